"""The docs' "Replacing a local root key", run as written (issue 11, item 3).

The section lives in docs/how-to/replace-root-key.md (it was the README's
until the README became a front page). Its shell block and its Python block
are read out of that page, not copied here, so this test fails as soon as
the documented procedure stops working. The docs example harness
(test_docs_examples.py) skips the two blocks, each marked as run here: they
need a database whose keys were written by both the library and the command
line, which this test builds. The database it starts from holds root keys
written both ways the docs show: by the library (``AeadWrapper(key)``, as in
the quick start) and by the command line (``--root-key-file``), from the
same old key; the two give the key the same id, which is what lets one
``--previous-root-key-file`` unwrap all of them.
"""

from __future__ import annotations

import base64
import os
import pathlib
import re
import secrets
import subprocess
import sys
from typing import Any

import pytest
from conftest import TestDB

import kms_async
from kms_async import KMS, AeadWrapper, BlobInfo, WrapperError
from kms_async._wrappers import key_fingerprint

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "how-to" / "replace-root-key.md"
SECTION = "\n## Replacing a local root key\n"
# What the docs harness reads before each block: skip it, this test runs it.
RUN_HERE = re.compile(r"<!-- docs-test: skip tests/test_readme_root_replacement\.py runs [^>]*-->")


def _section() -> str:
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(SECTION) == 1, f"{PAGE.name} should hold one {SECTION.strip()!r} section"
    start = text.index(SECTION) + 1
    end = text.find("\n## ", start)
    return text[start : end if end != -1 else len(text)]


def _block(language: str) -> str:
    found = re.findall(rf"([^\n]*)\n```{language}\n(.*?)```", _section(), re.DOTALL)
    assert len(found) == 1, f"the section should hold one {language} block"
    marker, code = found[0]
    # Marked, so the docs harness does not also run it (without the database it needs).
    assert RUN_HERE.fullmatch(marker.strip()), f"the {language} block lacks its marker"
    return str(code)


def _run_shell(script: str, cwd: pathlib.Path, dsn: str) -> subprocess.CompletedProcess[str]:
    """Run the page's shell lines with this checkout's kms_async and Python."""
    prelude = (
        "set -e\n"
        f'kms-async() {{ "{sys.executable}" -m kms_async "$@"; }}\n'
        f'python() {{ "{sys.executable}" "$@"; }}\n'
    )
    env = {
        **os.environ,
        "KMS_DATABASE_URL": dsn,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("KMS_ROOT_KEY", "KMS_ROOT_KEY_FILE", "KMS_ROOT_KEY_ID", "KMS_PREVIOUS_ROOT_KEY"):
        env.pop(name, None)
    return subprocess.run(
        ["bash", "-c", prelude + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


async def _populate(db: TestDB, tmp_path: pathlib.Path, old_key: bytes) -> dict[str, bytes]:
    """Keys made by the library and by the command line with the old key, and data."""
    (tmp_path / "old.key").write_text(base64.b64encode(old_key).decode() + "\n")
    made = _run_shell(
        "kms-async create globex initech --purposes database,oidc --root-key-file old.key",
        tmp_path,
        db.dsn,
    )
    assert made.returncode == 0, made.stderr
    ciphertexts = {}
    root = AeadWrapper(old_key)  # as the quick start makes it
    kms = await KMS.open(db.dsn, purposes=["database"], root_wrapper=root, max_staleness=None)
    async with kms:
        await kms.create_keys("acme")
        await kms.rotate_keys("globex")
        for scope in ("acme", "globex", "initech"):
            ciphertexts[scope] = await kms.encrypt(scope, "database", scope.encode())
    return ciphertexts


async def _root_key_ids(db: TestDB) -> set[str]:
    rows = await db.fetch("select key from kms_root_key_version")
    return {BlobInfo.from_bytes(bytes(r[0])).key_id for r in rows}


@pytest.mark.parametrize("how", ["command line", "python"])
async def test_the_docs_replace_a_local_root_key(
    db: TestDB, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    old_key = secrets.token_bytes(32)
    ciphertexts = await _populate(db, tmp_path, old_key)
    assert await _root_key_ids(db) == {key_fingerprint(old_key)}  # one key, one id

    shell = _block("sh")
    if how == "command line":
        ran = _run_shell(shell, tmp_path, db.dsn)
        assert ran.returncode == 0, ran.stderr
    else:
        commands = [line for line in shell.splitlines() if line and not line.startswith("#")]
        make_key = [line for line in commands if not line.startswith("kms-async")]
        assert len(make_key) == 1
        assert _run_shell(make_key[0], tmp_path, db.dsn).returncode == 0
        namespace: dict[str, Any] = {}
        exec(compile(_block("python"), str(PAGE), "exec"), namespace)
        monkeypatch.chdir(tmp_path)
        await namespace["replace_root_key"](db.dsn)
        # The docs' check, with the new key alone.
        checks = [line for line in commands if line.startswith("kms-async")]
        check = _run_shell(checks[-1], tmp_path, db.dsn)
        assert check.returncode == 0, check.stderr

    new_root = AeadWrapper.from_file(tmp_path / "new.key")
    assert await _root_key_ids(db) == {new_root.key_id}
    assert new_root.key_id != key_fingerprint(old_key)
    # The new key alone reads everything; the old one alone nothing.
    kms = await KMS.open(db.dsn, purposes=["database", "oidc"], root_wrapper=new_root)
    async with kms:
        for scope, ciphertext in ciphertexts.items():
            assert await kms.decrypt(scope, "database", ciphertext) == scope.encode()
        await kms.encrypt("initech", "oidc", b"x")
    with pytest.raises(WrapperError):  # refused at open (the root key check)
        await KMS.open(db.dsn, purposes=["database"], root_wrapper=AeadWrapper(old_key))
    kms = await KMS.open(
        db.dsn,
        purposes=["database"],
        root_wrapper=AeadWrapper(old_key),
        check_root_wrapper=False,
    )
    async with kms:
        with pytest.raises(WrapperError):
            await kms.decrypt("acme", "database", ciphertexts["acme"])
    # A second run of the whole procedure is harmless, and the check still passes.
    if how == "command line":
        rewrap = [line for line in shell.splitlines() if line.startswith("kms-async")]
        assert _run_shell("\n".join(rewrap), tmp_path, db.dsn).returncode == 0


async def test_the_docs_check_fails_while_a_scope_needs_the_old_key(
    db: TestDB, tmp_path: pathlib.Path
) -> None:
    old_key = secrets.token_bytes(32)
    await _populate(db, tmp_path, old_key)
    commands = [line for line in _block("sh").splitlines() if line and not line.startswith("#")]
    make_key, check = commands[0], commands[-1]
    assert _run_shell(make_key, tmp_path, db.dsn).returncode == 0
    refused = _run_shell(check, tmp_path, db.dsn)  # the check, before any rewrap
    assert refused.returncode == 1
    assert "--previous-root-key-file" in refused.stderr
    assert await _root_key_ids(db) == {key_fingerprint(old_key)}  # nothing written
    assert kms_async.AeadWrapper(old_key).key_id == key_fingerprint(old_key)
