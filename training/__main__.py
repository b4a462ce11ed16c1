"""`python -m training`: train one stage from a recipe (see `training.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
