"""Replacing the root of trust, as docs/how-to/replace-root-key.md describes it.

A store whose root keys are wrapped by a local AES key moves to a new root
(another local key, AWS KMS on moto's server, a SoftHSM2 key):

1. open with ``PooledWrapper(new, old)``;
2. ``rewrap_keys_many`` over every scope (``kms.iter_scopes()``);
3. reopen with ``new`` alone: everything decrypts, every wrapped root key
   names the new wrapper, and the old key alone unwraps none of them.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from test_root_aws import REGION, create_kms_key, moto_endpoint, set_aws_test_env
from test_root_pkcs11 import require_softhsm

from kms_async import (
    KMS,
    AeadWrapper,
    BlobInfo,
    DecryptionError,
    PooledWrapper,
    Wrapper,
    WrapperError,
)
from kms_async.aws import AwsKmsWrapper

PURPOSES = ["database", "oidc"]
SCOPES = ["org-1", "org-2", "project-3"]
OpenKMS = Callable[..., Awaitable[KMS]]


@pytest.fixture
def old_root(monkeypatch: pytest.MonkeyPatch) -> AeadWrapper:
    monkeypatch.setenv("KMS_ROOT_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    return AeadWrapper.from_env()


@pytest.fixture(params=["local", "aws", "pkcs11"])
async def new_root(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Wrapper]:
    """The root to move to, ready to be pooled: its key_id is final."""
    if request.param == "local":
        monkeypatch.setenv("KMS_ROOT_KEY_NEW", base64.b64encode(secrets.token_bytes(32)).decode())
        yield AeadWrapper.from_env("KMS_ROOT_KEY_NEW")
    elif request.param == "aws":
        set_aws_test_env(monkeypatch)
        endpoint = moto_endpoint()
        key = create_kms_key(endpoint)
        async with AwsKmsWrapper(
            key["KeyId"], region_name=REGION, endpoint_url=endpoint
        ) as wrapper:
            # Adopt the ARN before pooling: the pool routes blobs by key id.
            assert await wrapper.resolve() == key["Arn"]
            yield wrapper
    else:
        hsm = require_softhsm()
        async with hsm.wrapper(key_label=hsm.key_labels[1]) as wrapper:
            yield wrapper


async def _populate(open_kms: OpenKMS, root: Wrapper) -> dict[tuple[str, str], bytes]:
    """Keys for every scope, one rotated, and a ciphertext per (scope, purpose)."""
    made: dict[tuple[str, str], bytes] = {}
    kms = await open_kms(root_wrapper=root)
    async with kms:
        await kms.create_keys_many(SCOPES)
        for scope in SCOPES:
            for purpose in PURPOSES:
                made[(scope, purpose)] = await kms.encrypt(
                    scope, purpose, f"{scope}/{purpose}".encode()
                )
        await kms.rotate_keys("org-1", rewrap=False)
        made[("org-1", "database")] = await kms.encrypt("org-1", "database", b"org-1/database")
        made[("org-1", "oidc")] = await kms.encrypt("org-1", "oidc", b"org-1/oidc")
    return made


async def _wrapped_root_keys(db: Any) -> list[BlobInfo]:
    return [
        BlobInfo.from_bytes(bytes(r[0]))
        for r in await db.fetch("select key from kms_root_key_version")
    ]


async def test_replace_the_root_of_trust(
    db: Any, open_kms: OpenKMS, old_root: AeadWrapper, new_root: Wrapper
) -> None:
    made = await _populate(open_kms, old_root)
    # Four root key versions: one per scope, two for the rotated one.
    assert {b.key_id for b in await _wrapped_root_keys(db)} == {old_root.key_id}
    assert old_root.key_id != new_root.key_id

    # 1-2. Pool the new root with the old one and rewrap every scope.
    kms = await open_kms(root_wrapper=PooledWrapper(new_root, old_root))
    async with kms:
        scope_ids = [scope.id async for scope in kms.iter_scopes()]
        assert sorted(scope_ids) == sorted(SCOPES)
        await kms.rewrap_keys_many(scope_ids)
        # Running it again is harmless: the pool unwraps with the new root now.
        await kms.rewrap_keys_many(scope_ids)

    wrapped = await _wrapped_root_keys(db)
    assert len(wrapped) == len(SCOPES) + 1
    assert {b.key_id for b in wrapped} == {new_root.key_id}

    # 3. The new root alone decrypts everything, from a cold cache.
    kms = await open_kms(root_wrapper=new_root)
    async with kms:
        for (scope, purpose), ciphertext in made.items():
            assert await kms.decrypt(scope, purpose, ciphertext) == f"{scope}/{purpose}".encode()
        await kms.rotate_keys("org-2", rewrap=True)
        assert await kms.decrypt("org-2", "oidc", made[("org-2", "oidc")]) == b"org-2/oidc"

    # The old key unwraps no root key version any more, alone or in a KMS.
    for blob in await _wrapped_root_keys(db):
        with pytest.raises(DecryptionError):
            await old_root.decrypt(blob)
    kms = await open_kms(root_wrapper=old_root)
    async with kms:
        for scope in SCOPES:
            with pytest.raises(WrapperError):
                await kms.decrypt(scope, "database", made[(scope, "database")])
