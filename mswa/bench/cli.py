"""`python -m mswa.bench <command>`: one argparse subcommand per benchmark module."""

import argparse
import importlib

import mswa.bench
from mswa.folders import FolderError, check_file

COMMANDS = ("attention", "model", "eval", "generate", "data", "hf")  # modules of mswa.bench


def main(argv=None):
    """Run one benchmark; returns what its `run` returns (the hf benchmark: its rows)."""
    parser = argparse.ArgumentParser(prog="python -m mswa.bench", description=mswa.bench.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mswa.bench.{name}").add_command(commands)
    args = parser.parse_args(argv)
    try:  # before the benchmark runs, not after
        check_file("--output", args.output)
    except FolderError as error:
        parser.exit(2, f"error: {error}\n")
    return args.run(args)
