import sys

from llava_manager.cli import run_main

if sys.argv[1:2] == ["throughput"]:  # python -m benchmarks throughput ...: evaluation throughput against llava_hf
    from .throughput import main

    sys.exit(run_main(main, sys.argv[2:], prog="python -m benchmarks throughput"))

from .manager_cost import main

sys.exit(run_main(main, prog="python -m benchmarks"))
