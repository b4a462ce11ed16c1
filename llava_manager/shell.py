"""`llava-manager script NAME [ARGS...]`: run one of the shipped shell scripts (cluster launches, evaluation phases).

The scripts travel inside the package (`llava_manager/scripts/*.sh`), so an installed wheel has them too; they run
with this Python (`PYTHON`), and read their settings from the environment as each script's header says.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .cli import UsageError

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"


def script_names() -> list[str]:
    """The shipped scripts, without their `.sh`."""
    return sorted(path.stem for path in SCRIPTS_DIR.glob("*.sh"))


def script_header(name: str) -> str:
    """The comment block at the top of a script: what it runs and which settings it reads."""
    lines = (SCRIPTS_DIR / f"{name}.sh").read_text().splitlines()[1:]
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#").removeprefix(" "))
    return "\n".join(header)


def main(argv: list[str] | None = None, prog: str = "python -m llava_manager.shell") -> int:
    """Run the named script with the remaining arguments; return its exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        epilog="scripts: " + ", ".join(script_names()),
    )
    parser.add_argument("name", nargs="?", help="the script to run (see below); none: list them")
    parser.add_argument("--path", action="store_true", help="print the directory that holds the scripts")
    parser.add_argument("--show", action="store_true", help="print what the script does and reads, run nothing")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.path:
        print(SCRIPTS_DIR)
        return 0
    if args.name is None:
        for name in script_names():
            print(f"{name:<26} {script_header(name).splitlines()[0] if script_header(name) else ''}")
        return 0
    name = args.name.removesuffix(".sh")
    if name not in script_names():
        raise UsageError(f"unknown script {args.name!r}: expected one of {', '.join(script_names())}")
    if args.show:
        print(script_header(name))
        return 0
    bash = shutil.which("bash")
    if bash is None:
        raise UsageError("the scripts need bash, which is not on PATH")
    environment = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    return subprocess.run([bash, str(SCRIPTS_DIR / f"{name}.sh"), *args.args], env=environment, check=False).returncode


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main, prog="python -m llava_manager.shell"))
