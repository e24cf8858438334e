"""The ``kms-async`` command line (also ``python -m kms_async``).

Each subcommand is a function that adds its parser and points
``set_defaults(run=...)`` at a coroutine taking the parsed arguments and
returning the exit status; :func:`main` runs it and turns a
:class:`~kms_async.KMSError` into ``error: <message>`` and status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from . import __version__
from ._demo import DEFAULT_DB, POSTGRES_SCHEMA, run_demo
from ._errors import KMSError

__all__ = ["build_parser", "main"]


def _prog() -> str:
    if os.path.basename(sys.argv[0]) == "__main__.py":
        return "python -m kms_async"
    return "kms-async"


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="walk through the key lifecycle on a throwaway database",
        description=(
            "Create keys for three tenants, encrypt rows, rotate, re-encrypt and revoke, "
            "printing one line per step. The database is rebuilt on every run: a SQLite "
            f"file is deleted and created again; on PostgreSQL the demo uses the schema "
            f"{POSTGRES_SCHEMA}, dropped and created again."
        ),
    )
    parser.add_argument(
        "--db",
        metavar="DSN",
        default=DEFAULT_DB,
        help=f"sqlite:///FILE or postgresql://... (default: {DEFAULT_DB})",
    )
    parser.set_defaults(run=_run_demo)


async def _run_demo(args: argparse.Namespace) -> int:
    await run_demo(args.db)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Envelope-encryption keys for asyncio services, kept in PostgreSQL or SQLite.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = asyncio.run(args.run(args))
    except KMSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output left (`| head`); stop without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status
