"""The ``kms-async`` command line (also ``python -m kms_async``).

Each subcommand is a function that adds its parser and points
``set_defaults(run=...)`` at a coroutine taking the parsed arguments and
returning the exit status. :func:`main` runs it under :func:`asyncio.run`
and turns errors into the documented exit statuses (:data:`EXIT_CODES`).

Ctrl-C (SIGINT) and SIGTERM cancel the running command. Every write the
library makes is one transaction that rolls back when cancelled, and the bulk
commands commit in batches of whole scopes (or rows), so an interrupted run
leaves nothing half-written and can simply be run again.

Errors that name a fix carry it as data (``KMSError.remedy``); the advice
printed here names the command to run, not the library's Python call.

Nothing printed here is key material: only ids, counts and timestamps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import decimal
import json
import os
import re
import shlex
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn, TypeVar

from . import __version__
from ._demo import DEFAULT_DB, POSTGRES_SCHEMA, run_demo
from ._errors import (
    InvalidParameterError,
    KeyExistsError,
    KeyInUseError,
    KeyNotFoundError,
    KMSError,
    Remedy,
    RevokeTooSoonError,
    SchemaVersionError,
    StorageError,
)
from ._kms import DEFAULT_REVOKE_GRACE, KMS
from ._migrations import SCHEMA_VERSION, migrate
from ._progress import Progress
from ._reencrypt import EncryptedColumn, VersionUsage
from ._root_wrapper import (
    AWS_KEY_ENV,
    PKCS11_KEY_LABEL_ENV,
    PKCS11_LIB_ENV,
    PKCS11_PIN_ENV,
    PKCS11_TOKEN_ENV,
    PREVIOUS_KEY_ENV,
    PREVIOUS_KEY_FILE_ENV,
    PREVIOUS_KEY_ID_ENV,
    ROOT_KEY_ENV,
    ROOT_KEY_FILE_ENV,
    ROOT_KEY_ID_ENV,
    open_root_wrapper,
)
from ._sql import prepare_dsn
from ._types import ROOT_PURPOSE, CensusRow, Key, KeyVersion, KeyVersionInfo, RotationPolicy, Scope
from ._wrappers import PooledWrapper, Wrapper

__all__ = ["EXIT_CODES", "build_parser", "main"]

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_SCHEMA = 5
EXIT_STORAGE = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: Exit status -> what it means; the ``--help`` epilog and the docs print it.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "any other error (a wrapper or decryption failure, ...)",
    EXIT_USAGE: "usage or configuration error: bad arguments, no --db, no root key",
    EXIT_NOT_FOUND: "not found: no such scope, key or key version",
    EXIT_REFUSED: (
        "refused: the key version is still in use, the keys already exist, or revoke "
        "was not confirmed"
    ),
    EXIT_SCHEMA: "schema missing or at another version: run `migrate`",
    EXIT_STORAGE: "the database failed; the message says when a plain retry may work",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing half-written, run it again to continue",
    EXIT_TERMINATED: "stopped by SIGTERM; nothing half-written, run it again to continue",
}

INTERRUPTED_MESSAGE = "interrupted; nothing half-written \N{EM DASH} rerun to continue"

DSN_ENV = "KMS_DATABASE_URL"
PREFIX_ENV = "KMS_TABLE_PREFIX"
PURPOSES_ENV = "KMS_PURPOSES"

DEFAULT_SCOPE_BATCH = 1000
DEFAULT_ROW_BATCH = 500
DEFAULT_CONNECT_TIMEOUT = 10.0

_COLUMN_FIELDS = {
    "table": True,
    "ciphertext_column": True,
    "key_version_column": True,
    "scope_column": True,
    "purpose": True,
    "aad_template": False,
    "primary_key": False,
}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _Interrupted(Exception):
    """The command was cancelled by a signal and has finished cleaning up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors can come out as JSON."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            _print_json_error("UsageError", f"{self.prog}: {message}", EXIT_USAGE)
            raise SystemExit(EXIT_USAGE)
        super().error(message)

    def _print_message(self, message: str, file: Any = None) -> None:
        # Arguments may hold lone surrogates (undecodable bytes in argv).
        super()._print_message(_printable(message) if message else message, file)


def _prog() -> str:
    if os.path.basename(sys.argv[0]) == "__main__.py":
        return "python -m kms_async"
    return "kms-async"


# -- argument types ---------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _duration(text: str) -> float:
    """Seconds from a duration such as ``60``, ``45s``, ``2m`` or ``1h``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (a number with s, m, h, d or w, e.g. 90s)"
        )
    return float(match[1]) * _SECONDS[match[2]]


def _age_or_time(text: str) -> datetime.timedelta | datetime.datetime:
    """A duration (``90d``, ``12h``, ``30m``, ``45s``, ``2w``) or an ISO 8601 instant."""
    match = _DURATION.fullmatch(text.strip())
    if match is not None:
        return datetime.timedelta(seconds=float(match[1]) * _SECONDS[match[2]])
    try:
        when = datetime.datetime.fromisoformat(
            text.strip().replace("Z", "+00:00").replace("z", "+00:00")
        )
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (a number with s, m, h, d or w, e.g. 90d) "
            "nor a time (e.g. 2025-01-31T12:00:00Z)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)


def _max_age(text: str) -> float:
    """Seconds, more than 0, from a duration such as ``90d``, ``12h`` or ``30m``."""
    seconds = _duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return seconds


def _count(text: str) -> int:
    """A whole number of at least 0, also written like ``1e9`` or ``1_000_000``."""
    try:
        value = decimal.Decimal(text.strip().replace("_", ""))
    except decimal.InvalidOperation:
        value = decimal.Decimal("NaN")
    if not value.is_finite() or value != value.to_integral_value() or not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of at least 0 (e.g. 1000000 or 1e9)"
        )
    return int(value)


def _timeout(text: str) -> float:
    """Seconds, more than 0: ``10``, ``2.5`` or a duration such as ``30s``."""
    seconds = _duration(text)
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most a day")
    return seconds


def _purpose_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# -- the parser -------------------------------------------------------------


#: The global options' values when none is given (see _global_options).
_GLOBAL_DEFAULTS: dict[str, object] = {
    "db": None,
    "table_prefix": None,
    "purposes": None,
    "json": False,
    "progress": "auto",
    "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
}


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The database and output options, accepted before or after the command.

    The top-level parser holds the defaults; each command's copy suppresses
    them, so that an option given before the command is not reset by the
    command's parser (argparse lets a subparser's defaults win).
    """

    def default(name: str) -> dict[str, Any]:
        return {"default": _GLOBAL_DEFAULTS[name] if defaults else argparse.SUPPRESS}

    group = parser.add_argument_group("database and output (before or after the command)")
    group.add_argument(
        "--db",
        metavar="DSN",
        help=f"postgresql://... or sqlite:///FILE (default: ${DSN_ENV})",
        **default("db"),
    )
    group.add_argument(
        "--table-prefix",
        metavar="PREFIX",
        help=f"the tables' name prefix (default: ${PREFIX_ENV}, else kms)",
        **default("table_prefix"),
    )
    group.add_argument(
        "--purposes",
        metavar="A,B",
        type=_purpose_list,
        help=(
            "the data key purposes your application uses, comma-separated "
            f"(default: ${PURPOSES_ENV}, else database)"
        ),
        **default("purposes"),
    )
    group.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=_timeout,
        help=(
            "give up on a database server that does not answer within SECONDS "
            f"(default: {DEFAULT_CONNECT_TIMEOUT:g})"
        ),
        **default("connect_timeout"),
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="machine output: one JSON document on stdout; errors as a JSON object on stderr",
        **default("json"),
    )
    group.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        help="progress on stderr: auto shows it on a terminal only (never with --json)",
        **default("progress"),
    )


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    return common


def _root_options() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(add_help=False)
    group = root.add_argument_group(
        "root key (choose one; default: the base64 key in $KMS_ROOT_KEY)"
    )
    group.add_argument(
        "--root-key-env",
        metavar="NAME",
        help=f"environment variable holding the base64 of a 32-byte key (default: {ROOT_KEY_ENV})",
    )
    group.add_argument(
        "--root-key-file",
        metavar="PATH",
        help=f"file holding the key, raw or base64 (default: ${ROOT_KEY_FILE_ENV})",
    )
    group.add_argument(
        "--root-key-id",
        metavar="ID",
        help=(
            "key id recorded with what a local root key wraps "
            f"(default: ${ROOT_KEY_ID_ENV}, else a fingerprint of the key)"
        ),
    )
    group.add_argument(
        "--aws-kms-key-id",
        metavar="KEY",
        help=f"AWS KMS key id, ARN or alias (default: ${AWS_KEY_ENV})",
    )
    group.add_argument("--aws-region", metavar="REGION", help="AWS region of the KMS key")
    group.add_argument("--aws-endpoint-url", metavar="URL", help="AWS KMS endpoint (testing)")
    group.add_argument(
        "--pkcs11-lib",
        metavar="PATH",
        help=f"the HSM's PKCS#11 module (default: ${PKCS11_LIB_ENV}); PIN from ${PKCS11_PIN_ENV}",
    )
    group.add_argument(
        "--pkcs11-token",
        metavar="LABEL",
        help=f"token label (default: ${PKCS11_TOKEN_ENV})",
    )
    group.add_argument(
        "--pkcs11-key-label",
        metavar="LABEL",
        help=f"AES key label (default: ${PKCS11_KEY_LABEL_ENV})",
    )
    previous = root.add_argument_group(
        "previous root key (while replacing a local root key, until rewrap has run everywhere)"
    )
    previous.add_argument(
        "--previous-root-key-env",
        metavar="NAME",
        help=f"environment variable holding the old key, base64 (default: ${PREVIOUS_KEY_ENV})",
    )
    previous.add_argument(
        "--previous-root-key-file",
        metavar="PATH",
        help=f"file holding the old key, raw or base64 (default: ${PREVIOUS_KEY_FILE_ENV})",
    )
    previous.add_argument(
        "--previous-root-key-id",
        metavar="ID",
        help=(
            f"the old key's id (default: ${PREVIOUS_KEY_ID_ENV}, else a fingerprint of the key); "
            "it must be the id the old key wrote"
        ),
    )
    return root


def _scope_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("scopes", nargs="*", metavar="SCOPE", help=f"scope ids to {verb}")
    parser.add_argument(
        "--all-scopes",
        action="store_true",
        help=f"{verb} every scope that has keys",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_SCOPE_BATCH,
        metavar="N",
        help=f"scopes per transaction (default: {DEFAULT_SCOPE_BATCH})",
    )


def _columns_argument(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--columns",
        metavar="FILE",
        required=required,
        help=(
            "JSON list of the encrypted columns: objects with table, ciphertext_column, "
            "key_version_column, scope_column, purpose, and optionally aad_template "
            '(e.g. "{id}") and primary_key (default ["id"])'
        ),
    )


_COLUMNS_EXAMPLE = """\
columns file (--columns), one object per encrypted column:
  [{"table": "app_secret", "ciphertext_column": "ciphertext",
    "key_version_column": "key_version_id", "scope_column": "tenant_id",
    "purpose": "database", "aad_template": "{id}", "primary_key": ["id"]}]
"""


class _Adder:
    """Adds subparsers that share the common options and help layout."""

    def __init__(self, commands: Any) -> None:
        self.commands = commands
        self.common = _common_options()
        self.root = _root_options()

    def add(
        self,
        name: str,
        *,
        help: str,
        description: str,
        epilog: str,
        root_key: bool,
    ) -> argparse.ArgumentParser:
        parents = [self.common, self.root] if root_key else [self.common]
        parser: argparse.ArgumentParser = self.commands.add_parser(
            name,
            help=help,
            # RawDescriptionHelpFormatter keeps the epilog's layout; wrap the prose here.
            description=textwrap.fill(description, 79, break_on_hyphens=False),
            epilog=epilog,
            parents=parents,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(needs_root_key=root_key)
        return parser


def _add_demo(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="walk through the key lifecycle on a throwaway database",
        description=textwrap.fill(
            "Create keys for three tenants, encrypt rows, rotate, re-encrypt and revoke, "
            "printing one line per step. The database is rebuilt on every run: a SQLite "
            f"file is deleted and created again; on PostgreSQL the demo uses the schema "
            f"{POSTGRES_SCHEMA}, dropped and created again.",
            79,
            break_on_hyphens=False,
        ),
        epilog=(
            "example:\n"
            "  %(prog)s\n"
            "  %(prog)s --db postgresql://postgres@localhost/scratch\n\n"
            f"The demo never reads ${DSN_ENV}: it would rebuild your database."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--db",
        metavar="DSN",
        default=argparse.SUPPRESS,
        help=f"sqlite:///FILE or postgresql://... (default: {DEFAULT_DB})",
    )
    parser.set_defaults(run=_run_demo)


async def _run_demo(args: argparse.Namespace) -> int:
    if args.json:
        raise InvalidParameterError("the demo prints text for people; run it without --json")
    await run_demo(args.db or DEFAULT_DB)
    return EXIT_OK


def _add_migrate(adder: _Adder) -> None:
    parser = adder.add(
        "migrate",
        help="create or upgrade the key tables",
        description=(
            "Apply the schema files the database lacks, each in its own transaction. "
            "Running it again, or from several processes at once, is harmless."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s --db postgresql://app@db.internal/app\n"
            f"  {DSN_ENV}=sqlite:///app.db %(prog)s --table-prefix billing_kms"
        ),
        root_key=False,
    )
    parser.set_defaults(run=_run_migrate)


def _add_create(adder: _Adder) -> None:
    parser = adder.add(
        "create",
        help="create the root key and data keys of new scopes",
        description=(
            "Create a root key and one data key per purpose for each scope, all in one "
            "transaction: if any scope already has keys, nothing is created (exit 4)."
        ),
        epilog=(
            "example:\n"
            "  export KMS_ROOT_KEY=$(python -c "
            "'import os,base64;print(base64.b64encode(os.urandom(32)).decode())')\n"
            "  %(prog)s --db sqlite:///app.db acme globex --purposes database,oidc\n"
            "  %(prog)s acme --purpose database"
        ),
        root_key=True,
    )
    parser.add_argument("scopes", nargs="+", metavar="SCOPE", help="scope ids to create keys for")
    parser.add_argument(
        "--purpose",
        action="append",
        metavar="P",
        dest="only_purposes",
        help="create only this purpose's data key (repeatable; default: every --purposes)",
    )
    parser.set_defaults(run=_run_create)


def _add_scopes(adder: _Adder) -> None:
    parser = adder.add(
        "scopes",
        help="list the scopes that have keys",
        description=(
            "Print every scope that has keys, in the database's order of scope ids, with its "
            "newest root key version and when the scope was last rotated. Read page by page, "
            "so it streams millions of scopes."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s\n"
            "  %(prog)s --json | jq -r '.scopes[].id'\n"
            "  %(prog)s --after acme --limit 100"
        ),
        root_key=False,
    )
    parser.add_argument(
        "--after", metavar="SCOPE", help="start after this scope id (the last one of a page)"
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="print at most N scopes (default: all)"
    )
    parser.set_defaults(run=_run_scopes)


def _add_list(adder: _Adder) -> None:
    parser = adder.add(
        "list",
        help="show a scope's keys and their versions",
        description="Print the scope's root key and data keys with every version, oldest first.",
        epilog=("example:\n  %(prog)s acme\n  %(prog)s acme --json | jq '.keys[].versions[].id'"),
        root_key=False,
    )
    parser.add_argument("scope", metavar="SCOPE", help="the scope id")
    parser.set_defaults(run=_run_list)


def _add_rotate(adder: _Adder) -> None:
    parser = adder.add(
        "rotate",
        help="add new key versions for scopes",
        description=(
            "Add a new root key version and a new version of every data key the scope has, "
            "whatever --purposes says; new data is encrypted with them and old data still "
            "decrypts. Scopes are "
            "rotated --batch-size at a time, each batch one transaction, so an interrupted "
            "run never leaves a scope half-rotated. With --rewrap every existing version "
            "is also re-wrapped under the new root key version. --older-than skips scopes "
            "rotated recently, which also makes an interrupted run resumable."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s acme globex --rewrap\n"
            "  %(prog)s --all-scopes --older-than 90d\n"
            "  %(prog)s --due --max-age 90d --max-encryptions 1e9\n"
            "  %(prog)s acme --replace-unusable  # past versions under another root key\n\n"
            "Every data key of each scope is rotated, whatever --purposes says. With --due,\n"
            "a scope is due when the newest version of any of its data keys is at least\n"
            "--max-age old or has more than --max-encryptions encryptions counted (summed\n"
            "over every instance); instances running it at once rotate each scope once."
        ),
        root_key=True,
    )
    _scope_arguments(parser, "rotate")
    parser.add_argument(
        "--rewrap",
        action="store_true",
        help="also re-wrap every existing version under the new root key version",
    )
    parser.add_argument(
        "--replace-unusable",
        action="store_true",
        help=(
            "when a scope's newest root key version was written under another root key "
            "(status shows it UNUSABLE), rotate past it if this root key unwraps an older "
            "version; then revoke the unusable versions"
        ),
    )
    parser.add_argument(
        "--older-than",
        type=_age_or_time,
        metavar="AGE|TIME",
        help=(
            "only scopes whose newest root key version is at least AGE old (e.g. 90d, 12h) "
            "or was made before TIME (e.g. 2025-01-31T12:00:00Z), by the database's clock"
        ),
    )
    due = parser.add_argument_group("rotation by policy")
    due.add_argument(
        "--due",
        action="store_true",
        help=(
            "rotate every scope (or every SCOPE given) due under --max-age and "
            "--max-encryptions, checked again under the database's write lock"
        ),
    )
    due.add_argument(
        "--max-age",
        type=_max_age,
        metavar="AGE",
        help="with --due: newest data key versions at least AGE old (e.g. 90d, 12h, 30m)",
    )
    due.add_argument(
        "--max-encryptions",
        type=_count,
        metavar="N",
        help="with --due: newest data key versions with more than N encryptions (e.g. 1e9)",
    )
    parser.set_defaults(run=_run_rotate)


def _add_census(adder: _Adder) -> None:
    parser = adder.add(
        "census",
        help="list every data key version with its age, use and rows",
        description=(
            "Print every data key version (of one scope, or of all) with when it was made, "
            "how many encryptions every instance has counted under it (as flushed to the "
            "usage table, schema file 07), whether it is suspended and whether it is the "
            "newest. --rows also counts the application rows that reference each version "
            "through foreign keys, which scans those tables. --png draws the versions by age "
            "and by rows protected or encryptions (needs matplotlib: "
            "pip install 'kms-async[census-png]')."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s\n"
            "  %(prog)s --scope acme --rows\n"
            "  %(prog)s --json | jq '.versions[] | select(.encryptions > 1e9)'\n"
            "  %(prog)s --rows --png census.png"
        ),
        root_key=False,
    )
    parser.add_argument("--scope", metavar="SCOPE", help="only this scope (default: all)")
    parser.add_argument(
        "--rows",
        action="store_true",
        help="count the rows referencing each version (scans the referencing tables)",
    )
    parser.add_argument("--png", metavar="FILE", help="also draw the census as a PNG image")
    parser.set_defaults(run=_run_census)


def _add_rewrap(adder: _Adder) -> None:
    parser = adder.add(
        "rewrap",
        help="re-wrap every key version under the current root key",
        description=(
            "Re-wrap root key versions with the root key given here and data key versions "
            "with the newest root key version, making no new versions; run it for every "
            "scope after replacing the root key. Batches of --batch-size scopes, each one "
            "transaction."
        ),
        epilog=(
            "example (replacing a local root key):\n"
            "  %(prog)s --all-scopes --root-key-file /run/secrets/new-root-key \\\n"
            "      --previous-root-key-file /run/secrets/old-root-key\n"
            "  %(prog)s acme"
        ),
        root_key=True,
    )
    _scope_arguments(parser, "rewrap")
    parser.set_defaults(run=_run_rewrap)


def _add_bind(adder: _Adder) -> None:
    parser = adder.add(
        "bind",
        help="bind existing key versions to their place (for integrity='strict')",
        description=(
            "Write a binding for every key version that has none (written by the Go package "
            "or before schema file 06) and seal each scope's key state record, so that "
            "integrity='strict' accepts them; see SECURITY.md. Versions whose binding does "
            "not match are left refused. Batches of --batch-size scopes, each one "
            "transaction; scopes already bound are skipped, so running it again resumes."
        ),
        epilog="example:\n  %(prog)s --all-scopes\n  %(prog)s acme globex",
        root_key=True,
    )
    _scope_arguments(parser, "bind")
    parser.set_defaults(run=_run_bind)


def _add_reconcile(adder: _Adder) -> None:
    parser = adder.add(
        "reconcile",
        help="create whatever keys are missing for scopes and purposes",
        description=(
            "Create the missing root keys and data keys, for example after adding a purpose "
            "to your application. Prints the (scope, purpose) pairs created."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s --all-scopes --purpose oidc\n"
            "  %(prog)s acme globex --purposes database,oidc"
        ),
        root_key=True,
    )
    _scope_arguments(parser, "reconcile")
    parser.add_argument(
        "--purpose",
        action="append",
        metavar="P",
        dest="only_purposes",
        help="reconcile this purpose (repeatable; default: every --purposes)",
    )
    parser.set_defaults(run=_run_reconcile)


def _add_revoke(adder: _Adder) -> None:
    parser = adder.add(
        "revoke",
        help="delete one key version for good, if nothing uses it",
        description=(
            "Delete a root (krkv_...) or data (kdkv_...) key version. It first shows the "
            "version (scope, purpose, number, creation) and how many rows reference it "
            "through foreign keys, then asks for confirmation on a terminal; without one it "
            "needs --yes. Refused with exit 4 for the newest version of a key, a root version "
            "still wrapping data key versions (rewrap first) and a data version whose rows "
            "still exist (reencrypt first)."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s kdkv_3kTmZ8vQ1a --dry-run\n"
            "  %(prog)s kdkv_3kTmZ8vQ1a --scope acme\n"
            "  %(prog)s kdkv_3kTmZ8vQ1a --scope acme --yes --json   # from a script"
        ),
        root_key=True,
    )
    parser.add_argument("version_id", metavar="VERSION_ID", help="the key version id")
    parser.add_argument("--scope", metavar="SCOPE", help="refuse unless it belongs to SCOPE")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would be deleted and what references it; delete nothing",
    )
    parser.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (needed when stdin is not a terminal)",
    )
    _grace_arguments(parser)
    parser.set_defaults(run=_run_revoke)


def _add_suspend(adder: _Adder) -> None:
    for name, verb, description in (
        (
            "suspend",
            "refuse decryption under a data key version, reversibly",
            "Suspend a data key version (kdkv_...): every instance refuses to decrypt under "
            "it within its max_staleness, until it is resumed. Suspend a version before "
            "revoking it, and watch for errors: whatever still needs it fails in a way "
            "'resume' undoes. The newest version of a key cannot be suspended (rotate first). "
            "The Go package ignores suspension.",
        ),
        (
            "resume",
            "undo suspend: decrypt under the version again",
            "Resume a suspended data key version (kdkv_...): instances decrypt under it "
            "again within their max_staleness.",
        ),
    ):
        parser = adder.add(
            name,
            help=verb,
            description=description,
            epilog="example:\n  %(prog)s kdkv_3kTmZ8vQ1a --scope acme",
            root_key=False,
        )
        parser.add_argument("version_id", metavar="VERSION_ID", help="the data key version id")
        parser.add_argument("--scope", metavar="SCOPE", help="refuse unless it belongs to SCOPE")
        parser.set_defaults(run=_run_suspend, suspend=name == "suspend")


async def _run_suspend(args: argparse.Namespace) -> int:
    async with _open_kms(args, root_key=False) as kms:
        if args.suspend:
            await kms.suspend_key_version(args.version_id, scope_id=args.scope)
        else:
            await kms.resume_key_version(args.version_id, scope_id=args.scope)
    done = "suspended" if args.suspend else "resumed"
    _out(args, {done: args.version_id}, f"{done} {args.version_id}")
    return EXIT_OK


def _grace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grace",
        type=_duration,
        default=DEFAULT_REVOKE_GRACE,
        metavar="DURATION",
        help=(
            "refuse (exit 4) while the version has been superseded for less than this, by the "
            "database clock: other instances may still encrypt under it. It must exceed 4 x "
            f"the largest max_staleness of your services (default: {DEFAULT_REVOKE_GRACE:g}s)"
        ),
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="if the version was superseded too recently, wait until the grace has passed",
    )


def _add_reencrypt(adder: _Adder) -> None:
    parser = adder.add(
        "reencrypt",
        help="re-encrypt the rows a data key version protects under the newest version",
        description=(
            "Decrypt every row of the --columns tables still using VERSION_ID and encrypt it "
            "again under the newest version of its key, --batch-size rows per transaction. "
            "Interrupted, it keeps the batches done; run it again to continue."
        ),
        epilog=(
            "example:\n  %(prog)s kdkv_3kTmZ8vQ1a --columns columns.json\n\n" + _COLUMNS_EXAMPLE
        ),
        root_key=True,
    )
    _add_version_work_arguments(parser, dry_run=False)
    parser.set_defaults(run=_run_reencrypt)


def _add_destroy(adder: _Adder) -> None:
    parser = adder.add(
        "destroy",
        help="re-encrypt a data key version's rows, then revoke it",
        description=(
            "Re-encrypt, then revoke: afterwards nothing can decrypt with VERSION_ID. "
            "It first shows how many rows the version protects, then asks for confirmation "
            "on a terminal; without one it needs --yes. "
            "--dry-run only counts the rows it would re-encrypt (no root key needed)."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s kdkv_3kTmZ8vQ1a --columns columns.json --dry-run\n"
            "  %(prog)s kdkv_3kTmZ8vQ1a --columns columns.json --batch-size 2000\n"
            "  %(prog)s kdkv_3kTmZ8vQ1a --columns columns.json --yes   # from a script\n\n"
            + _COLUMNS_EXAMPLE
        ),
        root_key=True,
    )
    _add_version_work_arguments(parser, dry_run=True)
    parser.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (needed when stdin is not a terminal)",
    )
    _grace_arguments(parser)
    parser.set_defaults(run=_run_destroy)


def _add_version_work_arguments(parser: argparse.ArgumentParser, *, dry_run: bool) -> None:
    parser.add_argument("version_id", metavar="VERSION_ID", help="the data key version id")
    _columns_argument(parser, required=True)
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_ROW_BATCH,
        metavar="N",
        help=f"rows per transaction (default: {DEFAULT_ROW_BATCH})",
    )
    if dry_run:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print the rows that use the version and change nothing",
        )


def _add_status(adder: _Adder) -> None:
    parser = adder.add(
        "status",
        help="key versions per scope, and the rows each still protects",
        description=(
            "Print every key version of the scopes (default: every scope) with its state: "
            "active, suspended, or UNUSABLE when the root key given (if any) cannot unwrap "
            "it. With --columns, also the rows of each table that each data key version "
            "still protects."
        ),
        epilog=(
            "example:\n"
            "  %(prog)s acme\n"
            "  %(prog)s --columns columns.json --json\n\n" + _COLUMNS_EXAMPLE
        ),
        root_key=True,
    )
    parser.add_argument("scopes", nargs="*", metavar="SCOPE", help="scope ids (default: all)")
    _columns_argument(parser, required=False)
    parser.set_defaults(run=_run_status)


def _exit_code_epilog() -> str:
    lines = ["exit status:"]
    lines += [f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items()]
    lines += [
        "",
        "environment:",
        f"  {DSN_ENV}, {PREFIX_ENV}, {PURPOSES_ENV}: defaults of --db, --table-prefix, --purposes",
        f"  {ROOT_KEY_ENV} (base64), {ROOT_KEY_FILE_ENV}, {ROOT_KEY_ID_ENV}, {AWS_KEY_ENV},",
        f"  {PKCS11_LIB_ENV}, {PKCS11_TOKEN_ENV}, {PKCS11_KEY_LABEL_ENV}, {PKCS11_PIN_ENV},",
        f"  {PREVIOUS_KEY_ENV}, {PREVIOUS_KEY_FILE_ENV}, {PREVIOUS_KEY_ID_ENV}",
        "",
        "example:",
        f"  export {DSN_ENV}=postgresql://app@db.internal/app",
        "  %(prog)s migrate && %(prog)s create acme && %(prog)s list acme",
        "  %(prog)s --json scopes",
        "  %(prog)s COMMAND --help",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand."""
    parser = _Parser(
        prog=_prog(),
        description="Envelope-encryption keys for asyncio services, kept in PostgreSQL or SQLite.",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    adder = _Adder(commands)
    _add_migrate(adder)
    _add_create(adder)
    _add_scopes(adder)
    _add_list(adder)
    _add_status(adder)
    _add_census(adder)
    _add_rotate(adder)
    _add_rewrap(adder)
    _add_bind(adder)
    _add_reconcile(adder)
    _add_suspend(adder)
    _add_revoke(adder)
    _add_reencrypt(adder)
    _add_destroy(adder)
    _add_demo(commands)
    return parser


# -- configuration ----------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _dsn(args: argparse.Namespace) -> str:
    """The database URL, checked for a command line: every run opens the database anew,
    so an in-memory one is refused, and --connect-timeout applies where it can."""
    dsn = args.db or _env(DSN_ENV)
    if not dsn:
        raise InvalidParameterError(
            f"no database given: pass --db postgresql://... or --db sqlite:///FILE, "
            f"or set {DSN_ENV}"
        )
    prepared = prepare_dsn(str(dsn), connect_timeout=args.connect_timeout, in_memory=False)
    args.added_connect_timeout = prepared != dsn
    return prepared


def _prefix(args: argparse.Namespace) -> str:
    return str(args.table_prefix or _env(PREFIX_ENV) or "kms")


def _purposes(args: argparse.Namespace, *extra: Iterable[str]) -> list[str]:
    purposes = args.purposes
    if purposes is None:
        purposes = _purpose_list(_env(PURPOSES_ENV) or "database")
    if not purposes:
        raise InvalidParameterError("--purposes lists no purpose; write e.g. --purposes database")
    merged = list(purposes)
    for more in extra:
        merged += [p for p in more if p not in merged]
    return merged


_ROOT_KEY_FLAGS = {
    "--pkcs11-lib": "pkcs11_lib",
    "--aws-kms-key-id": "aws_kms_key_id",
    "--root-key-file": "root_key_file",
    "--root-key-env": "root_key_env",
}


def _root_key_given(args: argparse.Namespace) -> bool:
    """Whether the options or the environment name a root key (where it is optional)."""
    return any(getattr(args, name) for name in _ROOT_KEY_FLAGS.values()) or any(
        _env(name) for name in (ROOT_KEY_ENV, ROOT_KEY_FILE_ENV, AWS_KEY_ENV, PKCS11_LIB_ENV)
    )


def _root_wrapper(args: argparse.Namespace) -> AbstractAsyncContextManager[Wrapper]:
    """The root wrapper the options (else the environment) choose."""
    given = [flag for flag, name in _ROOT_KEY_FLAGS.items() if getattr(args, name)]
    if len(given) > 1:
        # Checked here too, to name the options rather than the library's arguments.
        raise InvalidParameterError(f"{' and '.join(given)} both name a root key; keep only one")
    return open_root_wrapper(
        key_env=args.root_key_env,
        key_file=args.root_key_file,
        key_id=args.root_key_id,
        aws_kms_key_id=args.aws_kms_key_id,
        aws_region=args.aws_region,
        aws_endpoint_url=args.aws_endpoint_url,
        pkcs11_lib=args.pkcs11_lib,
        pkcs11_token=args.pkcs11_token,
        pkcs11_key_label=args.pkcs11_key_label,
        previous_key_env=args.previous_root_key_env,
        previous_key_file=args.previous_root_key_file,
        previous_key_id=args.previous_root_key_id,
    )


def _load_columns(path: str) -> list[EncryptedColumn]:
    """The EncryptedColumn list described by the JSON file at ``path``."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise InvalidParameterError(
            f"cannot read columns file {path}: {exc.strerror or type(exc).__name__}"
        ) from exc
    except UnicodeDecodeError:
        raise InvalidParameterError(f"columns file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(
            f"columns file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg})"
        ) from None
    if not isinstance(data, list) or not data:
        raise InvalidParameterError(
            f"columns file {path} must hold a non-empty JSON list of objects, one per "
            'encrypted column: [{"table": ..., "ciphertext_column": ..., ...}]'
        )
    columns = []
    for n, entry in enumerate(data, 1):
        where = f"columns file {path}, entry {n}"
        if not isinstance(entry, dict):
            raise InvalidParameterError(f"{where} is {type(entry).__name__}, not an object")
        unknown = sorted(set(entry) - set(_COLUMN_FIELDS))
        if unknown:
            raise InvalidParameterError(
                f"{where} has unknown field(s) {', '.join(unknown)}; the fields are "
                f"{', '.join(_COLUMN_FIELDS)}"
            )
        for field, required in _COLUMN_FIELDS.items():
            value = entry.get(field)
            if field == "primary_key":
                if value is not None and (
                    not isinstance(value, list)
                    or not value
                    or not all(isinstance(c, str) and c for c in value)
                ):
                    raise InvalidParameterError(
                        f'{where}: primary_key must be a list of column names, e.g. ["id"]'
                    )
            elif value is None:
                if required:
                    raise InvalidParameterError(f"{where} lacks {field!r}")
            elif not isinstance(value, str) or not value:
                raise InvalidParameterError(f"{where}: {field} must be a non-empty string")
        kwargs: dict[str, Any] = {
            "table": entry["table"],
            "ciphertext_column": entry["ciphertext_column"],
            "key_version_column": entry["key_version_column"],
            "scope": entry["scope_column"],
            "purpose": entry["purpose"],
            "aad": entry.get("aad_template"),
        }
        if entry.get("primary_key") is not None:
            kwargs["primary_key"] = tuple(entry["primary_key"])
        try:
            columns.append(EncryptedColumn(**kwargs))
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{where}: {exc}") from exc
    return columns


def _column_purposes(columns: Sequence[EncryptedColumn]) -> list[str]:
    return list(dict.fromkeys(c.purpose for c in columns))


# -- running ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _open_kms(
    args: argparse.Namespace, *, root_key: bool, purposes: Iterable[str] = ()
) -> AsyncIterator[KMS]:
    """A KMS for one short command: no background refresh, no listener."""
    dsn, prefix, wanted = _dsn(args), _prefix(args), _purposes(args, purposes)
    async with contextlib.AsyncExitStack() as stack:
        wrapper = await stack.enter_async_context(_root_wrapper(args)) if root_key else None
        if wrapper is not None:
            # For advice about a root key that cannot unwrap what is stored.
            pooled = wrapper.key_ids() if isinstance(wrapper, PooledWrapper) else []
            args.root_key_ids = pooled or [wrapper.key_id]
        kms = await KMS.open(
            dsn,
            purposes=wanted,
            root_wrapper=wrapper,
            table_prefix=prefix,
            max_staleness=None,
            notifications=False,
            revoke_grace=getattr(args, "grace", DEFAULT_REVOKE_GRACE),
        )
        async with kms:
            yield kms


def _progress(args: argparse.Namespace, label: str, total: int | None, unit: str) -> Progress:
    tty = sys.stderr.isatty()
    enabled = not args.json and (args.progress == "always" or (args.progress == "auto" and tty))
    return Progress(label, total, unit=unit, stream=sys.stderr, enabled=enabled, in_place=tty)


def _out(args: argparse.Namespace, data: object, text: str | Sequence[str]) -> None:
    if args.json:
        print(_dumps(data))
        return
    lines = [text] if isinstance(text, str) else text
    for line in lines:
        print(line)


def _dumps(data: object) -> str:
    """JSON text, UTF-8 where it can be: text with lone surrogates (from argv) is escaped."""
    text = json.dumps(data, default=_json_default, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, default=_json_default)
    return text


def _printable(text: str) -> str:
    """``text`` with lone surrogates (from argv) written as escapes, so any stream takes it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_default(value: object) -> object:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, frozenset, set)):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _when(value: datetime.datetime) -> str:
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _iso(value: datetime.datetime) -> str:
    return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


async def _scopes(args: argparse.Namespace, kms: KMS) -> list[str]:
    if args.all_scopes and args.scopes:
        raise InvalidParameterError("give scope ids or --all-scopes, not both")
    if args.all_scopes:
        return [scope.id async for scope in kms.iter_scopes()]
    if not args.scopes:
        raise InvalidParameterError("give the scope ids, or --all-scopes for every scope")
    return list(dict.fromkeys(args.scopes))


# -- commands ---------------------------------------------------------------


async def _run_migrate(args: argparse.Namespace) -> int:
    applied = await migrate(_dsn(args), table_prefix=_prefix(args))
    text = (
        f"applied {', '.join(applied)}; schema at {SCHEMA_VERSION}"
        if applied
        else f"nothing to apply; schema at {SCHEMA_VERSION}"
    )
    _out(args, {"applied": applied, "schema_version": SCHEMA_VERSION}, text)
    return EXIT_OK


async def _run_create(args: argparse.Namespace) -> int:
    only = args.only_purposes
    async with _open_kms(args, root_key=True, purposes=only or ()) as kms:
        scopes = list(args.scopes)
        purposes = list(only) if only else list(kms.purposes)
        await kms.create_keys_many(scopes, purposes)
    _out(
        args,
        {"created": scopes, "purposes": purposes},
        f"created keys for {len(scopes)} scope(s) ({', '.join(scopes[:10])}"
        f"{', ...' if len(scopes) > 10 else ''}); purposes: {', '.join(purposes)}",
    )
    return EXIT_OK


def _key_json(key: Key, usage: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    versions = []
    for v in key.versions:
        entry: dict[str, Any] = {
            "id": v.id,
            "version": v.version,
            "create_time": v.create_time,
            "suspended": v.suspended,
            "unusable": v.unusable,
            "bound": v.bound,
        }
        if usage is not None and key.type == "dek":
            tables = usage.get(v.id, {})
            entry["rows"] = sum(tables.values())
            entry["tables"] = tables
        versions.append(entry)
    return {
        "id": key.id,
        "type": key.type,
        "purpose": key.purpose,
        "create_time": key.create_time,
        "versions": versions,
    }


def _key_rows(
    keys: Sequence[Key], usage: dict[str, dict[str, int]] | None = None, scope: str | None = None
) -> list[list[object]]:
    rows: list[list[object]] = []
    for key in keys:
        for v in key.versions:
            row: list[object] = [] if scope is None else [scope]
            row += [key.purpose, key.type, key.id, v.version, v.id, _when(v.create_time), _state(v)]
            if usage is not None:
                if key.type == "dek":
                    tables = usage.get(v.id, {})
                    detail = ", ".join(f"{t} {n}" for t, n in sorted(tables.items()) if n)
                    row.append(f"{sum(tables.values())}" + (f" ({detail})" if detail else ""))
                else:
                    row.append("-")
            rows.append(row)
    return rows


_KEY_HEADERS = ["PURPOSE", "TYPE", "KEY", "VERSION", "VERSION ID", "CREATED", "STATE"]


def _state(version: KeyVersion) -> str:
    states = ["suspended"] if version.suspended else []
    if version.unusable is not None:
        states.append("UNUSABLE")
    if version.bound is False:
        states.append("unbound")
    return ",".join(states) or "active"


def _unusable_lines(keys: Iterable[tuple[str, Sequence[Key]]]) -> list[str]:
    """Why each unusable version is unusable, and the way out."""
    lines = []
    for scope, scope_keys in keys:
        for key in scope_keys:
            for v in key.versions:
                if v.unusable is not None:
                    lines.append(f"{v.id} ({scope}, {key.purpose}) is UNUSABLE: {v.unusable}")
    if lines:
        lines.append(
            f"if the root key given here is the right one: {_prog()} rotate SCOPE "
            f"--replace-unusable, then {_prog()} revoke each unusable version"
        )
    return lines


def _scope_json(scope: Scope) -> dict[str, Any]:
    newest = scope.newest_root_version
    return {
        "id": scope.id,
        "root_key_id": scope.root_key_id,
        "create_time": scope.create_time,
        "root_version": newest.version,
        "root_version_id": newest.id,
        "rotate_time": newest.create_time,
    }


async def _run_scopes(args: argparse.Namespace) -> int:
    """Stream the scopes page by page: one page in memory however many there are."""
    remaining = args.limit
    after = args.after
    count = 0
    width = 0
    async with _open_kms(args, root_key=False) as kms:
        if args.json:
            sys.stdout.write('{"scopes": [')
        while remaining is None or remaining > 0:
            size = DEFAULT_SCOPE_BATCH if remaining is None else min(remaining, DEFAULT_SCOPE_BATCH)
            page = await kms.list_scopes(after=after, limit=size)
            for scope in page:
                if args.json:
                    sys.stdout.write(", " if count else "")
                    sys.stdout.write(json.dumps(_scope_json(scope), default=_json_default))
                else:
                    if not width:
                        # Column widths from the first page; longer ids just push.
                        width = max(len("SCOPE"), *(len(s.id) for s in page))
                        print(f"{'SCOPE':<{width}}  ROOT VERSION  ROTATED               CREATED")
                    newest = scope.newest_root_version
                    print(
                        f"{scope.id:<{width}}  {newest.version:<12}  "
                        f"{_when(newest.create_time):<20}  {_when(scope.create_time)}"
                    )
                count += 1
            if remaining is not None:
                remaining -= len(page)
            if len(page) < size:
                break
            after = page[-1].id
    if args.json:
        print("]}")
    elif not count:
        print("no scopes have keys" + (f" after {args.after}" if args.after else ""))
    return EXIT_OK


async def _run_list(args: argparse.Namespace) -> int:
    async with _open_kms(args, root_key=False) as kms:
        keys = await kms.list_keys(args.scope)
    _out(
        args,
        {"scope": args.scope, "keys": [_key_json(k) for k in keys]},
        [
            f"scope {args.scope}",
            *_table(_KEY_HEADERS, _key_rows(keys)),
            *_unusable_lines([(args.scope, keys)]),
        ],
    )
    return EXIT_OK


async def _in_batches(
    args: argparse.Namespace,
    scopes: Sequence[str],
    label: str,
    step: Callable[[Sequence[str]], Awaitable[object]],
) -> int:
    """Run ``step`` on ``--batch-size`` scopes at a time; return the transactions run."""
    progress = _progress(args, label, len(scopes), "scopes")
    batches = 0
    try:
        for batch in _chunks(scopes, args.batch_size):
            await step(batch)
            batches += 1
            progress.advance(len(batch))
    finally:
        progress.close()
    return batches


async def _run_rotate(args: argparse.Namespace) -> int:
    if args.due:
        return await _run_rotate_due(args)
    if args.max_age is not None or args.max_encryptions is not None:
        raise InvalidParameterError("--max-age and --max-encryptions go with --due")
    async with _open_kms(args, root_key=True) as kms:
        scopes = await _scopes(args, kms)
        # Every root key version this run makes is at least this new.
        started = await kms.database_time()
        skipped = 0
        if args.older_than is not None:
            newest = {s.id: s.newest_root_version.create_time for s in await kms.get_scopes(scopes)}
            if isinstance(args.older_than, datetime.timedelta):
                cutoff = started - args.older_than
                due = {s for s, made in newest.items() if made <= cutoff}
            else:
                due = {s for s, made in newest.items() if made < args.older_than}
            # A scope without keys stays in: rotating it reports it (exit 3).
            kept = [s for s in scopes if s in due or s not in newest]
            skipped = len(scopes) - len(kept)
            scopes = kept

        async def step(batch: Sequence[str]) -> None:
            await kms.rotate_keys_many(
                batch, rewrap=args.rewrap, replace_unusable=args.replace_unusable
            )

        try:
            batches = await _in_batches(args, scopes, "rotating", step) if scopes else 0
        except asyncio.CancelledError:
            if args.older_than is None:
                # (With --older-than, the same command run again already continues.)
                args.resume_hint = (
                    "to rotate only the scopes this run did not reach, run it again with "
                    f"--older-than {_iso(started)}"
                )
            raise
    text = f"rotated {len(scopes)} scope(s) in {batches} transaction(s)"
    if args.rewrap:
        text += ", re-wrapping every existing version"
    if skipped:
        text += f"; skipped {skipped} rotated more recently than --older-than"
    _out(
        args,
        {
            "rotated": len(scopes),
            "skipped": skipped,
            "transactions": batches,
            "rewrap": args.rewrap,
        },
        text,
    )
    return EXIT_OK


async def _run_rotate_due(args: argparse.Namespace) -> int:
    if args.all_scopes or args.rewrap or args.replace_unusable or args.older_than is not None:
        raise InvalidParameterError(
            "--due takes scope ids (or none for every scope), --max-age and "
            "--max-encryptions; not --all-scopes, --rewrap, --replace-unusable or --older-than"
        )
    if args.max_age is None and args.max_encryptions is None:
        raise InvalidParameterError("--due needs --max-age, --max-encryptions or both")
    policy = RotationPolicy(max_age=args.max_age, max_encryptions=args.max_encryptions)
    async with _open_kms(args, root_key=True) as kms:
        scopes = list(dict.fromkeys(args.scopes)) or None
        rotated = await kms.rotate_due(policy, scope_ids=scopes)
    text = [f"rotated {len(rotated)} scope(s) due under the policy"]
    text += [f"  {_printable(s)}" for s in rotated[:100]]
    if len(rotated) > 100:
        text.append(f"  ... and {len(rotated) - 100} more")
    _out(args, {"rotated": len(rotated), "scopes": rotated}, text)
    return EXIT_OK


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 0):.0f}s"
    if seconds < 3600:
        return f"{max(seconds, 0) / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _census_json(row: CensusRow, now: datetime.datetime) -> dict[str, Any]:
    return {
        "scope": row.scope,
        "purpose": row.purpose,
        "key_id": row.key_id,
        "version": row.version,
        "id": row.key_version_id,
        "create_time": _iso(row.create_time),
        "age_seconds": round((now - row.create_time).total_seconds(), 3),
        "encryptions": row.encryptions,
        "rows": row.referencing_rows,
        "suspended": row.suspended,
        "newest": row.newest,
    }


async def _run_census(args: argparse.Namespace) -> int:
    async with _open_kms(args, root_key=False) as kms:
        rows = await kms.census(args.scope, referencing_rows=args.rows)
        now = await kms.database_time()
    if args.png:
        await asyncio.to_thread(_draw_census, rows, now, args.png)
    headers = ["SCOPE", "PURPOSE", "VERSION", "ID", "CREATED", "AGE", "ENCRYPTIONS"]
    if args.rows:
        headers.append("ROWS")
    headers.append("STATE")
    table = []
    for row in rows:
        line: list[object] = [
            _printable(row.scope),
            row.purpose,
            row.version,
            row.key_version_id,
            _when(row.create_time),
            _age((now - row.create_time).total_seconds()),
            "-" if row.encryptions is None else f"{row.encryptions:,}",
        ]
        if args.rows:
            line.append(row.referencing_rows)
        states = (["newest"] if row.newest else []) + (["SUSPENDED"] if row.suspended else [])
        line.append(",".join(states) or "-")
        table.append(line)
    text = _table(headers, table) if rows else ["no data key versions"]
    if args.png:
        text.append(f"drew {len(rows)} version(s) to {args.png}")
    _out(
        args,
        {"database_time": _iso(now), "versions": [_census_json(r, now) for r in rows]},
        text,
    )
    return EXIT_OK


#: Versions drawn per panel of the census image, oldest (or busiest) first.
_PNG_BARS = 40


def _draw_census(rows: Sequence[CensusRow], now: datetime.datetime, path: str) -> None:
    """Bar charts: the oldest versions by age, the most used by encryptions counted
    and (with --rows) by rows protected; ``_PNG_BARS`` versions each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidParameterError(
            "--png needs matplotlib: pip install 'kms-async[census-png]'"
        ) from None

    def label(row: CensusRow) -> str:
        mark = "*" if row.newest else ""
        return f"{row.scope[:24]} {row.purpose[:12]} v{row.version}{mark}"

    def age(row: CensusRow) -> float:
        return max((now - row.create_time).total_seconds(), 0.0)

    oldest = max((age(r) for r in rows), default=0.0)
    unit, seconds = next(
        ((u, s) for u, s in (("days", 86400), ("hours", 3600)) if oldest >= 2 * s),
        ("minutes", 60),
    )
    panels: list[tuple[str, Callable[[CensusRow], float], str, str]] = [
        (f"age ({unit}, database clock)", lambda r: age(r) / seconds, "oldest", "#3f51b5"),
        ("encryptions counted", lambda r: float(r.encryptions or 0), "most used", "#ff9800"),
    ]
    if any(r.referencing_rows is not None for r in rows):
        panels.append(
            ("rows protected", lambda r: float(r.referencing_rows or 0), "most rows", "#4caf50")
        )
    shown = min(len(rows), _PNG_BARS)
    height = max(3.0, 0.28 * max(shown, 1) + 1.5)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), height), constrained_layout=True
    )
    try:
        for axis, (what, value, title, color) in zip(axes, panels, strict=True):
            picked = sorted(rows, key=value, reverse=True)[:_PNG_BARS]
            values = [value(r) for r in picked]
            axis.barh([label(r) for r in picked], values, color=color)
            axis.invert_yaxis()
            axis.set_xlabel(what)
            axis.set_title(f"{title}: {len(picked)} of {len(rows)} versions")
            axis.ticklabel_format(axis="x", style="plain", useOffset=False)
            if not any(values):
                axis.set_xlim(0, 1)
                axis.text(0.5, 0.5, "none counted", transform=axis.transAxes, ha="center")
        figure.suptitle(f"kms-async census, {_when(now)}  (* newest version of its key)")
        try:
            figure.savefig(path, dpi=100)
        except OSError as exc:
            raise InvalidParameterError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)


async def _run_bind(args: argparse.Namespace) -> int:
    async with _open_kms(args, root_key=True) as kms:
        scopes = await _scopes(args, kms)
        bound = 0

        async def step(batch: Sequence[str]) -> None:
            nonlocal bound
            bound += await kms.bind_keys(batch)

        try:
            batches = await _in_batches(args, scopes, "binding", step) if scopes else 0
        except asyncio.CancelledError:
            args.resume_hint = "run the same command again: scopes already bound are skipped"
            raise
    _out(
        args,
        {"scopes": len(scopes), "bound": bound, "transactions": batches},
        f"bound {bound} key version(s) of {len(scopes)} scope(s) in {batches} transaction(s)",
    )
    return EXIT_OK


async def _run_rewrap(args: argparse.Namespace) -> int:
    async with _open_kms(args, root_key=True) as kms:
        scopes = await _scopes(args, kms)

        async def step(batch: Sequence[str]) -> None:
            await kms.rewrap_keys_many(batch)

        batches = await _in_batches(args, scopes, "rewrapping", step) if scopes else 0
    _out(
        args,
        {"rewrapped": len(scopes), "transactions": batches},
        f"rewrapped {len(scopes)} scope(s) in {batches} transaction(s)",
    )
    return EXIT_OK


async def _run_reconcile(args: argparse.Namespace) -> int:
    only = args.only_purposes
    created: list[tuple[str, str]] = []
    async with _open_kms(args, root_key=True, purposes=only or ()) as kms:
        scopes = await _scopes(args, kms)
        purposes = list(only) if only else list(kms.purposes)

        async def step(batch: Sequence[str]) -> None:
            created.extend(await kms.reconcile_keys(batch, purposes))

        if scopes:
            await _in_batches(args, scopes, "reconciling", step)
    lines = [f"created {len(created)} key(s) for {len(scopes)} scope(s) checked"]
    lines += [f"  {scope}  {purpose}" for scope, purpose in created]
    _out(
        args,
        {
            "checked": len(scopes),
            "purposes": purposes,
            "created": [{"scope": s, "purpose": p} for s, p in created],
        },
        lines,
    )
    return EXIT_OK


def _version_json(info: KeyVersionInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "scope": info.scope,
        "purpose": info.purpose,
        "version": info.version,
        "create_time": info.create_time,
        "newest": info.newest,
        "rows": info.rows,
        "references": [dataclasses.asdict(r) for r in info.references],
    }


def _version_lines(info: KeyVersionInfo) -> list[str]:
    kind = "root key" if info.purpose == ROOT_PURPOSE else "data key"
    lines = [
        f"{kind} version {info.id}: scope {info.scope}, purpose {info.purpose}, "
        f"version {info.version}, created {_when(info.create_time)}"
        + (" (the newest: rotate first)" if info.newest else "")
    ]
    if info.purpose == ROOT_PURPOSE:
        lines.append(f"  wraps {info.rows} data key version(s)")
    elif not info.references:
        lines.append("  no table has a foreign key to it: nothing can say which rows use it")
    else:
        lines.append(f"  referenced by {info.rows} row(s):")
        lines += [f"    {r.table}.{r.column}: {r.rows}" for r in info.references]
    return lines


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return False


async def _confirm(question: str) -> bool:
    """Ask on the terminal; the loop keeps running, so Ctrl-C still stops it at once."""
    loop = asyncio.get_running_loop()
    print(question, end="", file=sys.stderr, flush=True)
    answered: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def ready() -> None:
        if not answered.done():
            answered.set_result(sys.stdin.readline())

    loop.add_reader(fd, ready)
    try:
        answer = await answered
    finally:
        loop.remove_reader(fd)
    return answer.strip().lower() in ("y", "yes")


async def _run_revoke(args: argparse.Namespace) -> int:
    async with _open_kms(args, root_key=True) as kms:
        info = await kms.describe_key_version(args.version_id, scope_id=args.scope)
        preview = _version_json(info)
        if args.dry_run:
            _out(
                args,
                {"dry_run": True, "revoked": None, "version": preview},
                [*_version_lines(info), "dry run: nothing deleted"],
            )
            return EXIT_OK
        if not args.yes:
            if not _stdin_is_tty():
                raise InvalidParameterError(
                    f"revoke deletes {args.version_id} for good and stdin is not a terminal to "
                    "confirm it: add --yes, or --dry-run to only look"
                )
            for line in _version_lines(info):
                print(line, file=sys.stderr)
            if not await _confirm(f"revoke {args.version_id} for good? [y/N] "):
                if args.json:
                    _print_json_error("NotConfirmed", "not revoked", EXIT_REFUSED, version=preview)
                else:
                    print("not revoked", file=sys.stderr)
                return EXIT_REFUSED
        await _when_revocable(
            args, lambda: kms.revoke_key_version(args.version_id, scope_id=args.scope)
        )
    _out(
        args,
        {"dry_run": False, "revoked": args.version_id, "version": preview},
        [*(_version_lines(info) if args.yes else []), f"revoked {args.version_id}"],
    )
    return EXIT_OK


async def _when_revocable(args: argparse.Namespace, revoke: Callable[[], Awaitable[T]]) -> T:
    """Run ``revoke``; with --wait, again once the grace the database reports has passed."""
    while True:
        try:
            return await revoke()
        except RevokeTooSoonError as exc:
            if not getattr(args, "wait", False):
                raise
            print(
                f"{_prog()}: {args.version_id} becomes revocable in {exc.retry_after:.1f} s; "
                "waiting",
                file=sys.stderr,
            )
            # The database said how long; then it decides again.
            await asyncio.sleep(exc.retry_after + 0.1)


def _usage_map(usages: Iterable[VersionUsage]) -> dict[str, dict[str, int]]:
    by_version: dict[str, dict[str, int]] = {}
    for u in usages:
        tables = by_version.setdefault(u.key_version_id, {})
        tables[u.table] = tables.get(u.table, 0) + u.rows
    return by_version


async def _run_status(args: argparse.Namespace) -> int:
    columns = _load_columns(args.columns) if args.columns else None
    purposes = _column_purposes(columns) if columns else []
    report = []
    async with _open_kms(args, root_key=_root_key_given(args), purposes=purposes) as kms:
        scopes = list(dict.fromkeys(args.scopes)) or [s.id async for s in kms.iter_scopes()]
        usage = _usage_map(await kms.version_usage(columns)) if columns else None
        progress = _progress(args, "reading", len(scopes), "scopes")
        try:
            for scope in scopes:
                report.append((scope, await kms.list_keys(scope)))
                progress.advance(1)
        finally:
            progress.close()
    headers = ["SCOPE", *_KEY_HEADERS] + (["ROWS"] if usage is not None else [])
    rows = [row for scope, keys in report for row in _key_rows(keys, usage, scope)]
    data: dict[str, Any] = {
        "scopes": [
            {"scope": scope, "keys": [_key_json(k, usage) for k in keys]} for scope, keys in report
        ]
    }
    text = [*_table(headers, rows), *_unusable_lines(report)] if rows else ["no scopes have keys"]
    _out(args, data, text)
    return EXIT_OK


def _usage_lines(version_id: str, usages: Sequence[VersionUsage]) -> list[str]:
    lines = [f"{version_id} protects {sum(u.rows for u in usages)} row(s)"]
    lines += [f"  {u.table}: {u.rows}" for u in usages if u.rows]
    return lines


async def _reencrypt(args: argparse.Namespace, *, destroy: bool) -> int:
    columns = _load_columns(args.columns)
    if destroy and not args.yes and not _stdin_is_tty():
        raise InvalidParameterError(
            f"destroy revokes {args.version_id} for good and stdin is not a terminal to "
            "confirm it: add --yes, or --dry-run to only look"
        )
    async with _open_kms(args, root_key=True, purposes=_column_purposes(columns)) as kms:
        usages = await kms.version_usage(columns, key_version_id=args.version_id)
        if destroy and not args.yes:
            for line in _usage_lines(args.version_id, usages):
                print(line, file=sys.stderr)
            question = f"re-encrypt those rows, then revoke {args.version_id} for good? [y/N] "
            if not await _confirm(question):
                if args.json:
                    _print_json_error("NotConfirmed", "not destroyed", EXIT_REFUSED)
                else:
                    print("not destroyed", file=sys.stderr)
                return EXIT_REFUSED
        progress = _progress(args, "re-encrypting", sum(u.rows for u in usages), "rows")
        work = kms.destroy_key_version if destroy else kms.reencrypt_key_version
        try:
            report = await _when_revocable(
                args,
                lambda: work(
                    args.version_id,
                    columns,
                    batch_size=args.batch_size,
                    progress=progress.advance,
                ),
            )
        finally:
            progress.close()
    lines = [
        f"re-encrypted {report.rows_reencrypted} row(s) of {report.version_id}; "
        f"{report.rows_remaining} remaining"
    ]
    if report.revoked:
        lines.append(f"{report.version_id} revoked")
    _out(args, dataclasses.asdict(report), lines)
    return EXIT_OK


async def _run_reencrypt(args: argparse.Namespace) -> int:
    return await _reencrypt(args, destroy=False)


async def _run_destroy(args: argparse.Namespace) -> int:
    if not args.dry_run:
        return await _reencrypt(args, destroy=True)
    columns = _load_columns(args.columns)
    async with _open_kms(args, root_key=False, purposes=_column_purposes(columns)) as kms:
        usages = await kms.version_usage(columns, key_version_id=args.version_id)
    _out(
        args,
        {
            "version_id": args.version_id,
            "dry_run": True,
            "rows": sum(u.rows for u in usages),
            "tables": {u.table: u.rows for u in usages},
        },
        [*_usage_lines(args.version_id, usages), "dry run: nothing changed"],
    )
    return EXIT_OK


# -- main ---------------------------------------------------------------------


def exit_code(exc: BaseException) -> int:
    """The documented exit status for an error."""
    if isinstance(exc, InvalidParameterError):
        return EXIT_USAGE
    if isinstance(exc, KeyNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, (KeyInUseError, KeyExistsError)):
        return EXIT_REFUSED
    if isinstance(exc, SchemaVersionError):
        return EXIT_SCHEMA
    if isinstance(exc, StorageError):
        return EXIT_STORAGE
    return EXIT_ERROR


def _print_json_error(kind: str, message: str, code: int, **extra: object) -> None:
    error = {"type": kind, "message": message, "exit_code": code, **extra}
    print(_dumps({"error": error}), file=sys.stderr)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _supervised(args: argparse.Namespace) -> int:
    """Run the command; Ctrl-C or SIGTERM cancels it, so open transactions roll back."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received and task is not None:
            task.cancel()
        received.append(signum)

    installed = []
    for signum in _STOP_SIGNALS:
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            # Windows, or not the main thread: KeyboardInterrupt does the job.
            pass
    try:
        status: int = await args.run(args)
        return status
    except asyncio.CancelledError:
        if not received:
            raise
        if task is not None and hasattr(task, "uncancel"):
            task.uncancel()
        raise _Interrupted(received[0]) from None
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _command(*words: str | None) -> str:
    """A command line to suggest, quoted for a shell."""
    return " ".join([_prog(), *(shlex.quote(w) if w else "SCOPE" for w in words)])


def _advice(exc: KMSError, remedy: Remedy, args: argparse.Namespace) -> str | None:
    """The remedy as this command line says it, or None to keep the library's words."""
    scope, version = remedy.scope_id, remedy.key_version_id
    if remedy.action == "migrate":
        return f"run `{_command('migrate')}`"
    if remedy.action == "create_keys":
        return f"create them with `{_command('create', scope)}`"
    if remedy.action == "rotate_keys":
        return f"run `{_command('rotate', scope)}` first"
    if remedy.action == "rewrap_keys":
        return f"run `{_command('rewrap', scope)}` so they move to the newest root key version"
    if remedy.action == "reconcile_keys":
        return (
            f"`{_command('rotate', scope)}` makes new versions, "
            f"`{_command('reconcile', scope)} --purpose P` adds purposes"
        )
    if remedy.action == "reencrypt_key_version" and version:
        return (
            f"re-encrypt them first: `{_command('destroy', version)} --columns FILE` "
            "re-encrypts its rows, then revokes it"
        )
    if remedy.action == "list_keys":
        return f"look with `{_command('status')}` before running it again"
    if remedy.action == "wait_revoke_grace" and isinstance(exc, RevokeTooSoonError):
        return (
            f"retry in {exc.retry_after:.1f} s, or add --wait to wait for it "
            "(--grace sets the grace; it must exceed 4 x the max_staleness of your services)"
        )
    if remedy.action == "previous_root_key":
        return _previous_root_advice(remedy, args)
    if remedy.action == "replace_unusable":
        return (
            f"if the root key given here is the right one, run "
            f"`{_command('rotate', scope)} --replace-unusable` (without --rewrap), then "
            f"revoke each version `{_command('status', scope)}` marks UNUSABLE with "
            f"`{_prog()} revoke VERSION_ID`; if it is the wrong one, fix the root key"
        )
    if remedy.action == "resume_key_version" and version:
        return f"run `{_command('resume', version)}` if the data under it is still needed"
    return None


def _previous_root_advice(remedy: Remedy, args: argparse.Namespace) -> str:
    stored, given = remedy.key_id, getattr(args, "root_key_ids", ())
    if stored and stored in given:
        return (
            f"a root key given here has the id {stored} the version names, but is not the key "
            "that wrote it: check the key (--root-key-file, --root-key-env or KMS_ROOT_KEY)"
        )
    shown = stored or "?"
    return (
        f"it was written under root key id {shown}, and the root key given here has id "
        f"{', '.join(given) or '?'}. If the root key was replaced, pass the old one too with "
        "--previous-root-key-file PATH or --previous-root-key-env NAME (and "
        f"--previous-root-key-id {shown} if it was made with that explicit id); if it is this "
        f"same key under an id chosen earlier, pass --root-key-id {shown}"
    )


def _message(exc: KMSError, args: argparse.Namespace) -> str:
    """The error's message, with the advice worded for this command line."""
    message = str(exc)
    if exc.remedy is not None and exc.problem is not None:
        advice = _advice(exc, exc.remedy, args)
        if advice is not None:
            message = f"{exc.problem}; {advice}"
    if getattr(args, "added_connect_timeout", False):
        message = message.replace("(connect_timeout)", "(--connect-timeout)")
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    _Parser.json_errors = json_mode
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    finally:
        _Parser.json_errors = False
    try:
        return asyncio.run(_supervised(args))
    except KMSError as exc:
        code = exit_code(exc)
        message = _message(exc, args)
        if args.json:
            _print_json_error(type(exc).__name__, message, code, retryable=exc.retryable)
        else:
            if exc.retryable:
                message += " (a temporary failure: run the same command again)"
            print(_printable(f"error: {message}"), file=sys.stderr)
        return code
    except (_Interrupted, KeyboardInterrupt) as exc:
        terminated = isinstance(exc, _Interrupted) and exc.signum == signal.SIGTERM
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        hint = getattr(args, "resume_hint", None)
        if args.json:
            extra = {} if hint is None else {"hint": hint}
            kind = "Terminated" if terminated else "Interrupted"
            _print_json_error(kind, INTERRUPTED_MESSAGE, code, **extra)
        else:
            print(INTERRUPTED_MESSAGE, file=sys.stderr)
            if hint is not None:
                print(hint, file=sys.stderr)
        return code
    except BrokenPipeError:
        # Whoever read the output left (`| head`); stop without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
