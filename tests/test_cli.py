"""The ``kms-async`` command line, in-process through ``main()`` and as ``python -m kms_async``.

In-process runs go through a worker thread, because ``main`` runs its own
event loop with ``asyncio.run``; the SIGINT test needs a real process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from conftest import TestDB, data_versions, root_versions

import kms_async
import kms_async._cli as kms_cli
from kms_async import KMS, AeadWrapper, BlobInfo, Scope
from kms_async._cli import EXIT_CODES, INTERRUPTED_MESSAGE, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = [
    "migrate",
    "create",
    "list",
    "status",
    "census",
    "rotate",
    "rewrap",
    "reconcile",
    "suspend",
    "resume",
    "revoke",
    "reencrypt",
    "destroy",
    "demo",
]
_ENV_VARS = [
    "KMS_DATABASE_URL",
    "KMS_TABLE_PREFIX",
    "KMS_PURPOSES",
    "KMS_ROOT_KEY",
    "KMS_ROOT_KEY_FILE",
    "KMS_ROOT_KEY_ID",
    "KMS_AWS_KMS_KEY_ID",
    "KMS_PKCS11_LIB",
    "KMS_PKCS11_TOKEN",
    "KMS_PKCS11_KEY_LABEL",
    "KMS_PKCS11_PIN",
]
APP_COLUMNS = [
    {
        "table": "app_secret",
        "ciphertext_column": "ciphertext",
        "key_version_column": "key_version_id",
        "scope_column": "scope_id",
        "purpose": "database",
        "aad_template": "{id}",
    }
]


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.err)["error"]
        return error


Cli = Callable[..., Awaitable[Result]]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def root_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def env(db: TestDB, root_key: str, monkeypatch: pytest.MonkeyPatch) -> TestDB:
    """The database and root key in the environment, as a deployment would set them."""
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    monkeypatch.setenv("KMS_ROOT_KEY", root_key)
    return db


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``main(argv)`` in a worker thread; return its status and output."""

    async def run(*argv: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def run_sync(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


async def open_kms(purposes: list[str] | None = None) -> KMS:
    """A KMS with the root key from the environment, as the command line uses."""
    return await KMS.open(
        os.environ["KMS_DATABASE_URL"],
        purposes=purposes or ["database"],
        root_wrapper=AeadWrapper.from_env(),
        max_staleness=None,
    )


def write_columns(tmp_path: Any, columns: object, name: str = "columns.json") -> str:
    """Write a columns file (JSON of ``columns``, or a string as it is); return its path."""
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as file:
        file.write(columns if isinstance(columns, str) else json.dumps(columns))
    return path


# -- help, usage and configuration errors ------------------------------------


def test_top_level_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_sync(capsys, "--help")
    assert result.code == 0
    for code, meaning in EXIT_CODES.items():
        assert f"{code:>3}  {meaning}" in result.out
    assert "example" in result.out
    for command in COMMANDS:
        assert command in result.out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    result = run_sync(capsys, command, "--help")
    assert result.code == 0
    assert "example" in result.out
    assert command in result.out


def test_python_dash_m_runs_the_same_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kms_async", "rotate", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "python -m kms_async rotate" in proc.stdout


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_sync(capsys).code == 2
    result = run_sync(capsys, "rotate", "--batch-size", "0")
    assert result.code == 2
    assert "--batch-size" in result.err
    result = run_sync(capsys, "list", "--json")
    assert result.code == 2
    assert result.out == ""
    assert result.error()["exit_code"] == 2


@pytest.mark.parametrize("json_mode", [False, True])
def test_missing_dsn_exits_2(capsys: pytest.CaptureFixture[str], json_mode: bool) -> None:
    result = run_sync(capsys, "list", "acme", *(["--json"] if json_mode else []))
    assert result.code == 2
    assert result.out == ""
    if json_mode:
        error = result.error()
        assert error["type"] == "InvalidParameterError"
        assert error["exit_code"] == 2
        assert "KMS_DATABASE_URL" in error["message"]
    else:
        assert result.err.startswith("error: no database given")
        assert "--db" in result.err
        assert "KMS_DATABASE_URL" in result.err


async def test_missing_root_key_exits_2_naming_the_variable(
    db: TestDB, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    for command in (["create", "acme"], ["rotate", "acme"], ["rewrap", "--all-scopes"]):
        result = await cli(*command)
        assert result.code == 2, result.err
        assert "KMS_ROOT_KEY" in result.err
    result = await cli("create", "acme", "--root-key-env", "MY_KEY")
    assert result.code == 2
    assert "MY_KEY" in result.err
    monkeypatch.setenv("KMS_ROOT_KEY", "not base64!")
    result = await cli("create", "acme")
    assert result.code == 2
    assert "KMS_ROOT_KEY" in result.err
    assert "not base64!" not in result.err
    assert await db.fetchval("select count(*) from kms_root_key") == 0


async def test_commands_without_keys_work_without_a_root_key(
    db: TestDB, cli: Cli, root_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    monkeypatch.setenv("KMS_ROOT_KEY", root_key)
    assert (await cli("create", "acme")).code == 0
    assert (await cli("rotate", "acme")).code == 0
    monkeypatch.delenv("KMS_ROOT_KEY")
    assert (await cli("migrate")).code == 0
    listed = await cli("list", "acme", "--json")
    assert listed.code == 0, listed.err
    old_root = listed.json()["keys"][0]["versions"][0]["id"]
    assert (await cli("status")).code == 0
    # Revoking records the revocation in the sealed key state record: it needs the key.
    keyless = await cli("revoke", old_root, "--grace", "0", "--yes")
    assert keyless.code == 2 and "KMS_ROOT_KEY" in keyless.err
    monkeypatch.setenv("KMS_ROOT_KEY", root_key)
    revoked = await cli("revoke", old_root, "--grace", "0", "--yes")
    assert revoked.code == 4  # still wraps the old data key version
    assert "rewrap" in revoked.err


async def test_revoke_waits_out_the_grace_only_when_asked(
    db: TestDB, cli: Cli, root_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    monkeypatch.setenv("KMS_ROOT_KEY", root_key)
    assert (await cli("create", "acme")).code == 0
    assert (await cli("rotate", "acme")).code == 0
    listed = await cli("list", "acme", "--json")
    old = next(k for k in listed.json()["keys"] if k["purpose"] == "database")["versions"][0]["id"]

    refused = await cli("revoke", old, "--yes")  # the default grace: 60 s
    assert refused.code == 4
    assert "retry in" in refused.err and "--wait" in refused.err and "--grace" in refused.err
    assert "revoke_grace" not in refused.err
    refused = await cli("revoke", old, "--grace", "1m", "--json", "--yes")
    assert refused.code == 4

    waited = await cli("revoke", old, "--grace", "1", "--wait", "--yes")
    assert waited.code == 0, waited.err
    assert f"revoked {old}" in waited.out
    assert (await cli("revoke", old, "--grace", "0")).code == 3  # gone
    assert (await cli("revoke", old, "--grace", "soon")).code == 2


def test_two_root_key_sources_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "x.db").touch()
    monkeypatch.setenv("KMS_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    result = run_sync(capsys, "create", "acme", "--root-key-file", "k", "--aws-kms-key-id", "a")
    assert result.code == 2
    assert "--aws-kms-key-id and --root-key-file" in result.err


def test_pkcs11_pin_only_from_the_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "x.db").touch()
    monkeypatch.setenv("KMS_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    result = run_sync(
        capsys,
        *("create", "acme", "--pkcs11-lib", "/nonexistent/lib.so"),
        *("--pkcs11-token", "t", "--pkcs11-key-label", "k"),
    )
    assert result.code == 2
    assert "KMS_PKCS11_PIN" in result.err
    assert run_sync(capsys, "create", "acme", "--pkcs11-pin", "1234").code == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read columns file"),
        ("{not json", "is not valid JSON (line 1"),
        ("{}", "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ("[1]", "entry 1 is int, not an object"),
        ([{**APP_COLUMNS[0], "purpose": None}], "entry 1 lacks 'purpose'"),
        ([{**APP_COLUMNS[0], "tabel": "x"}], "unknown field(s) tabel"),
        ([{**APP_COLUMNS[0], "primary_key": "id"}], "primary_key must be a list"),
        ([{**APP_COLUMNS[0], "table": "bad name"}], "entry 1: table"),
        ([{**APP_COLUMNS[0], "ciphertext_column": 3}], "ciphertext_column must be a non-empty"),
    ],
)
def test_bad_columns_file_exits_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    content: object,
    message: str,
) -> None:
    monkeypatch.setenv("KMS_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    path = os.path.join(str(tmp_path), "missing.json")
    if content is not None:
        path = write_columns(tmp_path, content)
    for argv in (
        ["status", "--columns", path],
        ["destroy", "kdkv_x", "--columns", path, "--dry-run"],
    ):
        result = run_sync(capsys, *argv)
        assert result.code == 2
        assert message in result.err
        assert path in result.err


# -- the key lifecycle ---------------------------------------------------------


async def test_lifecycle(env: TestDB, cli: Cli) -> None:
    db = env
    migrated = await cli("migrate", "--json")
    assert migrated.code == 0
    assert migrated.json() == {"applied": [], "schema_version": kms_async.SCHEMA_VERSION}

    created = await cli("create", "acme", "globex", "--purposes", "database,oidc")
    assert created.code == 0, created.err
    assert "created keys for 2 scope(s)" in created.out
    assert created.err == ""
    again = await cli("create", "globex", "initech", "--purposes", "database,oidc")
    assert again.code == 4
    assert "nothing was created" in again.err
    assert "initech" not in await root_versions(db)

    table = await cli("list", "acme")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0] == "scope acme"
    assert lines[1].split() == [
        *("PURPOSE", "TYPE", "KEY", "VERSION", "VERSION", "ID", "CREATED", "STATE")
    ]
    assert [line.split()[0] for line in lines[2:]] == ["rootKey", "database", "oidc"]
    listed = (await cli("list", "acme", "--json")).json()
    assert listed["scope"] == "acme"
    assert [(k["type"], k["purpose"]) for k in listed["keys"]] == [
        ("kek", "rootKey"),
        ("dek", "database"),
        ("dek", "oidc"),
    ]
    old_root = listed["keys"][0]["versions"][0]["id"]
    old_oidc = listed["keys"][2]["versions"][0]["id"]
    assert old_root.startswith("krkv_")

    rotated = await cli("rotate", "acme", "--rewrap", "--purposes", "database,oidc", "--json")
    assert rotated.code == 0, rotated.err
    assert rotated.json() == {"rotated": 1, "skipped": 0, "transactions": 1, "rewrap": True}
    assert rotated.err == ""
    assert await root_versions(db) == {"acme": [1, 2], "globex": [1]}
    assert (await data_versions(db))[("acme", "oidc")] == [1, 2]

    reconciled = await cli("reconcile", "--all-scopes", "--purpose", "billing", "--json")
    assert reconciled.code == 0, reconciled.err
    assert reconciled.json()["created"] == [
        {"scope": "acme", "purpose": "billing"},
        {"scope": "globex", "purpose": "billing"},
    ]
    nothing = await cli("reconcile", "acme", "--purposes", "database,oidc,billing")
    assert nothing.code == 0
    assert nothing.out.startswith("created 0 key(s)")

    status = await cli("status", "--json")
    assert status.code == 0
    scopes = {s["scope"]: s for s in status.json()["scopes"]}
    assert sorted(scopes) == ["acme", "globex"]
    acme_purposes = [(k["purpose"], len(k["versions"])) for k in scopes["acme"]["keys"]]
    assert acme_purposes == [("rootKey", 2), ("billing", 1), ("database", 2), ("oidc", 2)]
    status_text = await cli("status", "globex")
    assert status_text.code == 0
    assert status_text.out.splitlines()[0].split()[:3] == ["SCOPE", "PURPOSE", "TYPE"]
    assert all(line.startswith("globex") for line in status_text.out.splitlines()[1:])

    newest_oidc = scopes["acme"]["keys"][3]["versions"][-1]["id"]
    refused = await cli("revoke", newest_oidc, "--json", "--yes")
    assert refused.code == 4
    assert refused.error()["type"] == "KeyInUseError"
    assert "newest" in refused.error()["message"]
    wrong_scope = await cli("revoke", old_oidc, "--scope", "globex")
    assert wrong_scope.code == 3
    assert (await cli("revoke", old_oidc, "--scope", "acme", "--grace", "0", "--yes")).code == 0
    # The rewrap moved every data key version to root version 2.
    revoked = await cli("revoke", old_root, "--json", "--grace", "0", "--yes")
    assert revoked.code == 0, revoked.err
    assert revoked.json()["revoked"] == old_root
    assert revoked.json()["version"]["purpose"] == "rootKey"
    assert await root_versions(db) == {"acme": [2], "globex": [1]}
    assert (await data_versions(db))[("acme", "oidc")] == [2]

    rewrapped = await cli("rewrap", "--all-scopes", "--batch-size", "1")
    assert rewrapped.code == 0, rewrapped.err
    assert "rewrapped 2 scope(s) in 2 transaction(s)" in rewrapped.out

    kms = await open_kms(["database", "oidc", "billing"])
    async with kms:
        for scope in ("acme", "globex"):
            for purpose in ("database", "oidc", "billing"):
                ciphertext = await kms.encrypt(scope, purpose, b"still works")
                assert await kms.decrypt(scope, purpose, ciphertext) == b"still works"


async def test_unknown_scope_and_version_exit_3(env: TestDB, cli: Cli) -> None:
    assert (await cli("create", "acme")).code == 0
    listed = await cli("list", "nope")
    assert listed.code == 3
    assert listed.err.startswith("error: ")
    assert "'nope'" in listed.err
    as_json = await cli("list", "nope", "--json")
    assert as_json.code == 3
    assert as_json.out == ""
    assert as_json.error() == {
        "type": "KeyNotFoundError",
        "message": as_json.error()["message"],
        "exit_code": 3,
        "retryable": False,
    }
    rotated = await cli("rotate", "acme", "nope")
    assert rotated.code == 3
    assert await root_versions(env) == {"acme": [1]}  # all or nothing
    assert (await cli("revoke", "kdkv_0000000000")).code == 3
    assert (await cli("status", "nope")).code == 3
    assert (await cli("revoke", "nonsense")).code == 2


async def test_scopes_or_all_scopes(env: TestDB, cli: Cli) -> None:
    assert (await cli("create", "a", "b", "c")).code == 0
    both = await cli("rotate", "a", "--all-scopes")
    assert both.code == 2
    assert "not both" in both.err
    neither = await cli("rotate")
    assert neither.code == 2
    assert "--all-scopes" in neither.err
    batched = await cli("rotate", "--all-scopes", "--batch-size", "2", "--json")
    assert batched.json()["transactions"] == 2
    assert await root_versions(env) == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


async def test_every_scope_comes_from_kms_list_scopes_page_by_page(
    env: TestDB, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command line once looked up a KMS.list_scopes that did not exist
    # and, not finding it, quietly read the table with SQL of its own.
    scopes = [f"s{n}" for n in range(7)]
    assert (await cli("create", *scopes)).code == 0
    pages: list[list[str]] = []
    list_scopes, iter_scopes = KMS.list_scopes, KMS.iter_scopes

    async def recorded(self: KMS, *, after: str | None = None, limit: int = 1000) -> list[Scope]:
        page = await list_scopes(self, after=after, limit=limit)
        pages.append([s.id for s in page])
        return page

    def in_pages_of_two(self: KMS, *, batch_size: int = 1000) -> AsyncIterator[Scope]:
        return iter_scopes(self, batch_size=2)

    monkeypatch.setattr(KMS, "list_scopes", recorded)
    monkeypatch.setattr(KMS, "iter_scopes", in_pages_of_two)

    status = await cli("status", "--json")
    assert status.code == 0, status.err
    assert sorted(s["scope"] for s in status.json()["scopes"]) == scopes
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert sorted(s for p in pages for s in p) == scopes

    for command in ("rotate", "rewrap", "reconcile"):
        pages.clear()
        result = await cli(command, "--all-scopes", "--json")
        assert result.code == 0, result.err
        assert sorted(s for p in pages for s in p) == scopes, command
    assert await root_versions(env) == {scope: [1, 2] for scope in scopes}

    pages.clear()
    due = await cli("rotate", "--all-scopes", "--older-than", "2999-01-01T00:00:00Z", "--json")
    assert due.json()["rotated"] == 7
    assert len(pages) == 4


async def test_bind_all_scopes_binds_what_is_unbound_and_resumes(env: TestDB, cli: Cli) -> None:
    assert (await cli("create", "a", "b", "c")).code == 0
    # As if written before schema file 06 (or by the Go package).
    await env.execute("delete from kms_key_version_binding")
    await env.execute("delete from kms_key_state where scope_id <> 'c'")
    unbound = await cli("list", "a")
    assert "unbound" in unbound.out
    first = await cli("bind", "--all-scopes", "--batch-size", "2", "--progress", "always")
    assert first.code == 0, first.err
    assert "binding [" in first.err and "3/3 scopes" in first.err
    # A root key version and a data key version per scope (c: its bindings are gone too).
    assert "bound 6 key version(s) of 3 scope(s) in 2 transaction(s)" in first.out
    listed = await cli("list", "a", "--json")
    assert all(v["bound"] for k in listed.json()["keys"] for v in k["versions"])
    again = await cli("bind", "--all-scopes", "--json")
    assert again.code == 0
    assert again.json()["bound"] == 0
    assert await env.fetchval("select count(*) from kms_key_state") == 3


async def test_rotate_older_than(env: TestDB, cli: Cli) -> None:
    assert (await cli("create", "a", "b")).code == 0
    recent = await cli("rotate", "--all-scopes", "--older-than", "1h", "--json")
    assert recent.code == 0
    assert recent.json()["rotated"] == 0
    assert recent.json()["skipped"] == 2
    assert (await cli("rotate", "a", "--older-than", "0s")).code == 0
    assert await root_versions(env) == {"a": [1, 2], "b": [1]}
    future = "2999-01-01T00:00:00Z"
    assert (await cli("rotate", "--all-scopes", "--older-than", future)).code == 0
    assert await root_versions(env) == {"a": [1, 2, 3], "b": [1, 2]}
    past = await cli("rotate", "--all-scopes", "--older-than", "2000-01-01T00:00:00Z")
    assert "skipped 2" in past.out
    bad = await cli("rotate", "a", "--older-than", "soon")
    assert bad.code == 2


async def test_root_key_file_and_table_prefix(
    db: TestDB, cli: Cli, root_key: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await kms_async.migrate(db.dsn, table_prefix="other")
    key_file = write_columns(tmp_path, root_key + "\n", name="root.key")
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    monkeypatch.setenv("KMS_TABLE_PREFIX", "other")
    created = await cli("create", "acme", "--root-key-file", key_file)
    assert created.code == 0, created.err
    monkeypatch.setenv("KMS_ROOT_KEY_FILE", key_file)
    assert (await cli("rotate", "--all-scopes", "--rewrap")).code == 0
    assert await db.fetchval("select count(*) from other_root_key_version") == 2
    assert await db.fetchval("select count(*) from kms_root_key") == 0
    assert (await cli("list", "acme", "--table-prefix", "kms")).code == 3
    assert (await cli("list", "acme", "--table-prefix", "Bad-Prefix")).code == 2


async def test_replacing_the_root_key(
    env: TestDB, cli: Cli, root_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await cli("create", "acme", "globex")).code == 0
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    alone = await cli("rewrap", "--all-scopes")
    assert alone.code == 1
    assert "--previous-root-key-env" in alone.err
    assert root_key not in alone.err
    monkeypatch.setenv("KMS_PREVIOUS_ROOT_KEY", root_key)
    rewrapped = await cli("rewrap", "--all-scopes", "--batch-size", "1")
    assert rewrapped.code == 0, rewrapped.err
    monkeypatch.delenv("KMS_PREVIOUS_ROOT_KEY")
    # The new key alone now unwraps everything.
    assert (await cli("rotate", "--all-scopes", "--rewrap")).code == 0
    kms = await open_kms()
    async with kms:
        ciphertext = await kms.encrypt("acme", "database", b"x")
        assert await kms.decrypt("acme", "database", ciphertext) == b"x"


async def test_schema_missing_exits_5(
    cli: Cli, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "empty.db")):
        pass
    monkeypatch.setenv("KMS_DATABASE_URL", f"sqlite:///{tmp_path}/empty.db")
    result = await cli("list", "acme")
    assert result.code == 5
    assert "`kms-async migrate`" in result.err
    assert "kms_async.migrate()" not in result.err


async def test_unreachable_database_exits_6(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    result = await cli("list", "acme", "--json")
    assert result.code == 6
    assert result.error()["exit_code"] == 6


async def test_progress_only_when_asked_or_on_a_terminal(env: TestDB, cli: Cli) -> None:
    assert (await cli("create", "a", "b", "c")).code == 0
    quiet = await cli("rotate", "--all-scopes", "--batch-size", "1")
    assert quiet.code == 0
    assert quiet.err == ""
    shown = await cli("rotate", "--all-scopes", "--batch-size", "1", "--progress", "always")
    assert shown.code == 0
    assert "rotating [" in shown.err
    assert "3/3 scopes" in shown.err
    assert "scopes/s" in shown.err
    as_json = await cli("rotate", "--all-scopes", "--progress", "always", "--json")
    assert as_json.err == ""
    assert as_json.json()["rotated"] == 3


# -- re-encrypting and destroying ----------------------------------------------


async def store_rows(db: TestDB, rows: dict[str, str]) -> None:
    """Encrypt one row per id for its scope, bound to the id, as an application would."""
    kms = await open_kms()
    async with kms:
        for row_id, scope in rows.items():
            ciphertext = await kms.encrypt(scope, "database", row_id.encode(), aad=row_id.encode())
            await db.execute(
                "insert into app_secret (id, scope_id, key_version_id, ciphertext)"
                " values ($1, $2, $3, $4)",
                row_id,
                scope,
                BlobInfo.from_bytes(ciphertext).key_id,
                ciphertext,
            )


async def check_rows(db: TestDB) -> dict[str, str]:
    """Every row decrypts; return each row's key version."""
    kms = await open_kms()
    versions = {}
    async with kms:
        for row_id, scope, version, ciphertext in await db.fetch(
            "select id, scope_id, key_version_id, ciphertext from app_secret"
        ):
            aad = str(row_id).encode()
            assert await kms.decrypt(scope, "database", bytes(ciphertext), aad=aad) == aad
            versions[str(row_id)] = str(version)
    return versions


@contextlib.contextmanager
def answering(monkeypatch: pytest.MonkeyPatch, answer: str) -> Iterator[None]:
    """Stdin as a terminal on which the operator types ``answer``."""
    read_end, write_end = os.pipe()
    os.write(write_end, f"{answer}\n".encode())
    os.close(write_end)
    with open(read_end, encoding="utf-8") as stdin, monkeypatch.context() as patch:
        patch.setattr(sys, "stdin", stdin)
        patch.setattr(kms_cli, "_stdin_is_tty", lambda: True)
        yield


async def test_reencrypt_and_destroy(
    env: TestDB, cli: Cli, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = env
    await db.add_app_table()
    columns = write_columns(tmp_path, APP_COLUMNS)
    assert (await cli("create", "acme", "globex")).code == 0
    acme_rows = {f"a{n}": "acme" for n in range(5)}
    globex_rows = {f"g{n}": "globex" for n in range(3)}
    await store_rows(db, {**acme_rows, **globex_rows})
    before = await check_rows(db)
    acme_v1, globex_v1 = before["a0"], before["g0"]

    status = await cli("status", "--columns", columns, "--json")
    assert status.code == 0, status.err
    by_scope = {s["scope"]: s["keys"] for s in status.json()["scopes"]}
    database = next(k for k in by_scope["acme"] if k["purpose"] == "database")
    assert database["versions"][0]["rows"] == 5
    assert database["versions"][0]["tables"] == {"app_secret": 5}
    table = await cli("status", "acme", "--columns", columns)
    assert table.out.splitlines()[0].split()[-1] == "ROWS"
    assert "5 (app_secret 5)" in table.out

    newest = await cli("reencrypt", acme_v1, "--columns", columns)
    assert newest.code == 4  # the newest version: nothing newer to move to
    assert "rotate" in newest.err

    assert (await cli("rotate", "--all-scopes")).code == 0
    in_use = await cli("revoke", acme_v1, "--yes")
    assert in_use.code == 4
    assert "re-encrypt" in in_use.err

    dry = await cli("destroy", acme_v1, "--columns", columns, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert dry.json() == {
        "version_id": acme_v1,
        "dry_run": True,
        "rows": 5,
        "tables": {"app_secret": 5},
    }
    dry_text = await cli("destroy", acme_v1, "--columns", columns, "--dry-run")
    assert f"{acme_v1} protects 5 row(s)" in dry_text.out
    assert "nothing changed" in dry_text.out
    assert await check_rows(db) == before

    moved = await cli("reencrypt", acme_v1, "--columns", columns, "--batch-size", "2", "--json")
    assert moved.code == 0, moved.err
    assert moved.json() == {
        "version_id": acme_v1,
        "rows_reencrypted": 5,
        "rows_remaining": 0,
        "tables": {"app_secret": 5},
        "revoked": False,
    }
    after = await check_rows(db)
    (acme_v2,) = {after[r] for r in acme_rows}
    assert acme_v2 != acme_v1
    assert {after[r] for r in globex_rows} == {globex_v1}

    unconfirmed = await cli("destroy", acme_v1, "--columns", columns, "--grace", "0")
    assert unconfirmed.code == 2  # stdin is not a terminal and there is no --yes
    assert "add --yes" in unconfirmed.err
    with answering(monkeypatch, "n"):
        declined = await cli("destroy", acme_v1, "--columns", columns, "--grace", "0")
    assert declined.code == 4, declined.err
    assert f"{acme_v1} protects 0 row(s)" in declined.err
    assert "not destroyed" in declined.err
    assert (await data_versions(db))[("acme", "database")] == [1, 2]
    with answering(monkeypatch, "y"):
        destroyed = await cli("destroy", acme_v1, "--columns", columns, "--grace", "0")
    assert destroyed.code == 0, destroyed.err
    assert f"{acme_v1} revoked" in destroyed.out
    destroyed = await cli(
        "destroy",
        globex_v1,
        "--columns",
        columns,
        "--batch-size",
        "1",
        "--progress",
        "always",
        "--grace",
        "0",
        "--yes",
    )
    assert destroyed.code == 0, destroyed.err
    assert "re-encrypted 3 row(s)" in destroyed.out
    assert "3/3 rows" in destroyed.err
    final = await check_rows(db)
    assert not {acme_v1, globex_v1} & set(final.values())
    assert (await data_versions(db))[("acme", "database")] == [2]
    gone = await cli("destroy", acme_v1, "--columns", columns, "--grace", "0", "--yes")
    assert gone.code == 3


# -- Ctrl-C and SIGTERM ------------------------------------------------------------


# Each signal on one database: the handling is the same Python on both, and
# each case costs a subprocess and hundreds of scopes.
@pytest.mark.parametrize(
    ("db", "signum", "status"),
    [("sqlite", signal.SIGINT, 130), ("postgres", signal.SIGTERM, 143)],
    ids=["sqlite-SIGINT", "postgres-SIGTERM"],
    indirect=["db"],
)
async def test_a_signal_stops_between_whole_scopes(
    env: TestDB, tmp_path: Any, signum: int, status: int
) -> None:
    db = env
    # 300 transactions of 2 scopes: the signal lands long before the last.
    scopes = [f"s{n:05d}" for n in range(600)]
    kms = await open_kms()
    async with kms:
        await kms.create_keys_many(scopes)
    # SQLite keeps whole seconds: let the resume hint's instant follow the keys'.
    newest = "select max(create_time) < current_timestamp from kms_root_key_version"
    for _ in range(100):
        if await db.fetchval(newest):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the database clock did not pass the keys' creation in 5 s")

    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "kms_async", "rotate", "--all-scopes"),
        *("--batch-size", "2", "--progress", "always"),
        cwd=REPO,
        env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    first = await asyncio.wait_for(proc.stderr.readline(), 60)
    assert first.startswith(b"rotating "), first
    proc.send_signal(signum)
    out, rest = await asyncio.wait_for(proc.communicate(), 60)
    err = (first + rest).decode()
    assert proc.returncode == status, err
    assert INTERRUPTED_MESSAGE in err
    assert "Traceback" not in err
    assert out == b""

    roots = await root_versions(db)
    data = await data_versions(db)
    assert sorted(roots) == scopes
    counts = {len(v) for v in roots.values()}
    assert counts <= {1, 2}
    assert 2 in counts and 1 in counts, "the interrupt should land mid-run"
    for scope, versions in roots.items():
        assert versions == list(range(1, len(versions) + 1))
        assert data[(scope, "database")] == versions  # never half-rotated

    hint = re.search(r"run it again with (--older-than \S+)", err)
    assert hint is not None, err
    rerun = await asyncio.to_thread(
        subprocess.run,
        [
            *(sys.executable, "-m", "kms_async", "rotate", "--all-scopes"),
            *hint[1].split(),
            *("--batch-size", "500", "--json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["rotated"] == sum(1 for v in roots.values() if len(v) == 1)
    assert await root_versions(db) == {scope: [1, 2] for scope in scopes}
    assert {tuple(v) for v in (await data_versions(db)).values()} == {(1, 2)}


# -- other root keys, and the demo ---------------------------------------------


async def test_aws_kms_root_key(cli: Cli, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_root_aws import REGION, create_kms_key, moto_endpoint, set_aws_test_env

    set_aws_test_env(monkeypatch)
    endpoint = moto_endpoint()
    arn = create_kms_key(endpoint)["Arn"]
    dsn = f"sqlite:///{tmp_path}/aws.db"
    await kms_async.migrate(dsn)
    monkeypatch.setenv("KMS_DATABASE_URL", dsn)
    aws = ["--aws-kms-key-id", arn, "--aws-region", REGION, "--aws-endpoint-url", endpoint]
    created = await cli("create", "acme", *aws)
    assert created.code == 0, created.err
    monkeypatch.setenv("KMS_AWS_KMS_KEY_ID", arn)
    rotated = await cli(
        "rotate", "acme", "--rewrap", "--aws-region", REGION, "--aws-endpoint-url", endpoint
    )
    assert rotated.code == 0, rotated.err


async def test_pkcs11_root_key(cli: Cli, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_root_pkcs11 import require_softhsm

    hsm = require_softhsm()
    dsn = f"sqlite:///{tmp_path}/hsm.db"
    await kms_async.migrate(dsn)
    monkeypatch.setenv("KMS_DATABASE_URL", dsn)
    monkeypatch.setenv("KMS_PKCS11_PIN", hsm.pin)
    options = [
        *("--pkcs11-lib", hsm.lib_path, "--pkcs11-token", hsm.token_label),
        *("--pkcs11-key-label", hsm.key_labels[0]),
    ]
    created = await cli("create", "acme", *options)
    assert created.code == 0, created.err
    assert hsm.pin not in created.out + created.err
    rotated = await cli("rotate", "acme", "--rewrap", *options)
    assert rotated.code == 0, rotated.err
    monkeypatch.setenv("KMS_PKCS11_PIN", "0000")
    wrong = await cli("rotate", "acme", *options)
    assert wrong.code == 2, wrong.err
    assert "0000" not in wrong.err


async def test_demo_still_works(cli: Cli, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_DATABASE_URL", "postgresql://must-not-be-used@127.0.0.1:1/x")
    result = await cli("demo", "--db", f"sqlite:///{tmp_path}/demo.db")
    assert result.code == 0, result.err
    assert "done: every step behaved as expected" in result.out


def test_demo_leaves_a_database_it_did_not_make_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    path = os.path.join(str(tmp_path), "app.db")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("create table users (id integer primary key)")
    result = run_sync(capsys, "demo", "--db", f"sqlite:///{path}")
    assert result.code == 2
    assert "refusing to delete" in result.err
    assert "users" in result.err
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("select count(*) from users").fetchone() == (0,)


# -- a command line that speaks command line (issue 11, item 6) ---------------------


async def test_global_options_before_or_after_the_command(env: TestDB, cli: Cli) -> None:
    assert (await cli("create", "acme")).code == 0
    before = await cli("--json", "list", "acme")
    after = await cli("list", "acme", "--json")
    assert before.code == after.code == 0, before.err
    assert before.json() == after.json()
    os.environ.pop("KMS_DATABASE_URL")  # (monkeypatch restores it)
    dsn = env.dsn
    for argv in (
        ("--db", dsn, "--json", "--table-prefix", "kms", "scopes"),
        ("scopes", "--db", dsn, "--json", "--table-prefix", "kms"),
        ("--json", "scopes", "--db", dsn),
    ):
        result = await cli(*argv)
        assert result.code == 0, (argv, result.err)
        assert [s["id"] for s in result.json()["scopes"]] == ["acme"]
    usage = await cli("--json", "list")  # a usage error is JSON too
    assert usage.code == 2
    assert usage.error()["type"] == "UsageError"


async def test_scopes_lists_every_scope(env: TestDB, cli: Cli) -> None:
    empty = await cli("scopes")
    assert empty.code == 0
    assert empty.out.strip() == "no scopes have keys"
    assert (await cli("--json", "scopes")).json() == {"scopes": []}

    assert (await cli("create", "globex", "acme", "initech")).code == 0
    assert (await cli("rotate", "acme")).code == 0
    text = await cli("scopes")
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[0].split() == ["SCOPE", "ROOT", "VERSION", "ROTATED", "CREATED"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["acme", "2"],
        ["globex", "1"],
        ["initech", "1"],
    ]

    listed = (await cli("scopes", "--json")).json()["scopes"]
    assert [s["id"] for s in listed] == ["acme", "globex", "initech"]
    acme = listed[0]
    assert acme["root_version"] == 2
    assert acme["root_version_id"].startswith("krkv_")
    assert acme["root_key_id"].startswith("krk_")
    assert acme["rotate_time"] >= acme["create_time"]

    page = (await cli("scopes", "--json", "--after", "acme", "--limit", "1")).json()
    assert [s["id"] for s in page["scopes"]] == ["globex"]
    assert (await cli("scopes", "--limit", "0")).code == 2


async def test_a_sqlite_path_must_exist_unless_the_command_creates_it(
    cli: Cli, tmp_path: Any, root_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_ROOT_KEY", root_key)
    path = tmp_path / "app.db"
    for argv in (("list", "acme"), ("create", "acme"), ("scopes",), ("status",)):
        result = await cli(*argv, "--db", f"sqlite:///{path}")
        assert result.code == 2, argv
        assert f"no SQLite database at {path}" in result.err
        assert "run `kms-async migrate`" in result.err
        assert not path.exists()
    nowhere = await cli("migrate", "--db", f"sqlite:///{tmp_path}/no/such/dir/app.db")
    assert nowhere.code == 2
    assert "does not exist" in nowhere.err
    assert (await cli("migrate", "--db", f"sqlite:///{path}")).code == 0
    assert (await cli("create", "acme", "--db", f"sqlite:///{path}")).code == 0


@pytest.mark.parametrize(
    "dsn",
    [
        "sqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared",
        "sqlite:///",
        "sqlite://app.db",
        "sqlite:app.db",
        "app.db",
        "mysql://app@db/app",
        "postgresql+asyncpg://app@db/app",
        "postgresql://app@[::1/app",
        "postgresql://app@127.0.0.1:99999999/app",
        "postgresql://app@127.0.0.1/app?sslmode=bogus",
        "postgresql://app@127.0.0.1/app?connect_timeout=soon",
        "",
        " ",
        "sqlite:///a\x00b",
    ],
)
def test_a_malformed_db_is_a_usage_error_in_json_too(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["list", "acme"], ["migrate"]):
        result = run_sync(capsys, "--json", *command, "--db", dsn)
        assert result.code == 2, (dsn, result.err)
        assert result.out == ""
        error = result.error()
        assert error["exit_code"] == 2
        assert error["message"]
        assert ":memory:" not in error["message"]
        text = run_sync(capsys, *command, "--db", dsn)
        assert text.code == 2
        assert "Traceback" not in text.err
        assert ":memory:" not in text.err
    assert list(tmp_path.iterdir()) == []


async def test_a_hung_server_is_named_with_the_timeout(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _fake_pg import hung_server

    async with hung_server() as port:
        dsn = f"postgresql://app:secret@127.0.0.1:{port}/app"
        result = await cli("list", "acme", "--db", dsn, "--connect-timeout", "0.5", "--json")
        text = await cli("--connect-timeout", "0.5", "list", "acme", "--db", dsn)
    assert result.code == 6, result.err
    message = result.error()["message"]
    assert f"127.0.0.1:{port}" in message
    assert "0.5 s" in message and "--connect-timeout" in message
    assert "secret" not in message
    assert text.code == 6
    assert "did not answer within 0.5 s" in text.err
    assert (await cli("list", "acme", "--db", dsn, "--connect-timeout", "0")).code == 2


async def test_a_host_name_that_does_not_resolve_is_not_temporary(cli: Cli) -> None:
    result = await cli("list", "acme", "--db", "postgresql://app@db.example.invalid/app")
    assert result.code == 6
    assert "cannot resolve the database host name" in result.err
    assert "temporary" not in result.err
    as_json = await cli("--json", "list", "acme", "--db", "postgresql://app@db.example.invalid/a")
    assert as_json.error()["retryable"] is False


async def test_refused_credentials_are_not_temporary(cli: Cli) -> None:
    from _fake_pg import refusing_server

    async with refusing_server("28P01", 'password authentication failed for user "app"') as port:
        result = await cli(
            "--json", "list", "acme", "--db", f"postgresql://app:pw@127.0.0.1:{port}/a"
        )
    assert result.code == 6
    assert result.error()["retryable"] is False
    assert "password authentication failed" in result.error()["message"]


_PYTHON_ADVICE = re.compile(r"\w+\((?:'[^']*')?\)|kms_async\.|PooledWrapper|revoke_grace")


async def test_errors_name_the_command_to_run(env: TestDB, cli: Cli, tmp_path: Any) -> None:
    db = env
    await db.add_app_table()
    assert (await cli("create", "acme")).code == 0
    listed = (await cli("list", "acme", "--json")).json()
    old_root = listed["keys"][0]["versions"][0]["id"]
    old_data = listed["keys"][1]["versions"][0]["id"]
    await store_rows(db, {"r1": "acme"})
    assert (await cli("rotate", "acme")).code == 0
    newest_root = (await cli("list", "acme", "--json")).json()["keys"][0]["versions"][-1]["id"]

    expected = {
        ("rotate", "nobody"): "create them with `kms-async create nobody`",
        ("create", "acme"): "`kms-async reconcile acme --purpose P` adds purposes",
        ("revoke", old_root, "--yes", "--grace", "0"): "run `kms-async rewrap acme`",
        ("revoke", newest_root, "--yes"): "run `kms-async rotate acme` first",
        ("revoke", old_data, "--yes", "--grace", "0"): f"`kms-async destroy {old_data} --columns",
    }
    for argv, advice in expected.items():
        for json_mode in (False, True):
            result = await cli(*argv, *(["--json"] if json_mode else []))
            assert result.code in (3, 4), (argv, result.err)
            message = result.error()["message"] if json_mode else result.err
            assert advice in message, (argv, message)
            assert not _PYTHON_ADVICE.search(message), (argv, message)
    await db.execute("delete from app_secret")
    too_soon = await cli("revoke", old_data, "--yes")
    assert too_soon.code == 4
    assert "add --wait" in too_soon.err
    assert not _PYTHON_ADVICE.search(too_soon.err)


async def test_a_wrong_root_key_is_explained_with_the_options_to_use(
    env: TestDB, cli: Cli, root_key: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keys made under an explicit id, as the README once suggested.
    assert (await cli("create", "acme", "--root-key-id", "root-1")).code == 0
    # Another key under the same id.
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    wrong = await cli("rotate", "acme", "--root-key-id", "root-1", "--json")
    assert wrong.code == 1
    assert wrong.error()["retryable"] is False
    assert "is not the key that wrote it" in wrong.error()["message"]
    # Replacing it: the old key alone is not enough, the advice names its id.
    monkeypatch.setenv("KMS_PREVIOUS_ROOT_KEY", root_key)
    without_id = await cli("rewrap", "--all-scopes")
    assert without_id.code == 1
    assert "--previous-root-key-id root-1" in without_id.err
    assert not _PYTHON_ADVICE.search(without_id.err)
    rewrapped = await cli("rewrap", "--all-scopes", "--previous-root-key-id", "root-1")
    assert rewrapped.code == 0, rewrapped.err


# -- revoke shows what it deletes (issue 11, item 4) --------------------------------


async def test_revoke_shows_what_it_would_delete_and_asks(env: TestDB, cli: Cli) -> None:
    db = env
    await db.add_app_table()
    await db.add_app_table("app_audit")
    assert (await cli("create", "acme")).code == 0
    await store_rows(db, {"r1": "acme", "r2": "acme"})
    old = next(
        k
        for k in (await cli("list", "acme", "--json")).json()["keys"]
        if k["purpose"] == "database"
    )["versions"][0]
    await db.execute(
        "insert into app_audit (id, scope_id, key_version_id, ciphertext) values ($1, $2, $3, $4)",
        "a1",
        "acme",
        old["id"],
        b"x",
    )
    assert (await cli("rotate", "acme")).code == 0
    before = await data_versions(db)

    dry = await cli("revoke", old["id"], "--dry-run")
    assert dry.code == 0, dry.err
    assert (
        f"data key version {old['id']}: scope acme, purpose database, version 1, created "
        in dry.out
    )
    assert "referenced by 3 row(s)" in dry.out
    assert "app_secret.key_version_id: 2" in dry.out
    assert "app_audit.key_version_id: 1" in dry.out
    assert "dry run: nothing deleted" in dry.out
    as_json = (await cli("revoke", old["id"], "--dry-run", "--json", "--scope", "acme")).json()
    assert as_json["dry_run"] is True and as_json["revoked"] is None
    version = as_json["version"]
    assert (version["id"], version["scope"], version["purpose"], version["version"]) == (
        old["id"],
        "acme",
        "database",
        1,
    )
    assert version["create_time"] == old["create_time"]
    assert version["rows"] == 3
    assert sorted((r["table"], r["column"], r["rows"]) for r in version["references"]) == [
        ("app_audit", "key_version_id", 1),
        ("app_secret", "key_version_id", 2),
    ]
    assert (await cli("revoke", old["id"], "--dry-run", "--scope", "globex")).code == 3
    root = (await cli("list", "acme", "--json")).json()["keys"][0]["versions"][0]
    shown = await cli("revoke", root["id"], "--dry-run")
    assert f"root key version {root['id']}: scope acme, purpose rootKey, version 1" in shown.out
    assert "wraps 1 data key version(s)" in shown.out  # data version 1
    assert (await cli("revoke", root["id"], "--dry-run", "--json")).json()["version"]["rows"] == 1

    # No terminal to ask on (stdin is not one here): refused without --yes.
    unasked = await cli("revoke", old["id"], "--grace", "0")
    assert unasked.code == 2
    assert "--yes" in unasked.err and "--dry-run" in unasked.err
    assert (await cli("revoke", old["id"], "--grace", "0", "--json")).error()["exit_code"] == 2
    assert await data_versions(db) == before

    await db.execute("delete from app_secret")
    await db.execute("delete from app_audit")
    revoked = await cli("revoke", old["id"], "--grace", "0", "--yes", "--json")
    assert revoked.code == 0, revoked.err
    assert revoked.json()["revoked"] == old["id"]
    assert revoked.json()["version"]["rows"] == 0
    assert (await data_versions(db))[("acme", "database")] == [2]


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_revoke_asks_on_a_terminal(env: TestDB, answer: str) -> None:
    import pty

    db = env
    kms = await open_kms()
    async with kms:
        await kms.create_keys("acme")
        old = (await kms.list_keys("acme"))[1].versions[0].id
        await kms.rotate_keys("acme")
    primary, secondary = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "kms_async", "revoke", old, "--grace", "0"),
            cwd=REPO,
            env=dict(os.environ),
            stdin=secondary,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        shown = b""
        while b"[y/N]" not in shown:
            chunk = await asyncio.wait_for(proc.stderr.read(200), 60)
            assert chunk, shown
            shown += chunk
        assert f"data key version {old}: scope acme".encode() in shown
        os.write(primary, answer.encode() + b"\n")
        out, rest = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        os.close(primary)
        os.close(secondary)
    remaining = (await data_versions(db))[("acme", "database")]
    if answer == "y":
        assert proc.returncode == 0, rest
        assert f"revoked {old}".encode() in out
        assert remaining == [2]
    else:
        assert proc.returncode == 4, rest
        assert b"not revoked" in rest
        assert remaining == [1, 2]
