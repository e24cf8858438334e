"""open_root_wrapper: the root wrapper configured by arguments or KMS_* environment variables."""

from __future__ import annotations

import base64
import os
import secrets
from typing import Any

import pytest
from conftest import PURPOSES, TestDB

import kms_async
from kms_async import AeadWrapper, InvalidParameterError, PooledWrapper, open_root_wrapper

_ENV_VARS = [
    "KMS_ROOT_KEY",
    "KMS_ROOT_KEY_FILE",
    "KMS_ROOT_KEY_ID",
    "KMS_PREVIOUS_ROOT_KEY",
    "KMS_PREVIOUS_ROOT_KEY_FILE",
    "KMS_PREVIOUS_ROOT_KEY_ID",
    "KMS_AWS_KMS_KEY_ID",
    "KMS_PKCS11_LIB",
    "KMS_PKCS11_TOKEN",
    "KMS_PKCS11_KEY_LABEL",
    "KMS_PKCS11_PIN",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def key_file(tmp_path: Any, key: str, name: str = "root.key") -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as file:
        file.write(key + "\n")
    return path


async def test_the_default_is_the_key_in_kms_root_key(monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key()
    monkeypatch.setenv("KMS_ROOT_KEY", key)
    async with open_root_wrapper() as wrapper:
        assert isinstance(wrapper, AeadWrapper)
        assert wrapper.key_id == AeadWrapper.from_env().key_id
        blob = await wrapper.encrypt(b"x")
        assert await AeadWrapper.from_env().decrypt(blob) == b"x"


async def test_a_named_variable_and_a_key_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", new_key())
    async with open_root_wrapper(key_env="MY_KEY", key_id="root-7") as wrapper:
        assert wrapper.key_id == "root-7"
    monkeypatch.setenv("KMS_ROOT_KEY_ID", "root-8")
    async with open_root_wrapper(key_env="MY_KEY") as wrapper:
        assert wrapper.key_id == "root-8"


async def test_a_key_file_by_argument_or_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    path = key_file(tmp_path, key)
    expected = AeadWrapper(base64.b64decode(key), key_id="unused")
    async with open_root_wrapper(key_file=path) as wrapper:
        assert isinstance(wrapper, AeadWrapper)
        assert wrapper.matches_key(expected.key_bytes())
    # The file named in the environment wins over KMS_ROOT_KEY, the last resort.
    monkeypatch.setenv("KMS_ROOT_KEY", new_key())
    monkeypatch.setenv("KMS_ROOT_KEY_FILE", path)
    async with open_root_wrapper() as wrapper:
        assert isinstance(wrapper, AeadWrapper)
        assert wrapper.matches_key(expected.key_bytes())


async def test_an_argument_wins_over_the_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_AWS_KMS_KEY_ID", "alias/not-used")
    monkeypatch.setenv("KMS_PKCS11_LIB", "/not/used.so")
    async with open_root_wrapper(key_file=key_file(tmp_path, new_key())) as wrapper:
        assert isinstance(wrapper, AeadWrapper)


async def test_an_aws_kms_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    monkeypatch.setenv("KMS_AWS_KMS_KEY_ID", "alias/kms-root")
    async with open_root_wrapper(aws_region="eu-west-1") as wrapper:
        from kms_async.aws import AwsKmsWrapper

        assert isinstance(wrapper, AwsKmsWrapper)
        assert wrapper.key_id == "alias/kms-root"


async def test_the_previous_key_joins_a_pooled_wrapper(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = new_key(), new_key()
    monkeypatch.setenv("KMS_ROOT_KEY", new)
    monkeypatch.setenv("KMS_PREVIOUS_ROOT_KEY", old)
    async with open_root_wrapper() as wrapper:
        assert isinstance(wrapper, PooledWrapper)
        old_blob = await AeadWrapper.from_env("KMS_PREVIOUS_ROOT_KEY").encrypt(b"old")
        assert await wrapper.decrypt(old_blob) == b"old"
        new_blob = await wrapper.encrypt(b"new")
        assert new_blob.key_id == AeadWrapper.from_env().key_id
    monkeypatch.delenv("KMS_PREVIOUS_ROOT_KEY")
    path = key_file(tmp_path, old, "old.key")
    async with open_root_wrapper(previous_key_file=path, previous_key_id="old-1") as wrapper:
        assert isinstance(wrapper, PooledWrapper)
        assert "old-1" in wrapper.key_ids()


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        ({}, {}, "no root key: set KMS_ROOT_KEY to the base64 of 32 random bytes"),
        (
            {"key_file": "a", "aws_kms_key_id": "b"},
            {},
            "aws_kms_key_id and key_file both name a root key; keep only one",
        ),
        (
            {},
            {"KMS_ROOT_KEY_FILE": "a", "KMS_AWS_KMS_KEY_ID": "b"},
            "KMS_AWS_KMS_KEY_ID and KMS_ROOT_KEY_FILE both name a root key",
        ),
        ({"key_env": "MY_UNSET_KEY"}, {}, "environment variable MY_UNSET_KEY is not set"),
        ({}, {"KMS_ROOT_KEY": "not base64!"}, "KMS_ROOT_KEY"),
        ({"key_file": "/nonexistent/root.key"}, {}, "does not exist"),
        (
            {"pkcs11_lib": "/nonexistent/lib.so", "pkcs11_token": "t"},
            {},
            "a PKCS#11 root key also needs the key label (or KMS_PKCS11_KEY_LABEL), "
            "the user PIN (or KMS_PKCS11_PIN)",
        ),
        (
            {"previous_key_env": "A", "previous_key_file": "b"},
            {"KMS_ROOT_KEY": new_key()},
            "give the previous root key once",
        ),
    ],
)
async def test_bad_configuration(
    monkeypatch: pytest.MonkeyPatch,
    arguments: dict[str, Any],
    environment: dict[str, str],
    message: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidParameterError) as caught:
        async with open_root_wrapper(**arguments):
            pytest.fail("configured a root wrapper from a bad configuration")
    assert message in str(caught.value)
    assert "not base64!" not in str(caught.value)


async def test_a_kms_opened_with_it_creates_and_uses_keys(
    db: TestDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = new_key()
    monkeypatch.setenv("KMS_ROOT_KEY", old)
    async with open_root_wrapper() as root:
        kms = await kms_async.KMS.open(
            db.dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
        )
        async with kms:
            await kms.create_keys("acme")
            ciphertext = await kms.encrypt("acme", "database", b"secret")

    # Replace the root key: with the previous one given, rewrap moves the scope over.
    monkeypatch.setenv("KMS_ROOT_KEY", new_key())
    monkeypatch.setenv("KMS_PREVIOUS_ROOT_KEY", old)
    async with open_root_wrapper() as root:
        kms = await kms_async.KMS.open(
            db.dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
        )
        async with kms:
            await kms.rewrap_keys("acme")
    monkeypatch.delenv("KMS_PREVIOUS_ROOT_KEY")
    async with open_root_wrapper() as root:
        kms = await kms_async.KMS.open(
            db.dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
        )
        async with kms:
            assert await kms.decrypt("acme", "database", ciphertext) == b"secret"
