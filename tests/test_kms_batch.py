"""encrypt_many and decrypt_many: the same envelopes as encrypt/decrypt, item errors by index."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import GatedWrapper, input_validation

from kms_async import (
    KMS,
    AeadWrapper,
    BlobInfo,
    DecryptionError,
    InvalidParameterError,
    KeyNotFoundError,
    KeySuspendedError,
    KMSError,
    UnknownKeyVersionError,
)

OpenKMS = Callable[..., Awaitable[KMS]]

#: Uniform sizes take the bulk path; mixed ones (across varint length
#: boundaries) the per-length one.
MIXED = [0, 1, 99, 100, 127, 200, 1024, 16355, 16356]


def key_id(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


@pytest.fixture
async def scoped(kms: KMS) -> KMS:
    await kms.create_keys("s1")
    return kms


async def wait_until(condition: Callable[[], bool], *, limit: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, "condition not reached within the polling limit"
        await asyncio.sleep(0.01)


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1024] * 64, MIXED], ids=["uniform", "mixed"])
async def test_batches_and_single_calls_read_each_other(scoped: KMS, sizes: list[int]) -> None:
    plaintexts = [secrets.token_bytes(n) for n in sizes]
    aads = [f"row-{i}".encode() if i % 2 else None for i in range(len(sizes))]
    batch = await scoped.encrypt_many("s1", "database", plaintexts, aad=aads)
    singles = [
        await scoped.encrypt("s1", "database", p, aad=a)
        for p, a in zip(plaintexts, aads, strict=True)
    ]
    newest = (await scoped.list_keys("s1"))[1].versions[-1].id
    assert {key_id(c) for c in batch} == {newest}
    assert len(set(batch)) == len(batch)  # a fresh nonce each
    assert [
        await scoped.decrypt("s1", "database", c, aad=a) for c, a in zip(batch, aads, strict=True)
    ] == plaintexts
    assert await scoped.decrypt_many("s1", "database", singles, aad=aads) == plaintexts
    assert await scoped.decrypt_many("s1", "database", batch, aad=aads) == plaintexts


async def test_any_iterable_works_and_empty_aad_means_none(scoped: KMS) -> None:
    plaintexts = [b"a", b"bb", bytearray(b"ccc"), memoryview(b"dddd")]
    made = await scoped.encrypt_many("s1", "database", (p for p in plaintexts))
    assert await scoped.decrypt_many("s1", "database", tuple(made), aad=[b""] * 4) == [
        b"a",
        b"bb",
        b"ccc",
        b"dddd",
    ]


async def test_large_batches_are_offloaded_and_read_the_same(
    scoped: KMS, open_kms: OpenKMS
) -> None:
    plaintexts = [secrets.token_bytes(n) for n in (5000, 5000, 70_000)]
    async with await open_kms(offload_threshold=4096) as offloading:
        made = await offloading.encrypt_many("s1", "database", plaintexts)
        assert await offloading.decrypt_many("s1", "database", made) == plaintexts
        uniform = await offloading.encrypt_many("s1", "database", plaintexts[:2])
        assert await offloading.decrypt_many("s1", "database", uniform) == plaintexts[:2]
    assert await scoped.decrypt_many("s1", "database", made) == plaintexts


async def test_empty_batches_return_nothing_and_read_no_key(scoped: KMS) -> None:
    assert await scoped.encrypt_many("s1", "database", []) == []
    assert await scoped.decrypt_many("s1", "database", [], aad=[]) == []
    # No key is read: a scope without keys is not an error for no items.
    assert await scoped.encrypt_many("no-such-scope", "database", []) == []
    with pytest.raises(InvalidParameterError):
        await scoped.encrypt_many("", "database", [])
    with pytest.raises(InvalidParameterError):
        await scoped.decrypt_many("s1", "nope", [])


async def test_a_scope_without_keys_is_key_not_found(kms: KMS) -> None:
    with pytest.raises(KeyNotFoundError):
        await kms.encrypt_many("nobody", "database", [b"x"])
    with pytest.raises(KeyNotFoundError):
        await kms.decrypt_many("nobody", "database", [b"x"])


# -- versions -----------------------------------------------------------------------


async def test_mixed_versions_after_a_rotation(scoped: KMS, open_kms: OpenKMS) -> None:
    old = await scoped.encrypt_many("s1", "database", [b"old-1", b"old-2"])
    async with await open_kms() as other:
        await other.rotate_keys("s1")
        # Made by another instance: this one has not seen the new version yet.
        new = await other.encrypt_many("s1", "database", [b"new-1", b"new-2"])
    assert key_id(old[0]) != key_id(new[0])
    mixed = [old[0], new[0], old[1], new[1]]
    assert await scoped.decrypt_many("s1", "database", mixed) == [
        b"old-1",
        b"new-1",
        b"old-2",
        b"new-2",
    ]
    # Now both versions are cached, and encrypt_many uses the new one.
    assert await scoped.decrypt_many("s1", "database", mixed[::-1]) == [
        b"new-2",
        b"old-2",
        b"new-1",
        b"old-1",
    ]
    assert key_id((await scoped.encrypt_many("s1", "database", [b"x"]))[0]) == key_id(new[0])
    async with await open_kms() as cold:
        assert await cold.decrypt_many("s1", "database", mixed) == [
            b"old-1",
            b"new-1",
            b"old-2",
            b"new-2",
        ]


async def test_a_revoked_version_names_the_item(scoped: KMS) -> None:
    old = await scoped.encrypt_many("s1", "database", [b"old"])
    await scoped.rotate_keys("s1")
    new = await scoped.encrypt_many("s1", "database", [b"new"])
    await scoped.revoke_key_version(key_id(old[0]))
    with pytest.raises(UnknownKeyVersionError, match=r"ciphertexts\[1\]") as caught:
        await scoped.decrypt_many("s1", "database", [new[0], old[0]])
    assert caught.value.index == 1


async def test_a_suspended_version_names_the_item(scoped: KMS) -> None:
    old = await scoped.encrypt_many("s1", "database", [b"old"])
    await scoped.rotate_keys("s1")
    new = await scoped.encrypt_many("s1", "database", [b"new"])
    await scoped.suspend_key_version(key_id(old[0]))
    with pytest.raises(KeySuspendedError) as caught:
        await scoped.decrypt_many("s1", "database", [new[0], old[0]])
    assert caught.value.index == 1
    await scoped.resume_key_version(key_id(old[0]))
    assert await scoped.decrypt_many("s1", "database", [new[0], old[0]]) == [b"new", b"old"]


async def test_another_scopes_ciphertext_is_refused(kms: KMS) -> None:
    await kms.create_keys("a")
    await kms.create_keys("b")
    theirs = await kms.encrypt_many("b", "database", [b"b"])
    ours = await kms.encrypt_many("a", "database", [b"a"])
    with pytest.raises(UnknownKeyVersionError) as caught:
        await kms.decrypt_many("a", "database", [ours[0], theirs[0]])
    assert caught.value.index == 1


async def test_envelopes_with_other_fields_decrypt_item_by_item(scoped: KMS) -> None:
    """Anything plain decrypt reads, decrypt_many reads (here an envelope with an hmac field)."""
    made = await scoped.encrypt_many("s1", "database", [b"one", b"two"])
    blob = BlobInfo.from_bytes(made[1])
    other = BlobInfo(ciphertext=blob.ciphertext, key_id=blob.key_id, hmac=b"x").to_bytes()
    assert await scoped.decrypt("s1", "database", other) == b"two"
    assert await scoped.decrypt_many("s1", "database", [made[0], other]) == [b"one", b"two"]


# -- tampering and AAD ---------------------------------------------------------------


async def test_tampering_with_any_byte_of_one_item_names_it(scoped: KMS) -> None:
    plaintexts = [secrets.token_bytes(200) for _ in range(3)]
    made = await scoped.encrypt_many("s1", "database", plaintexts)
    wrong: dict[int, str] = {}
    for position in range(len(made[1])):
        tampered = bytearray(made[1])
        tampered[position] ^= 0x01
        batch = [made[0], bytes(tampered), made[2]]
        try:
            await scoped.decrypt_many("s1", "database", batch)
        except DecryptionError as exc:  # UnknownKeyVersionError included
            if exc.index != 1 or "ciphertexts[1]" not in str(exc):
                wrong[position] = f"index {exc.index}: {exc}"
        else:
            wrong[position] = "decrypted"
    assert wrong == {}
    # Truncated, and extended past the envelope.
    for bad in (made[1][:-1], made[1][:40], made[1] + b"\x00"):
        with pytest.raises(DecryptionError) as caught:
            await scoped.decrypt_many("s1", "database", [made[0], bad, made[2]])
        assert caught.value.index == 1
    assert await scoped.decrypt_many("s1", "database", made) == plaintexts


async def test_wrong_or_missing_aad_names_the_item(scoped: KMS) -> None:
    made = await scoped.encrypt_many("s1", "database", [b"a", b"b", b"c"], aad=[b"1", b"2", b"3"])
    with pytest.raises(DecryptionError, match=r"ciphertexts\[2\]") as caught:
        await scoped.decrypt_many("s1", "database", made, aad=[b"1", b"2", b"x"])
    assert caught.value.index == 2
    with pytest.raises(DecryptionError) as caught:
        await scoped.decrypt_many("s1", "database", made)
    assert caught.value.index == 0
    assert await scoped.decrypt_many("s1", "database", made, aad=[b"1", b"2", b"3"]) == [
        b"a",
        b"b",
        b"c",
    ]


# -- bad input: only library errors ---------------------------------------------------


@input_validation
@pytest.mark.parametrize(
    "values",
    [b"one value", "text", bytearray(b"x"), memoryview(b"x"), 42, None],
    ids=["bytes", "str", "bytearray", "memoryview", "int", "none"],
)
async def test_a_batch_that_is_not_a_list_is_invalid(scoped: KMS, values: Any) -> None:
    with pytest.raises(InvalidParameterError, match="list"):
        await scoped.encrypt_many("s1", "database", values)
    with pytest.raises(InvalidParameterError, match="list"):
        await scoped.decrypt_many("s1", "database", values)


@input_validation
async def test_aad_must_be_one_per_item(scoped: KMS) -> None:
    made = await scoped.encrypt_many("s1", "database", [b"a", b"b"])
    for call, items in ((scoped.encrypt_many, [b"a", b"b"]), (scoped.decrypt_many, made)):
        with pytest.raises(InvalidParameterError, match="one AAD per item"):
            await call("s1", "database", items, aad=[b"1"])
        with pytest.raises(InvalidParameterError, match=r"\[aad\] \* len"):
            await call("s1", "database", items, aad=b"12")
        with pytest.raises(InvalidParameterError, match="list"):
            await call("s1", "database", items, aad=7)


@input_validation
@pytest.mark.parametrize("item", ["text", None, 42, [1, 2]], ids=["str", "none", "int", "list"])
async def test_an_item_of_the_wrong_type_is_named(scoped: KMS, item: Any) -> None:
    with pytest.raises(InvalidParameterError, match=r"plaintexts\[1\]") as caught:
        await scoped.encrypt_many("s1", "database", [b"ok", item])
    assert caught.value.index == 1
    made = await scoped.encrypt_many("s1", "database", [b"ok", b"ok"])
    with pytest.raises(KMSError) as failed:
        await scoped.decrypt_many("s1", "database", [made[0], item])
    assert failed.value.index == 1
    with pytest.raises(InvalidParameterError, match=r"plaintexts\[0\]"):
        await scoped.encrypt_many("s1", "database", [b"ok"], aad=[item if item else "x"])
    with pytest.raises(InvalidParameterError) as bad_aad:
        await scoped.decrypt_many("s1", "database", made, aad=[None, "text"])
    assert bad_aad.value.index == 1


@input_validation
@pytest.mark.parametrize("scope_id", [None, 42, ["s1"], ""], ids=["none", "int", "list", "empty"])
async def test_bad_scope_ids_are_invalid(scoped: KMS, scope_id: Any) -> None:
    with pytest.raises(InvalidParameterError):
        await scoped.encrypt_many(scope_id, "database", [b"x"])
    with pytest.raises(InvalidParameterError):
        await scoped.decrypt_many(scope_id, "database", [b"x"])


@input_validation
async def test_a_closed_kms_refuses_batches(db: Any, root_wrapper: AeadWrapper) -> None:
    from kms_async import ClosedError

    kms = await KMS.open(db.dsn, purposes=["database"], root_wrapper=root_wrapper)
    await kms.create_keys("s1")
    made = await kms.encrypt_many("s1", "database", [b"x"])
    await kms.aclose()
    for call, items in ((kms.encrypt_many, [b"x"]), (kms.decrypt_many, made)):
        with pytest.raises(ClosedError):
            await call("s1", "database", items)
        with pytest.raises(ClosedError):
            await call("s1", "database", [])


# -- cancellation ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["encrypt_many", "decrypt_many"])
async def test_cancelled_during_a_cold_load_leaves_the_kms_usable(
    scoped: KMS, open_kms: OpenKMS, root_wrapper: AeadWrapper, method: str
) -> None:
    made = await scoped.encrypt_many("s1", "database", [b"a", b"b"])
    gated = GatedWrapper(root_wrapper)
    cold = await open_kms(root_wrapper=gated)
    try:
        items = [b"a", b"b"] if method == "encrypt_many" else made
        task = asyncio.ensure_future(getattr(cold, method)("s1", "database", items))
        await wait_until(gated.entered.is_set)
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()
        gated.gate.set()
        assert await cold.decrypt_many("s1", "database", made) == [b"a", b"b"]
        again = await cold.encrypt_many("s1", "database", [b"c"])
        assert await scoped.decrypt_many("s1", "database", again) == [b"c"]
    finally:
        gated.gate.set()
        await cold.aclose()


async def test_cancelled_while_offloaded_leaves_the_kms_usable(
    scoped: KMS, open_kms: OpenKMS
) -> None:
    plaintexts = [secrets.token_bytes(256 * 1024) for _ in range(8)]
    async with await open_kms(offload_threshold=1024) as offloading:
        made = await offloading.encrypt_many("s1", "database", plaintexts)
        for call, items in (
            (offloading.encrypt_many, plaintexts),
            (offloading.decrypt_many, made),
        ):
            task = asyncio.ensure_future(call("s1", "database", items))
            await asyncio.sleep(0)  # started: the batch is in the worker thread
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled() or len(task.result()) == len(plaintexts)
        assert await offloading.decrypt_many("s1", "database", made) == plaintexts
