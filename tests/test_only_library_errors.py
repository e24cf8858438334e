"""Bad arguments get a KMSError that says what to fix, never a raw Python error.

The cases issue 11 (item 7) found escaping raw: ``purposes=None``, malformed
PostgreSQL DSNs and connection options, a NUL in a key file path, a root key
id that is not valid Unicode, and buffers AES-GCM cannot take.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from conftest import PURPOSES, TestDB

import kms_async
from kms_async import KMS, AeadWrapper, BlobInfo, InvalidParameterError


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@127.0.0.1:99999999/x",  # OverflowError in asyncpg
        "postgresql://postgres@[not-an-address/x",  # ValueError from urllib
        "postgresql://postgres@127.0.0.1/x?sslmode=bogus",  # ClientConfigurationError
    ],
)
async def test_malformed_postgres_dsns_are_invalid_parameters(dsn: str) -> None:
    for attempt in (
        lambda: KMS.open(dsn, purposes=PURPOSES),
        lambda: kms_async.migrate(dsn),
    ):
        with pytest.raises(InvalidParameterError) as refused:
            await attempt()
        assert refused.value.retryable is False
        assert "invalid" in str(refused.value) or "malformed" in str(refused.value)


@pytest.mark.parametrize("purposes", [None, 7, object()])
async def test_purposes_that_are_not_a_list_are_invalid(db: TestDB, purposes: Any) -> None:
    with pytest.raises(InvalidParameterError, match="purposes must be a list"):
        await KMS.open(db.dsn, purposes=purposes)


@pytest.mark.parametrize(
    "make",
    [
        lambda: AeadWrapper.from_file("key\x00file"),
        lambda: AeadWrapper(os.urandom(32), key_id="root\ud800"),
        lambda: BlobInfo(b"x" * 28, "kdkv\udfff"),
    ],
    ids=["nul-in-path", "surrogate-key-id", "surrogate-blob-key-id"],
)
def test_bad_text_in_wrapper_arguments_is_invalid(make: Callable[[], Any]) -> None:
    with pytest.raises(InvalidParameterError):
        make()


async def test_buffers_aes_gcm_cannot_take_are_invalid(db: TestDB, kms: KMS) -> None:
    await kms.create_keys("org")
    made = await kms.encrypt("org", "database", b"x")
    strided = memoryview(b"abcdefgh")[::2]  # not contiguous
    with pytest.raises(InvalidParameterError, match="contiguous"):
        await kms.encrypt("org", "database", strided)
    with pytest.raises(InvalidParameterError, match="contiguous"):
        await kms.encrypt("org", "database", b"x", aad=strided)
    with pytest.raises(InvalidParameterError, match="contiguous"):
        await kms.decrypt("org", "database", made, aad=strided)
    assert await kms.decrypt("org", "database", made) == b"x"
