"""Local AES root keys: ``AeadWrapper.from_env`` and ``AeadWrapper.from_file``.

Every malformed input gets an ``InvalidParameterError`` that says what to do
and never repeats the value it was given.
"""

from __future__ import annotations

import base64
import os
import pathlib
import secrets
from typing import Any

import pytest

import kms_async
from kms_async import KMS, AeadWrapper, BlobInfo, InvalidParameterError
from kms_async._wrappers import key_fingerprint

PURPOSES = ["database", "oidc"]
MAKE_KEY = 'python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"'


def _assert_secret_absent(message: str, *secrets_: str | bytes) -> None:
    for secret in secrets_:
        text = secret.decode("latin-1") if isinstance(secret, bytes) else secret
        assert text.strip() not in message


# -- from_env --------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda k: base64.b64encode(k).decode(), id="standard"),
        pytest.param(lambda k: base64.urlsafe_b64encode(k).decode(), id="urlsafe"),
        pytest.param(lambda k: base64.urlsafe_b64encode(k).decode().rstrip("="), id="unpadded"),
        pytest.param(lambda k: f"  {base64.b64encode(k).decode()}\n", id="whitespace"),
    ],
)
async def test_from_env_accepts_both_alphabets(
    monkeypatch: pytest.MonkeyPatch, encode: object
) -> None:
    key = secrets.token_bytes(32)
    monkeypatch.setenv("KMS_ROOT_KEY", encode(key))  # type: ignore[operator]
    wrapper = AeadWrapper.from_env()
    assert wrapper.matches_key(key)
    blob = await wrapper.encrypt(b"root key")
    assert blob.key_id == wrapper.key_id
    assert await AeadWrapper(key, key_id="other").decrypt(blob) == b"root key"


def test_from_env_reads_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_bytes(32)
    monkeypatch.delenv("KMS_ROOT_KEY", raising=False)
    monkeypatch.setenv("APP_ROOT_KEY", base64.b64encode(key).decode())
    assert AeadWrapper.from_env("APP_ROOT_KEY").matches_key(key)


def test_default_key_id_is_a_stable_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_bytes(32)
    encoded = base64.b64encode(key).decode()
    monkeypatch.setenv("KMS_ROOT_KEY", encoded)
    monkeypatch.setenv("ELSEWHERE", encoded)
    first = AeadWrapper.from_env()
    assert first.key_id == key_fingerprint(key)
    assert first.key_id.startswith("local-") and len(first.key_id) == len("local-") + 16
    # The same key gives the same id wherever it is kept...
    assert AeadWrapper.from_env("ELSEWHERE").key_id == first.key_id
    # ...another key another id, and the id reveals nothing of the key.
    assert key_fingerprint(secrets.token_bytes(32)) != first.key_id
    _assert_secret_absent(first.key_id, key.hex()[:8], encoded[:8])
    _assert_secret_absent(repr(first), key.hex()[:8], encoded[:8])


async def test_every_way_to_load_a_key_gives_it_the_same_id(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library's constructor, its loaders, open_root_wrapper and so the
    # command line: one key, one id (issue 11, item 3).
    key = secrets.token_bytes(32)
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(key).decode())
    monkeypatch.delenv("KMS_ROOT_KEY_ID", raising=False)
    (tmp_path / "root.key").write_bytes(key)
    ids = {
        AeadWrapper(key).key_id,
        AeadWrapper(bytearray(key)).key_id,  # type: ignore[arg-type]
        AeadWrapper.from_env().key_id,
        AeadWrapper.from_file(tmp_path / "root.key").key_id,
    }
    async with kms_async.open_root_wrapper() as from_env:
        ids.add(from_env.key_id)
    async with kms_async.open_root_wrapper(key_file=tmp_path / "root.key") as from_file:
        ids.add(from_file.key_id)
    assert ids == {key_fingerprint(key)}
    assert AeadWrapper(key, key_id="root-1").key_id == "root-1"


def test_explicit_key_id_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    assert AeadWrapper.from_env(key_id="root-1").key_id == "root-1"
    with pytest.raises(InvalidParameterError, match="key_id"):
        AeadWrapper.from_env(key_id="")


def test_missing_variable_names_it_and_how_to_make_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_ROOT_KEY", raising=False)
    with pytest.raises(InvalidParameterError) as info:
        AeadWrapper.from_env()
    message = str(info.value)
    assert "KMS_ROOT_KEY" in message and "is not set" in message
    assert MAKE_KEY in message
    assert isinstance(info.value, ValueError)


def test_empty_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_ROOT_KEY", "  \n")
    with pytest.raises(InvalidParameterError, match="KMS_ROOT_KEY is empty"):
        AeadWrapper.from_env()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("this is not base64!", id="alphabet"),
        pytest.param("QUJDREVGR", id="impossible-length"),
        pytest.param("QUJD=RUZH", id="inner-padding"),
        pytest.param("QUJDRUZHSElKS0xNTk9QUVJTVFVWV1hZWjAxMjM0NTY3ODk=ab=", id="trailing"),
    ],
)
def test_not_base64(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KMS_ROOT_KEY", value)
    with pytest.raises(InvalidParameterError, match="base64") as info:
        AeadWrapper.from_env()
    assert MAKE_KEY in str(info.value)
    _assert_secret_absent(str(info.value), value)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_wrong_length_says_the_length_not_the_bytes(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    key = secrets.token_bytes(size)
    encoded = base64.b64encode(key).decode() or "===="
    monkeypatch.setenv("KMS_ROOT_KEY", encoded)
    with pytest.raises(InvalidParameterError) as info:
        AeadWrapper.from_env()
    message = str(info.value)
    assert f"decodes to {size} bytes" in message and "32 bytes" in message
    if size:
        _assert_secret_absent(message, encoded, key.hex())


def test_hex_key_gets_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_ROOT_KEY", secrets.token_hex(32))
    with pytest.raises(InvalidParameterError, match="looks like hex"):
        AeadWrapper.from_env()


# -- from_file -------------------------------------------------------------


def test_from_file_raw_bytes(tmp_path: pathlib.Path) -> None:
    # A raw key may contain whitespace bytes at its ends; they are key bytes.
    key = b"\n" + secrets.token_bytes(30) + b" "
    path = tmp_path / "root.key"
    path.write_bytes(key)
    wrapper = AeadWrapper.from_file(path)
    assert wrapper.matches_key(key)
    assert wrapper.key_id == key_fingerprint(key)
    assert AeadWrapper.from_file(str(path), key_id="root-1").key_id == "root-1"


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda k: base64.b64encode(k) + b"\n", id="standard-newline"),
        pytest.param(
            lambda k: b"\t " + base64.urlsafe_b64encode(k).rstrip(b"=") + b"\r\n", id="urlsafe"
        ),
    ],
)
async def test_from_file_base64_text(tmp_path: pathlib.Path, encode: object) -> None:
    key = secrets.token_bytes(32)
    path = tmp_path / "root.key"
    path.write_bytes(encode(key))  # type: ignore[operator]
    wrapper = AeadWrapper.from_file(path)
    assert wrapper.matches_key(key)
    blob = await wrapper.encrypt(b"x")
    assert await wrapper.decrypt(BlobInfo.from_bytes(blob.to_bytes())) == b"x"


def test_file_and_env_agree_on_the_default_id(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = secrets.token_bytes(32)
    (tmp_path / "root.key").write_bytes(key)
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(key).decode())
    assert AeadWrapper.from_file(tmp_path / "root.key").key_id == AeadWrapper.from_env().key_id


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(InvalidParameterError) as info:
        AeadWrapper.from_file(path)
    message = str(info.value)
    assert str(path) in message and "does not exist" in message and MAKE_KEY in message
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory_is_unreadable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidParameterError, match="cannot read key file") as info:
        AeadWrapper.from_file(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_path_through_a_file_is_unreadable(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InvalidParameterError, match="cannot read key file") as info:
        AeadWrapper.from_file(tmp_path / "file" / "root.key")
    assert isinstance(info.value.__cause__, NotADirectoryError)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files regardless of mode"
)
def test_unreadable_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(secrets.token_bytes(32))
    path.chmod(0)
    try:
        with pytest.raises(InvalidParameterError, match="cannot read key file"):
            AeadWrapper.from_file(path)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("content", [b"", b"\n", bytes(range(200, 231)), bytes(range(48))])
def test_file_that_holds_no_key(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(content)
    with pytest.raises(InvalidParameterError) as info:
        AeadWrapper.from_file(path)
    message = str(info.value)
    assert str(path) in message
    if len(content) > 1:
        assert f"holds {len(content)} bytes" in message


def test_file_with_short_base64(tmp_path: pathlib.Path) -> None:
    short = base64.b64encode(secrets.token_bytes(24))  # 32 characters: text, not a raw key
    path = tmp_path / "root.key"
    path.write_bytes(short)
    with pytest.raises(InvalidParameterError, match="decodes to 24 bytes") as info:
        AeadWrapper.from_file(path)
    _assert_secret_absent(str(info.value), short)


def test_bad_path_type() -> None:
    with pytest.raises(InvalidParameterError, match="file path"):
        AeadWrapper.from_file(42)  # type: ignore[arg-type]


def test_fingerprint_checks_its_input() -> None:
    with pytest.raises(InvalidParameterError, match="32 bytes"):
        key_fingerprint(b"short")


# -- as the root of a KMS --------------------------------------------------


async def test_env_root_and_file_root_are_the_same_root(
    db: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = secrets.token_bytes(32)
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(key).decode())
    (tmp_path / "root.key").write_bytes(key)

    kms = await KMS.open(
        db.dsn, purposes=PURPOSES, root_wrapper=AeadWrapper.from_env(), max_staleness=None
    )
    async with kms:
        await kms.create_keys("tenant-1")
        ciphertext = await kms.encrypt("tenant-1", "database", b"secret", aad=b"row-1")
        await kms.rotate_keys("tenant-1", rewrap=True)

    kms = await KMS.open(
        db.dsn,
        purposes=PURPOSES,
        root_wrapper=AeadWrapper.from_file(tmp_path / "root.key"),
        max_staleness=None,
    )
    async with kms:
        assert await kms.decrypt("tenant-1", "database", ciphertext, aad=b"row-1") == b"secret"
    rows = await db.fetch("select key from kms_root_key_version")
    assert len(rows) == 2
    assert {BlobInfo.from_bytes(bytes(r[0])).key_id for r in rows} == {key_fingerprint(key)}
