"""Every public call and every CLI command, driven with hostile arguments.

The property (issue 11, item 7): whatever the arguments, a public call of
the library returns or raises a ``KMSError`` subclass, and a ``kms-async``
command exits with one of its documented statuses, never a traceback (with
``--json``, an error is a JSON object). The calls are found by introspection
(every public method of ``KMS``, ``KMS.open`` and the package's functions
and constructors), so a method added later is driven too. Arguments are
drawn per parameter name: plausible values (existing scopes, purposes, key
version ids, genuine ciphertexts) mixed with hostile ones (wrong types,
surrogates, NULs, huge numbers, NaN, nested lists, memoryviews).

Each example runs every call once, on SQLite and PostgreSQL; the examples
are derandomized and few, to keep the run to seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import pathlib
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from conftest import TestDB
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kms_async
from kms_async import KMS, AeadWrapper, EncryptedColumn, KMSError
from kms_async._cli import EXIT_CODES, build_parser, main

QUICK = settings(
    max_examples=int(os.environ.get("HUNT", "6")),
    deadline=None,
    derandomize=not os.environ.get("HUNT"),
    # A failure is reported as found: shrinking calls that open databases
    # could take minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_WEIRD = [
    "",
    " ",
    "x" * 3000,
    "a\x00b",
    "\ud800",
    "rootKey",
    "kdkv_AAAAAAAAAA",
    "krkv_AAAAAAAAAA",
    "kdkv_" + "\x00" * 10,
    "../../etc/passwd",
    "sqlite:",
    "postgresql://[::1",
    b"\x00\xff",
    memoryview(b"abcdefgh")[::2],
    bytearray(b"ab"),
    float("nan"),
    float("inf"),
    -1,
    0,
    2**70,
    True,
    object(),
    {"a": 1},
    [None],
    ["database", "database"],
    ("x",),
]
HOSTILE = st.one_of(
    st.none(),
    st.sampled_from(_WEIRD),
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.binary(max_size=40),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.lists(st.text(max_size=6), max_size=3),
)


def _strategies(known: dict[str, Any]) -> dict[str, st.SearchStrategy[Any]]:
    """Per parameter name: plausible values mixed with hostile ones."""
    scope = st.sampled_from(["org", "other", "nobody"])
    purpose = st.sampled_from(["database", "oidc", "rootKey", "billing"])
    version = st.sampled_from(known["versions"])
    column = EncryptedColumn(
        table="app_secret",
        ciphertext_column="ciphertext",
        key_version_column="key_version_id",
        scope="scope_id",
        purpose="database",
    )
    binary = st.one_of(st.binary(max_size=64), st.sampled_from(known["ciphertexts"]))
    return {
        "scope_id": scope,
        "after": scope,
        "scope_ids": st.lists(scope, max_size=3),
        "purpose": purpose,
        "purposes": st.lists(purpose, max_size=3),
        "plaintext": binary,
        "ciphertext": binary,
        "aad": st.one_of(st.none(), st.binary(max_size=8)),
        "key_version_id": version,
        "columns": st.just([column]),
        "batch_size": st.integers(-2, 3),
        "limit": st.integers(-2, 3),
        "progress": st.sampled_from([None, lambda n: None]),
        "rewrap": st.booleans(),
        "conn": st.none(),
        "wrapper": st.just(known["root"]),
        "root_wrapper": st.just(known["root"]),
    }


def _public_methods() -> list[str]:
    names = []
    for name, value in sorted(vars(KMS).items()):
        if name.startswith("_") or isinstance(value, property) or name == "aclose":
            continue
        if callable(value) or isinstance(value, (classmethod, staticmethod)):
            names.append(name)
    return names


def _parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(function).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _draw_kwargs(
    data: st.DataObject, function: Callable[..., Any], plausible: dict[str, Any]
) -> dict[str, Any]:
    kwargs = {}
    for p in _parameters(function):
        if p.default is not p.empty and data.draw(st.booleans()):
            continue  # leave it at its default
        strategy = plausible.get(p.name)
        choice = HOSTILE if strategy is None else st.one_of(strategy, strategy, HOSTILE)
        kwargs[p.name] = data.draw(choice, label=p.name)
    return kwargs


async def _drive(function: Callable[..., Any], what: str, kwargs: dict[str, Any]) -> Any:
    """Call and run to its end (awaiting, iterating, entering); only KMSError may come out."""
    try:
        result = function(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        if hasattr(result, "__anext__"):
            return [item async for item in result]
        if isinstance(result, contextlib.AbstractAsyncContextManager):
            async with result as entered:
                return entered
        return result
    except KMSError:
        return None
    except Exception as exc:
        pytest.fail(f"{what}({kwargs!r}) raised {type(exc).__name__}: {exc!r}")


@pytest.fixture
async def known(db: TestDB, kms: KMS, root_wrapper: AeadWrapper) -> dict[str, Any]:
    """A populated store: two scopes (one rotated), app rows, ids and ciphertexts."""
    await db.add_app_table()
    await kms.create_keys_many(["org", "other"])
    ciphertexts = [await kms.encrypt("org", "database", b"secret")]
    await kms.rotate_keys("org")
    ciphertexts.append(await kms.encrypt("org", "oidc", b"secret", aad=b"row"))
    versions = [v.id for k in await kms.list_keys("org") for v in k.versions]
    return {"root": root_wrapper, "ciphertexts": ciphertexts, "versions": versions}


@QUICK
@given(data=st.data())
async def test_every_kms_method_takes_hostile_arguments(
    db: TestDB, kms: KMS, known: dict[str, Any], data: st.DataObject
) -> None:
    plausible = _strategies(known)
    for name in _public_methods():
        if name == "open":
            continue
        method = getattr(kms, name)
        kwargs = _draw_kwargs(data, method, plausible)
        await _drive(method, f"KMS.{name}", kwargs)
    # The KMS is still whole: correct calls work (the hostile ones may have
    # rotated or revoked, which is their right).
    ciphertext = await kms.encrypt("org", "database", b"still whole")
    assert await kms.decrypt("org", "database", ciphertext) == b"still whole"


@QUICK
@given(data=st.data())
async def test_opening_and_the_package_functions_take_hostile_arguments(
    db: TestDB,
    known: dict[str, Any],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    data: st.DataObject,
) -> None:
    monkeypatch.chdir(tmp_path)  # a hostile sqlite:///name lands here
    plausible = {
        **_strategies(known),
        "db": st.sampled_from([db.dsn, f"sqlite:///{tmp_path}/new.db", "sqlite:///:memory:"]),
        "dialect": st.sampled_from(["postgres", "sqlite"]),
        "key": st.binary(min_size=31, max_size=33),
        "key_id": st.sampled_from([None, "root-1"]),
    }
    functions: dict[str, Callable[..., Any]] = {"KMS.open": KMS.open}
    for name in kms_async.__all__:
        value = getattr(kms_async, name)
        if inspect.isfunction(value):
            functions[name] = value
    functions.update(
        {
            "AeadWrapper": AeadWrapper,
            "AeadWrapper.from_env": AeadWrapper.from_env,
            "AeadWrapper.from_file": AeadWrapper.from_file,
            "BlobInfo.from_bytes": kms_async.BlobInfo.from_bytes,
            "EncryptedColumn": EncryptedColumn,
        }
    )
    for what, function in functions.items():
        kwargs = _draw_kwargs(data, function, plausible)
        result = await _drive(function, what, kwargs)
        if isinstance(result, KMS):
            await result.aclose()


def _command_options() -> dict[str, list[str]]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    options = {}
    for name, sub in commands.choices.items():
        options[name] = sorted(
            {s for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")}
        )
    return options


OPTIONS = _command_options()
_ARG_TEXT = st.one_of(
    st.sampled_from(["org", "nobody", "0", "-1", "1e999", "nan", "auto", "--", "-", "="]),
    st.text(st.characters(exclude_categories=(), exclude_characters="\x00"), max_size=10),
)


@settings(QUICK, max_examples=int(os.environ.get("HUNT", "4")))
@given(data=st.data())
async def test_every_cli_command_takes_hostile_arguments(
    db: TestDB,
    known: dict[str, Any],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    data: st.DataObject,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KMS_DATABASE_URL", db.dsn)
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    versions = st.sampled_from(known["versions"])
    for command, options in sorted(OPTIONS.items()):
        words = st.one_of(st.sampled_from(options), _ARG_TEXT, versions)
        argv = [command, *data.draw(st.lists(words, max_size=6), label=command)]
        if command == "demo":
            argv += ["--db", data.draw(_ARG_TEXT, label="demo db")]  # never a real demo run
        json_mode = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
        capsys.readouterr()
        code = await asyncio.to_thread(main, argv)
        err = capsys.readouterr().err
        assert code in EXIT_CODES, (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if json_mode and code not in (0, 130, 143) and err.strip():
            error = json.loads(err.strip().splitlines()[-1])["error"]
            assert error["exit_code"] == code, (argv, error)
            assert error["message"], (argv, error)


def test_every_command_is_driven() -> None:
    assert set(OPTIONS) >= {"migrate", "create", "scopes", "list", "revoke", "demo"}
    assert "describe_key_version" in _public_methods()
