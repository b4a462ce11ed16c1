import sys

from llava_manager.cli import run_main

from .manager_cost import main

sys.exit(run_main(main, prog="python -m benchmarks"))
