"""The command line's side of issue 11: suspend and resume, the state of
every version in list and status, and the way out of an unusable version."""

from __future__ import annotations

import base64
import secrets

import pytest
from conftest import TestDB
from test_cli import Cli, clean_env, cli, env, open_kms, root_key  # noqa: F401
from test_operator_safety import rotate_by_sql

from kms_async import AeadWrapper


async def test_suspend_then_resume_from_the_command_line(env: TestDB, cli: Cli) -> None:  # noqa: F811
    assert (await cli("migrate")).code == 0
    assert (await cli("create", "acme")).code == 0
    assert (await cli("rotate", "acme")).code == 0
    async with await open_kms() as kms:
        keys = await kms.list_keys("acme")
        old = next(k for k in keys if k.purpose == "database").versions[0]
    done = await cli("suspend", old.id, "--scope", "acme", "--json")
    assert done.code == 0, done.err
    assert done.json() == {"suspended": old.id}
    listed = await cli("list", "acme", "--json")
    states = {v["id"]: v["suspended"] for k in listed.json()["keys"] for v in k["versions"]}
    assert states[old.id] is True
    text = await cli("status", "acme")
    line = next(row for row in text.out.splitlines() if old.id in row)
    assert line.rstrip().endswith("suspended")
    # The newest version cannot be suspended: exit 4 (in use), nothing changes.
    newest = next(k for k in listed.json()["keys"] if k["purpose"] == "database")["versions"][-1]
    refused = await cli("suspend", newest["id"])
    assert refused.code == 4, refused.err
    assert "rotate" in refused.err
    resumed = await cli("resume", old.id)
    assert resumed.code == 0 and f"resumed {old.id}" in resumed.out
    after = await cli("list", "acme", "--json")
    assert not any(v["suspended"] for k in after.json()["keys"] for v in k["versions"])


async def test_status_marks_unusable_versions_and_rotate_replaces_them(
    env: TestDB,  # noqa: F811
    cli: Cli,  # noqa: F811
) -> None:
    assert (await cli("migrate")).code == 0
    assert (await cli("create", "acme")).code == 0
    other = AeadWrapper(secrets.token_bytes(32), key_id="someone-else")
    bad_root, bad_data = await rotate_by_sql(env, "acme", other)

    status = await cli("status", "acme")
    assert status.code == 0, status.err
    unusable = [row for row in status.out.splitlines() if "UNUSABLE" in row]
    assert any(bad_root in row for row in unusable) and any(bad_data in row for row in unusable)
    assert "rotate SCOPE --replace-unusable" in status.out
    as_json = (await cli("status", "acme", "--json")).json()
    flagged = {
        v["id"]
        for s in as_json["scopes"]
        for k in s["keys"]
        for v in k["versions"]
        if v["unusable"]
    }
    assert flagged == {bad_root, bad_data}

    plain = await cli("rotate", "acme")
    assert plain.code != 0
    assert "rotate acme --replace-unusable" in plain.err and "rotate_keys" not in plain.err
    fixed = await cli("rotate", "acme", "--replace-unusable")
    assert fixed.code == 0, fixed.err
    assert (await cli("revoke", bad_data, "--grace", "0", "--yes")).code == 0
    assert (await cli("revoke", bad_root, "--grace", "0", "--yes")).code == 0
    clean = await cli("status", "acme")
    assert "UNUSABLE" not in clean.out


async def test_a_wrong_root_key_is_refused_before_anything_runs(
    env: TestDB,  # noqa: F811
    cli: Cli,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (await cli("migrate")).code == 0
    assert (await cli("create", "acme")).code == 0
    before = await env.fetch("select private_id, key from kms_root_key_version order by 1")
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    result = await cli("rotate", "acme")
    assert result.code != 0
    assert "another root key" in result.err
    assert await env.fetch("select private_id, key from kms_root_key_version order by 1") == before
