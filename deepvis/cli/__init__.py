"""`deepvis` command line. Each subcommand lives in its own module `deepvis/cli/<name>.py` with
`add_parser(subparsers)` and `run(args) -> int`; this file only wires them, sets up the `deepvis`
logger (-v / -q) and turns user errors into one line on stderr with exit code 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

log = logging.getLogger("deepvis")

# subcommand -> module; order = order in `deepvis --help`
COMMANDS = ["demo", "build", "submit", "status", "query", "compare", "serve", "live", "optimize", "tune", "activations", "layers"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete, user-facing one-line error."""
    from deepvis.storage.errors import StoreError
    from deepvis.tasks.errors import UserError
    return (UserError, StoreError)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("deepvis-atlas")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Handler(logging.Handler):
    """INFO and DEBUG to stdout, WARNING and above to stderr, as the bare message: at the default
    level a `log.info(m)` prints exactly what `print(m)` did. Looks sys.stdout up at each record,
    so redirected or captured streams are honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            print(self.format(record), file=stream, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def setup_logging(verbosity: int) -> None:
    """verbosity: -1 (-q: warnings and errors only), 0 (default: INFO), 1 (-v: DEBUG)."""
    log.setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity])
    for h in [h for h in log.handlers if isinstance(h, _Handler)]:
        log.removeHandler(h)  # main() may run more than once in a process (tests)
    log.addHandler(_Handler())
    log.propagate = False
    if verbosity < 0:
        # tqdm (>= 4.66) takes its defaults from TQDM_* variables when it is first imported, which the
        # commands do lazily, after this; Ray workers started from here inherit it too
        os.environ["TQDM_DISABLE"] = "1"


def _add_globals(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0,
                   help="more messages (debug level)")
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                   help="only warnings and errors; no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepvis",
        description="Build and query a browsable atlas of what every unit of every layer of an image "
                    "network responds to (Yosinski et al. 2015), on a Ray cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `deepvis COMMAND --help` for the options of a command.")
    _add_globals(p)
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
    setup_logging(args.verbosity)
    if args.verbosity < 0 and getattr(args, "progress", False) is None:
        args.progress = False  # `build -q` = `build --no-progress`
    log.debug("deepvis %s, Python %s, command %s", version(), sys.version.split()[0], args.command)
    try:
        return int(args._run(args) or 0)
    except user_errors() as e:
        log.error("deepvis %s: error: %s", args.command, e)
        return 2
    except KeyboardInterrupt:
        log.error("deepvis %s: interrupted; finished work is kept, re-run to resume", args.command)
        return 130


# Commands that only read an atlas end without the interpreter's teardown: pyarrow's (and torch's)
# native thread pools can abort a finished process there ("terminate called without an active
# exception", exit -6, about 1 run in 4 of `deepvis query`), after all output was written.
READ_ONLY = ("query", "status", "compare")


def run_and_exit(argv: list[str] | None = None) -> None:
    """The console script: main(), then exit; read-only commands skip the teardown (see READ_ONLY)."""
    code = main(argv)
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    if command in READ_ONLY:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_and_exit()
