"""encrypt, decrypt and get_wrapper: round trips, bad input, tampering, key separation."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import input_validation

import kms_async._kms as _kms_module
from kms_async import (
    KMS,
    ROOT_PURPOSE,
    AeadWrapper,
    BlobInfo,
    DecryptionError,
    InvalidParameterError,
    KeyNotFoundError,
    KMSError,
    PooledWrapper,
    UnknownKeyVersionError,
)

OpenKMS = Callable[..., Awaitable[KMS]]

MiB = 1024 * 1024


def key_id_of(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def outcome(call: Awaitable[Any]) -> str:
    """How a decrypt ended: "refused" (a DecryptionError), "decrypted", or the error's name."""
    try:
        await call
    except DecryptionError:  # UnknownKeyVersionError included
        return "refused"
    except Exception as exc:  # reported, not hidden: the test fails on it
        return type(exc).__name__
    return "decrypted"


@pytest.fixture
async def scoped(kms: KMS) -> KMS:
    """The kms fixture with keys for scope "s1"."""
    await kms.create_keys("s1")
    return kms


# -- round trips -------------------------------------------------------------------

# Envelope field 1 holds nonce + ciphertext + tag = size + 28 bytes; these sizes
# sit on both sides of each varint length boundary (1, 2, 3 and 4 bytes).
SIZES = [0, 1, 99, 100, 16355, 16356, MiB, 2097151 - 28, 2097152 - 28, 3 * MiB]


@pytest.mark.parametrize("size", SIZES)
async def test_round_trip_of_every_size(scoped: KMS, size: int) -> None:
    plaintext = secrets.token_bytes(size)
    ciphertext = await scoped.encrypt("s1", "database", plaintext)
    assert await scoped.decrypt("s1", "database", ciphertext) == plaintext


@pytest.mark.parametrize("offload_threshold", [None, 4096])
@pytest.mark.parametrize("size", [64 * 1024, 2097152 - 28, 3 * MiB])
async def test_large_payloads_inline_and_offloaded(
    scoped: KMS,
    open_kms: OpenKMS,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    offload_threshold: int | None,
) -> None:
    plaintext = secrets.token_bytes(size)
    async with await open_kms(offload_threshold=offload_threshold) as kms:
        ciphertext = await kms.encrypt("s1", "database", plaintext, aad=b"row")
        assert await scoped.decrypt("s1", "database", ciphertext, aad=b"row") == plaintext
        # Envelopes this library wrote, of any length, take the fast path,
        # which never copies the payload to decode it.
        with monkeypatch.context() as patched:
            patched.setattr(_kms_module, "decode", _no_decode)
            assert await kms.decrypt("s1", "database", ciphertext, aad=b"row") == plaintext
        for position in (len(ciphertext) // 2, len(ciphertext) - 20):
            tampered = bytearray(ciphertext)
            tampered[position] ^= 1
            with pytest.raises(DecryptionError):
                await kms.decrypt("s1", "database", bytes(tampered), aad=b"row")
        with pytest.raises(DecryptionError):
            await kms.decrypt("s1", "database", ciphertext, aad=b"other row")
        # The general path: the same fields in another order (key_info first).
        reordered = ciphertext[-19:] + ciphertext[:-19]
        assert BlobInfo.from_bytes(reordered) == BlobInfo.from_bytes(ciphertext)
        assert await kms.decrypt("s1", "database", reordered, aad=b"row") == plaintext


def _no_decode(data: object) -> BlobInfo:
    raise AssertionError("decode() called on the fast path")


async def test_round_trip_of_a_1_mib_plaintext_on_a_cold_kms(
    scoped: KMS, open_kms: OpenKMS
) -> None:
    plaintext = secrets.token_bytes(MiB)
    ciphertext = await scoped.encrypt("s1", "database", plaintext)
    async with await open_kms() as cold:
        assert await cold.decrypt("s1", "database", ciphertext) == plaintext


async def test_round_trip_with_aad(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload", aad=b"row-17")
    assert await scoped.decrypt("s1", "oidc", ciphertext, aad=b"row-17") == b"payload"


async def test_empty_aad_means_no_aad(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload", aad=b"")
    assert await scoped.decrypt("s1", "oidc", ciphertext) == b"payload"
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload")
    assert await scoped.decrypt("s1", "oidc", ciphertext, aad=b"") == b"payload"


async def test_encrypting_twice_gives_different_ciphertexts(scoped: KMS) -> None:
    first = await scoped.encrypt("s1", "database", b"same")
    second = await scoped.encrypt("s1", "database", b"same")
    assert first != second
    assert key_id_of(first) == key_id_of(second)


async def test_ciphertext_is_a_blob_naming_the_data_key_version(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "database", b"payload")
    blob = BlobInfo.from_bytes(ciphertext)
    keys = {k.purpose: k for k in await scoped.list_keys("s1")}
    assert blob.key_id == keys["database"].versions[-1].id
    assert len(blob.ciphertext) == 12 + len(b"payload") + 16


async def test_wrong_aad_is_a_decryption_error(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload", aad=b"row-17")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await scoped.decrypt("s1", "oidc", ciphertext, aad=b"row-18")


async def test_missing_aad_is_a_decryption_error(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload", aad=b"row-17")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await scoped.decrypt("s1", "oidc", ciphertext)


async def test_unexpected_aad_is_a_decryption_error(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload")
    with pytest.raises(DecryptionError, match="decryption failed"):
        await scoped.decrypt("s1", "oidc", ciphertext, aad=b"row-17")


# -- tampering -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 200])
async def test_flipping_any_byte_of_a_ciphertext_never_decrypts(scoped: KMS, size: int) -> None:
    ciphertext = await scoped.encrypt("s1", "database", secrets.token_bytes(size))
    results = {}
    for position in range(len(ciphertext)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(ciphertext)
            tampered[position] ^= mask
            results[(position, mask)] = await outcome(
                scoped.decrypt("s1", "database", bytes(tampered))
            )
    assert {k: v for k, v in results.items() if v != "refused"} == {}


@pytest.mark.parametrize("size", [0, 16, 200])
async def test_truncating_a_ciphertext_at_any_length_never_decrypts(scoped: KMS, size: int) -> None:
    ciphertext = await scoped.encrypt("s1", "database", secrets.token_bytes(size))
    results = {
        length: await outcome(scoped.decrypt("s1", "database", ciphertext[:length]))
        for length in range(len(ciphertext))
    }
    assert {k: v for k, v in results.items() if v != "refused"} == {}


async def test_tampering_is_refused_on_a_cold_kms_too(scoped: KMS, open_kms: OpenKMS) -> None:
    ciphertext = await scoped.encrypt("s1", "database", b"payload")
    async with await open_kms() as cold:
        results = {}
        for position in range(len(ciphertext)):
            tampered = bytearray(ciphertext)
            tampered[position] ^= 0x01
            results[position] = await outcome(cold.decrypt("s1", "database", bytes(tampered)))
        assert {k: v for k, v in results.items() if v != "refused"} == {}
        assert await cold.decrypt("s1", "database", ciphertext) == b"payload"


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"garbage", b"\x0a\x05abc", b"\x0a\x80", bytes(64), b"\xff" * 64],
    ids=["empty", "nul", "text", "short-field", "bad-varint", "zeros", "ones"],
)
async def test_garbage_bytes_are_a_decryption_error(scoped: KMS, garbage: bytes) -> None:
    with pytest.raises(DecryptionError, match="ciphertext"):
        await scoped.decrypt("s1", "database", garbage)


async def test_random_bytes_are_a_decryption_error(scoped: KMS) -> None:
    results = {
        i: await outcome(scoped.decrypt("s1", "database", secrets.token_bytes(i)))
        for i in range(0, 100)
    }
    assert {k: v for k, v in results.items() if v != "refused"} == {}


@input_validation
@pytest.mark.parametrize("ciphertext", ["text", None, 42], ids=["str", "none", "int"])
async def test_ciphertext_that_is_not_bytes_is_a_kms_error(scoped: KMS, ciphertext: Any) -> None:
    with pytest.raises(KMSError, match="ciphertext"):
        await scoped.decrypt("s1", "database", ciphertext)


# -- bad arguments ------------------------------------------------------------------


@input_validation
@pytest.mark.parametrize("plaintext", ["text", None, 42], ids=["str", "none", "int"])
async def test_encrypt_rejects_plaintext_that_is_not_bytes(scoped: KMS, plaintext: Any) -> None:
    with pytest.raises(InvalidParameterError, match="bytes"):
        await scoped.encrypt("s1", "database", plaintext)


@input_validation
async def test_encrypt_rejects_str_aad(scoped: KMS) -> None:
    with pytest.raises(InvalidParameterError, match="bytes"):
        await scoped.encrypt("s1", "database", b"payload", aad="row-17")  # type: ignore[arg-type]


@input_validation
async def test_decrypt_rejects_str_aad(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "database", b"payload", aad=b"row-17")
    with pytest.raises(InvalidParameterError, match="bytes"):
        await scoped.decrypt("s1", "database", ciphertext, aad="row-17")  # type: ignore[arg-type]


@input_validation
@pytest.mark.parametrize(
    ("purpose", "match"),
    [
        ("audit", "not a supported key purpose"),
        (ROOT_PURPOSE, ROOT_PURPOSE),
        ("", "missing purpose"),
        (None, "purpose"),
    ],
    ids=["unknown", "rootKey", "empty", "none"],
)
async def test_encrypt_and_decrypt_reject_bad_purposes(
    scoped: KMS, purpose: Any, match: str
) -> None:
    ciphertext = await scoped.encrypt("s1", "database", b"payload")
    with pytest.raises(InvalidParameterError, match=match):
        await scoped.encrypt("s1", purpose, b"payload")
    with pytest.raises(InvalidParameterError, match=match):
        await scoped.decrypt("s1", purpose, ciphertext)


@input_validation
@pytest.mark.parametrize("scope_id", ["", "  ", None, 42, ["s1"]], ids=str)
async def test_encrypt_and_decrypt_reject_bad_scope_ids(scoped: KMS, scope_id: Any) -> None:
    ciphertext = await scoped.encrypt("s1", "database", b"payload")
    with pytest.raises(InvalidParameterError, match="scope id"):
        await scoped.encrypt(scope_id, "database", b"payload")
    with pytest.raises(InvalidParameterError, match="scope id"):
        await scoped.decrypt(scope_id, "database", ciphertext)


async def test_encrypt_for_an_unknown_scope_is_key_not_found(kms: KMS) -> None:
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await kms.encrypt("nope", "database", b"payload")


async def test_decrypt_for_an_unknown_scope_is_key_not_found(scoped: KMS) -> None:
    ciphertext = await scoped.encrypt("s1", "database", b"payload")
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await scoped.decrypt("nope", "database", ciphertext)


async def test_encrypt_for_a_purpose_the_scope_lacks_is_key_not_found(kms: KMS) -> None:
    await kms.create_keys("s1", ["database"])
    with pytest.raises(KeyNotFoundError, match="reconcile_keys"):
        await kms.encrypt("s1", "oidc", b"payload")


# -- key separation ---------------------------------------------------------------


async def test_ciphertext_of_one_scope_is_refused_by_another(kms: KMS) -> None:
    await kms.create_keys("a")
    await kms.create_keys("b")
    ciphertext = await kms.encrypt("a", "database", b"tenant a")
    with pytest.raises(UnknownKeyVersionError):
        await kms.decrypt("b", "database", ciphertext)


async def test_ciphertext_of_one_scope_is_refused_by_another_with_cached_keys(kms: KMS) -> None:
    await kms.create_keys("a")
    await kms.create_keys("b")
    assert await kms.decrypt("b", "database", await kms.encrypt("b", "database", b"b")) == b"b"
    ciphertext = await kms.encrypt("a", "database", b"tenant a")
    with pytest.raises(UnknownKeyVersionError):
        await kms.decrypt("b", "database", ciphertext)
    # Repeated attempts stay refused (the reload found nothing either).
    with pytest.raises(UnknownKeyVersionError):
        await kms.decrypt("b", "database", ciphertext)


async def test_ciphertext_of_one_scope_is_refused_by_another_on_a_cold_kms(
    kms: KMS, open_kms: OpenKMS
) -> None:
    await kms.create_keys("a")
    await kms.create_keys("b")
    ciphertext = await kms.encrypt("a", "database", b"tenant a")
    async with await open_kms() as cold:
        with pytest.raises(UnknownKeyVersionError):
            await cold.decrypt("b", "database", ciphertext)
        assert await cold.decrypt("a", "database", ciphertext) == b"tenant a"


async def test_ciphertext_of_one_purpose_is_refused_by_another_purpose(scoped: KMS) -> None:
    await scoped.encrypt("s1", "oidc", b"warm the oidc keys")
    ciphertext = await scoped.encrypt("s1", "database", b"payload")
    with pytest.raises(UnknownKeyVersionError):
        await scoped.decrypt("s1", "oidc", ciphertext)


async def test_scope_and_purpose_that_concatenate_alike_get_separate_keys(
    open_kms: OpenKMS,
) -> None:
    # "o_xa" + "data" == "o_x" + "adata": the Go cache key collided here.
    async with await open_kms(purposes=["data", "adata"]) as kms:
        await kms.create_keys("o_xa")
        await kms.create_keys("o_x")
        first = await kms.encrypt("o_xa", "data", b"first")
        second = await kms.encrypt("o_x", "adata", b"second")

        assert key_id_of(first) != key_id_of(second)
        assert (await kms.get_wrapper("o_xa", "data")).key_id == key_id_of(first)
        assert (await kms.get_wrapper("o_x", "adata")).key_id == key_id_of(second)
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt("o_x", "adata", first)
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt("o_xa", "data", second)
        assert await kms.decrypt("o_xa", "data", first) == b"first"
        assert await kms.decrypt("o_x", "adata", second) == b"second"


async def test_ciphertext_from_another_instances_rotation_decrypts(
    scoped: KMS, open_kms: OpenKMS
) -> None:
    before = await scoped.encrypt("s1", "database", b"before")  # caches the keys
    async with await open_kms() as other:
        await other.rotate_keys("s1")
        after = await other.encrypt("s1", "database", b"after")
    assert key_id_of(after) != key_id_of(before)
    assert await scoped.decrypt("s1", "database", after) == b"after"
    assert await scoped.decrypt("s1", "database", before) == b"before"


# -- get_wrapper ------------------------------------------------------------------


async def test_get_wrapper_encrypts_with_the_newest_version(scoped: KMS) -> None:
    await scoped.rotate_keys("s1")
    keys = {k.purpose: k for k in await scoped.list_keys("s1")}
    wrapper = await scoped.get_wrapper("s1", "database")
    assert isinstance(wrapper, PooledWrapper)
    assert wrapper.key_id == keys["database"].versions[-1].id
    assert wrapper.key_ids() == sorted(v.id for v in keys["database"].versions)
    assert (await wrapper.encrypt(b"x")).key_id == keys["database"].versions[-1].id


async def test_get_wrapper_with_an_old_version_id_returns_that_version_alone(
    scoped: KMS,
) -> None:
    old = await scoped.encrypt("s1", "database", b"old")
    await scoped.rotate_keys("s1")
    new = await scoped.encrypt("s1", "database", b"new")

    wrapper = await scoped.get_wrapper("s1", "database", key_version_id=key_id_of(old))

    assert wrapper.key_id == key_id_of(old)
    assert await wrapper.decrypt(BlobInfo.from_bytes(old)) == b"old"
    with pytest.raises(DecryptionError):
        await wrapper.decrypt(BlobInfo.from_bytes(new))


async def test_get_wrapper_with_an_old_version_id_works_on_a_cold_kms(
    scoped: KMS, open_kms: OpenKMS
) -> None:
    old = await scoped.encrypt("s1", "database", b"old")
    await scoped.rotate_keys("s1")
    async with await open_kms() as cold:
        wrapper = await cold.get_wrapper("s1", "database", key_version_id=key_id_of(old))
        assert wrapper.key_id == key_id_of(old)
        assert await wrapper.decrypt(BlobInfo.from_bytes(old)) == b"old"


async def test_get_wrapper_with_bogus_version_ids_is_key_not_found(kms: KMS) -> None:
    await kms.create_keys("s1")
    await kms.create_keys("s2")
    oidc = await kms.encrypt("s1", "oidc", b"x")
    other_scope = await kms.encrypt("s2", "database", b"x")
    for bogus in ("foo", "kdkv_AAAAAAAAAA", key_id_of(oidc), key_id_of(other_scope)):
        with pytest.raises(KeyNotFoundError, match="unable to find specified key version"):
            await kms.get_wrapper("s1", "database", key_version_id=bogus)


async def test_get_wrapper_decrypts_what_encrypt_made_and_the_reverse(scoped: KMS) -> None:
    wrapper = await scoped.get_wrapper("s1", "oidc")
    ciphertext = await scoped.encrypt("s1", "oidc", b"payload", aad=b"ctx")
    assert await wrapper.decrypt(BlobInfo.from_bytes(ciphertext), aad=b"ctx") == b"payload"
    blob = await wrapper.encrypt(b"other way", aad=b"ctx")
    assert await scoped.decrypt("s1", "oidc", blob.to_bytes(), aad=b"ctx") == b"other way"


async def test_get_wrapper_for_root_key_is_the_root_pool(scoped: KMS, db: Any) -> None:
    await scoped.rotate_keys("s1")
    root_key = (await scoped.list_keys("s1"))[0]
    root = await scoped.get_wrapper("s1", ROOT_PURPOSE)
    assert root.key_id == root_key.versions[-1].id
    assert isinstance(root, PooledWrapper)
    assert root.key_ids() == sorted(v.id for v in root_key.versions)

    # The root pool unwraps the stored data key versions.
    data = await scoped.get_wrapper("s1", "database")
    assert isinstance(data, PooledWrapper)
    newest = data.primary
    assert isinstance(newest, AeadWrapper)
    wrapped = await db.fetchval(
        "select key from kms_data_key_version where private_id = $1", newest.key_id
    )
    unwrapped = await root.decrypt(BlobInfo.from_bytes(bytes(wrapped)))
    assert newest.matches_key(unwrapped), "the root pool unwrapped another key"


async def test_get_wrapper_for_root_key_honours_the_version_id(scoped: KMS) -> None:
    await scoped.rotate_keys("s1")
    first, second = (await scoped.list_keys("s1"))[0].versions
    old = await scoped.get_wrapper("s1", ROOT_PURPOSE, key_version_id=first.id)
    assert old.key_id == first.id
    new = await scoped.get_wrapper("s1", ROOT_PURPOSE, key_version_id=second.id)
    assert new.key_id == second.id
    with pytest.raises(KeyNotFoundError, match="unable to find specified key version"):
        await scoped.get_wrapper("s1", ROOT_PURPOSE, key_version_id="krkv_AAAAAAAAAA")


async def test_get_wrapper_for_an_unknown_scope_is_key_not_found(kms: KMS) -> None:
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await kms.get_wrapper("nope", "database")
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await kms.get_wrapper("nope", ROOT_PURPOSE)


@input_validation
async def test_get_wrapper_rejects_bad_arguments(scoped: KMS) -> None:
    with pytest.raises(InvalidParameterError, match="not a supported key purpose"):
        await scoped.get_wrapper("s1", "audit")
    with pytest.raises(InvalidParameterError, match="scope id"):
        await scoped.get_wrapper("", "database")
    with pytest.raises(InvalidParameterError, match="key_version_id"):
        await scoped.get_wrapper("s1", "database", key_version_id=42)  # type: ignore[arg-type]
