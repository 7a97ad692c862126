"""`deepvis` command line. Each subcommand lives in its own module `cluster/cmd_<name>.py` with
`add_parser(subparsers)` and `run(args) -> int`; this file only wires them and turns user errors
into one line on stderr with exit code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module; order = order in `deepvis --help`
COMMANDS = ["demo", "build", "submit", "status", "query", "compare", "serve", "live", "optimize", "tune", "activations", "layers"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete, user-facing one-line error."""
    from deepvis.storage.errors import StoreError
    from deepvis.tasks.errors import UserError
    return (UserError, StoreError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepvis",
        description="Build and query a browsable atlas of what every unit of every layer of an image "
                    "network responds to (Yosinski et al. 2015), on a Ray cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `deepvis COMMAND --help` for the options of a command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"deepvis.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"deepvis.cli.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub).set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except user_errors() as e:
        print(f"deepvis {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepvis {args.command}: interrupted; finished work is kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
