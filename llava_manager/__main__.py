"""`python -m llava_manager COMMAND ...`: the `llava-manager` command (see `llava_manager.cli`)."""

import sys

from .cli import drop_working_directory, main

if __name__ == "__main__":
    drop_working_directory()
    sys.exit(main())
