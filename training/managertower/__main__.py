import sys

from llava_manager.cli import run_main

from .cli import main

sys.exit(run_main(main, prog="python -m training.managertower"))
