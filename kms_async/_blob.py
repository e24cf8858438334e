"""The ``BlobInfo`` envelope: the protobuf message the Go package stores.

Wrapped keys and data encrypted by the library are stored as the protobuf
``github.com.hashicorp.go.kms.wrapping.v2.types.BlobInfo``. Only a handful of
fields matter here, so the codec is written by hand instead of depending on
protobuf: field 1 ``ciphertext`` (nonce || AES-GCM output), 2 ``iv``,
3 ``hmac`` and 5 ``key_info`` whose field 3 ``key_id`` names the wrapping key.
Encoding emits fields in ascending order and omits empty ones, as protobuf-go
does, so the bytes match what the Go package writes. Decoding skips every
field it does not use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from itertools import repeat, starmap

from ._errors import DecryptionError, InvalidParameterError

__all__ = [
    "BlobInfo",
    "decode",
    "encode_prefix",
    "encode_suffix",
    "envelope_header",
    "envelope_layout",
    "nonce_batch",
    "nonces",
    "reset_nonces",
    "sealed_header",
]

NONCE_SIZE = 12
TAG_SIZE = 16

#: Fields accepted per message. A BlobInfo has eleven kinds; a cap keeps a
#: hostile envelope of millions of tiny fields from stalling the event loop.
_MAX_FIELDS = 64

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LEN = 2
_WIRE_FIXED32 = 5


@dataclasses.dataclass(frozen=True, slots=True)
class BlobInfo:
    """An encrypted value and the id of the key that encrypted it.

    ``ciphertext`` is the 12-byte nonce followed by the AES-GCM output for the
    library's own wrappers; other wrappers (cloud KMS, HSM) may also use
    ``iv``, ``hmac`` and ``wrapped_key``. ``mechanism`` and ``hmac_key_id``
    carry the matching ``KeyInfo`` fields through unchanged.
    """

    ciphertext: bytes
    key_id: str = ""
    iv: bytes = b""
    hmac: bytes = b""
    wrapped_key: bytes = b""
    mechanism: int = 0
    hmac_key_id: str = ""

    def __post_init__(self) -> None:
        for name in ("ciphertext", "iv", "hmac", "wrapped_key"):
            if not isinstance(getattr(self, name), bytes):
                raise InvalidParameterError(f"BlobInfo.{name} must be bytes")
        if not isinstance(self.key_id, str) or not isinstance(self.hmac_key_id, str):
            raise InvalidParameterError("BlobInfo.key_id and hmac_key_id must be str")
        try:
            self.key_id.encode()
            self.hmac_key_id.encode()
        except UnicodeEncodeError:
            raise InvalidParameterError(
                "BlobInfo.key_id and hmac_key_id must be valid Unicode text"
            ) from None

    def __repr__(self) -> str:
        return f"BlobInfo(key_id={self.key_id!r}, ciphertext=<{len(self.ciphertext)} bytes>)"

    def to_bytes(self) -> bytes:
        """Encode as the Go package's protobuf ``BlobInfo``."""
        out = bytearray()
        _put_bytes(out, 1, self.ciphertext)
        _put_bytes(out, 2, self.iv)
        _put_bytes(out, 3, self.hmac)
        info = bytearray()
        if self.mechanism:
            info.append(0x08)
            _put_varint(info, self.mechanism)
        _put_bytes(info, 3, self.key_id.encode())
        _put_bytes(info, 4, self.hmac_key_id.encode())
        _put_bytes(info, 5, self.wrapped_key)
        _put_bytes(out, 5, bytes(info))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> BlobInfo:
        """Decode a protobuf ``BlobInfo``.

        Raises:
            DecryptionError: ``data`` is not a well-formed BlobInfo.
        """
        return decode(data)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_bytes(out: bytearray, field: int, value: bytes) -> None:
    if value:
        out.append((field << 3) | _WIRE_LEN)
        _put_varint(out, len(value))
        out += value


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    _put_varint(out, value)
    return bytes(out)


def encode_prefix(ciphertext_len: int) -> bytes:
    """The bytes before field 1's payload for a ciphertext of that length."""
    return b"\x0a" + _varint_bytes(ciphertext_len)


def encode_suffix(key_id: str) -> bytes:
    """The ``key_info`` field naming ``key_id``, which follows field 1."""
    encoded = key_id.encode()
    info = b"\x1a" + _varint_bytes(len(encoded)) + encoded
    return b"\x2a" + _varint_bytes(len(info)) + info


class _Malformed(Exception):
    pass


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:  # more than 64 bits: Go rejects it too
            raise _Malformed
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def field_length(data: bytes, pos: int) -> tuple[int, int]:
    """(the varint at ``pos``, where what follows it starts); (-1, pos) if malformed."""
    try:
        return _read_varint(data, pos)
    except _Malformed:
        return -1, pos


def _fields(data: bytes | memoryview) -> list[tuple[int, int, object]]:
    """Split a message into (field, wire type, value) triples."""
    fields: list[tuple[int, int, object]] = []
    pos = 0
    end = len(data)
    while pos < end:
        tag, pos = _read_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _Malformed
        value: object
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise _Malformed
            value = data[pos : pos + length]
            pos += length
        elif wire == _WIRE_FIXED64:
            pos += 8
            value = None
        elif wire == _WIRE_FIXED32:
            pos += 4
            value = None
        else:  # groups are not used by this message
            raise _Malformed
        if pos > end or len(fields) == _MAX_FIELDS:
            raise _Malformed
        fields.append((field, wire, value))
    return fields


def decode(data: bytes | bytearray | memoryview) -> BlobInfo:
    """Decode a BlobInfo, skipping unknown fields; raise DecryptionError if malformed."""
    if type(data) is bytes:
        simple = _decode_simple(data)
        if simple is not None:
            return simple
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecryptionError("ciphertext must be bytes")
    values: dict[str, object] = {}
    try:
        for field, wire, value in _fields(memoryview(data)):
            if wire == _WIRE_LEN and field in (1, 2, 3):
                values[("ciphertext", "iv", "hmac")[field - 1]] = bytes(value)  # type: ignore[call-overload]
            elif wire == _WIRE_LEN and field == 5:
                for info_field, info_wire, info_value in _fields(value):  # type: ignore[arg-type]
                    if info_wire == _WIRE_LEN and info_field in (3, 4):
                        name = "key_id" if info_field == 3 else "hmac_key_id"
                        values[name] = bytes(info_value).decode()  # type: ignore[call-overload]
                    elif info_wire == _WIRE_LEN and info_field == 5:
                        values["wrapped_key"] = bytes(info_value)  # type: ignore[call-overload]
                    elif info_wire == _WIRE_VARINT and info_field == 1:
                        values["mechanism"] = info_value
            elif field in (1, 2, 3, 5):
                # A known field with the wrong wire type is a corrupt message.
                raise _Malformed
    except (_Malformed, UnicodeDecodeError):
        raise DecryptionError("ciphertext is not a valid BlobInfo envelope") from None
    if "ciphertext" not in values:
        raise DecryptionError("ciphertext is not a valid BlobInfo envelope")
    return BlobInfo(**values)  # type: ignore[arg-type]


def _decode_simple(data: bytes) -> BlobInfo | None:
    """The envelope this library writes (field 1, then key_info holding only a
    key id, each shorter than 128 bytes), read without the general parser;
    ``None`` for anything else. Wrapped keys all have this shape."""
    if len(data) < 6 or data[0] != 0x0A or data[1] >= 0x80:
        return None
    info = 2 + data[1]
    if (
        len(data) < info + 4
        or data[info] != 0x2A
        or data[info + 1] != len(data) - info - 2
        or data[info + 2] != 0x1A
        or data[info + 3] != len(data) - info - 4
    ):
        return None
    try:
        key_id = data[info + 4 :].decode()
    except UnicodeDecodeError:
        return None
    return BlobInfo(data[2:info], key_id)


_NONCE_BATCH = 512
_nonce_pool: list[bytes] = []


def reset_nonces() -> None:
    """Discard buffered nonces (called in a forked child)."""
    _nonce_pool.clear()


#: Pops a buffered nonce, or raises IndexError when there is none (then call
#: :func:`nonces`, which refills): the hot path saves a call this way.
take_nonce: Callable[[], bytes] = _nonce_pool.pop


def nonces(pop: Callable[[], bytes] = _nonce_pool.pop) -> bytes:
    """A fresh random 96-bit nonce.

    One ``os.urandom`` call costs about a quarter of a small AES-GCM round
    trip, so nonces are drawn from the OS CSPRNG in batches and handed out
    one by one. ``list.pop`` is atomic under the GIL, so two threads never
    receive the same nonce (two threads refilling at once only add more fresh
    ones); a forked child discards the inherited pool (``os.register_at_fork``
    below) so parent and child never share a nonce.
    """
    while True:
        try:
            return pop()
        except IndexError:
            # Other threads may drain the refill before this one pops: loop.
            _refill()


def _refill() -> None:
    _nonce_pool.extend(_split(os.urandom(NONCE_SIZE * _NONCE_BATCH)))


def _split(batch: bytes) -> list[bytes]:
    return [batch[i : i + NONCE_SIZE] for i in range(0, len(batch), NONCE_SIZE)]


def nonce_batch(count: int) -> list[bytes]:
    """``count`` fresh random 96-bit nonces, for the batch calls.

    Each one is popped from the buffer on its own (``list.pop`` is atomic, so
    no two threads receive the same one). If the buffer runs dry midway, the
    nonces already popped are dropped, never handed out again, and the
    buffer is refilled; a batch larger than the buffer is drawn from the OS
    CSPRNG at once.
    """
    if count <= _NONCE_BATCH:
        for _ in range(2):
            if count <= len(_nonce_pool):
                try:
                    return list(starmap(_nonce_pool.pop, repeat((), count)))
                except IndexError:
                    pass  # other threads drained it meanwhile
            _refill()
    return _split(os.urandom(NONCE_SIZE * count))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reset_nonces)


ENVELOPE_HEADERS: list[bytes | None] = [None] * 0x4000


def envelope_header(length: int) -> bytes:
    """The bytes before a field-1 payload of ``length`` bytes (tag, varint length)."""
    if length < 0x4000:
        header = ENVELOPE_HEADERS[length]
        if header is None:
            header = ENVELOPE_HEADERS[length] = encode_prefix(length)
        return header
    if length < 0x200000:  # up to 2 MiB: three varint bytes, written out
        return bytes((0x0A, (length & 0x7F) | 0x80, ((length >> 7) & 0x7F) | 0x80, length >> 14))
    return encode_prefix(length)


#: Envelope headers by the length of the AES-GCM output they precede (after
#: the nonce), filled on first use: the hot path saves an addition this way.
SEALED_HEADERS: list[bytes | None] = [None] * 0x4000


def sealed_header(size: int) -> bytes:
    """The bytes before the nonce and ``size`` bytes of AES-GCM output."""
    header = envelope_header(size + NONCE_SIZE)
    if size < len(SEALED_HEADERS):
        SEALED_HEADERS[size] = header
    return header


#: Where the parts of an envelope of a given size are: its header, and the
#: slices of the header, the nonce and the AES-GCM output.
Layout = tuple[bytes, slice, slice, slice]


def envelope_layout(size: int, suffix_size: int) -> Layout | None:
    """The layout of a ``size``-byte envelope this library writes, if one fits.

    That is field 1 with the shortest length varint, holding a nonce and at
    least a tag, then ``suffix_size`` bytes of key_info. Other well-formed
    envelopes (a longer varint, more fields) exist; they take the general path.
    """
    payload = size - suffix_size - 1  # field 1's length varint and value
    for varint_size in range(1, 6):
        length = payload - varint_size
        if length < NONCE_SIZE + TAG_SIZE:
            return None
        header = envelope_header(length)
        if len(header) == varint_size + 1:
            start = varint_size + 1
            # Header and nonce slices are shared: a table of layouts by size
            # then holds one new slice per size.
            return (
                header,
                _HEADER_AT[start],
                _NONCE_AT[start],
                slice(start + NONCE_SIZE, start + length),
            )
    return None


_HEADER_AT = [slice(0, start) for start in range(7)]
_NONCE_AT = [slice(start, start + NONCE_SIZE) for start in range(7)]
