"""Sealing and opening many envelopes under one (scope, purpose) at once.

``KMS.encrypt_many`` and ``KMS.decrypt_many`` make and read the very bytes
``encrypt`` and ``decrypt`` do. The work per item is what a hand-written loop
of AES-GCM calls does, plus building or checking the envelope; written as
``map`` pipelines over builtins, so that no Python bytecode runs per item
(for values of one size), the envelope costs little more than the copies
it needs.

The opening pipeline only accepts what it can check in bulk: envelopes
that this library wrote (field 1 with the shortest length varint, then
key_info naming a cached version) for one cached pair. Anything else makes
it return ``None`` or raise, and the caller decrypts item by item, the way
``decrypt`` does, so both calls accept and refuse the same ciphertexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import getitem
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blob import Layout, envelope_layout, sealed_header
from ._errors import InvalidParameterError

__all__ = ["aad_list", "item_list", "open_many", "seal_many"]

#: From this envelope size on, bodies are sliced through a memoryview (no copy).
_COPY_LIMIT = 4096

_join = b"".join


class Cipher(Protocol):
    """An AESGCM, or what stands in for a version that must not be used."""

    def encrypt(self, nonce: bytes, data: Any, aad: Any, /) -> bytes: ...

    def decrypt(self, nonce: bytes, data: Any, aad: Any, /) -> bytes: ...


_aead_decrypt = AESGCM.decrypt
_BUFFERS = (str, bytes, bytearray, memoryview)


def item_list(name: str, items: object) -> Sequence[Any]:
    """``items`` as a list or tuple; one bytes or str object is refused."""
    if type(items) is list or type(items) is tuple:
        return items
    if isinstance(items, _BUFFERS):
        raise InvalidParameterError(
            f"{name} must be a list of values, not one {type(items).__name__} object; write [value]"
        )
    try:
        return list(items)  # type: ignore[call-overload,no-any-return]
    except TypeError:
        raise InvalidParameterError(
            f"{name} must be a list of values, not {type(items).__name__}"
        ) from None


def aad_list(aad: object, count: int, name: str) -> Sequence[Any]:
    """One AAD per item: ``aad`` checked against ``count`` items, or ``None`` for each."""
    if aad is None:
        return (None,) * count
    if isinstance(aad, _BUFFERS):
        raise InvalidParameterError(
            "aad must be None or a list with one AAD per item, not one "
            f"{type(aad).__name__} object; for the same AAD on every item write "
            f"[aad] * len({name})"
        )
    aads = item_list("aad", aad)
    if len(aads) != count:
        raise InvalidParameterError(
            f"aad has {len(aads)} items for {count} {name}: give one AAD per item, or None"
        )
    return aads


def seal_many(
    aead: Cipher,
    suffix: bytes,
    nonces: list[bytes],
    plaintexts: Sequence[Any],
    aads: Sequence[Any],
) -> list[bytes]:
    """The envelopes of ``plaintexts``, each sealed under its own nonce.

    Raises what ``AESGCM.encrypt`` raises for an unusable item (TypeError,
    BufferError, OverflowError); the caller finds which one.
    """
    sealed = list(map(aead.encrypt, nonces, plaintexts, aads))
    sizes = list(map(len, sealed))
    if sizes.count(sizes[0]) == len(sizes):
        headers: Any = repeat(sealed_header(sizes[0]))
    else:
        by_size = {size: sealed_header(size) for size in set(sizes)}
        headers = map(by_size.__getitem__, sizes)
    return list(map(_join, zip(headers, nonces, sealed, repeat(suffix))))


_layouts: dict[tuple[int, int], Layout | None] = {}


def _layout(size: int, suffix_size: int) -> Layout | None:
    key = (size, suffix_size)
    try:
        return _layouts[key]
    except KeyError:
        pass
    if len(_layouts) >= 4096:
        _layouts.clear()
    found = _layouts[key] = envelope_layout(size, suffix_size)
    return found


def open_many(
    aead: Cipher,
    suffix: bytes,
    older: dict[bytes, Any] | None,
    ciphertexts: Sequence[Any],
    sizes: list[int],
    aads: Sequence[Any],
) -> list[bytes] | None:
    """The plaintexts, or ``None`` if any envelope is not one this can check in bulk.

    ``sizes`` holds ``len()`` of each ciphertext.

    Raises ``InvalidTag`` if any item fails authentication, and TypeError,
    BufferError or OverflowError for an unusable AAD; the caller then goes
    item by item to name the one.
    """
    # Every check slices and compares (bytes.startswith and endswith parse
    # their arguments on each call: slower on 3.11). Slicing raises
    # TypeError for what has no slices, and comparing with a bytes suffix
    # refuses whatever is not bytes-like.
    suffix_size = len(suffix)
    count = len(ciphertexts)
    tails: list[Any] = list(map(getitem, ciphertexts, repeat(slice(-suffix_size, None))))
    keys: list[Any] | None = None
    if tails.count(suffix) != count:
        if older is None:
            return None
        by_suffix: dict[Any, Any] = {suffix: aead, **older}
        keys = list(map(by_suffix.get, tails))
        if None in keys:
            return None
    size = sizes[0]
    if sizes.count(size) == len(sizes):
        layout = _layout(size, suffix_size)
        if layout is None:
            return None
        header, head_at, nonce_at, body_at = layout
        heads = list(map(getitem, ciphertexts, repeat(head_at)))
        if heads.count(header) != count:
            return None
        nonces: list[Any] = list(map(getitem, ciphertexts, repeat(nonce_at)))
        views: Any = ciphertexts if size < _COPY_LIMIT else map(memoryview, ciphertexts)
        bodies: Any = map(getitem, views, repeat(body_at))
    else:
        distinct = set(sizes)
        layouts = {}
        for size in distinct:
            layout = _layout(size, suffix_size)
            if layout is None:
                return None
            layouts[size] = layout
        per_item = list(map(layouts.__getitem__, sizes))
        heads = list(map(getitem, ciphertexts, [x[1] for x in per_item]))
        if heads != [x[0] for x in per_item]:
            return None
        nonces = list(map(getitem, ciphertexts, [x[2] for x in per_item]))
        views = ciphertexts if max(distinct) < _COPY_LIMIT else map(memoryview, ciphertexts)
        bodies = map(getitem, views, [x[3] for x in per_item])
    if keys is None:
        return list(map(aead.decrypt, nonces, bodies, aads))
    return list(map(_aead_decrypt, keys, nonces, bodies, aads))
