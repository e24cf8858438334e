"""The BlobInfo envelope: golden vectors, canonical encoding, hostile input, nonces."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import warnings
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms_async import KMS, AeadWrapper, BlobInfo, DecryptionError, _blob, _kms, _wrappers

VECTORS: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).parent / "data" / "wire-vectors.json").read_text(encoding="utf-8")
)

ROOT_VERSION = VECTORS["root_key_version"]
DATA_VERSION = VECTORS["data_key_version"]
NONCE_SIZE = 12
TAG_SIZE = 16


def unhex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def fixed_nonce(monkeypatch: pytest.MonkeyPatch, module: Any, nonce: bytes) -> None:
    """Make every nonce ``module`` draws equal ``nonce``."""
    monkeypatch.setattr(module, "nonces", lambda: nonce)
    if hasattr(module, "take_nonce"):  # the hot path's own way to the buffer
        monkeypatch.setattr(module, "take_nonce", lambda: nonce)


def root_external_wrapper() -> AeadWrapper:
    return AeadWrapper(
        bytes.fromhex(VECTORS["root_external_key"]), key_id=VECTORS["root_external_key_id"]
    )


def root_version_wrapper() -> AeadWrapper:
    return AeadWrapper(bytes.fromhex(ROOT_VERSION["key"]), key_id=ROOT_VERSION["private_id"])


def data_version_wrapper() -> AeadWrapper:
    return AeadWrapper(bytes.fromhex(DATA_VERSION["key"]), key_id=DATA_VERSION["private_id"])


# -- golden vectors: stored key columns ------------------------------------------

KEY_VECTORS = {
    "root_key_version": (ROOT_VERSION, root_external_wrapper),
    "data_key_version": (DATA_VERSION, root_version_wrapper),
}


@pytest.mark.parametrize("name", sorted(KEY_VECTORS))
async def test_wrapping_a_key_under_the_fixed_nonce_gives_the_stored_column(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    vector, make_wrapper = KEY_VECTORS[name]
    fixed_nonce(monkeypatch, _wrappers, bytes.fromhex(vector["nonce"]))
    blob = await make_wrapper().encrypt(bytes.fromhex(vector["key"]))
    assert blob.to_bytes().hex() == vector["stored_key_column"]


@pytest.mark.parametrize("name", sorted(KEY_VECTORS))
async def test_the_stored_column_unwraps_to_the_key(name: str) -> None:
    vector, make_wrapper = KEY_VECTORS[name]
    wrapper = make_wrapper()
    blob = BlobInfo.from_bytes(bytes.fromhex(vector["stored_key_column"]))
    assert blob.key_id == wrapper.key_id
    assert await wrapper.decrypt(blob) == bytes.fromhex(vector["key"])


def test_the_root_key_version_column_has_the_documented_layout() -> None:
    column = bytes.fromhex(ROOT_VERSION["stored_key_column"])
    blob = BlobInfo.from_bytes(column)
    assert column[:2] == b"\x0a\x3c"  # field 1, 60 bytes: nonce, 32-byte key, tag
    assert blob.ciphertext[:NONCE_SIZE] == bytes.fromhex(ROOT_VERSION["nonce"])
    assert len(blob.ciphertext) == NONCE_SIZE + 32 + TAG_SIZE
    assert column[62:] == b"\x2a\x08\x1a\x06root-1"


def test_the_data_key_version_column_names_the_root_key_version() -> None:
    column = bytes.fromhex(DATA_VERSION["stored_key_column"])
    assert len(column) == 81
    assert column[62:] == b"\x2a\x11\x1a\x0fkrkv_AAAAAAAAAA"


# -- golden vectors: data ----------------------------------------------------------

DATA_VECTORS = ["data_empty_plaintext", "data_with_aad"]


@pytest.mark.parametrize("name", DATA_VECTORS)
async def test_encrypting_data_under_the_fixed_nonce_gives_the_vector(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    vector = VECTORS[name]
    fixed_nonce(monkeypatch, _wrappers, bytes.fromhex(vector["nonce"]))
    blob = await data_version_wrapper().encrypt(
        bytes.fromhex(vector["plaintext"]), aad=unhex(vector["aad"])
    )
    assert blob.to_bytes().hex() == vector["ciphertext"]


@pytest.mark.parametrize("name", DATA_VECTORS)
async def test_the_data_vector_decrypts_to_the_plaintext(name: str) -> None:
    vector = VECTORS[name]
    blob = BlobInfo.from_bytes(bytes.fromhex(vector["ciphertext"]))
    assert blob.key_id == DATA_VERSION["private_id"]
    plaintext = await data_version_wrapper().decrypt(blob, aad=unhex(vector["aad"]))
    assert plaintext == bytes.fromhex(vector["plaintext"])


async def test_the_aad_vector_does_not_decrypt_without_its_aad() -> None:
    blob = BlobInfo.from_bytes(bytes.fromhex(VECTORS["data_with_aad"]["ciphertext"]))
    with pytest.raises(DecryptionError, match="decryption failed"):
        await data_version_wrapper().decrypt(blob)


async def newest_version_id(kms: KMS, scope_id: str, purpose: str) -> str:
    (key,) = [k for k in await kms.list_keys(scope_id) if k.purpose == purpose]
    return key.versions[-1].id


@pytest.mark.parametrize("name", DATA_VECTORS)
async def test_kms_encrypt_writes_the_vector_layout(
    kms: KMS, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    vector = VECTORS[name]
    plaintext = bytes.fromhex(vector["plaintext"])
    golden = bytes.fromhex(vector["ciphertext"])
    await kms.create_keys("s1")
    version_id = await newest_version_id(kms, "s1", "oidc")
    fixed_nonce(monkeypatch, _kms, bytes.fromhex(vector["nonce"]))

    ciphertext = await kms.encrypt("s1", "oidc", plaintext, aad=unhex(vector["aad"]))

    blob = BlobInfo.from_bytes(ciphertext)
    assert blob.key_id == version_id
    assert len(blob.ciphertext) == NONCE_SIZE + len(plaintext) + TAG_SIZE
    assert blob.ciphertext[:NONCE_SIZE] == bytes.fromhex(vector["nonce"])
    assert blob.to_bytes() == ciphertext
    # Same header as the vector, and the same key_info suffix with another id.
    assert ciphertext[:2] == golden[:2]
    assert ciphertext.endswith(b"\x2a\x11\x1a\x0f" + version_id.encode())
    assert golden.endswith(b"\x2a\x11\x1a\x0f" + DATA_VERSION["private_id"].encode())
    assert len(ciphertext) == len(golden)


@pytest.mark.parametrize("name", DATA_VECTORS)
async def test_kms_encrypt_matches_an_aead_wrapper_over_the_same_key_byte_for_byte(
    kms: KMS, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    vector = VECTORS[name]
    plaintext = bytes.fromhex(vector["plaintext"])
    aad = unhex(vector["aad"])
    await kms.create_keys("s1")
    version_id = await newest_version_id(kms, "s1", "database")
    version = await kms.get_wrapper("s1", "database", key_version_id=version_id)
    fixed_nonce(monkeypatch, _kms, bytes.fromhex(vector["nonce"]))
    fixed_nonce(monkeypatch, _wrappers, bytes.fromhex(vector["nonce"]))

    from_kms = await kms.encrypt("s1", "database", plaintext, aad=aad)
    from_wrapper = (await version.encrypt(plaintext, aad=aad)).to_bytes()

    assert from_kms == from_wrapper
    assert await kms.decrypt("s1", "database", from_kms, aad=aad) == plaintext


@pytest.mark.parametrize("name", DATA_VECTORS)
async def test_encrypt_many_writes_what_encrypt_writes_byte_for_byte(
    kms: KMS, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    vector = VECTORS[name]
    plaintext = bytes.fromhex(vector["plaintext"])
    aad = unhex(vector["aad"])
    nonce = bytes.fromhex(vector["nonce"])
    await kms.create_keys("s1")
    fixed_nonce(monkeypatch, _kms, nonce)
    monkeypatch.setattr(_kms, "nonce_batch", lambda count: [nonce] * count)

    single = await kms.encrypt("s1", "oidc", plaintext, aad=aad)
    batch = await kms.encrypt_many("s1", "oidc", [plaintext, plaintext], aad=[aad, aad])

    assert batch == [single, single]
    assert await kms.decrypt_many("s1", "oidc", batch, aad=[aad, aad]) == [plaintext] * 2


def test_the_extra_fields_vector_decodes_with_its_extra_fields() -> None:
    blob = BlobInfo.from_bytes(bytes.fromhex(VECTORS["data_with_extra_fields"]["ciphertext"]))
    assert blob.key_id == DATA_VERSION["private_id"]
    assert blob.iv == bytes(12)
    assert blob.mechanism == 1
    same_without_extras = BlobInfo.from_bytes(bytes.fromhex(VECTORS["data_with_aad"]["ciphertext"]))
    assert blob.ciphertext == same_without_extras.ciphertext


async def test_the_extra_fields_vector_decrypts_with_its_aad() -> None:
    vector = VECTORS["data_with_extra_fields"]
    blob = BlobInfo.from_bytes(bytes.fromhex(vector["ciphertext"]))
    plaintext = await data_version_wrapper().decrypt(blob, aad=bytes.fromhex(vector["aad"]))
    assert plaintext == bytes.fromhex(vector["plaintext"])


def test_the_extra_fields_vector_re_encodes_to_the_same_bytes() -> None:
    column = bytes.fromhex(VECTORS["data_with_extra_fields"]["ciphertext"])
    assert BlobInfo.from_bytes(column).to_bytes() == column


# -- encoding ----------------------------------------------------------------------


def test_encoding_omits_empty_fields() -> None:
    assert BlobInfo(b"abc").to_bytes() == b"\x0a\x03abc"


def test_encoding_of_ciphertext_and_key_id() -> None:
    assert BlobInfo(b"abc", "k1").to_bytes() == b"\x0a\x03abc\x2a\x04\x1a\x02k1"


def test_encoding_emits_every_field_in_ascending_order() -> None:
    blob = BlobInfo(
        ciphertext=b"C",
        key_id="K",
        iv=b"I",
        hmac=b"H",
        wrapped_key=b"W",
        mechanism=300,
        hmac_key_id="M",
    )
    assert blob.to_bytes() == (
        b"\x0a\x01C"  # 1 ciphertext
        b"\x12\x01I"  # 2 iv
        b"\x1a\x01H"  # 3 hmac
        b"\x2a\x0c"  # 5 key_info, 12 bytes:
        b"\x08\xac\x02"  # 1 mechanism, varint 300
        b"\x1a\x01K"  # 3 key_id
        b"\x22\x01M"  # 4 hmac_key_id
        b"\x2a\x01W"  # 5 wrapped_key
    )


@pytest.mark.parametrize("length", [0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000])
def test_field_lengths_are_minimal_varints(length: int) -> None:
    expected_varint_size = 1 + (length >= 0x80) + (length >= 0x4000) + (length >= 0x200000)
    encoded = BlobInfo(bytes(length)).to_bytes()
    assert len(encoded) == 1 + expected_varint_size + length
    assert BlobInfo.from_bytes(encoded).ciphertext == bytes(length)


def test_non_ascii_key_ids_are_utf8() -> None:
    encoded = BlobInfo(b"x", "clé").to_bytes()
    assert encoded.endswith("clé".encode())
    assert BlobInfo.from_bytes(encoded).key_id == "clé"


@pytest.mark.parametrize("length", [1, 0x7F, 0x80, 0x3FFF, 0x4000, 70_000])
def test_the_kms_envelope_pieces_equal_the_canonical_encoding(length: int) -> None:
    payload = os.urandom(length)
    pieces = _blob.envelope_header(length) + payload + _blob.encode_suffix("kdkv_BBBBBBBBBB")
    assert pieces == BlobInfo(payload, "kdkv_BBBBBBBBBB").to_bytes()
    assert _blob.encode_prefix(length) == _blob.envelope_header(length)


blobs = st.builds(
    BlobInfo,
    ciphertext=st.binary(min_size=1, max_size=300),
    key_id=st.text(max_size=40),
    iv=st.binary(max_size=20),
    hmac=st.binary(max_size=20),
    wrapped_key=st.binary(max_size=200),
    mechanism=st.integers(min_value=0, max_value=2**64 - 1),
    hmac_key_id=st.text(max_size=20),
)


@given(blobs)
def test_decoding_an_encoding_gives_the_same_blob(blob: BlobInfo) -> None:
    assert BlobInfo.from_bytes(blob.to_bytes()) == blob


@given(blobs)
def test_canonical_bytes_re_encode_unchanged(blob: BlobInfo) -> None:
    canonical = blob.to_bytes()
    assert BlobInfo.from_bytes(canonical).to_bytes() == canonical


def test_repr_shows_the_key_id_and_not_the_ciphertext() -> None:
    ciphertext = bytes(range(40, 100))
    text = repr(BlobInfo(ciphertext, "kdkv_BBBBBBBBBB"))
    assert "kdkv_BBBBBBBBBB" in text
    assert "60 bytes" in text
    for form in (repr(ciphertext), ciphertext.hex(), ciphertext[:16].decode("ascii")):
        assert form not in text


# -- unknown fields ------------------------------------------------------------------

BASE = BlobInfo(b"sealed-bytes", "kdkv_BBBBBBBBBB")


def tag(field: int, wire: int) -> bytes:
    out = bytearray()
    _blob._put_varint(out, (field << 3) | wire)
    return bytes(out)


UNKNOWN_FIELDS = {
    "varint": tag(15, 0) + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    "fixed64": tag(2047, 1) + b"\x01\x02\x03\x04\x05\x06\x07\x08",
    "fixed32": tag(100, 5) + b"\x01\x02\x03\x04",
    "length_delimited": tag(2**29 - 1, 2) + b"\x03abc",
    "deprecated_wrapped_bool": tag(4, 0) + b"\x01",
    "deprecated_value_path": tag(6, 2) + b"\x04/a/b",
    "plaintext": tag(7, 2) + b"\x02hi",
    "client_data_struct": tag(8, 2) + b"\x00",
}


@pytest.mark.parametrize("name", sorted(UNKNOWN_FIELDS))
@pytest.mark.parametrize("where", ["first", "between", "last"])
def test_unknown_top_level_fields_are_skipped(name: str, where: str) -> None:
    field1, key_info = b"\x0a\x0csealed-bytes", BASE.to_bytes()[14:]
    extra = UNKNOWN_FIELDS[name]
    data = {
        "first": extra + field1 + key_info,
        "between": field1 + extra + key_info,
        "last": field1 + key_info + extra,
    }[where]
    assert field1 + key_info == BASE.to_bytes()
    assert BlobInfo.from_bytes(data) == BASE


def test_unknown_key_info_fields_are_skipped() -> None:
    info = b"".join(
        [
            tag(2, 0) + b"\x07",  # hmac_mechanism
            b"\x1a\x0fkdkv_BBBBBBBBBB",  # key_id
            tag(6, 0) + b"\x80\x01",  # flags
            tag(7, 0) + b"\x04",  # key_type Aes256
            tag(8, 2) + b"\x02\x01\x02",  # key_purposes, packed
            tag(9, 2) + b"\x00",  # key
            tag(1000, 5) + b"abcd",
            tag(1001, 1) + b"abcdefgh",
        ]
    )
    data = b"\x0a\x0csealed-bytes\x2a" + bytes([len(info)]) + info
    assert BlobInfo.from_bytes(data) == BASE


def test_a_repeated_key_info_is_merged_as_protobuf_does() -> None:
    data = b"\x0a\x01x\x2a\x02\x08\x05\x2a\x04\x1a\x02k1"
    blob = BlobInfo.from_bytes(data)
    assert (blob.key_id, blob.mechanism) == ("k1", 5)


def test_the_last_of_a_repeated_ciphertext_field_wins() -> None:
    assert BlobInfo.from_bytes(b"\x0a\x01a\x0a\x01b").ciphertext == b"b"


def test_decoding_accepts_bytearray_and_memoryview() -> None:
    data = BASE.to_bytes()
    assert BlobInfo.from_bytes(bytearray(data)) == BASE
    assert BlobInfo.from_bytes(memoryview(data)) == BASE


# -- malformed input -------------------------------------------------------------------

VALID_FIELD1 = b"\x0a\x03abc"

MALFORMED = {
    "empty": b"",
    "tag_varint_unterminated": b"\x80",
    "field1_without_length": b"\x0a",
    "field1_length_varint_unterminated": b"\x0a\x80",
    "varint_value_unterminated": VALID_FIELD1 + tag(9, 0) + b"\xff",
    "varint_longer_than_ten_bytes": VALID_FIELD1 + tag(9, 0) + b"\xff" * 10 + b"\x01",
    # Ten bytes, but the last carries more than bit 63: not a uint64 (Go refuses it).
    "varint_overflowing_64_bits": VALID_FIELD1 + b"\x2a\x0b\x08" + b"\xff" * 9 + b"\x7f",
    "field1_length_past_end": b"\x0a\x05abc",
    "field1_huge_length": b"\x0a\xff\xff\xff\xff\x0fabc",
    "key_info_length_past_end": VALID_FIELD1 + b"\x2a\x05\x1a\x01k",
    "key_id_length_past_key_info_end": VALID_FIELD1 + b"\x2a\x03\x1a\x05k",
    "fixed64_truncated": VALID_FIELD1 + tag(9, 1) + b"\x00\x00",
    "fixed32_truncated": VALID_FIELD1 + tag(9, 5) + b"\x00",
    "field_number_zero_varint": VALID_FIELD1 + b"\x00\x00",
    "field_number_zero_bytes": b"\x02\x01x" + VALID_FIELD1,
    "field_number_zero_in_key_info": VALID_FIELD1 + b"\x2a\x02\x00\x00",
    "start_group": VALID_FIELD1 + tag(9, 3),
    "end_group": VALID_FIELD1 + tag(9, 4),
    "group_in_key_info": VALID_FIELD1 + b"\x2a\x01" + tag(9, 3),
    "wire_type_6": VALID_FIELD1 + tag(9, 6),
    "wire_type_7": VALID_FIELD1 + tag(9, 7),
    "field1_as_varint": tag(1, 0) + b"\x01",
    "field1_as_fixed64": tag(1, 1) + bytes(8),
    "field1_as_fixed32": tag(1, 5) + bytes(4),
    "field5_as_varint": VALID_FIELD1 + tag(5, 0) + b"\x01",
    "field5_as_fixed32": VALID_FIELD1 + tag(5, 5) + bytes(4),
    "key_id_not_utf8": VALID_FIELD1 + b"\x2a\x04\x1a\x02\xff\xfe",
    "hmac_key_id_not_utf8": VALID_FIELD1 + b"\x2a\x03\x22\x01\x80",
    "missing_field1": b"\x2a\x08\x1a\x06root-1",
    "only_unknown_fields": tag(9, 2) + b"\x01x",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_envelopes_raise_decryption_error(name: str) -> None:
    with pytest.raises(DecryptionError, match="not a valid BlobInfo"):
        BlobInfo.from_bytes(MALFORMED[name])


@pytest.mark.parametrize("value", ["0a03616263", 10, None, [10, 3], BASE])
def test_non_bytes_input_raises_decryption_error(value: object) -> None:
    with pytest.raises(DecryptionError, match="must be bytes"):
        BlobInfo.from_bytes(value)  # type: ignore[arg-type]


def test_every_truncation_of_a_vector_is_refused_except_at_a_field_boundary() -> None:
    column = bytes.fromhex(DATA_VERSION["stored_key_column"])
    end_of_field1 = 62
    for cut in range(len(column)):
        if cut == end_of_field1:
            assert BlobInfo.from_bytes(column[:cut]).key_id == ""
            continue
        with pytest.raises(DecryptionError):
            BlobInfo.from_bytes(column[:cut])


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decryption_error(data: bytes) -> None:
    try:
        blob = BlobInfo.from_bytes(data)
    except DecryptionError:
        return
    assert isinstance(blob.ciphertext, bytes)


# -- envelope layout ---------------------------------------------------------------


@pytest.mark.parametrize(
    "length", [0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 0xFFFFFFF, 0x10000000]
)
def test_envelope_headers_hold_the_shortest_varint(length: int) -> None:
    assert _blob.envelope_header(length) == _blob.encode_prefix(length)


async def test_a_longer_length_varint_still_decrypts_through_the_general_path(kms: KMS) -> None:
    await kms.create_keys("s1")
    plaintext = b"sixteen bytes!!!"
    canonical = await kms.encrypt("s1", "database", plaintext)
    assert canonical[:2] == b"\x0a\x2c"  # 12 + 16 + 16 bytes
    padded = b"\x0a\xac\x00" + canonical[2:]  # the same length as a two-byte varint
    assert BlobInfo.from_bytes(padded) == BlobInfo.from_bytes(canonical)
    assert await kms.decrypt("s1", "database", padded) == plaintext
    assert await kms.decrypt_many("s1", "database", [canonical, padded]) == [plaintext] * 2


# -- nonces --------------------------------------------------------------------------


def test_nonces_are_distinct_12_byte_values() -> None:
    drawn = [_blob.nonces() for _ in range(10_000)]
    assert {len(n) for n in drawn} == {NONCE_SIZE}
    assert all(type(n) is bytes for n in drawn)
    assert len(set(drawn)) == len(drawn)


def test_nonces_stay_distinct_across_a_reset() -> None:
    before = [_blob.nonces() for _ in range(1000)]
    _blob.reset_nonces()
    after = [_blob.nonces() for _ in range(1000)]
    assert len(set(before) | set(after)) == 2000


def test_nonces_drawn_from_many_threads_are_distinct() -> None:
    def draw(_: int) -> list[bytes]:
        return [_blob.nonces() for _ in range(2000)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        drawn = [n for batch in pool.map(draw, range(8)) for n in batch]
    assert len(set(drawn)) == 16_000


def test_nonce_batches_are_distinct_from_each_other_and_from_single_nonces() -> None:
    drawn = [_blob.nonces() for _ in range(100)]
    for count in (0, 1, 64, 511, 512, 513, 2000, 64, 64):
        batch = _blob.nonce_batch(count)
        assert len(batch) == count
        assert all(type(n) is bytes and len(n) == NONCE_SIZE for n in batch)
        drawn += batch
    drawn += [_blob.nonces() for _ in range(100)]
    assert len(set(drawn)) == len(drawn)


def test_nonce_batches_drawn_from_many_threads_are_distinct() -> None:
    def draw(_: int) -> list[bytes]:
        return [n for _ in range(100) for n in _blob.nonce_batch(37)] + [_blob.nonces()]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        drawn = [n for batch in pool.map(draw, range(8)) for n in batch]
    assert len(set(drawn)) == 8 * 3701


def test_the_wrappers_draw_their_nonces_from_the_shared_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fixed_nonce(monkeypatch, _wrappers, b"N" * NONCE_SIZE)
    blob = data_version_wrapper().encrypt_sync(b"payload")
    assert blob.ciphertext[:NONCE_SIZE] == b"N" * NONCE_SIZE


CHILD_DRAWS = 64


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available here")
def test_a_forked_child_never_repeats_the_parents_nonces() -> None:
    _blob.nonces()  # the parent now holds a partly used buffer the child inherits
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a threaded process; the child only
        # draws nonces, writes them to a pipe and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, b"".join(_blob.nonces() for _ in range(CHILD_DRAWS)))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    parent = [_blob.nonces() for _ in range(CHILD_DRAWS)]
    received = b""
    while chunk := os.read(read_end, 65536):
        received += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = [received[i : i + NONCE_SIZE] for i in range(0, len(received), NONCE_SIZE)]
    assert len(child) == CHILD_DRAWS
    assert set(child).isdisjoint(parent)
