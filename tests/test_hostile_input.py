"""Hostile input: ciphertexts, AAD, scope ids, purposes, table prefixes and key version ids.

Every public call that takes outside input either does what it promises or
raises a ``KMSError`` subclass, never a raw driver or codec exception, and
never hands one tenant's plaintext to another. The properties run on SQLite
and PostgreSQL; each test opens one KMS and hypothesis runs its examples
against it (hence the suppressed function-scoped-fixture health check: the
reuse is deliberate, and every example is independent of the others' keys).

The last section plays an attacker with write access to the key tables; the
outcomes are described in SECURITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import input_validation
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kms_async
from kms_async import (
    KMS,
    ROOT_PURPOSE,
    BlobInfo,
    DecryptionError,
    InvalidParameterError,
    KeyExistsError,
    KeyIntegrityError,
    KeyInUseError,
    KeyNotFoundError,
    KMSError,
    StorageError,
    UnknownKeyVersionError,
)
from kms_async import _keyring as keyring_module

OpenKMS = Callable[..., Awaitable[KMS]]

#: Examples per property: KMS_PROPERTY_EXAMPLES=500 for a longer hunt.
PROPERTY = settings(
    max_examples=int(os.environ.get("KMS_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Each example of these writes and reads keys; the listed hostile cases beside
# them run every time.
SLOW_PROPERTY = settings(PROPERTY, max_examples=25)

KEY_TABLES = (
    "kms_root_key",
    "kms_root_key_version",
    "kms_data_key",
    "kms_data_key_version",
)


@pytest.fixture
def no_reload_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reload at once for ciphertexts naming unknown versions (the spacing is tested apart)."""
    monkeypatch.setattr(keyring_module, "RELOAD_SPACING", 0.0)


# -- protobuf framing, written here independently of kms_async._blob ----------------


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def len_field(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


@st.composite
def one_field(draw: st.DrawFn, numbers: st.SearchStrategy[int]) -> bytes:
    """One well-framed field of any wire type."""
    field = draw(numbers)
    wire = draw(st.sampled_from([0, 1, 2, 5]))
    if wire == 0:
        return tag(field, 0) + varint(draw(st.integers(0, 2**64 - 1)))
    if wire == 1:
        return tag(field, 1) + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return tag(field, 5) + draw(st.binary(min_size=4, max_size=4))
    return len_field(field, draw(st.binary(max_size=40)))


# Top level: BlobInfo fields the data path ignores (iv, hmac only as bytes) and
# fields unknown to the message; never 1 (ciphertext) or 5 (key_info).
_TOP_NUMBERS = st.one_of(st.sampled_from([4, 6, 7, 8]), st.integers(9, 2**29 - 1))
top_fields = st.lists(
    st.one_of(
        one_field(_TOP_NUMBERS),
        st.builds(len_field, st.sampled_from([2, 3]), st.binary(max_size=20)),
    ),
    max_size=3,
).map(b"".join)
# Inside key_info: anything but the string fields 3 (key_id) and 4 (hmac_key_id),
# which must hold UTF-8 as protobuf requires.
_INFO_NUMBERS = st.one_of(st.sampled_from([1, 2, 5, 6, 7, 8]), st.integers(9, 2**29 - 1))
info_fields = st.lists(one_field(_INFO_NUMBERS), max_size=3).map(b"".join)


@st.composite
def framings(draw: st.DrawFn) -> dict[str, bytes]:
    return {
        "before": draw(top_fields),
        "middle": draw(top_fields),
        "after": draw(top_fields),
        "info_before": draw(info_fields),
        "info_after": draw(info_fields),
    }


def framed(ciphertext: bytes, key_id: str, parts: dict[str, bytes]) -> tuple[bytes, range, range]:
    """A BlobInfo with extra fields around and inside; also where field 1 and key_id lie."""
    head = parts["before"] + tag(1, 2) + varint(len(ciphertext))
    body = range(len(head), len(head) + len(ciphertext))
    out = head + ciphertext + parts["middle"]
    encoded = key_id.encode()
    info_head = parts["info_before"] + tag(3, 2) + varint(len(encoded))
    info = info_head + encoded + parts["info_after"]
    field5_head = tag(5, 2) + varint(len(info))
    key_start = len(out) + len(field5_head) + len(info_head)
    out += field5_head + info + parts["after"]
    return out, body, range(key_start, key_start + len(encoded))


# -- outcomes ----------------------------------------------------------------------


async def outcome(call: Awaitable[Any]) -> tuple[str, Any]:
    """("ok", value) or ("error", exc); anything but a KMSError fails the test."""
    try:
        return "ok", await call
    except KMSError as exc:
        return "error", exc
    except Exception as exc:  # pragma: no cover - reported as the failure
        pytest.fail(f"raised {type(exc).__name__} instead of a KMSError: {exc!r}")


async def assert_decrypt_refused_or_genuine(
    kms: KMS, scope: str, purpose: str, data: bytes, original: bytes, plaintext: bytes
) -> None:
    """``data`` decrypts only to ``plaintext`` and only if it still carries the
    original AES-GCM body and key id; otherwise it is a DecryptionError."""
    kind, value = await outcome(kms.decrypt(scope, purpose, data))
    if kind == "error":
        assert isinstance(value, DecryptionError), repr(value)
        return
    assert value == plaintext
    genuine = BlobInfo.from_bytes(original)
    parsed = BlobInfo.from_bytes(data)
    assert (parsed.ciphertext, parsed.key_id) == (genuine.ciphertext, genuine.key_id)


async def row_counts(db: Any) -> dict[str, int]:
    counts = ", ".join(f"(select count(*) from {t})" for t in KEY_TABLES)
    (row,) = await db.fetch(f"select {counts}")
    return dict(zip(KEY_TABLES, map(int, row), strict=True))


# -- arbitrary ciphertexts ---------------------------------------------------------


@pytest.fixture
async def tenant(kms: KMS) -> tuple[KMS, bytes, bytes]:
    """The kms fixture with scope "t" and one genuine ciphertext of it."""
    await kms.create_keys("t")
    plaintext = b"tenant t's secret"
    return kms, plaintext, await kms.encrypt("t", "database", plaintext)


@PROPERTY
@given(data=st.binary(max_size=300))
async def test_arbitrary_bytes_never_decrypt(
    tenant: tuple[KMS, bytes, bytes], no_reload_spacing: None, data: bytes
) -> None:
    kms, _, genuine = tenant
    assume(data != genuine)
    kind, value = await outcome(kms.decrypt("t", "database", data))
    assert kind == "error" and isinstance(value, DecryptionError), value


@PROPERTY
@given(
    body=st.binary(max_size=120),
    version_index=st.integers(0, 2),
    parts=framings(),
)
async def test_forged_envelopes_naming_real_versions_never_decrypt(
    tenant: tuple[KMS, bytes, bytes],
    no_reload_spacing: None,
    body: bytes,
    version_index: int,
    parts: dict[str, bytes],
) -> None:
    """Well-framed envelopes routed to a real key version still need its tag."""
    kms, _, genuine = tenant
    # The database version genuine uses, the oidc version, the root key version.
    versions = [v.id for k in await kms.list_keys("t") for v in k.versions]
    key_id = versions[version_index]
    data, _, _ = framed(body, key_id, parts)
    assume(BlobInfo.from_bytes(data).ciphertext != BlobInfo.from_bytes(genuine).ciphertext)
    kind, value = await outcome(kms.decrypt("t", "database", data))
    assert kind == "error" and isinstance(value, DecryptionError), value


@pytest.mark.parametrize("size", [0, 1, 150])
async def test_every_truncation_is_refused(kms: KMS, no_reload_spacing: None, size: int) -> None:
    await kms.create_keys("t")
    plaintext = secrets.token_bytes(size)
    genuine = await kms.encrypt("t", "database", plaintext)
    for cut in range(len(genuine)):
        kind, value = await outcome(kms.decrypt("t", "database", genuine[:cut]))
        assert kind == "error" and isinstance(value, DecryptionError), (cut, value)
    assert await kms.decrypt("t", "database", genuine) == plaintext


@PROPERTY
@given(parts=framings(), cut=st.integers(0, 10_000))
async def test_truncations_of_framed_envelopes_never_yield_other_data(
    tenant: tuple[KMS, bytes, bytes], no_reload_spacing: None, parts: dict[str, bytes], cut: int
) -> None:
    kms, plaintext, genuine = tenant
    blob = BlobInfo.from_bytes(genuine)
    data, _, _ = framed(blob.ciphertext, blob.key_id, parts)
    await assert_decrypt_refused_or_genuine(
        kms, "t", "database", data[: cut % (len(data) + 1)], genuine, plaintext
    )


@PROPERTY
@given(flips=st.dictionaries(st.integers(0, 10_000), st.integers(1, 255), min_size=1, max_size=4))
async def test_bit_flips_are_refused(
    tenant: tuple[KMS, bytes, bytes], no_reload_spacing: None, flips: dict[int, int]
) -> None:
    kms, plaintext, genuine = tenant
    data = bytearray(genuine)
    for position, mask in flips.items():
        data[position % len(data)] ^= mask
    assume(bytes(data) != genuine)
    await assert_decrypt_refused_or_genuine(kms, "t", "database", bytes(data), genuine, plaintext)


@PROPERTY
@given(parts=framings())
async def test_unknown_fields_around_a_real_envelope_are_skipped(
    tenant: tuple[KMS, bytes, bytes], parts: dict[str, bytes]
) -> None:
    kms, plaintext, genuine = tenant
    blob = BlobInfo.from_bytes(genuine)
    data, _, _ = framed(blob.ciphertext, blob.key_id, parts)
    assert await kms.decrypt("t", "database", data) == plaintext
    # A bytearray or memoryview of the same bytes takes the general path too.
    assert await kms.decrypt("t", "database", bytearray(data)) == plaintext


@PROPERTY
@given(parts=framings(), where=st.sampled_from(["body", "key_id"]), at=st.integers(0, 10_000))
async def test_framing_does_not_weaken_the_tag(
    tenant: tuple[KMS, bytes, bytes],
    no_reload_spacing: None,
    parts: dict[str, bytes],
    where: str,
    at: int,
) -> None:
    kms, _, genuine = tenant
    blob = BlobInfo.from_bytes(genuine)
    envelope, body, key_id = framed(blob.ciphertext, blob.key_id, parts)
    region = body if where == "body" else key_id
    position = region[at % len(region)]
    for mask in (0x01, 0x20, 0x80, 0xFF):
        mutated = bytearray(envelope)
        mutated[position] ^= mask
        kind, value = await outcome(kms.decrypt("t", "database", bytes(mutated)))
        assert kind == "error", (where, position, mask)
        assert isinstance(value, DecryptionError), value
        if where == "key_id" and isinstance(value, UnknownKeyVersionError):
            assert "another scope or purpose" in str(value)


@PROPERTY
@given(
    aad=st.one_of(st.none(), st.binary(max_size=64)),
    other=st.one_of(st.none(), st.binary(max_size=64)),
    same=st.booleans(),
)
async def test_decrypt_succeeds_only_with_the_exact_aad(
    tenant: tuple[KMS, bytes, bytes], aad: bytes | None, other: bytes | None, same: bool
) -> None:
    kms, _, _ = tenant
    plaintext = b"bound to its aad"
    ciphertext = await kms.encrypt("t", "oidc", plaintext, aad=aad)
    given_aad = aad if same else other
    kind, value = await outcome(kms.decrypt("t", "oidc", ciphertext, aad=given_aad))
    if (aad or b"") == (given_aad or b""):
        assert (kind, value) == ("ok", plaintext)
    else:
        assert kind == "error" and isinstance(value, DecryptionError), value
        assert not isinstance(value, UnknownKeyVersionError)


async def test_empty_aad_and_none_are_the_same(kms: KMS) -> None:
    await kms.create_keys("t")
    for enc_aad in (None, b""):
        ciphertext = await kms.encrypt("t", "database", b"p", aad=enc_aad)
        for dec_aad in (None, b"", bytearray(), memoryview(b"")):
            assert await kms.decrypt("t", "database", ciphertext, aad=dec_aad) == b"p"


@input_validation
@pytest.mark.parametrize("aad", ["text", 5, object(), ["list"]])
async def test_aad_of_the_wrong_type_is_an_invalid_parameter(kms: KMS, aad: Any) -> None:
    await kms.create_keys("t")
    ciphertext = await kms.encrypt("t", "database", b"p")
    with pytest.raises(InvalidParameterError):
        await kms.encrypt("t", "database", b"p", aad=aad)
    with pytest.raises(InvalidParameterError):
        await kms.decrypt("t", "database", ciphertext, aad=aad)


@input_validation
@pytest.mark.parametrize("ciphertext", ["text", 5, None, object()])
async def test_ciphertext_of_the_wrong_type_is_refused(kms: KMS, ciphertext: Any) -> None:
    await kms.create_keys("t")
    await kms.encrypt("t", "database", b"warm the cache")
    with pytest.raises(KMSError):
        await kms.decrypt("t", "database", ciphertext)


async def test_fast_path_refuses_what_the_envelope_parser_refuses(kms: KMS) -> None:
    """A 4-byte field-1 length with its last byte cut off is not a BlobInfo.

    For field-1 lengths in [2**21, 2**22) the canonical varint takes four
    bytes. Dropping the fourth leaves a frame the protobuf decoder (here and
    in Go) refuses; decrypt's fast path must refuse it as well instead of
    reading the length from three bytes.
    """
    await kms.create_keys("t")
    plaintext = b"\x00" * (2**21)
    genuine = await kms.encrypt("t", "database", plaintext)
    assert genuine[0] == 0x0A and genuine[3] >= 0x80 and genuine[4] == 0x01
    crafted = genuine[:4] + genuine[5:]
    with pytest.raises(DecryptionError):
        BlobInfo.from_bytes(crafted)
    with pytest.raises(DecryptionError):
        await kms.decrypt("t", "database", crafted)


@PROPERTY
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.one_of(
                one_field(st.integers(1, 2**29 - 1)),
                st.builds(len_field, st.just(5), info_fields),
                st.builds(lambda f, w: tag(f, w), st.integers(0, 40), st.integers(0, 7)),
                st.binary(max_size=8),
            ),
            max_size=6,
        ).map(b"".join),
    )
)
def test_blobinfo_from_bytes_parses_or_raises_decryption_error(data: bytes) -> None:
    try:
        blob = BlobInfo.from_bytes(data)
    except DecryptionError:
        return
    assert isinstance(blob, BlobInfo)
    assert isinstance(blob.ciphertext, bytes) and isinstance(blob.key_id, str)
    if blob.ciphertext:
        assert BlobInfo.from_bytes(blob.to_bytes()) == blob


@pytest.mark.parametrize("data", [bytearray(b"\x0a\x01x"), memoryview(b"\x0a\x01x")])
def test_blobinfo_from_bytes_takes_bytes_like(data: Any) -> None:
    assert BlobInfo.from_bytes(data).ciphertext == b"x"


@pytest.mark.parametrize("data", ["\x0a\x01x", 5, None, [10, 1, 120]])
def test_blobinfo_from_bytes_refuses_non_bytes(data: Any) -> None:
    with pytest.raises(DecryptionError):
        BlobInfo.from_bytes(data)


# -- reloads caused by hostile ciphertexts -----------------------------------------


def count_loads(kms: KMS) -> list[tuple[str, str]]:
    """Record every database load of a (scope, purpose) by this KMS."""
    loads: list[tuple[str, str]] = []
    original = kms._keyring.load

    async def counting(scope_id: str, purpose: str, **options: Any) -> Any:
        loads.append((scope_id, purpose))
        return await original(scope_id, purpose, **options)

    kms._keyring.load = counting  # type: ignore[method-assign]
    return loads


async def test_malformed_version_ids_cause_no_database_reads(kms: KMS) -> None:
    await kms.create_keys("t")
    genuine = BlobInfo.from_bytes(await kms.encrypt("t", "database", b"p"))
    loads = count_loads(kms)
    for key_id in [
        "",
        "x",
        "kdkv_",
        "kdkv_short",
        "kdkv_AAAAAAAAAAA",
        "krkv_AAAAAAAAAA",
        "kdkv_AAAA'AAAAA",
        "kdkv_AAAAAAAAA\u00e9",
        "kdkv_AAAAAAAAAA\n",
        "k" * 500,
    ]:
        data = BlobInfo(genuine.ciphertext, key_id).to_bytes()
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt("t", "database", data)
    assert loads == []


async def test_unknown_well_formed_versions_share_reloads(kms: KMS) -> None:
    """Hostile ciphertexts naming made-up versions cost far fewer reloads than calls."""
    await kms.create_keys("t")
    genuine = BlobInfo.from_bytes(await kms.encrypt("t", "database", b"p"))
    loads = count_loads(kms)
    forged = [
        BlobInfo(genuine.ciphertext, f"kdkv_{secrets.token_hex(5)}").to_bytes() for _ in range(50)
    ]
    results = await asyncio.gather(
        *(kms.decrypt("t", "database", f) for f in forged), return_exceptions=True
    )
    assert all(isinstance(r, UnknownKeyVersionError) for r in results), results
    assert 1 <= len(loads) < len(forged) // 2


# -- scope ids ---------------------------------------------------------------------

NASTY = [
    "'", "''", '"', "`", "\\", "\\'", "\x00", "\x01", "\x1b[31m", "\x7f", "\u202e",
    "\u200f", "\u0301", "e\u0301", "\u00e9", "\U0001f600", "\U0001f469\u200d\U0001f467",
    "\ud800", "\udfff", " ", "\t", "\n", "\r\n", "\u00a0", "\u2028", "\u3000", "\ufeff",
    "\u200b", "%", "_", "*", ";", "--", "/*", "*/", "$1", "?", "?1", ":a", "\u00df",
    "\u0130", "\ufb01", "\u2126", "\U0010ffff", "\ufffe",
    "'; drop table kms_root_key; --", '" or "1"="1',
]  # fmt: skip


def storable(text: str) -> bool:
    """Whether a database text column can hold ``text`` (no NUL, no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


hostile_text = st.one_of(
    st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=3)), max_size=6).map("".join),
    st.text(max_size=20),
    st.sampled_from(["x" * 10_000, "\u00e9" * 600, "x" * 1024, "x" * 1025, "a" * 256]),
)


async def assert_scope_round_trip(kms: KMS, db: Any, scope: Any) -> None:
    """Every scope operation works for ``scope``, or each raises InvalidParameterError."""
    try:
        await kms.create_keys(scope)
    except InvalidParameterError:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: kms.encrypt(scope, "database", b"p"),
            lambda: kms.decrypt(scope, "database", b"\x0a\x00"),
            lambda: kms.rotate_keys(scope),
            lambda: kms.rewrap_keys(scope),
            lambda: kms.list_keys(scope),
            lambda: kms.get_wrapper(scope, "database"),
            lambda: kms.get_wrapper(scope, ROOT_PURPOSE),
            lambda: kms.reconcile_keys([scope]),
            lambda: kms.create_keys_many([scope]),
        ]
        if scope is not None:  # scope_id=None means "any scope"
            calls.append(lambda: kms.revoke_key_version("kdkv_AAAAAAAAAA", scope_id=scope))
        for call in calls:
            kind, value = await outcome(call())
            assert kind == "error" and isinstance(value, InvalidParameterError), value
        return
    except KeyExistsError:
        pass  # hypothesis drew this scope before
    ciphertext = await kms.encrypt(scope, "database", b"p", aad=b"a")
    assert await kms.decrypt(scope, "database", ciphertext, aad=b"a") == b"p"
    await kms.rotate_keys(scope, rewrap=True)
    assert await kms.reconcile_keys([scope]) == []
    keys = await kms.list_keys(scope)
    assert {k.scope for k in keys} == {scope}
    stored = await db.fetch("select scope_id from kms_root_key where private_id = $1", keys[0].id)
    assert stored == [(scope,)]  # byte-exact through the database
    database_key = next(k for k in keys if k.purpose == "database")
    oldest = database_key.versions[0].id
    assert await kms.decrypt(scope, "database", ciphertext, aad=b"a") == b"p"
    await kms.revoke_key_version(oldest, scope_id=scope)
    with pytest.raises(UnknownKeyVersionError):
        await kms.decrypt(scope, "database", ciphertext, aad=b"a")
    wrapper = await kms.get_wrapper(scope, "database")
    assert oldest not in wrapper.key_ids()  # type: ignore[attr-defined]
    assert (await kms.get_wrapper(scope, ROOT_PURPOSE)).key_id.startswith("krkv_")


@SLOW_PROPERTY
@given(scope=hostile_text)
async def test_hostile_scope_ids_round_trip_or_are_invalid(kms: KMS, db: Any, scope: str) -> None:
    await assert_scope_round_trip(kms, db, scope)


@pytest.mark.parametrize(
    "scope",
    ["'", '"', "`", "\\", "a'; drop table kms_root_key; --", "\u202eevil", "\U0001f600",
     "e\u0301", "\x01\x1b[2J", "tab\there", "line\nbreak", " padded ", "x" * 1024,
     "\u00e9" * 512, "%_", "$1", "?1"],
)  # fmt: skip
async def test_unusual_scope_ids_work(kms: KMS, db: Any, scope: str) -> None:
    await assert_scope_round_trip(kms, db, scope)
    assert len(await db.fetch("select * from kms_root_key where scope_id = $1", scope)) == 1


@pytest.mark.parametrize(
    "scope",
    ["", " ", "\t\n", "\u3000", "a\x00b", "\x00", "a\ud800", "\udfff", "x" * 1025,
     "x" * 10_000, "\u00e9" * 513, None, 5, b"bytes", ["list"]],
)  # fmt: skip
async def test_unusable_scope_ids_are_invalid(kms: KMS, db: Any, scope: Any) -> None:
    before = await row_counts(db)
    await assert_scope_round_trip(kms, db, scope)
    assert await row_counts(db) == before


SCOPE_PAIRS = [
    ("a", "a "), ("a", " a"), ("a", "a\t"), ("a", "a\n"), ("a", "A"), ("\u00e9", "e\u0301"),
    ("a'", "a''"), ("a\\", "a\\\\"), ("a%", "a_"), ("a", "a\u200b"), ("a", "\uff41"),
    ("ss", "\u00df"), ("i", "\u0130"), ("a", "a\x01"), ("\u03a9", "\u2126"),
    ("a\u202eb", "b\u202ea"), ("tenant", "tenant\ufeff"), ("x'y", 'x"y'), ("a;b", "a;b--"),
]  # fmt: skip


async def assert_scopes_are_separate(kms: KMS, first: str, second: str) -> None:
    made = {}
    for scope in (first, second):
        with contextlib.suppress(KeyExistsError):
            await kms.create_keys(scope)
        made[scope] = await kms.encrypt(scope, "database", f"data of {scope!r}".encode())
    roots = {scope: (await kms.list_keys(scope))[0].id for scope in made}
    assert roots[first] != roots[second]
    for source, target in ((first, second), (second, first)):
        for purpose in ("database", "oidc"):
            with pytest.raises(UnknownKeyVersionError):
                await kms.decrypt(target, purpose, made[source])
        assert await kms.decrypt(source, "database", made[source]) == (
            f"data of {source!r}".encode()
        )
    database_ids = {
        scope: {v.id for k in await kms.list_keys(scope) for v in k.versions} for scope in made
    }
    assert not database_ids[first] & database_ids[second]


@pytest.mark.parametrize(("first", "second"), SCOPE_PAIRS)
async def test_scopes_differing_by_one_character_are_separate(
    kms: KMS, open_kms: OpenKMS, no_reload_spacing: None, first: str, second: str
) -> None:
    await assert_scopes_are_separate(kms, first, second)
    # And from a cold cache, where every decrypt loads from the database.
    async with await open_kms() as cold:
        await assert_scopes_are_separate(cold, first, second)


@SLOW_PROPERTY
@given(
    base=st.text(alphabet="abcXYZ019", min_size=1, max_size=6),
    extra=st.sampled_from([c for c in NASTY if storable(c)]),
    at=st.integers(0, 6),
)
async def test_scopes_differing_by_hostile_characters_are_separate(
    kms: KMS, no_reload_spacing: None, base: str, extra: str, at: int
) -> None:
    position = at % (len(base) + 1)
    other = base[:position] + extra + base[position:]
    assume(other.strip() and other != base)
    await assert_scopes_are_separate(kms, base, other)


# -- purposes ----------------------------------------------------------------------


@SLOW_PROPERTY
@given(purpose=hostile_text)
async def test_hostile_purposes_round_trip_or_are_invalid(
    open_kms: OpenKMS, db: Any, purpose: str
) -> None:
    try:
        kms = await open_kms(purposes=[purpose])
    except InvalidParameterError:
        return
    async with kms:
        scope = "p-" + secrets.token_hex(8)
        await kms.create_keys(scope)
        ciphertext = await kms.encrypt(scope, purpose, b"p")
        assert await kms.decrypt(scope, purpose, ciphertext) == b"p"
        await kms.rotate_keys(scope, rewrap=True)
        keys = await kms.list_keys(scope)
        assert [k.purpose for k in keys] == [ROOT_PURPOSE, purpose]
        stored = await db.fetch(
            "select purpose from kms_data_key where private_id = $1", keys[1].id
        )
        assert stored == [(purpose,)]
        await kms.revoke_key_version(keys[1].versions[0].id, scope_id=scope)
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt(scope, purpose, ciphertext)
        assert await kms.reconcile_keys([scope], [purpose]) == []


@input_validation
@pytest.mark.parametrize(
    "purpose",
    ["", " ", " database", "database ", "data\x00base", "\ud800", "x" * 257, "x" * 10_000,
     ROOT_PURPOSE, None, 5, b"database"],
)  # fmt: skip
async def test_unusable_purposes_are_invalid(open_kms: OpenKMS, kms: KMS, purpose: Any) -> None:
    with pytest.raises(InvalidParameterError):
        await open_kms(purposes=[purpose])
    await kms.create_keys("t")
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: kms.encrypt("t", purpose, b"p"),
        lambda: kms.decrypt("t", purpose, b"\x0a\x00"),
        lambda: kms.get_wrapper("t", purpose),
        lambda: kms.reconcile_keys(["t"], [purpose]),
        lambda: kms.create_keys("u", [purpose]),
    ]
    for call in calls:
        kind, value = await outcome(call())
        if purpose == ROOT_PURPOSE and kind == "ok":
            continue  # get_wrapper("rootKey") is allowed
        assert kind == "error" and isinstance(value, InvalidParameterError), value


PURPOSE_PAIRS = [
    ("db", "DB"), ("db", "db\u200b"), ("\u00e9", "e\u0301"), ("a'", "a''"), ("a\\", "a\\\\"),
    ("a%", "a_"), ("k", "\u212a"), ("x;y", "x;y--"), ("a\u202eb", "b\u202ea"),
]  # fmt: skip


@pytest.mark.parametrize(("first", "second"), PURPOSE_PAIRS)
async def test_purposes_differing_by_one_character_are_separate(
    open_kms: OpenKMS, no_reload_spacing: None, first: str, second: str
) -> None:
    async with await open_kms(purposes=[first, second]) as kms:
        await kms.create_keys("t")
        one = await kms.encrypt("t", first, b"first")
        two = await kms.encrypt("t", second, b"second")
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt("t", second, one)
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt("t", first, two)
        assert await kms.decrypt("t", first, one) == b"first"
        assert [k.purpose for k in await kms.list_keys("t")] == [
            ROOT_PURPOSE,
            *sorted([first, second]),
        ]


# -- table prefixes ----------------------------------------------------------------

HOSTILE_PREFIXES = [
    "kms; drop table kms_root_key", "kms_root_key--", "a' or '1'='1", 'kms"', "kms`", "kms\\",
    "\u0137ms", "kms\u0301", "\uff4b\uff4d\uff53", "kms\u200b", "KMS", "Kms", "k" * 21,
    "x" * 10_000, "kms\n", " kms", "kms ", "", "1kms", "_kms", "kms\x00", "kms/*", "kms-x",
    "kms.x", "public.kms", "kms;", "\ud800", None, 5, b"kms",
]  # fmt: skip


async def schema_objects(db: Any) -> list[tuple[Any, ...]]:
    if db.dialect == "postgres":
        return await db.fetch(
            "select table_name from information_schema.tables where table_schema = $1 order by 1",
            db.schema,
        )
    return await db.fetch("select type, name from sqlite_master order by 1, 2")


def unreachable_dsn(dialect: str) -> str:
    if dialect == "postgres":
        return "postgresql://nobody@127.0.0.1:1/none"
    return "sqlite:////nonexistent-dir/for/kms/tests.db"


@input_validation
@pytest.mark.parametrize("prefix", HOSTILE_PREFIXES)
async def test_hostile_table_prefixes_are_refused_before_any_sql(
    db: Any, root_wrapper: Any, prefix: Any
) -> None:
    objects = await schema_objects(db)
    counts = await row_counts(db)
    for target in (db.dsn, unreachable_dsn("postgres"), unreachable_dsn("sqlite")):
        # With an unreachable database a connection attempt would fail with a
        # storage error: the prefix is refused before any connection is made.
        with pytest.raises(InvalidParameterError):
            await KMS.open(target, purposes=["database"], root_wrapper=root_wrapper,
                           table_prefix=prefix, max_staleness=None)  # fmt: skip
        with pytest.raises(InvalidParameterError):
            await kms_async.migrate(target, table_prefix=prefix)
    for dialect in ("postgres", "sqlite"):
        with pytest.raises(InvalidParameterError):
            kms_async.migrations(dialect, table_prefix=prefix)  # type: ignore[arg-type]
    assert await schema_objects(db) == objects
    assert await row_counts(db) == counts


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.one_of(st.text(max_size=25), st.from_regex(r"[a-z][a-z0-9_]{0,25}", fullmatch=True))
)
def test_accepted_table_prefixes_are_plain_identifiers(prefix: str) -> None:
    try:
        files = kms_async.migrations("sqlite", table_prefix=prefix)
    except InvalidParameterError:
        return
    assert 1 <= len(prefix) <= 20
    assert prefix[0] in "abcdefghijklmnopqrstuvwxyz"
    assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in prefix)
    assert all(f"{prefix}_root_key" in f.sql or f.number > 1 for f in files)


# -- key version ids ---------------------------------------------------------------

storable_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
version_id_text = st.one_of(
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(["kdkv_", "krkv_", "kdk_", "krk_", ""]),
        st.lists(
            st.one_of(
                st.sampled_from([c for c in NASTY if storable(c)]),
                st.text(alphabet=storable_chars, max_size=4),
            ),
            max_size=5,
        ).map("".join),
    ),
    st.sampled_from([
        "kdkv_' or '1'='1", "krkv_'; delete from kms_root_key_version; --", "kdkv_%",
        "kdkv__________", "krkv_%%%%%%%%%%", "kdkv_*", "kdkv_" + "A" * 10_000,
    ]),
)  # fmt: skip


@pytest.fixture
async def populated(kms: KMS) -> KMS:
    """Two scopes, rotated, so there are old versions a bad query could delete."""
    for scope in ("a", "b"):
        await kms.create_keys(scope)
        await kms.rotate_keys(scope)
    return kms


@SLOW_PROPERTY
@given(version_id=version_id_text)
async def test_hostile_key_version_ids_delete_nothing(
    populated: KMS, db: Any, no_reload_spacing: None, version_id: str
) -> None:
    kms = populated
    before = await row_counts(db)
    for scope in (None, "a"):
        kind, value = await outcome(kms.revoke_key_version(version_id, scope_id=scope))
        assert kind == "error", version_id
        assert isinstance(value, (InvalidParameterError, KeyNotFoundError)), value
    for purpose in ("database", ROOT_PURPOSE):
        kind, value = await outcome(kms.get_wrapper("a", purpose, key_version_id=version_id))
        assert kind == "error", version_id
        assert isinstance(value, (InvalidParameterError, KeyNotFoundError)), value
    assert await row_counts(db) == before


@pytest.mark.parametrize("call", ["revoke", "get_wrapper", "get_wrapper_root"])
@pytest.mark.parametrize(
    "version_id", ["kdkv_\ud800", "krkv_\udfffAAAAAAAAA", "kdkv_\x00", "krkv_AAAA\x00AAAAA"]
)
async def test_unencodable_key_version_ids_are_invalid_or_not_found(
    populated: KMS, db: Any, version_id: str, call: str
) -> None:
    """Lone surrogates and NUL cannot be stored in a text column: no such version.

    They must be refused like any other bad id (InvalidParameterError or
    KeyNotFoundError), not surface as a StorageError ("database connection is
    closed" on SQLite) or a raw UnicodeEncodeError from get_wrapper.
    """
    kms = populated
    before = await row_counts(db)
    if call == "revoke":
        attempt = kms.revoke_key_version(version_id)
    else:
        purpose = "database" if call == "get_wrapper" else ROOT_PURPOSE
        attempt = kms.get_wrapper("a", purpose, key_version_id=version_id)
    try:
        await attempt
    except (InvalidParameterError, KeyNotFoundError):
        pass
    except Exception as exc:
        pytest.fail(f"{version_id!r}: {type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"{version_id!r} was accepted")
    assert await row_counts(db) == before
    # The KMS is still usable afterwards.
    assert await kms.decrypt("a", "database", await kms.encrypt("a", "database", b"p")) == b"p"


@input_validation
@pytest.mark.parametrize("version_id", [None, 5, b"kdkv_AAAAAAAAAA", ["kdkv_AAAAAAAAAA"]])
async def test_key_version_ids_of_the_wrong_type_are_invalid(
    populated: KMS, version_id: Any
) -> None:
    with pytest.raises(InvalidParameterError):
        await populated.revoke_key_version(version_id)
    if version_id is not None:
        with pytest.raises(InvalidParameterError):
            await populated.get_wrapper("a", "database", key_version_id=version_id)


# -- cross-tenant ------------------------------------------------------------------


@pytest.mark.parametrize("cached", ["both", "neither", "source", "target"])
async def test_ciphertexts_never_cross_scopes_or_purposes(
    open_kms: OpenKMS, no_reload_spacing: None, cached: str
) -> None:
    async with await open_kms() as setup:
        await setup.create_keys_many(["A", "B"])
        await setup.rotate_keys("A")
        made = {
            (scope, purpose): await setup.encrypt(scope, purpose, f"{scope}/{purpose}".encode())
            for scope in ("A", "B")
            for purpose in ("database", "oidc")
        }
    pairs = list(made)
    for source in pairs:
        for target in pairs:
            if source == target:
                continue
            async with await open_kms() as kms:
                if cached in ("both", "source"):
                    await kms.encrypt(*source, b"warm")
                if cached in ("both", "target"):
                    await kms.encrypt(*target, b"warm")
                with pytest.raises(UnknownKeyVersionError):
                    await kms.decrypt(*target, made[source])
                # The refusal did not poison the cache for legitimate use.
                assert (
                    await kms.decrypt(*source, made[source]) == f"{source[0]}/{source[1]}".encode()
                )


async def scope_rows(db: Any, scope: str) -> dict[str, Any]:
    """The ids and wrapped keys of a scope's newest versions, read straight from the tables."""
    root_key = await db.fetchval("select private_id from kms_root_key where scope_id = $1", scope)
    root_version, root_wrapped = (
        await db.fetch(
            "select private_id, key from kms_root_key_version where root_key_id = $1"
            " order by version desc",
            root_key,
        )
    )[0]
    data_key = await db.fetchval(
        "select private_id from kms_data_key where root_key_id = $1 and purpose = 'database'",
        root_key,
    )
    data_version, data_wrapped = (
        await db.fetch(
            "select private_id, key from kms_data_key_version where data_key_id = $1"
            " order by version desc",
            data_key,
        )
    )[0]
    return {
        "root_key": root_key,
        "root_version": root_version,
        "root_wrapped": bytes(root_wrapped),
        "data_key": data_key,
        "data_version": data_version,
        "data_wrapped": bytes(data_wrapped),
    }


async def bump(db: Any) -> None:
    await db.execute("update kms_collection_version set version = version + 1")


FORGED_VERSION = "kdkv_Forged0001"
FORGED_ROOT = "krkv_Forged0001"


async def test_copied_wrapped_data_key_cannot_be_unwrapped_by_another_scope(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """DB write: A's wrapped data key inserted as a new version of B's data key.

    It is wrapped by A's root key version, so B's root key version cannot
    unwrap it: B refuses it (KeyUnusableError, a DecryptionError) for
    encryption and decryption alike, and A's data is safe.
    """
    await kms.create_keys_many(["A", "B"])
    secret = await kms.encrypt("A", "database", b"A's secret")
    a, b = await scope_rows(db, "A"), await scope_rows(db, "B")
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        FORGED_VERSION, b["data_key"], b["root_version"], a["data_wrapped"],
    )  # fmt: skip
    await bump(db)
    # The forged row even names the right wrapping key: GCM still refuses it.
    stripped = BlobInfo(BlobInfo.from_bytes(a["data_wrapped"]).ciphertext).to_bytes()
    relabelled = BlobInfo(BlobInfo.from_bytes(a["data_wrapped"]).ciphertext, b["root_version"])
    for wrapped in (a["data_wrapped"], stripped, relabelled.to_bytes()):
        await db.execute(
            "update kms_data_key_version set key = $1 where private_id = $2",
            wrapped,
            FORGED_VERSION,
        )
        async with await open_kms() as fresh:
            for call in (
                lambda: fresh.decrypt("B", "database", secret),
                lambda: fresh.encrypt("B", "database", b"x"),
                lambda: fresh.get_wrapper("B", "database"),
            ):
                kind, value = await outcome(call())
                assert kind == "error" and isinstance(value, DecryptionError), value
            assert await fresh.decrypt("A", "database", secret) == b"A's secret"


async def test_data_key_pointed_at_another_scopes_root_version_is_refused(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """DB write: A's wrapped data key in B, pointing at A's root key version.

    The foreign key accepts any root key version, but B's loads only read B's
    own root key versions, so the row is reported as broken (StorageError).
    """
    await kms.create_keys_many(["A", "B"])
    secret = await kms.encrypt("A", "database", b"A's secret")
    a, b = await scope_rows(db, "A"), await scope_rows(db, "B")
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        FORGED_VERSION, b["data_key"], a["root_version"], a["data_wrapped"],
    )  # fmt: skip
    await bump(db)
    forged = BlobInfo(BlobInfo.from_bytes(secret).ciphertext, FORGED_VERSION).to_bytes()
    async with await open_kms() as fresh:
        for call in (
            lambda: fresh.decrypt("B", "database", secret),
            lambda: fresh.decrypt("B", "database", forged),
            lambda: fresh.encrypt("B", "database", b"x"),
            lambda: fresh.rewrap_keys("B"),
        ):
            kind, value = await outcome(call())
            assert kind == "error" and isinstance(value, StorageError), value
            assert "missing root key version" in str(value)
        assert await fresh.decrypt("A", "database", secret) == b"A's secret"
        # A's root version is now referenced from B: revoking it is refused, not cascaded.
        await fresh.rotate_keys("A", rewrap=True)
        with pytest.raises(KeyInUseError):
            await fresh.revoke_key_version(a["root_version"])
    assert (
        await db.fetchval(
            "select count(*) from kms_data_key_version where private_id = $1", FORGED_VERSION
        )
        == 1
    )


async def transplant(db: Any, source: dict[str, Any], target: dict[str, Any]) -> None:
    """DB write: copy source's root key version and data key version into target's keys,
    relabelling the routing key id, which nothing authenticates."""
    await db.execute(
        "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
        FORGED_ROOT, target["root_key"], source["root_wrapped"],
    )  # fmt: skip
    relabelled = BlobInfo(BlobInfo.from_bytes(source["data_wrapped"]).ciphertext, FORGED_ROOT)
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        FORGED_VERSION, target["data_key"], FORGED_ROOT, relabelled.to_bytes(),
    )  # fmt: skip
    await bump(db)


@pytest.mark.parametrize("integrity", ["bind", "strict"])
async def test_full_key_transplant_between_scopes(
    kms: KMS, db: Any, open_kms: OpenKMS, integrity: str
) -> None:
    """Closed by the bindings: the copied root key version has none, and its
    fingerprint names the bound original in scope A."""
    await kms.create_keys_many(["A", "B"])
    secret = await kms.encrypt("A", "database", b"A's secret")
    await transplant(db, await scope_rows(db, "A"), await scope_rows(db, "B"))
    relabelled = BlobInfo(BlobInfo.from_bytes(secret).ciphertext, FORGED_VERSION).to_bytes()
    async with await open_kms(integrity=integrity) as fresh:
        with pytest.raises(KeyIntegrityError, match="same root key"):
            await fresh.decrypt("B", "database", relabelled)
        # B's own keys still work.
        assert await fresh.decrypt("B", "database", await fresh.encrypt("B", "database", b"b"))


async def test_full_key_transplant_is_stopped_by_aad_naming_the_scope(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """The mitigation SECURITY.md recommends: AAD that names the scope (and the row)."""
    await kms.create_keys_many(["A", "B"])
    secret = await kms.encrypt("A", "database", b"A's secret", aad=b"A/app_secret/1")
    await transplant(db, await scope_rows(db, "A"), await scope_rows(db, "B"))
    relabelled = BlobInfo(BlobInfo.from_bytes(secret).ciphertext, FORGED_VERSION).to_bytes()
    async with await open_kms() as fresh:
        for aad in (b"B/app_secret/1", b"B/app_secret/2", None):
            kind, value = await outcome(fresh.decrypt("B", "database", relabelled, aad=aad))
            assert kind == "error" and isinstance(value, DecryptionError), value


async def test_full_key_transplant_is_not_used_for_unrelabelled_ciphertexts(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """What the transplant does not achieve: A's ciphertexts as stored still route to A only,
    and A itself is untouched."""
    await kms.create_keys_many(["A", "B"])
    secret = await kms.encrypt("A", "database", b"A's secret")
    await transplant(db, await scope_rows(db, "A"), await scope_rows(db, "B"))
    async with await open_kms() as fresh:
        with pytest.raises(UnknownKeyVersionError):
            await fresh.decrypt("B", "database", secret)
        assert await fresh.decrypt("A", "database", secret) == b"A's secret"
        keys = {v.id for k in await fresh.list_keys("A") for v in k.versions}
        assert FORGED_VERSION not in keys and FORGED_ROOT not in keys


@pytest.mark.parametrize("integrity", ["bind", "strict"])
async def test_a_restored_revoked_version_stays_revoked(
    kms: KMS, db: Any, open_kms: OpenKMS, integrity: str
) -> None:
    """Closed by the key state record, which lists the revoked version."""
    await kms.create_keys("A")
    old = await kms.encrypt("A", "database", b"under the first version")
    first = BlobInfo.from_bytes(old).key_id
    (row,) = await db.fetch(
        "select data_key_id, root_key_version_id, key from kms_data_key_version"
        " where private_id = $1",
        first,
    )
    await kms.rotate_keys("A")
    await kms.revoke_key_version(first)
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        first, row[0], row[1], bytes(row[2]),
    )  # fmt: skip
    await bump(db)
    async with await open_kms(integrity=integrity) as fresh:
        new = BlobInfo.from_bytes(await fresh.encrypt("A", "database", b"new data")).key_id
        kind, value = await outcome(fresh.decrypt("A", "database", old))
        assert kind == "error" and new != first
        assert isinstance(value, KeyIntegrityError) and "was revoked" in str(value)


async def test_a_broken_scope_does_not_stop_other_scopes_refreshing(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """A tampered (or corrupted) scope must not freeze the cache of the others.

    Scope B is cached, then its tables are tampered with; meanwhile another
    instance rotates scope C and revokes C's old version. refresh() may report
    B's failure, but C's revocation must still reach this instance's cache.
    """
    await kms.create_keys_many(["A", "B", "C"])
    await kms.encrypt("B", "database", b"cache B first")
    old = await kms.encrypt("C", "database", b"under C's first version")
    c_first = BlobInfo.from_bytes(old).key_id
    async with await open_kms() as other:
        await other.rotate_keys("C")
        await other.revoke_key_version(c_first)
    a, b = await scope_rows(db, "A"), await scope_rows(db, "B")
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        FORGED_VERSION, b["data_key"], b["root_version"], a["data_wrapped"],
    )  # fmt: skip
    await bump(db)
    for _ in range(2):
        with contextlib.suppress(KMSError):
            await kms.refresh()
    with pytest.raises(UnknownKeyVersionError):
        await kms.decrypt("C", "database", old)
    new = BlobInfo.from_bytes(await kms.encrypt("C", "database", b"x")).key_id
    assert new != c_first
