"""`python -m training`: train one stage from a recipe (the same as `llava-manager train`; see `training.cli`)."""

import sys

from llava_manager.cli import run_main

from .cli import main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m training"))
