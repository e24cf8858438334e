"""AeadWrapper, PooledWrapper and the Wrapper protocol, alone and as a KMS root wrapper."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Awaitable, Callable

import pytest
from conftest import PURPOSES, TestDB
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_async import (
    KMS,
    AeadWrapper,
    BlobInfo,
    DecryptionError,
    InvalidParameterError,
    KeyNotFoundError,
    PooledWrapper,
    UnknownKeyVersionError,
    Wrapper,
    WrapperError,
)

OpenKMS = Callable[..., Awaitable[KMS]]

NONCE_SIZE = 12
TAG_SIZE = 16


def new_wrapper(key_id: str) -> AeadWrapper:
    return AeadWrapper(secrets.token_bytes(32), key_id=key_id)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# -- AeadWrapper: construction --------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_aead_wrapper_rejects_keys_that_are_not_32_bytes(size: int) -> None:
    with pytest.raises(InvalidParameterError, match="32-byte key"):
        AeadWrapper(bytes(size), key_id="k")


def test_a_bad_key_length_is_also_a_value_error() -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        AeadWrapper(bytes(16), key_id="k")


@pytest.mark.parametrize("key", ["0" * 32, 32, None, [0] * 32])
def test_aead_wrapper_rejects_keys_that_are_not_bytes(key: object) -> None:
    with pytest.raises(InvalidParameterError, match="key must be bytes"):
        AeadWrapper(key, key_id="k")  # type: ignore[arg-type]


@pytest.mark.parametrize("key_id", ["", 7, b"k"])
def test_aead_wrapper_requires_a_non_empty_str_key_id(key_id: object) -> None:
    with pytest.raises(InvalidParameterError, match="non-empty key_id"):
        AeadWrapper(bytes(32), key_id=key_id)  # type: ignore[arg-type]


async def test_aead_wrapper_copies_a_bytearray_key() -> None:
    key = bytearray(secrets.token_bytes(32))
    wrapper = AeadWrapper(key, key_id="k")  # type: ignore[arg-type]
    blob = await wrapper.encrypt(b"payload")
    key[:] = bytes(32)
    assert await wrapper.decrypt(blob) == b"payload"
    assert type(wrapper.key_bytes()) is bytes


def test_key_bytes_returns_the_key() -> None:
    key = secrets.token_bytes(32)
    assert AeadWrapper(key, key_id="k").key_bytes() == key


def test_matches_key_is_true_only_for_the_same_key() -> None:
    key = secrets.token_bytes(32)
    wrapper = AeadWrapper(key, key_id="k")
    assert wrapper.matches_key(key)
    assert not wrapper.matches_key(flip(key, 31))
    assert not wrapper.matches_key(key[:16])
    assert not wrapper.matches_key(b"")


def test_the_key_id_is_exposed() -> None:
    assert new_wrapper("root-7").key_id == "root-7"


@pytest.mark.parametrize("show", [repr, str])
def test_repr_and_str_show_the_key_id_and_never_the_key(show: Callable[[object], str]) -> None:
    key = secrets.token_bytes(32)
    text = show(AeadWrapper(key, key_id="root-7"))
    assert "root-7" in text
    forms = [
        repr(key),
        str(key),
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        base64.b64encode(key).decode().rstrip("="),
        key.decode("latin-1"),
    ]
    leaks = [i for i, form in enumerate(forms) if form in text]
    assert leaks == []  # indexes only: the key itself never reaches the report


def test_an_aead_wrapper_is_a_wrapper() -> None:
    assert isinstance(new_wrapper("k"), Wrapper)


# -- AeadWrapper: round trips ---------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", b"secret value", os.urandom(70_000)])
async def test_round_trip_without_aad(plaintext: bytes) -> None:
    wrapper = new_wrapper("k")
    assert await wrapper.decrypt(await wrapper.encrypt(plaintext)) == plaintext


async def test_round_trip_with_aad() -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(b"payload", aad=b"row-17")
    assert await wrapper.decrypt(blob, aad=b"row-17") == b"payload"


async def test_the_blob_holds_nonce_ciphertext_and_tag_under_the_key_id() -> None:
    blob = await new_wrapper("root-7").encrypt(b"payload")
    assert blob.key_id == "root-7"
    assert len(blob.ciphertext) == NONCE_SIZE + len(b"payload") + TAG_SIZE
    assert (blob.iv, blob.hmac, blob.wrapped_key, blob.mechanism) == (b"", b"", b"", 0)


async def test_the_blob_is_plain_aes_gcm_with_the_nonce_in_front() -> None:
    key = secrets.token_bytes(32)
    blob = await AeadWrapper(key, key_id="k").encrypt(b"payload", aad=b"ctx")
    sealed = blob.ciphertext
    assert AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], b"ctx") == b"payload"


@pytest.mark.parametrize(("encrypt_aad", "decrypt_aad"), [(None, b""), (b"", None)])
async def test_empty_aad_and_no_aad_are_interchangeable(
    encrypt_aad: bytes | None, decrypt_aad: bytes | None
) -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(b"payload", aad=encrypt_aad)
    assert await wrapper.decrypt(blob, aad=decrypt_aad) == b"payload"


async def test_aad_may_be_a_bytearray_or_memoryview() -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(b"payload", aad=bytearray(b"ctx"))  # type: ignore[arg-type]
    plaintext = await wrapper.decrypt(blob, aad=memoryview(b"ctx"))  # type: ignore[arg-type]
    assert plaintext == b"payload"


async def test_two_encryptions_of_the_same_plaintext_differ() -> None:
    wrapper = new_wrapper("k")
    first = await wrapper.encrypt(b"payload")
    second = await wrapper.encrypt(b"payload")
    assert first.ciphertext[:NONCE_SIZE] != second.ciphertext[:NONCE_SIZE]
    assert first.ciphertext != second.ciphertext


def test_the_sync_methods_round_trip() -> None:
    wrapper = new_wrapper("k")
    blob = wrapper.encrypt_sync(b"payload", aad=b"ctx")
    assert wrapper.decrypt_sync(blob, aad=b"ctx") == b"payload"


# -- AeadWrapper: refusals ------------------------------------------------------------


@pytest.mark.parametrize("aad", [None, b"", b"row-18"])
async def test_the_wrong_aad_is_refused(aad: bytes | None) -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(b"payload", aad=b"row-17")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await wrapper.decrypt(blob, aad=aad)


async def test_aad_given_only_at_decrypt_is_refused() -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(b"payload")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await wrapper.decrypt(blob, aad=b"row-17")


async def test_the_wrong_key_is_refused_even_under_the_same_key_id() -> None:
    blob = await new_wrapper("k").encrypt(b"payload")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await new_wrapper("k").decrypt(blob)


REGIONS = {
    "nonce": range(0, NONCE_SIZE),
    "body": range(NONCE_SIZE, NONCE_SIZE + 20),
    "tag": range(NONCE_SIZE + 20, NONCE_SIZE + 20 + TAG_SIZE),
}


@pytest.mark.parametrize("region", sorted(REGIONS))
async def test_flipping_any_byte_of_the_ciphertext_is_refused(region: str) -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(os.urandom(20), aad=b"ctx")
    assert len(blob.ciphertext) == NONCE_SIZE + 20 + TAG_SIZE
    for index in REGIONS[region]:
        tampered = BlobInfo(flip(blob.ciphertext, index), blob.key_id)
        with pytest.raises(DecryptionError, match="decryption failed"):
            await wrapper.decrypt(tampered, aad=b"ctx")


@pytest.mark.parametrize("length", [0, 1, 11, 12, 27])
async def test_a_ciphertext_shorter_than_nonce_and_tag_is_refused(length: int) -> None:
    with pytest.raises(DecryptionError, match="too short"):
        await new_wrapper("k").decrypt(BlobInfo(os.urandom(length), "k"))


async def test_a_truncated_ciphertext_is_refused() -> None:
    wrapper = new_wrapper("k")
    blob = await wrapper.encrypt(b"payload")
    with pytest.raises(DecryptionError):
        await wrapper.decrypt(BlobInfo(blob.ciphertext[:-1], blob.key_id))


@pytest.mark.parametrize("plaintext", ["text", None, 5])
async def test_a_plaintext_that_is_not_bytes_is_refused(plaintext: object) -> None:
    with pytest.raises(InvalidParameterError, match="plaintext must be bytes"):
        await new_wrapper("k").encrypt(plaintext)  # type: ignore[arg-type]


async def test_an_aad_that_is_not_bytes_is_refused() -> None:
    wrapper = new_wrapper("k")
    with pytest.raises(InvalidParameterError, match="aad must be bytes"):
        await wrapper.encrypt(b"payload", aad="ctx")  # type: ignore[arg-type]
    blob = await wrapper.encrypt(b"payload")
    with pytest.raises(InvalidParameterError, match="aad must be bytes"):
        await wrapper.decrypt(blob, aad="ctx")  # type: ignore[arg-type]


async def test_decrypt_requires_a_blob_info() -> None:
    wrapper = new_wrapper("k")
    encoded = (await wrapper.encrypt(b"payload")).to_bytes()
    with pytest.raises(InvalidParameterError, match="must be a BlobInfo"):
        await wrapper.decrypt(encoded)  # type: ignore[arg-type]


# -- PooledWrapper ----------------------------------------------------------------------


async def test_a_pool_encrypts_with_its_primary() -> None:
    primary, other = new_wrapper("new"), new_wrapper("old")
    pool = PooledWrapper(primary, other)
    blob = await pool.encrypt(b"payload", aad=b"ctx")
    assert blob.key_id == "new"
    assert await primary.decrypt(blob, aad=b"ctx") == b"payload"


def test_a_pool_reports_its_primary() -> None:
    primary = new_wrapper("new")
    pool = PooledWrapper(primary, new_wrapper("old"))
    assert pool.key_id == "new"
    assert pool.primary is primary


async def test_a_pool_decrypts_blobs_of_every_member() -> None:
    members = [new_wrapper(key_id) for key_id in ("a", "b", "c")]
    pool = PooledWrapper(*members)
    for member in members:
        blob = await member.encrypt(member.key_id.encode(), aad=b"ctx")
        assert await pool.decrypt(blob, aad=b"ctx") == member.key_id.encode()


async def test_a_pool_routes_by_key_id_rather_than_trying_every_member() -> None:
    a, b = new_wrapper("a"), new_wrapper("b")
    blob = await b.encrypt(b"payload")
    relabelled = BlobInfo(blob.ciphertext, "a")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await PooledWrapper(a, b).decrypt(relabelled)


async def test_a_blob_naming_an_unknown_key_id_is_refused() -> None:
    pool = PooledWrapper(new_wrapper("a"), new_wrapper("b"))
    blob = await new_wrapper("z").encrypt(b"payload")
    with pytest.raises(UnknownKeyVersionError, match="'z', which is not in this pool"):
        await pool.decrypt(blob)


async def test_an_unknown_key_id_is_a_decryption_error_and_a_key_not_found_error() -> None:
    pool = PooledWrapper(new_wrapper("a"))
    blob = await new_wrapper("z").encrypt(b"payload")
    with pytest.raises(DecryptionError) as caught:
        await pool.decrypt(blob)
    assert isinstance(caught.value, KeyNotFoundError)
    assert isinstance(caught.value, UnknownKeyVersionError)


async def test_a_blob_without_key_id_goes_to_the_primary() -> None:
    primary, other = new_wrapper("new"), new_wrapper("old")
    pool = PooledWrapper(primary, other)
    blob = await primary.encrypt(b"payload")
    assert await pool.decrypt(BlobInfo(blob.ciphertext, "")) == b"payload"


async def test_a_blob_without_key_id_from_another_member_is_refused() -> None:
    primary, other = new_wrapper("new"), new_wrapper("old")
    blob = await other.encrypt(b"payload")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await PooledWrapper(primary, other).decrypt(BlobInfo(blob.ciphertext, ""))


@pytest.mark.parametrize(
    ("ids", "duplicate"), [(("a", "a"), "a"), (("a", "b", "a"), "a"), (("a", "b", "b"), "b")]
)
def test_a_pool_rejects_duplicate_key_ids(ids: tuple[str, ...], duplicate: str) -> None:
    with pytest.raises(InvalidParameterError, match=f"share key id '{duplicate}'"):
        PooledWrapper(*(new_wrapper(key_id) for key_id in ids))


def test_pooling_the_same_wrapper_twice_is_rejected() -> None:
    wrapper = new_wrapper("a")
    with pytest.raises(InvalidParameterError, match="share key id 'a'"):
        PooledWrapper(wrapper, wrapper)


@pytest.mark.parametrize("member", [None, "a", b"\x00" * 32, object(), AESGCM(bytes(32))])
def test_a_pool_rejects_members_that_are_not_wrappers(member: object) -> None:
    with pytest.raises(InvalidParameterError, match="must be wrappers"):
        PooledWrapper(new_wrapper("a"), member)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="must be wrappers"):
        PooledWrapper(member)  # type: ignore[arg-type]


def test_key_ids_are_sorted() -> None:
    pool = PooledWrapper(*(new_wrapper(key_id) for key_id in ("m", "b", "z", "a")))
    assert pool.key_ids() == ["a", "b", "m", "z"]


def test_wrapper_for_finds_members_by_key_id() -> None:
    a, b = new_wrapper("a"), new_wrapper("b")
    pool = PooledWrapper(a, b)
    assert pool.wrapper_for("b") is b
    assert pool.wrapper_for("c") is None


def test_a_pool_is_a_wrapper() -> None:
    assert isinstance(PooledWrapper(new_wrapper("a")), Wrapper)


def test_a_pool_repr_shows_key_ids_only() -> None:
    key = secrets.token_bytes(32)
    text = repr(PooledWrapper(AeadWrapper(key, key_id="new"), new_wrapper("old")))
    assert "'new'" in text and "'old'" in text
    assert key.hex() not in text and repr(key) not in text


async def test_replacing_a_root_keeps_old_blobs_readable() -> None:
    old, new = new_wrapper("root-old"), new_wrapper("root-new")
    wrapped_by_old = await old.encrypt(b"root key material", aad=b"ctx")
    pool = PooledWrapper(new, old)
    assert await pool.decrypt(wrapped_by_old, aad=b"ctx") == b"root key material"


async def test_after_replacing_a_root_new_blobs_carry_the_new_key_id() -> None:
    old, new = new_wrapper("root-old"), new_wrapper("root-new")
    pool = PooledWrapper(new, old)
    rewrapped = await pool.encrypt(await pool.decrypt(await old.encrypt(b"material")))
    assert rewrapped.key_id == "root-new"
    assert await new.decrypt(rewrapped) == b"material"
    with pytest.raises(DecryptionError):
        await old.decrypt(rewrapped)


# -- user-defined wrappers --------------------------------------------------------------


class EnvelopeServiceWrapper:
    """A duck-typed wrapper shaped like a cloud key service: nonce in ``iv``."""

    def __init__(self, key_id: str) -> None:
        self._aead = AESGCM(secrets.token_bytes(32))
        self._key_id = key_id
        self.calls: list[str] = []

    @property
    def key_id(self) -> str:
        return self._key_id

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        self.calls.append("encrypt")
        iv = os.urandom(12)
        return BlobInfo(self._aead.encrypt(iv, plaintext, aad), self._key_id, iv=iv)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        self.calls.append("decrypt")
        return self._aead.decrypt(blob.iv, blob.ciphertext, aad)


class FailingWrapper:
    """A root wrapper whose key service is down for ``encrypt``, ``decrypt`` or both."""

    def __init__(self, inner: Wrapper, *, fail: set[str]) -> None:
        self._inner = inner
        self._fail = fail

    @property
    def key_id(self) -> str:
        return self._inner.key_id

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        if "encrypt" in self._fail:
            raise RuntimeError("key service unavailable")
        return await self._inner.encrypt(plaintext, aad=aad)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        if "decrypt" in self._fail:
            raise RuntimeError("key service unavailable")
        return await self._inner.decrypt(blob, aad=aad)


def test_a_duck_typed_wrapper_satisfies_the_protocol() -> None:
    wrapper = EnvelopeServiceWrapper("svc-1")
    assert not isinstance(wrapper, AeadWrapper)
    assert isinstance(wrapper, Wrapper)


async def test_a_user_wrapper_works_as_the_kms_root_wrapper(db: TestDB) -> None:
    root = EnvelopeServiceWrapper("svc-1")
    async with await KMS.open(
        db.dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
    ) as kms:
        await kms.create_keys("s1")
        ciphertext = await kms.encrypt("s1", "database", b"payload", aad=b"ctx")
        assert await kms.decrypt("s1", "database", ciphertext, aad=b"ctx") == b"payload"
    assert root.calls[0] == "encrypt"
    column = await db.fetchval("select key from kms_root_key_version")
    stored = BlobInfo.from_bytes(bytes(column))
    assert stored.key_id == "svc-1"
    assert len(stored.iv) == 12


async def test_a_cold_kms_unwraps_through_a_user_wrapper(db: TestDB) -> None:
    root = EnvelopeServiceWrapper("svc-1")
    async with await KMS.open(
        db.dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
    ) as kms:
        await kms.create_keys("s1")
        ciphertext = await kms.encrypt("s1", "oidc", b"payload")
    async with await KMS.open(
        db.dsn,
        purposes=PURPOSES,
        root_wrapper=root,
        max_staleness=None,
        check_root_wrapper=False,
    ) as cold:
        root.calls.clear()
        assert await cold.decrypt("s1", "oidc", ciphertext) == b"payload"
    assert "decrypt" in root.calls


async def test_a_root_wrapper_failing_to_encrypt_makes_create_keys_raise_wrapper_error(
    db: TestDB, root_wrapper: AeadWrapper, open_kms: OpenKMS
) -> None:
    broken = FailingWrapper(root_wrapper, fail={"encrypt"})
    async with await open_kms(root_wrapper=broken) as kms:
        with pytest.raises(WrapperError, match="root wrapper failed") as caught:
            await kms.create_keys("s1")
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert not isinstance(caught.value, RuntimeError)


async def test_a_failed_create_keys_writes_nothing(
    db: TestDB, root_wrapper: AeadWrapper, open_kms: OpenKMS
) -> None:
    broken = FailingWrapper(root_wrapper, fail={"encrypt"})
    async with await open_kms(root_wrapper=broken) as kms:
        with pytest.raises(WrapperError):
            await kms.create_keys("s1")
        with pytest.raises(KeyNotFoundError):
            await kms.list_keys("s1")
    for table in ("kms_root_key", "kms_root_key_version", "kms_data_key"):
        assert await db.fetchval(f"select count(*) from {table}") == 0


async def test_a_root_wrapper_failing_to_decrypt_makes_a_cold_encrypt_raise_wrapper_error(
    kms: KMS, root_wrapper: AeadWrapper, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    broken = FailingWrapper(root_wrapper, fail={"decrypt"})
    async with await open_kms(root_wrapper=broken) as cold:
        with pytest.raises(WrapperError, match="cannot unwrap root key version") as caught:
            await cold.encrypt("s1", "database", b"payload")
        assert isinstance(caught.value.__cause__, RuntimeError)


async def test_a_root_wrapper_failing_to_decrypt_makes_a_cold_decrypt_raise_wrapper_error(
    kms: KMS, root_wrapper: AeadWrapper, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"payload")
    broken = FailingWrapper(root_wrapper, fail={"decrypt"})
    async with await open_kms(root_wrapper=broken) as cold:
        with pytest.raises(WrapperError, match="cannot unwrap root key version"):
            await cold.decrypt("s1", "database", ciphertext)


async def test_a_wrong_root_wrapper_makes_a_cold_encrypt_raise_wrapper_error(
    kms: KMS, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    async with await open_kms(root_wrapper=new_wrapper("root-1")) as cold:
        with pytest.raises(WrapperError, match="cannot unwrap root key version"):
            await cold.encrypt("s1", "database", b"payload")


async def test_a_pooled_root_wrapper_serves_a_kms_after_the_root_is_replaced(
    kms: KMS, root_wrapper: AeadWrapper, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"payload")
    replacement = PooledWrapper(new_wrapper("root-2"), root_wrapper)
    async with await open_kms(root_wrapper=replacement) as cold:
        assert await cold.decrypt("s1", "database", ciphertext) == b"payload"
