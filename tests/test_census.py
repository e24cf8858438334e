"""The key census: KMS.census() and the CLI's census and rotate --due."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import pathlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import TestDB

import kms_async
from kms_async import KMS, AeadWrapper, BlobInfo, CensusRow, KeyNotFoundError
from kms_async._cli import main

OpenKMS = Callable[..., Awaitable[KMS]]


def key_id(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def test_census_of_one_scope(db: TestDB, kms: KMS) -> None:
    await kms.create_keys_many(["acme", "globex"])
    old = key_id(await kms.encrypt("acme", "database", b"x"))
    await kms.rotate_keys("acme")
    new = key_id(await kms.encrypt("acme", "database", b"x"))
    await kms.encrypt_many("acme", "database", [b"y"] * 4)
    await kms.suspend_key_version(old)
    await kms.flush_usage()
    before = await kms.database_time()
    rows = await kms.census("acme")
    assert all(isinstance(r, CensusRow) for r in rows)
    assert [(r.scope, r.purpose, r.version) for r in rows] == [
        ("acme", "database", 1),
        ("acme", "database", 2),
        ("acme", "oidc", 1),
        ("acme", "oidc", 2),
    ]
    first, second = rows[0], rows[1]
    assert (first.key_version_id, first.encryptions, first.suspended, first.newest) == (
        old,
        1,
        True,
        False,
    )
    assert (second.key_version_id, second.encryptions, second.suspended, second.newest) == (
        new,
        5,
        False,
        True,
    )
    assert rows[2].encryptions == 0 and rows[3].newest
    assert first.key_id == second.key_id != rows[2].key_id
    assert all(r.referencing_rows is None for r in rows)  # not asked for
    assert all(r.create_time <= before + datetime.timedelta(seconds=1) for r in rows)
    assert first.create_time.tzinfo is not None


async def test_census_of_every_scope_and_referencing_rows(db: TestDB, kms: KMS) -> None:
    await db.add_app_table()
    await kms.create_keys_many([f"s{i}" for i in range(3)])
    for i in range(3):
        ciphertext = await kms.encrypt(f"s{i}", "database", b"secret")
        for n in range(i):
            await db.execute(
                "insert into app_secret (id, scope_id, key_version_id, ciphertext)"
                " values ($1, $2, $3, $4)",
                f"row-{i}-{n}",
                f"s{i}",
                key_id(ciphertext),
                ciphertext,
            )
    rows = await kms.census(referencing_rows=True)
    assert [r.scope for r in rows] == ["s0", "s0", "s1", "s1", "s2", "s2"]
    by_scope = {r.scope: r.referencing_rows for r in rows if r.purpose == "database"}
    assert by_scope == {"s0": 0, "s1": 1, "s2": 2}
    assert all(r.referencing_rows == 0 for r in rows if r.purpose == "oidc")
    assert await kms.list_data_key_version_referencers() == ["app_secret"]


async def test_census_of_a_scope_without_keys(kms: KMS) -> None:
    with pytest.raises(KeyNotFoundError):
        await kms.census("nobody")
    assert await kms.census() == []


# -- the command line ---------------------------------------------------------------


@pytest.fixture
def env(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> TestDB:
    for name in ("KMS_TABLE_PREFIX", "KMS_PURPOSES", "KMS_ROOT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    return db


Run = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def _fill(env: TestDB) -> dict[str, str]:
    """Two scopes with counted encryptions; returns scope -> newest version id."""
    async with await KMS.open(
        os.environ["KMS_DATABASE_URL"],
        purposes=["database"],
        root_wrapper=AeadWrapper.from_env(),
        max_staleness=None,
    ) as kms:
        await kms.create_keys_many(["acme", "globex"])
        newest = {}
        for scope, n in (("acme", 7), ("globex", 2)):
            newest[scope] = key_id((await kms.encrypt_many(scope, "database", [b"x"] * n))[0])
    return newest


async def test_cli_census_table_json_and_png(env: TestDB, cli: Run, tmp_path: pathlib.Path) -> None:
    newest = await _fill(env)
    code, out, _ = await cli("census")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "SCOPE",
        "PURPOSE",
        "VERSION",
        "ID",
        "CREATED",
        "AGE",
        "ENCRYPTIONS",
        "STATE",
    ]
    assert any(newest["acme"] in line and " 7 " in line and "newest" in line for line in lines)
    code, out, _ = await cli("census", "--scope", "globex", "--rows", "--json")
    assert code == 0
    data = json.loads(out)
    assert [(v["scope"], v["id"], v["encryptions"], v["rows"]) for v in data["versions"]] == [
        ("globex", newest["globex"], 2, 0)
    ]
    assert data["versions"][0]["newest"] is True and data["versions"][0]["age_seconds"] >= 0
    png = tmp_path / "census.png"
    code, out, _ = await cli("census", "--rows", "--png", str(png))
    assert code == 0 and f"to {png}" in out
    image = png.read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 1000


async def test_cli_census_of_a_missing_scope_fails(env: TestDB, cli: Run) -> None:
    await _fill(env)
    code, _, err = await cli("census", "--scope", "nobody")
    assert code == 3, err
    assert "nobody" in err


async def test_cli_rotate_due(env: TestDB, cli: Run) -> None:
    await _fill(env)
    code, out, _ = await cli("rotate", "--due", "--max-encryptions", "5", "--json")
    assert code == 0
    assert json.loads(out) == {"rotated": 1, "scopes": ["acme"]}
    code, out, _ = await cli("rotate", "--due", "--max-encryptions", "5", "--max-age", "90d")
    assert code == 0 and "rotated 0 scope(s)" in out
    code, out, _ = await cli("rotate", "--due", "--max-encryptions", "1e0", "globex", "acme")
    assert code == 0 and out.splitlines()[1:] == ["  globex"]
    code, out, _ = await cli("census", "--json")
    versions = {(v["scope"], v["version"]) for v in json.loads(out)["versions"]}
    assert versions == {("acme", 1), ("acme", 2), ("globex", 1), ("globex", 2)}


@pytest.mark.parametrize(
    "argv",
    [
        ["rotate", "--due"],
        ["rotate", "--due", "--max-age", "1d", "--rewrap"],
        ["rotate", "--due", "--max-age", "1d", "--all-scopes"],
        ["rotate", "acme", "--max-age", "1d"],
    ],
)
async def test_cli_rotate_due_refuses_what_does_not_fit(
    env: TestDB, cli: Run, argv: list[str]
) -> None:
    code, _, err = await cli(*argv)
    assert code == 2, err


@pytest.mark.parametrize("bad", ["1.5", "-1", "1e99", "many", "nan"])
def test_max_encryptions_must_be_a_whole_number(
    capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    assert main(["rotate", "--due", "--max-encryptions", bad]) == 2
    assert "whole number" in capsys.readouterr().err


def test_max_age_and_counts_parse() -> None:
    from kms_async._cli import _count, _max_age

    assert _max_age("90d") == 90 * 86400
    assert _max_age("12h") == 12 * 3600
    assert _max_age("30m") == 1800
    assert _count("1e9") == 10**9
    assert _count("1_000") == 1000
    assert _count("2.5e3") == 2500


def test_census_row_is_in_the_public_api() -> None:
    assert kms_async.CensusRow is CensusRow
    row: Any = CensusRow(
        scope="s",
        purpose="p",
        key_id="kdk_AAAAAAAAAA",
        version=1,
        key_version_id="kdkv_AAAAAAAAAA",
        create_time=datetime.datetime.now(datetime.timezone.utc),
        encryptions=None,
        referencing_rows=None,
        suspended=False,
        newest=True,
    )
    assert row.newest
