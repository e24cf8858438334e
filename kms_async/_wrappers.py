"""Wrappers: objects that encrypt and decrypt bytes under a key id.

Every key in the hierarchy is used through a wrapper. The root external
wrapper (a local AES key, a cloud KMS, an HSM) is supplied by the application
and may do network I/O, so the protocol is asynchronous.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blob import (
    NONCE_SIZE,
    TAG_SIZE,
    BlobInfo,
    decode,
    encode_suffix,
    envelope_header,
    nonces,
)
from ._errors import (
    DecryptionError,
    InvalidParameterError,
    KMSError,
    UnknownKeyVersionError,
    WrapperError,
)

__all__ = [
    "AeadWrapper",
    "PooledWrapper",
    "Wrapper",
    "aead_wrapper",
    "key_fingerprint",
    "seal",
    "unseal",
    "unwrap_key",
    "wrap_key",
    "wrapper_error",
]

KEY_SIZE = 32
DEFAULT_KEY_ENV = "KMS_ROOT_KEY"

_MAKE_KEY = 'python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"'
_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


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


# -- the local AES-GCM format (the Go aead wrapper's) -------------------------


def seal(aead: AESGCM, plaintext: bytes, aad: bytes | None = None) -> bytes:
    """A fresh random nonce followed by the AES-GCM output: a blob's ``ciphertext``."""
    nonce = nonces()
    return nonce + aead.encrypt(nonce, plaintext, aad)


def unseal(aead: AESGCM, sealed: bytes, aad: bytes | None = None) -> bytes:
    """The plaintext of what :func:`seal` made.

    Raises:
        InvalidTag: wrong key, wrong AAD, tampered or too short.
    """
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise InvalidTag
    return aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)


def wrap_key(aead: AESGCM, wrapping_id: str, key: bytes) -> bytes:
    """A key wrapped under a root key version (``wrapping_id``), as stored.

    The same bytes as ``BlobInfo(seal(aead, key), wrapping_id).to_bytes()``,
    written out: bulk writes wrap a key for every scope.
    """
    sealed = seal(aead, key)
    return envelope_header(len(sealed)) + sealed + encode_suffix(wrapping_id)


def unwrap_key(aead: AESGCM, wrapping_id: str, version_id: str, wrapped: bytes) -> bytes:
    """The key of data key version ``version_id``, stored under root key version ``wrapping_id``.

    Raises:
        DecryptionError: the stored blob does not unwrap to a key under it.
    """
    suffix = encode_suffix(wrapping_id)
    if (
        len(wrapped) == _WRAPPED_SIZE + len(suffix)
        and wrapped.startswith(_WRAPPED_HEADER)
        and wrapped.endswith(suffix)
    ):
        # The shape wrap_key writes (the common case): no parsing needed.
        return _unseal_key(aead, wrapping_id, version_id, wrapped[2:_WRAPPED_SIZE])
    blob = decode(wrapped)
    if blob.key_id and blob.key_id != wrapping_id:
        raise DecryptionError(
            f"data key version {version_id} names wrapping key {blob.key_id!r} but its "
            f"row names {wrapping_id}; the key tables were changed outside kms_async"
        )
    return _unseal_key(aead, wrapping_id, version_id, blob.ciphertext)


#: A wrapped 32-byte key: field 1's tag and length, then nonce, key and tag.
_WRAPPED_HEADER = b"\x0a" + bytes([NONCE_SIZE + KEY_SIZE + TAG_SIZE])
_WRAPPED_SIZE = len(_WRAPPED_HEADER) + NONCE_SIZE + KEY_SIZE + TAG_SIZE


def _unseal_key(aead: AESGCM, wrapping_id: str, version_id: str, sealed: bytes) -> bytes:
    try:
        key = unseal(aead, sealed)
    except InvalidTag:
        raise DecryptionError(
            f"data key version {version_id} cannot be unwrapped with root key version "
            f"{wrapping_id}; the key tables were changed or corrupted"
        ) from None
    if len(key) != KEY_SIZE:
        raise DecryptionError(f"data key version {version_id} does not hold a {KEY_SIZE}-byte key")
    return key


def wrapper_error(message: str, cause: Exception) -> WrapperError:
    """A WrapperError for a failed wrapper call, as retryable as its cause.

    A wrapper's own KMSError says whether it is worth retrying (AWS KMS
    throttling is, a wrong key never); a timeout or a dropped connection
    from any other wrapper may pass.
    """
    error = WrapperError(message)
    if isinstance(cause, KMSError):
        error.retryable = cause.retryable
    elif isinstance(cause, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        error.retryable = True
    return error


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidParameterError(f"{name} must be bytes, not {type(value).__name__}")


class AeadWrapper:
    """AES-256-GCM under a 32-byte key, with a random 96-bit nonce per call.

    The blob's ciphertext is the nonce followed by the GCM output, and its
    ``key_id`` is this wrapper's id: the format of the Go ``aead`` wrapper.

    ``key_id`` defaults to :func:`key_fingerprint` of the key, the id the
    command line and :func:`open_root_wrapper` give the same key, so a key
    keeps one id however it is loaded. Pass ``key_id=`` only to keep an id
    already written into a database.
    """

    __slots__ = ("_aead", "_key", "_key_id")

    def __init__(self, key: bytes, *, key_id: str | None = None) -> None:
        _check_bytes("key", key)
        if len(key) != KEY_SIZE:
            raise InvalidParameterError(
                f"AeadWrapper needs a {KEY_SIZE}-byte key, got {len(key)} bytes; "
                "generate one with os.urandom(32)"
            )
        if key_id is None:
            key_id = key_fingerprint(key)
        if not isinstance(key_id, str) or not key_id:
            raise InvalidParameterError("AeadWrapper needs a non-empty key_id")
        try:
            key_id.encode()
        except UnicodeEncodeError:
            raise InvalidParameterError("AeadWrapper's key_id must be valid Unicode text") from None
        self._key = bytes(key)
        self._key_id = key_id
        self._aead = AESGCM(self._key)

    @classmethod
    def from_env(cls, name: str = DEFAULT_KEY_ENV, *, key_id: str | None = None) -> AeadWrapper:
        """A wrapper for the base64 key (standard or URL-safe) in environment variable ``name``.

        ``key_id`` defaults to :func:`key_fingerprint` of the key: an id that
        follows the key wherever it is kept, so two different keys never
        share an id. Pass ``key_id=`` to keep an id already in use.

        Raises:
            InvalidParameterError: the variable is unset or empty, is not
                base64, or does not hold 32 bytes.
        """
        if not isinstance(name, str) or not name:
            raise InvalidParameterError("name must be the name of an environment variable")
        try:
            value = os.environ.get(name, "")
        except (UnicodeEncodeError, ValueError):
            raise InvalidParameterError(
                f"{name!r} cannot be the name of an environment variable"
            ) from None
        if not value.strip():
            state = "is empty" if name in os.environ else "is not set"
            raise InvalidParameterError(
                f"environment variable {name} {state}; set it to the base64 of 32 random bytes, "
                f"made with: {_MAKE_KEY}"
            )
        key = _decode_base64_key(value.encode("utf-8", "replace"), f"environment variable {name}")
        return cls(key, key_id=key_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, key_id: str | None = None) -> AeadWrapper:
        """A wrapper for the key in the file at ``path``.

        The file holds either the 32 raw key bytes or their base64 (standard
        or URL-safe), with any surrounding whitespace. ``key_id`` defaults to
        :func:`key_fingerprint` of the key, as for :meth:`from_env`.

        Raises:
            InvalidParameterError: the file is missing or unreadable, or does
                not hold a 32-byte key in either form.
        """
        try:
            shown = os.fsdecode(path)
        except TypeError:
            raise InvalidParameterError(
                f"path must be a file path, not {type(path).__name__}"
            ) from None
        try:
            with open(path, "rb") as file:
                data = file.read(64 * 1024 + 1)
        except FileNotFoundError as exc:
            raise InvalidParameterError(
                f"key file {shown} does not exist; write the base64 of 32 random bytes to it, "
                f"made with: {_MAKE_KEY}"
            ) from exc
        except ValueError:  # a NUL in the path
            raise InvalidParameterError(f"key file path {shown!r} is not a valid path") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise InvalidParameterError(
                f"cannot read key file {shown} ({reason}); check the path and that this "
                "process may read it"
            ) from exc
        source = f"key file {shown}"
        stripped = data.strip()
        if stripped and _BASE64_ALPHABET.issuperset(stripped):
            key = _decode_base64_key(stripped, source)
        elif len(data) == KEY_SIZE:
            key = data
        else:
            raise InvalidParameterError(
                f"{source} holds {len(data)} bytes, neither a raw {KEY_SIZE}-byte key nor base64 "
                f"text; write the base64 of 32 random bytes to it, made with: {_MAKE_KEY}"
            )
        return cls(key, key_id=key_id)

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
        _check_bytes("key", key)
        return hmac.compare_digest(self._key, bytes(key))

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        return self.encrypt_sync(plaintext, aad=aad)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        return self.decrypt_sync(blob, aad=aad)

    def encrypt_sync(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        """Synchronous ``encrypt``; no I/O happens in either."""
        _check_bytes("plaintext", plaintext)
        if aad is not None:
            _check_bytes("aad", aad)
        return BlobInfo(seal(self._aead, plaintext, aad or None), self._key_id)

    def decrypt_sync(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        """Synchronous ``decrypt``."""
        if not isinstance(blob, BlobInfo):
            raise InvalidParameterError(f"blob must be a BlobInfo, not {type(blob).__name__}")
        if aad is not None:
            _check_bytes("aad", aad)
        if len(blob.ciphertext) < NONCE_SIZE + TAG_SIZE:
            raise DecryptionError("ciphertext is too short to be AES-GCM output")
        try:
            return unseal(self._aead, blob.ciphertext, aad or None)
        except InvalidTag:
            raise DecryptionError(
                "decryption failed: wrong key, wrong AAD or tampered ciphertext"
            ) from None


def aead_wrapper(aead: AESGCM, key: bytes, key_id: str) -> AeadWrapper:
    """An AeadWrapper over an unwrapped key version, sharing its AESGCM object."""
    wrapper = AeadWrapper.__new__(AeadWrapper)
    wrapper._key = key
    wrapper._key_id = key_id
    wrapper._aead = aead
    return wrapper


def key_fingerprint(key: bytes) -> str:
    """A stable, non-secret id for a 32-byte key: ``"local-"`` and 16 hex digits.

    The digits are HMAC-SHA256 of a fixed label under the key, so they say
    nothing about the key itself, yet differ between keys and stay the same
    for one key wherever it is stored (environment, file, secret manager).

    Raises:
        InvalidParameterError: ``key`` is not 32 bytes.
    """
    _check_bytes("key", key)
    if len(key) != KEY_SIZE:
        raise InvalidParameterError(f"a key must be {KEY_SIZE} bytes, got {len(key)} bytes")
    digest = hmac.new(bytes(key), b"kms_async key id v1", hashlib.sha256).hexdigest()
    return "local-" + digest[:16]


def _decode_base64_key(text: bytes, source: str) -> bytes:
    """Decode base64 in either alphabet, padding optional; never echo the text."""
    stripped = text.strip()
    fix = f"set it to the base64 of 32 random bytes, made with: {_MAKE_KEY}"
    if not _BASE64_ALPHABET.issuperset(stripped):
        raise InvalidParameterError(f"{source} is not base64 (standard or URL-safe); {fix}")
    standard = stripped.translate(_URLSAFE_TO_STANDARD).rstrip(b"=")
    try:
        key = base64.b64decode(standard + b"=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError(
            f"{source} is not valid base64 (standard or URL-safe); {fix}"
        ) from None
    if len(key) != KEY_SIZE:
        hint = ""
        if len(stripped) == 2 * KEY_SIZE and _HEX_DIGITS.issuperset(stripped):
            hint = " (it looks like hex; the key must be base64)"
        raise InvalidParameterError(
            f"{source} decodes to {len(key)} bytes, but a root key is {KEY_SIZE} bytes{hint}; {fix}"
        )
    return key


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
        member = self._by_id.get(key_id)
        if member is None:
            # Some wrappers learn their final key id later (a cloud KMS
            # reports the key's ARN on first use): look at them afresh.
            self._by_id = {m.key_id: m for m in self._by_id.values()}
            member = self._by_id.get(key_id)
        return member

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        return await self._primary.encrypt(plaintext, aad=aad)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        if not isinstance(blob, BlobInfo):
            raise InvalidParameterError(f"blob must be a BlobInfo, not {type(blob).__name__}")
        member = self._primary if not blob.key_id else self.wrapper_for(blob.key_id)
        if member is None:
            raise UnknownKeyVersionError(
                f"blob names key id {blob.key_id!r}, which is not in this pool"
            )
        return await member.decrypt(blob, aad=aad)
