"""Wrappers: objects that encrypt and decrypt bytes under a key id.

Every key in the hierarchy is used through a wrapper. The root external
wrapper (a local AES key, a cloud KMS, an HSM) is supplied by the application
and may do network I/O, so the protocol is asynchronous.
"""

from __future__ import annotations

import hmac
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blob import NONCE_SIZE, TAG_SIZE, BlobInfo, nonces
from ._errors import (
    DecryptionError,
    InvalidParameterError,
    UnknownKeyVersionError,
)

__all__ = ["AeadWrapper", "PooledWrapper", "Wrapper"]

KEY_SIZE = 32


@runtime_checkable
class Wrapper(Protocol):
    """Encrypts and decrypts bytes under a key identified by ``key_id``.

    ``key_id`` may be empty until the first ``encrypt`` for wrappers that
    only learn it from their key service.
    """

    @property
    def key_id(self) -> str: ...

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        """Encrypt ``plaintext``, binding the optional ``aad``."""
        ...

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        """Decrypt a blob made by ``encrypt`` with the same ``aad``."""
        ...


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidParameterError(f"{name} must be bytes, not {type(value).__name__}")


class AeadWrapper:
    """AES-256-GCM under a 32-byte key, with a random 96-bit nonce per call.

    The blob's ciphertext is the nonce followed by the GCM output, and its
    ``key_id`` is this wrapper's id: the format of the Go ``aead`` wrapper.
    """

    __slots__ = ("_aead", "_key", "_key_id")

    def __init__(self, key: bytes, *, key_id: str) -> None:
        _check_bytes("key", key)
        if len(key) != KEY_SIZE:
            raise InvalidParameterError(
                f"AeadWrapper needs a {KEY_SIZE}-byte key, got {len(key)} bytes; "
                "generate one with os.urandom(32)"
            )
        if not isinstance(key_id, str) or not key_id:
            raise InvalidParameterError("AeadWrapper needs a non-empty key_id")
        self._key = bytes(key)
        self._key_id = key_id
        self._aead = AESGCM(self._key)

    @classmethod
    def _from_aead(cls, aead: AESGCM, key: bytes, key_id: str) -> AeadWrapper:
        self = cls.__new__(cls)
        self._key = key
        self._key_id = key_id
        self._aead = aead
        return self

    def __repr__(self) -> str:
        return f"AeadWrapper(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    def key_bytes(self) -> bytes:
        """Return the raw key. Treat the result as secret."""
        return self._key

    def matches_key(self, key: bytes) -> bool:
        """Compare ``key`` with this wrapper's key in constant time."""
        return hmac.compare_digest(self._key, key)

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        return self.encrypt_sync(plaintext, aad=aad)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        return self.decrypt_sync(blob, aad=aad)

    def encrypt_sync(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        """Synchronous ``encrypt``; no I/O happens in either."""
        _check_bytes("plaintext", plaintext)
        if aad is not None:
            _check_bytes("aad", aad)
        nonce = nonces()
        return BlobInfo(nonce + self._aead.encrypt(nonce, plaintext, aad or None), self._key_id)

    def decrypt_sync(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        """Synchronous ``decrypt``."""
        if not isinstance(blob, BlobInfo):
            raise InvalidParameterError(f"blob must be a BlobInfo, not {type(blob).__name__}")
        if aad is not None:
            _check_bytes("aad", aad)
        data = blob.ciphertext
        if len(data) < NONCE_SIZE + TAG_SIZE:
            raise DecryptionError("ciphertext is too short to be AES-GCM output")
        try:
            return self._aead.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], aad or None)
        except InvalidTag:
            raise DecryptionError(
                "decryption failed: wrong key, wrong AAD or tampered ciphertext"
            ) from None


class PooledWrapper:
    """Encrypts with ``primary``; decrypts with whichever member the blob names.

    This is how a key is replaced: pool the new wrapper as primary with the
    old one, rewrap, then drop the old one. A blob without a key id goes to
    the primary.
    """

    __slots__ = ("_by_id", "_primary")

    def __init__(self, primary: Wrapper, *others: Wrapper) -> None:
        members = (primary, *others)
        by_id: dict[str, Wrapper] = {}
        for member in members:
            if not isinstance(member, Wrapper):
                raise InvalidParameterError(
                    f"PooledWrapper members must be wrappers, not {type(member).__name__}"
                )
            key_id = member.key_id
            if key_id in by_id:
                raise InvalidParameterError(f"two pooled wrappers share key id {key_id!r}")
            by_id[key_id] = member
        self._primary = primary
        self._by_id = by_id

    def __repr__(self) -> str:
        return f"PooledWrapper(primary={self._primary.key_id!r}, key_ids={self.key_ids()!r})"

    @property
    def key_id(self) -> str:
        return self._primary.key_id

    @property
    def primary(self) -> Wrapper:
        return self._primary

    def key_ids(self) -> list[str]:
        """The key ids of every member, sorted."""
        return sorted(self._by_id)

    def wrapper_for(self, key_id: str) -> Wrapper | None:
        """The member with ``key_id``, or ``None``."""
        return self._by_id.get(key_id)

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        return await self._primary.encrypt(plaintext, aad=aad)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        if not isinstance(blob, BlobInfo):
            raise InvalidParameterError(f"blob must be a BlobInfo, not {type(blob).__name__}")
        member = self._primary if not blob.key_id else self._by_id.get(blob.key_id)
        if member is None:
            raise UnknownKeyVersionError(
                f"blob names key id {blob.key_id!r}, which is not in this pool"
            )
        return await member.decrypt(blob, aad=aad)
