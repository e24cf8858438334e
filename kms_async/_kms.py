"""The KMS facade: lifecycle, public operations and their transactions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import anyio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _reencrypt
from . import _repository as repo
from ._blob import (
    ENVELOPE_HEADERS,
    NONCE_SIZE,
    TAG_SIZE,
    BlobInfo,
    decode,
    encode_suffix,
    envelope_header,
    field_length,
    nonces,
    take_nonce,
)
from ._cache import KeyCache, PurposeKeys, VersionKey
from ._errors import (
    ClosedError,
    DecryptionError,
    ForeignContextError,
    InvalidParameterError,
    KeyExistsError,
    KeyInUseError,
    KeyNotFoundError,
    KMSError,
    RevokeTooSoonError,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    UnknownKeyVersionError,
    WrapperError,
)
from ._freshness import Freshness
from ._ids import (
    DATA_KEY_PREFIX,
    DATA_KEY_VERSION_PREFIX,
    ROOT_KEY_PREFIX,
    ROOT_KEY_VERSION_PREFIX,
    new_id,
)
from ._migrations import SCHEMA_VERSION
from ._reencrypt import EncryptedColumn, ReencryptReport, VersionUsage
from ._sql import DEFAULT_POOL_TIMEOUT, Connection, Database, IntegrityError, open_database
from ._types import ROOT_PURPOSE, Key, KeyVersion, Scope
from ._wrappers import KEY_SIZE, AeadWrapper, PooledWrapper, Wrapper

__all__ = ["KMS"]

logger = logging.getLogger("kms_async")

#: Longest scope id accepted, in UTF-8 bytes (PostgreSQL's btree limit is ~2.7 kB).
MAX_SCOPE_BYTES = 1024
#: Longest purpose accepted, in UTF-8 bytes.
MAX_PURPOSE_BYTES = 256
#: reconcile_keys reads again this often when other processes create the same keys.
_WRITE_ATTEMPTS = 5
#: Root keys wrapped concurrently by bulk operations (for remote root wrappers).
_WRAP_CONCURRENCY = 16
#: Bulk writes of at most this many scopes put the new keys in the cache.
_PRIME_LIMIT = 100
#: A ciphertext naming an unknown version reloads its scope at most this often.
_RELOAD_SPACING = 0.2

_VERSION_ID = re.compile(r"kdkv_[A-Za-z0-9]{10}")

#: Default seconds a superseded version must wait before it can be revoked.
DEFAULT_REVOKE_GRACE = 60.0

#: Open instances, so a forked child can make the ones it inherited unusable.
_instances: weakref.WeakSet[KMS] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for kms in list(_instances):
        kms._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _seal_envelope(
    aead: AESGCM, nonce: bytes, plaintext: bytes, aad: bytes | None, suffix: bytes
) -> bytes:
    """Encrypt and build the envelope (run in a worker thread for large payloads)."""
    sealed = aead.encrypt(nonce, plaintext, aad)
    return b"".join((envelope_header(len(sealed) + NONCE_SIZE), nonce, sealed, suffix))


def _show(value: str, limit: int = 80) -> str:
    """repr() of an id for messages, shortened so hostile input stays readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _check_text(name: str, value: object, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidParameterError(f"{name} must be a str, not {type(value).__name__}")
    if not value or not value.strip():
        raise InvalidParameterError(f"missing {name}: it must not be empty or blank")
    if "\x00" in value:
        raise InvalidParameterError(f"{name} must not contain NUL characters")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidParameterError(f"{name} is not valid Unicode text") from None
    if size > max_bytes:
        raise InvalidParameterError(f"{name} is {size} bytes long; the limit is {max_bytes}")
    return value


def _check_scope(scope_id: object) -> str:
    return _check_text("scope id", scope_id, MAX_SCOPE_BYTES)


def _check_purpose_name(purpose: object) -> str:
    _check_text("purpose", purpose, MAX_PURPOSE_BYTES)
    assert isinstance(purpose, str)
    if purpose.strip() != purpose:
        raise InvalidParameterError(f"purpose {_show(purpose)} has surrounding whitespace")
    return purpose


#: Length of the key_info suffix naming a 15-character key version id.
_SUFFIX_SIZE = 19
#: Above this size, decrypt slices through a memoryview instead of copying.
_COPY_LIMIT = 4096


def _wrap_local(aead: AESGCM, key_id: str, plaintext: bytes) -> bytes:
    """Wrap a key under a root key version, in the Go aead wrapper's format."""
    nonce = nonces()
    sealed = aead.encrypt(nonce, plaintext, None)
    return b"".join(
        (envelope_header(len(sealed) + NONCE_SIZE), nonce, sealed, encode_suffix(key_id))
    )


def _unwrap_local(aead: AESGCM, wrapping_id: str, version_id: str, wrapped: bytes) -> bytes:
    """Unwrap a data key version stored under root key version ``wrapping_id``."""
    blob = decode(wrapped)
    if blob.key_id and blob.key_id != wrapping_id:
        raise DecryptionError(
            f"data key version {version_id} names wrapping key {_show(blob.key_id)} but its "
            f"row names {wrapping_id}; the key tables were changed outside kms_async"
        )
    sealed = blob.ciphertext
    try:
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise InvalidTag
        key = aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], None)
    except InvalidTag:
        raise DecryptionError(
            f"data key version {version_id} cannot be unwrapped with root key version "
            f"{wrapping_id}; the key tables were changed or corrupted"
        ) from None
    if len(key) != KEY_SIZE:
        raise DecryptionError(f"data key version {version_id} does not hold a {KEY_SIZE}-byte key")
    return key


def _wrapper_error(message: str, cause: Exception) -> WrapperError:
    """A WrapperError for a failed root wrapper call, as retryable as its cause."""
    error = WrapperError(message)
    if isinstance(cause, KMSError) and cause.retryable:
        error.retryable = True
    return error


class _Stale(Exception):
    """Another writer changed the keys between an optimistic read and the write."""


@dataclasses.dataclass(frozen=True, slots=True)
class _RewrapPlan:
    """New wrappings computed outside the transaction, and what they assumed."""

    root_key_id: str
    target_root_version_id: str
    root_updates: list[tuple[bytes, str, bytes]]  # new wrapped, id, old wrapped
    data_updates: list[tuple[bytes, str, str, bytes]]  # new wrapped, root version, id, old

    @property
    def expected(self) -> tuple[set[tuple[str, bytes]], set[tuple[str, bytes]]]:
        return (
            {(u[1], u[2]) for u in self.root_updates},
            {(u[2], u[3]) for u in self.data_updates},
        )


class KMS:
    """Envelope-encryption keys for many scopes, kept in the application's database.

    Open with :meth:`open`; use as ``async with await KMS.open(...) as kms`` or
    call :meth:`aclose`. One instance is safe to share between all tasks of an
    event loop.
    """

    def __init__(
        self,
        database: Database,
        *,
        purposes: tuple[str, ...],
        root_wrapper: Wrapper | None,
        cache_size: int,
        max_staleness: float | None,
    ) -> None:
        self._closed = False
        # Connections belong to the process and the event loop that opened them.
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db = database
        self._q = database.queries
        self._purposes = purposes
        self._wrappers: dict[str, Wrapper] = {}
        if root_wrapper is not None:
            self.add_external_wrapper(ROOT_PURPOSE, root_wrapper)
        self._cache = KeyCache(cache_size, purposes)
        # The hot path reads the LRU directly.
        self._entries = self._cache.entries
        self._offload_threshold = sys.maxsize
        self._revoke_grace = DEFAULT_REVOKE_GRACE
        self._freshness = Freshness(database, self._cache, self._purpose_keys_reload, max_staleness)
        self._watcher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        _instances.add(self)

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        db: object,
        *,
        purposes: Iterable[str],
        root_wrapper: Wrapper | None = None,
        table_prefix: str = "kms",
        cache_size: int = 100_000,
        max_staleness: float | None = 1.0,
        notifications: bool | None = None,
        offload_threshold: int | None = 4 * 1024 * 1024,
        revoke_grace: float = DEFAULT_REVOKE_GRACE,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    ) -> KMS:
        """Connect, check the schema and return a ready KMS.

        Args:
            db: a DSN (``postgresql://...``, ``sqlite:///file.db``), an asyncpg
                ``Pool`` or an aiosqlite ``Connection``. A pool or connection
                stays the caller's: ``aclose`` leaves it open.
            purposes: the data key purposes this application uses, such as
                ``["database", "oidc"]``. ``rootKey`` is reserved.
            root_wrapper: the root of trust that wraps every root key; may
                also be added later with ``add_external_wrapper("rootKey", w)``.
            table_prefix: the tables' name prefix.
            cache_size: how many (scope, purpose) pairs keep unwrapped keys.
            max_staleness: seconds within which key changes made by other
                processes reach this instance's cache. If no check succeeds
                for four times as long (the database is away), cached keys
                stop being used to encrypt until the database answers.
                ``None`` turns the background check off: only for a single
                instance, since then other instances' changes never arrive.
            notifications: on PostgreSQL, LISTEN for other instances' key
                changes, which reach the cache within milliseconds. The
                default turns it on when ``db`` is a DSN (a dedicated
                connection) and off for a caller's pool, where it would hold
                one of the pool's connections; the periodic check runs either
                way, so a pooler that drops notifications costs only speed.
            offload_threshold: payloads of at least this many bytes are
                encrypted and decrypted in a worker thread so the event loop
                keeps serving other tasks; ``None`` keeps all work inline.
            revoke_grace: seconds a version must have been superseded (by
                the database clock) before this instance revokes it, so that
                no instance can still be encrypting under it. It must exceed
                four times the largest ``max_staleness`` in the fleet.
            pool_timeout: on PostgreSQL, seconds to wait for a free pool
                connection before raising TransientStorageError (a shared
                pool exhausted by requests that each wait for the KMS would
                otherwise wait forever).

        Raises:
            InvalidParameterError: an argument is not usable.
            SchemaVersionError: the schema is missing or at another version.
            StorageError: the database cannot be reached.
        """
        if isinstance(purposes, str):
            raise InvalidParameterError(
                "purposes must be a list of purposes, not one string; write purposes=[...]"
            )
        checked: list[str] = []
        for purpose in purposes:
            _check_purpose_name(purpose)
            if purpose == ROOT_PURPOSE:
                raise InvalidParameterError(
                    f"{ROOT_PURPOSE!r} is reserved for root keys and cannot be a data key purpose"
                )
            if purpose not in checked:
                checked.append(purpose)
        if not isinstance(cache_size, int) or cache_size < 1:
            raise InvalidParameterError("cache_size must be a positive integer")
        if offload_threshold is not None and (
            not isinstance(offload_threshold, int) or offload_threshold < 1
        ):
            raise InvalidParameterError("offload_threshold must be a positive integer or None")
        if max_staleness is not None and not (
            isinstance(max_staleness, (int, float)) and max_staleness > 0
        ):
            raise InvalidParameterError(
                "max_staleness must be a positive number of seconds or None"
            )
        if not isinstance(revoke_grace, (int, float)) or not 0 <= revoke_grace < 10**9:
            raise InvalidParameterError("revoke_grace must be a number of seconds, 0 or more")
        if not isinstance(pool_timeout, (int, float)) or not 0 < pool_timeout < 10**9:
            raise InvalidParameterError("pool_timeout must be a positive number of seconds")
        database = await open_database(db, prefix=table_prefix, pool_timeout=pool_timeout)
        try:
            kms = cls(
                database,
                purposes=tuple(checked),
                root_wrapper=root_wrapper,
                cache_size=cache_size,
                max_staleness=max_staleness,
            )
            if offload_threshold is not None:
                kms._offload_threshold = offload_threshold
            kms._revoke_grace = float(revoke_grace)
            kms._loop = asyncio.get_running_loop()
            await kms.validate_schema()
            async with database.read() as conn:
                if kms._q.notify is not None:
                    oid = await conn.fetchval(
                        kms._q.collection_version_oid, f"{kms._q.prefix}_collection_version"
                    )
                    kms._q.notify_channel = f"{kms._q.prefix}_key_change_{oid}"
            await kms._freshness.start()
            listen = kms._q.notify is not None and (
                notifications or (notifications is None and isinstance(db, str))
            )
            if listen and max_staleness is not None and not database.can_listen():
                raise InvalidParameterError(
                    "notifications=True would hold the only connection of your pool; "
                    "give the pool max_size=2 or more, or leave notifications off"
                )
        except BaseException:
            await database.aclose()
            raise
        if max_staleness is not None:
            loop = asyncio.get_running_loop()
            kms._watcher = loop.create_task(kms._freshness.watch(lambda: kms._closed))
            if listen:
                kms._listener = loop.create_task(
                    database.listen_forever(kms._q.notify_channel, kms._freshness.on_notification)
                )
        logger.debug("kms_async: opened %s database, purposes %s", database.dialect, checked)
        return kms

    async def __aenter__(self) -> KMS:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drop every cached key and close what the KMS opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cache.clear()
        # Registered wrappers may hold root key material too.
        self._wrappers.clear()
        self._freshness.stop()
        if os.getpid() != self._pid:
            # A forked child: the connections are the parent's; closing them
            # here would break them there. Drop them without any I/O.
            return
        try:
            tasks = [t for t in (self._watcher, self._listener) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._cache.drain()
        finally:
            self._cache.clear()
            await self._db.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._entries)} cached"
        return f"<KMS {self._db.dialect} purposes={list(self._purposes)!r} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this KMS was closed; open a new one with KMS.open()")
        if os.getpid() != self._pid:
            raise ForeignContextError(
                f"this KMS was opened in process {self._pid} and cannot be used after a fork; "
                "open a new KMS in each worker process, after the fork"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and self._loop is not None and loop is not self._loop:
            raise ForeignContextError(
                "this KMS was opened on another event loop; its connections work only "
                "there: open a KMS on each event loop that needs one"
            )

    def _after_fork_in_child(self) -> None:
        # Keys and connections stay with the parent. Emptying the cache sends
        # the hot path to the slow path, which raises ForeignContextError.
        self._cache.clear()
        self._freshness.stop()

    @property
    def dialect(self) -> str:
        """``"postgres"`` or ``"sqlite"``."""
        return self._db.dialect

    @property
    def purposes(self) -> tuple[str, ...]:
        """The data key purposes given to :meth:`open`, de-duplicated, in order."""
        return self._purposes

    # -- external wrappers -------------------------------------------------

    def _check_known_purpose(self, purpose: object) -> str:
        if not isinstance(purpose, str) or not purpose:
            raise InvalidParameterError("missing purpose")
        if purpose != ROOT_PURPOSE and purpose not in self._purposes:
            raise InvalidParameterError(
                f"{_show(purpose)} is not a supported key purpose; this KMS was opened with "
                f"purposes={list(self._purposes)!r}"
            )
        return purpose

    def add_external_wrapper(self, purpose: str, wrapper: Wrapper) -> None:
        """Register the wrapper for ``purpose``; ``"rootKey"`` sets the root wrapper.

        A wrapper replaces any registered before it; cached keys stay valid.
        To replace the root of trust, register ``PooledWrapper(new, old)`` and
        run :meth:`rewrap_keys` for every scope.

        Raises:
            InvalidParameterError: unknown purpose, or ``wrapper`` is not a Wrapper.
        """
        self._check_open()
        self._check_known_purpose(purpose)
        if wrapper is None or not isinstance(wrapper, Wrapper):
            raise InvalidParameterError(
                "missing wrapper: pass an object with key_id, encrypt() and decrypt()"
            )
        self._wrappers[purpose] = wrapper

    def get_external_wrapper(self, purpose: str) -> Wrapper:
        """The wrapper registered for ``purpose``.

        Raises:
            InvalidParameterError: unknown purpose.
            KeyNotFoundError: nothing registered for it.
        """
        self._check_open()
        self._check_known_purpose(purpose)
        wrapper = self._wrappers.get(purpose)
        if wrapper is None:
            raise KeyNotFoundError(f"missing external wrapper for {purpose!r}")
        return wrapper

    def get_external_root_wrapper(self) -> Wrapper:
        """The root wrapper.

        Raises:
            KeyNotFoundError: none registered.
        """
        self._check_open()
        wrapper = self._wrappers.get(ROOT_PURPOSE)
        if wrapper is None:
            raise KeyNotFoundError(
                "missing external root wrapper: pass root_wrapper= to KMS.open() or call "
                "add_external_wrapper('rootKey', wrapper)"
            )
        return wrapper

    async def _wrap_root(self, key: bytes) -> bytes:
        wrapper = self.get_external_root_wrapper()
        try:
            blob = await wrapper.encrypt(key)
        except Exception as exc:
            raise _wrapper_error(f"the root wrapper failed to wrap a root key: {exc}", exc) from exc
        if not isinstance(blob, BlobInfo):
            raise WrapperError(
                f"the root wrapper returned {type(blob).__name__} instead of a BlobInfo"
            )
        return blob.to_bytes()

    async def _unwrap_root(self, version_id: str, version: int, wrapped: bytes) -> VersionKey:
        cached = self._cache.get_root(version_id)
        if cached is not None:
            # A rotation caches its new root before the database numbers it.
            return (
                cached
                if cached.version == version
                else dataclasses.replace(cached, version=version)
            )
        wrapper = self.get_external_root_wrapper()
        blob = decode(wrapped)
        try:
            key = await wrapper.decrypt(blob)
        except Exception as exc:
            raise _wrapper_error(
                f"the root wrapper cannot unwrap root key version {version_id} (wrapped under "
                f"key id {_show(blob.key_id)}): {exc}; if the root key was replaced, register "
                "PooledWrapper(new, old) until rewrap_keys() has run for every scope",
                exc,
            ) from exc
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise WrapperError(f"root key version {version_id} did not unwrap to a 32-byte key")
        unwrapped = VersionKey(version_id, version, AESGCM(key), key)
        self._cache.put_root(version_id, unwrapped)
        return unwrapped

    # -- schema ------------------------------------------------------------

    async def validate_schema(self) -> str:
        """Return the schema version, which must be ``v0.0.2``.

        Raises:
            SchemaVersionError: the tables are missing or at another version.
        """
        self._check_open()
        async with self._db.read() as conn:
            version = await repo.schema_version(conn, self._q)
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"invalid schema version, expected version {SCHEMA_VERSION} and got {version}; "
                "run kms_async.migrate() or apply the sql/ files with your migration tool",
                found=version,
            )
        return version

    # -- the hot path ------------------------------------------------------

    async def encrypt(
        self, scope_id: str, purpose: str, plaintext: bytes, *, aad: bytes | None = None
    ) -> bytes:
        """Encrypt ``plaintext`` with the newest key of (scope, purpose).

        Returns the Go-compatible BlobInfo envelope naming the key version.
        ``aad`` (optional) must be given again to decrypt.

        Raises:
            InvalidParameterError: bad scope, purpose, plaintext or aad.
            KeyNotFoundError: the scope has no key for the purpose.
        """
        try:
            keys = self._entries[(scope_id, purpose)]
            keys.used = True
        except KeyError:
            keys = None  # loaded below, so a miss does not chain a KeyError into errors
        except TypeError:
            raise InvalidParameterError("scope id and purpose must be strings") from None
        if keys is None:
            keys = await self._purpose_keys(scope_id, purpose)
        try:
            nonce = take_nonce()
        except IndexError:
            nonce = nonces()
        try:
            if len(plaintext) < self._offload_threshold:
                sealed = keys.aead.encrypt(nonce, plaintext, aad)
            else:
                # AES-GCM releases the GIL, and so does copying a large bytes
                # object: the whole envelope is built in a worker thread.
                return await anyio.to_thread.run_sync(
                    _seal_envelope, keys.aead, nonce, plaintext, aad, keys.suffix
                )
        except TypeError:
            raise InvalidParameterError("plaintext and aad must be bytes") from None
        # envelope_header(), inlined for the common sizes: one call less.
        size = len(sealed) + NONCE_SIZE
        header = ENVELOPE_HEADERS[size] if size < 0x4000 else None
        if header is None:
            header = envelope_header(size)
        return b"".join((header, nonce, sealed, keys.suffix))

    async def decrypt(
        self, scope_id: str, purpose: str, ciphertext: bytes, *, aad: bytes | None = None
    ) -> bytes:
        """Decrypt what :meth:`encrypt` returned for the same scope and purpose.

        A ciphertext whose key version belongs to another scope or purpose is
        refused, never decrypted.

        Raises:
            DecryptionError: tampered, malformed, wrong AAD or wrong key.
            UnknownKeyVersionError: the version is revoked or not this pair's.
            InvalidParameterError: bad scope, purpose or argument types.
            KeyNotFoundError: the scope has no key for the purpose.
        """
        try:
            keys = self._entries[(scope_id, purpose)]
            keys.used = True
        except KeyError:
            keys = None  # loaded below, so a miss does not chain a KeyError into errors
        except TypeError:
            raise InvalidParameterError("scope id and purpose must be strings") from None
        if keys is None:
            keys = await self._keys_to_decrypt(scope_id, purpose)
        if type(ciphertext) is bytes and len(ciphertext) > _SUFFIX_SIZE + 2:
            # Fast path: an envelope this library wrote ends with key_info
            # naming one of the cached versions; the rest is field 1.
            aead: AESGCM | None = keys.aead
            if not ciphertext.endswith(keys.suffix):
                aead = keys.find(ciphertext[-_SUFFIX_SIZE:])
            if aead is not None:
                length = ciphertext[1]
                start = 2
                if length >= 0x80:
                    second = ciphertext[2]
                    if second < 0x80:
                        length = (length & 0x7F) | (second << 7)
                        start = 3
                    elif ciphertext[3] < 0x80:  # up to 2 MiB
                        length = (length & 0x7F) | ((second & 0x7F) << 7) | (ciphertext[3] << 14)
                        start = 4
                    else:
                        length, start = field_length(ciphertext, 1)  # 2 MiB and more
                end = len(ciphertext) - _SUFFIX_SIZE
                if ciphertext[0] == 0x0A and start + length == end and length >= 28:
                    body = ciphertext if end < _COPY_LIMIT else memoryview(ciphertext)
                    nonce = ciphertext[start : start + NONCE_SIZE]
                    try:
                        if end < self._offload_threshold:
                            return aead.decrypt(nonce, body[start + NONCE_SIZE : end], aad)
                        return await anyio.to_thread.run_sync(
                            aead.decrypt, nonce, body[start + NONCE_SIZE : end], aad
                        )
                    except InvalidTag:
                        raise DecryptionError(
                            "decryption failed: wrong AAD, wrong scope or purpose, "
                            "or tampered ciphertext"
                        ) from None
                    except TypeError:
                        raise InvalidParameterError("aad must be bytes") from None
        return await self._decrypt_blob(scope_id, purpose, keys, decode(ciphertext), aad)

    async def _decrypt_blob(
        self,
        scope_id: str,
        purpose: str,
        keys: PurposeKeys,
        blob: BlobInfo,
        aad: bytes | None,
    ) -> bytes:
        """Decrypt any well-formed envelope: the general path."""
        aead = keys.find_id(blob.key_id)
        if aead is None:
            aead = await self._unknown_version(scope_id, purpose, blob.key_id)
        sealed = blob.ciphertext
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise DecryptionError("ciphertext is too short")
        try:
            if len(sealed) >= self._offload_threshold:
                return await anyio.to_thread.run_sync(
                    aead.decrypt, sealed[:NONCE_SIZE], memoryview(sealed)[NONCE_SIZE:], aad
                )
            return aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
        except InvalidTag:
            raise DecryptionError(
                "decryption failed: wrong AAD, wrong scope or purpose, or tampered ciphertext"
            ) from None
        except TypeError:
            raise InvalidParameterError("aad must be bytes") from None

    async def _purpose_keys(self, scope_id: str, purpose: str) -> PurposeKeys:
        """Cache miss: validate, then load once for every concurrent caller."""
        self._check_open()
        _check_scope(scope_id)
        self._check_data_purpose(purpose)
        return await self._purpose_keys_reload(scope_id, purpose)

    async def _keys_to_decrypt(self, scope_id: str, purpose: str) -> PurposeKeys:
        """Cache miss on decrypt: load, or while the database is away, use a
        pair that was demoted for lack of confirmation (never for encrypting)."""
        try:
            return await self._purpose_keys(scope_id, purpose)
        except TransientStorageError:
            demoted = self._cache.demoted.get((scope_id, purpose))
            if demoted is None:
                raise
            return demoted

    def _check_data_purpose(self, purpose: object) -> str:
        self._check_known_purpose(purpose)
        if purpose == ROOT_PURPOSE:
            raise InvalidParameterError(
                f"{ROOT_PURPOSE!r} keys only wrap other keys; use a data key purpose"
            )
        assert isinstance(purpose, str)
        return purpose

    async def _load_purpose(self, scope_id: str, purpose: str) -> PurposeKeys:
        # The connection goes back to the pool before any wrapper is called.
        async with self._db.read() as conn:
            rows = await repo.load_purpose(conn, self._q, scope_id, purpose)
        roots = {}
        for version_id, version, wrapped in rows.root_versions:
            roots[version_id] = await self._unwrap_root(version_id, version, wrapped)
        versions = []
        for version_id, version, wrapped, root_version_id in rows.data_versions:
            root = roots.get(root_version_id)
            if root is None:
                raise StorageError(
                    f"data key version {version_id} points at a missing root key version"
                )
            key = _unwrap_local(root.aead, root_version_id, version_id, wrapped)
            versions.append(VersionKey(version_id, version, AESGCM(key), key))
        logger.debug(
            "kms_async: loaded %d %r key versions of scope %s", len(versions), purpose, scope_id
        )
        return PurposeKeys(versions, loaded_at=time.monotonic())

    async def _unknown_version(self, scope_id: str, purpose: str, key_id: str) -> AESGCM:
        """A ciphertext names a version not in the cache: reload the pair once.

        Reloads of one pair are spaced by ``_RELOAD_SPACING`` so that hostile
        ciphertexts cannot turn every call into a database query.
        """
        if _VERSION_ID.fullmatch(key_id):
            key = (scope_id, purpose)
            current = self._entries.get(key)
            if current is not None:
                wait = current.loaded_at + _RELOAD_SPACING - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                current = self._entries.get(key)
            found = None if current is None else current.find_id(key_id)
            if found is not None:
                return found
            self._check_open()
            found = (await self._purpose_keys_reload(scope_id, purpose)).find_id(key_id)
            if found is not None:
                return found
        raise UnknownKeyVersionError(
            f"ciphertext names key version {_show(key_id)}, which "
            f"{purpose!r} keys of scope {_show(scope_id)} do not have: it was revoked, or the "
            "ciphertext belongs to another scope or purpose"
        )

    # -- wrappers for callers ---------------------------------------------

    async def get_wrapper(
        self, scope_id: str, purpose: str, *, key_version_id: str | None = None
    ) -> Wrapper:
        """A wrapper over the keys of (scope, purpose).

        Without ``key_version_id``: a PooledWrapper that encrypts with the
        newest version and decrypts with any. With it: that version alone.
        For ``"rootKey"`` the wrappers hold the scope's root key versions.

        Raises:
            KeyNotFoundError: no such scope, purpose or version.
            InvalidParameterError: bad arguments.
        """
        self._check_open()
        _check_scope(scope_id)
        self._check_known_purpose(purpose)
        if key_version_id is not None:
            _check_text("key_version_id", key_version_id, MAX_SCOPE_BYTES)
        if purpose == ROOT_PURPOSE:
            versions = await self._root_versions(scope_id)
        else:
            keys = await self._purpose_keys(scope_id, purpose)
            if key_version_id is not None and keys.find_id(key_version_id) is None:
                with contextlib.suppress(UnknownKeyVersionError):
                    await self._unknown_version(scope_id, purpose, key_version_id)
                keys = self._entries.get((scope_id, purpose), keys)
            versions = list(keys.versions)
        wrappers = [AeadWrapper._from_aead(v.aead, v.key, v.id) for v in versions]
        if key_version_id is None:
            return PooledWrapper(*wrappers)
        for wrapper in wrappers:
            if wrapper.key_id == key_version_id:
                return wrapper
        raise KeyNotFoundError(
            f"unable to find specified key version ID {_show(key_version_id)} among the "
            f"{purpose!r} keys of scope {_show(scope_id)}"
        )

    async def _root_versions(self, scope_id: str) -> list[VersionKey]:
        async with self._db.read() as conn:
            root_key_id, _ = await repo.require_root_key(conn, self._q, scope_id)
            rows = await repo.root_key_versions(conn, self._q, root_key_id)
        if not rows:
            raise KeyNotFoundError(f"scope {_show(scope_id)} has no root key versions")
        unwrapped = [await self._unwrap_root(r.id, r.version, r.wrapped) for r in rows]
        return sorted(unwrapped, key=lambda v: v.version, reverse=True)

    # -- argument checks for writes ---------------------------------------

    def _check_purpose_list(self, purposes: Iterable[str] | None) -> list[str]:
        if purposes is None:
            return list(self._purposes)
        if isinstance(purposes, (str, bytes)):
            raise InvalidParameterError(
                "purposes must be a list of purposes, not one string; write [purpose]"
            )
        checked: list[str] = []
        for purpose in purposes:
            if purpose == ROOT_PURPOSE:
                raise InvalidParameterError(
                    f"{ROOT_PURPOSE!r} is a reserved key purpose; root keys are made implicitly"
                )
            self._check_data_purpose(purpose)
            if purpose in checked:
                raise InvalidParameterError(f"duplicate key purpose {purpose!r}")
            checked.append(purpose)
        return checked

    # -- writes ------------------------------------------------------------

    def _check_scope_list(self, scope_ids: Iterable[str]) -> list[str]:
        if isinstance(scope_ids, (str, bytes)):
            raise InvalidParameterError(
                "scope_ids must be a list of scope ids, not one string; write [scope_id]"
            )
        scopes = [_check_scope(scope_id) for scope_id in scope_ids]
        if not scopes:
            raise InvalidParameterError("missing scope ids")
        return scopes

    async def _new_roots(self, count: int) -> list[tuple[VersionKey, bytes]]:
        """Make ``count`` root key versions, wrapped, several wrapper calls at a time.

        Runs before any transaction opens: no connection or lock is held
        while a root key service answers.
        """
        keys = [os.urandom(KEY_SIZE) for _ in range(count)]
        wrapped = [b""] * count
        pending = iter(range(count))

        async def worker() -> None:
            for i in pending:
                wrapped[i] = await self._wrap_root(keys[i])

        workers = [asyncio.ensure_future(worker()) for _ in range(min(count, _WRAP_CONCURRENCY))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return [
            (VersionKey(new_id(ROOT_KEY_VERSION_PREFIX), 1, AESGCM(key), key), blob)
            for key, blob in zip(keys, wrapped, strict=True)
        ]

    @contextlib.asynccontextmanager
    async def _invalidating(self, scope_ids: list[str]) -> AsyncIterator[None]:
        """Drop the scopes' cached keys when a write ends, however it ends.

        A write cancelled while its commit was in flight may still have
        committed, so the cache is invalidated on every exit, not only on
        success; the next use reloads from what the database holds.
        """
        try:
            yield
        finally:
            for scope_id in scope_ids:
                self._cache.invalidate_scope(scope_id)

    async def create_keys(
        self,
        scope_id: str,
        purposes: Iterable[str] | None = None,
        *,
        conn: Any = None,
    ) -> None:
        """Create the scope's root key and a data key for each purpose.

        ``purposes`` defaults to every purpose of this KMS. With ``conn`` (your
        asyncpg or aiosqlite connection inside your open transaction) the keys
        commit or roll back with your work.

        Raises:
            InvalidParameterError: bad scope or purposes, or ``conn`` not in a transaction.
            KeyExistsError: the scope already has keys.
            KeyNotFoundError: no root wrapper is registered.
            WrapperError: the root wrapper failed.
        """
        await self.create_keys_many([scope_id], purposes, conn=conn)

    async def create_keys_many(
        self,
        scope_ids: Iterable[str],
        purposes: Iterable[str] | None = None,
        *,
        conn: Any = None,
    ) -> None:
        """:meth:`create_keys` for many scopes in one transaction: all or none.

        Raises:
            InvalidParameterError: bad or duplicate scope ids, bad purposes.
            KeyExistsError: one of the scopes already has keys; nothing was created.
            KeyNotFoundError: no root wrapper is registered.
            WrapperError: the root wrapper failed.
        """
        self._check_open()
        scopes = self._check_scope_list(scope_ids)
        if len(set(scopes)) != len(scopes):
            raise InvalidParameterError("scope_ids lists a scope more than once")
        wanted = self._check_purpose_list(purposes)
        self.get_external_root_wrapper()
        roots = await self._new_roots(len(scopes))
        new_roots = []
        data: list[tuple[str, repo.NewDataKey, VersionKey]] = []
        for scope_id, (root, wrapped) in zip(scopes, roots, strict=True):
            new_root = repo.NewRootKey(new_id(ROOT_KEY_PREFIX), scope_id, root.id, wrapped)
            new_roots.append(new_root)
            for purpose in wanted:
                key = os.urandom(KEY_SIZE)
                version = VersionKey(new_id(DATA_KEY_VERSION_PREFIX), 1, AESGCM(key), key)
                row = repo.NewDataKey(
                    new_id(DATA_KEY_PREFIX),
                    new_root.id,
                    purpose,
                    version.id,
                    root.id,
                    _wrap_local(root.aead, root.id, key),
                )
                data.append((scope_id, row, version))
        async with self._invalidating(scopes), self._db.transaction(conn) as tx:
            changed = await repo.bump_collection_version(tx, self._q)
            try:
                await repo.insert_root_keys(tx, self._q, new_roots)
            except IntegrityError as exc:
                if exc.kind != "unique":
                    raise
                which = (
                    f"scope {_show(scopes[0])} already has"
                    if len(scopes) == 1
                    else ("one of the scopes already has")
                )
                raise KeyExistsError(
                    f"{which} keys and nothing was created; use rotate_keys() to make new "
                    "versions or reconcile_keys() to add purposes"
                ) from exc
            await repo.insert_data_keys(tx, self._q, [row for _, row, _ in data])
            await repo.announce(tx, self._q, changed, scopes)
        if conn is None and len(scopes) <= _PRIME_LIMIT:
            # Committed: the first encrypt for a new scope needs no query.
            for root, _ in roots:
                self._cache.put_root(root.id, root)
            for scope_id, row, version in data:
                self._cache.put((scope_id, row.purpose), PurposeKeys([version]))
        logger.debug("kms_async: created keys for %d scope(s): %s", len(scopes), wanted)

    async def rotate_keys(self, scope_id: str, *, rewrap: bool = False, conn: Any = None) -> None:
        """Add a new root key version and a new version of each data key.

        New data is encrypted with the new versions; old versions still
        decrypt. With ``rewrap=True`` every existing key version is also
        re-wrapped (root versions by the current root wrapper, data versions
        by the new root version). Only purposes this KMS was opened with are
        rotated.

        Raises:
            KeyNotFoundError: the scope has no keys, or no root wrapper.
            WrapperError: the root wrapper failed.
            TransientStorageError: other writers kept changing the scope.
        """
        await self.rotate_keys_many([scope_id], rewrap=rewrap, conn=conn)

    async def rotate_keys_many(
        self, scope_ids: Iterable[str], *, rewrap: bool = False, conn: Any = None
    ) -> None:
        """:meth:`rotate_keys` for many scopes in one transaction: all or none.

        Raises:
            KeyNotFoundError: one of the scopes has no keys; nothing was rotated.
            WrapperError: the root wrapper failed.
            TransientStorageError: other writers kept changing the scopes.
        """
        self._check_open()
        scopes = list(dict.fromkeys(self._check_scope_list(scope_ids)))
        self.get_external_root_wrapper()
        roots = dict(zip(scopes, await self._new_roots(len(scopes)), strict=True))

        async def body(tx: Connection, plans: dict[str, _RewrapPlan]) -> None:
            await self._rotate_in(tx, roots, plans)

        targets = {scope_id: root for scope_id, (root, _) in roots.items()}
        async with self._invalidating(scopes):
            await self._write_with_retry(scopes, conn, rewrap, body, targets=targets)
        if conn is None and len(scopes) <= _PRIME_LIMIT:
            for root, _ in roots.values():
                self._cache.put_root(root.id, root)
        logger.debug("kms_async: rotated %d scope(s) (rewrap=%s)", len(scopes), rewrap)

    async def _rotate_in(
        self,
        tx: Connection,
        roots: dict[str, tuple[VersionKey, bytes]],
        plans: dict[str, _RewrapPlan],
    ) -> None:
        q = self._q
        owners = await self._root_keys_of(tx, list(roots))
        await repo.insert_rows(
            tx,
            q,
            q.insert_root_key_version,
            [(root.id, owners[scope_id], wrapped) for scope_id, (root, wrapped) in roots.items()],
        )
        new_root_of = {owners[scope_id]: root for scope_id, (root, _) in roots.items()}
        new_versions = []
        for data_key_id, root_key_id, purpose in await repo.data_keys_of_roots(
            tx, q, list(new_root_of)
        ):
            if purpose in self._purposes:
                root = new_root_of[root_key_id]
                new_versions.append(
                    repo.NewDataKey(
                        data_key_id,
                        root_key_id,
                        purpose,
                        new_id(DATA_KEY_VERSION_PREFIX),
                        root.id,
                        _wrap_local(root.aead, root.id, os.urandom(KEY_SIZE)),
                        new_key=False,
                    )
                )
        await repo.insert_data_keys(tx, q, new_versions)
        await self._apply_rewraps(tx, plans)

    async def rewrap_keys(self, scope_id: str, *, conn: Any = None) -> None:
        """Re-wrap every key version of the scope without making new versions.

        Root key versions are re-wrapped by the current root wrapper (its
        primary, for a PooledWrapper), and every data key version by the
        newest root key version. Run it for every scope after replacing the
        root wrapper; afterwards the old root key is no longer needed.

        Raises:
            KeyNotFoundError: the scope has no keys, or no root wrapper.
            WrapperError: the root wrapper failed.
            TransientStorageError: other writers kept changing the scope.
        """
        await self.rewrap_keys_many([scope_id], conn=conn)

    async def rewrap_keys_many(self, scope_ids: Iterable[str], *, conn: Any = None) -> None:
        """:meth:`rewrap_keys` for many scopes in one transaction: all or none.

        Raises:
            KeyNotFoundError: one of the scopes has no keys; nothing was rewrapped.
            WrapperError: the root wrapper failed.
            TransientStorageError: other writers kept changing the scopes.
        """
        self._check_open()
        scopes = list(dict.fromkeys(self._check_scope_list(scope_ids)))
        self.get_external_root_wrapper()

        async with self._invalidating(scopes):
            await self._write_with_retry(scopes, conn, True, self._apply_rewraps, targets=None)
        logger.debug("kms_async: rewrapped %d scope(s)", len(scopes))

    async def _write_with_retry(
        self,
        scope_ids: list[str],
        conn: Any,
        rewrap: bool,
        body: Callable[[Connection, dict[str, _RewrapPlan]], Awaitable[None]],
        *,
        targets: dict[str, VersionKey] | None,
    ) -> None:
        """Run ``body`` in one transaction, with rewrap plans if asked.

        The first attempt computes the plans from an unlocked read, so wrapper
        calls (maybe a remote root key service) run while no connection or
        write lock is held; inside the transaction the rows are read again.
        If another writer changed them in between, the next attempt builds
        the plans inside the transaction, under the write lock, which cannot
        be overtaken: contention costs holding the lock, never a failure.
        """
        for attempt in range(2):
            optimistic = rewrap and attempt == 0
            plans: dict[str, _RewrapPlan] = {}
            try:
                if optimistic:
                    plans = await self._planned(scope_ids, conn, targets)
                async with self._db.transaction(conn) as tx:
                    changed = await repo.bump_collection_version(tx, self._q)
                    if optimistic:
                        await self._check_plans(tx, plans)
                    elif rewrap:
                        snapshots = await self._snapshots(tx, scope_ids)
                        for scope_id in scope_ids:
                            target = None if targets is None else targets[scope_id]
                            plans[scope_id] = await self._plan_rewrap(
                                scope_id, snapshots[scope_id], target, locked=True
                            )
                    await body(tx, plans)
                    await repo.announce(tx, self._q, changed, scope_ids)
                return
            except _Stale:
                continue
        raise AssertionError("unreachable: the locked attempt cannot be stale")

    async def _planned(
        self, scope_ids: list[str], conn: Any, targets: dict[str, VersionKey] | None
    ) -> dict[str, _RewrapPlan]:
        """Rewrap plans for the scopes from reads outside any write transaction."""
        if conn is not None:
            async with self._db.transaction(conn) as tx:
                snapshots = await self._snapshots(tx, scope_ids)
        else:
            async with self._db.read() as reader:
                snapshots = await self._snapshots(reader, scope_ids)
        return {
            scope_id: await self._plan_rewrap(
                scope_id,
                snapshots[scope_id],
                None if targets is None else targets[scope_id],
                locked=False,
            )
            for scope_id in scope_ids
        }

    async def _plan_rewrap(
        self,
        scope_id: str,
        snapshot: tuple[str, list[repo.RootKeyVersionRow], list[repo.DataKeyVersionRow]],
        target: VersionKey | None,
        *,
        locked: bool,
    ) -> _RewrapPlan:
        """New wrappings for every key version in ``snapshot``.

        Root versions are re-wrapped by the root wrapper, data versions by
        ``target`` (a rotation's new root version) or else the newest root
        version.
        """
        root_key_id, root_rows, data_rows = snapshot
        if not root_rows:
            raise KeyNotFoundError(f"scope {_show(scope_id)} has no root key versions")
        roots: dict[str, VersionKey] = {}
        root_updates = []
        for row in root_rows:
            roots[row.id] = await self._unwrap_root(row.id, row.version, row.wrapped)
            rewrapped = await self._wrap_root(roots[row.id].key)
            root_updates.append((rewrapped, row.id, row.wrapped))
        goal = target if target is not None else roots[root_rows[-1].id]
        data_updates = []
        for d in data_rows:
            parent = roots.get(d.root_key_version_id)
            if parent is None:
                if locked:
                    raise StorageError(
                        f"data key version {d.id} points at a missing root key version (none "
                        "of its scope's); the key tables were changed outside kms_async"
                    )
                # The two reads of an unlocked snapshot straddled another
                # writer's commit; under the write lock this cannot happen.
                raise _Stale
            key = _unwrap_local(parent.aead, parent.id, d.id, d.wrapped)
            data_updates.append((_wrap_local(goal.aead, goal.id, key), goal.id, d.id, d.wrapped))
        return _RewrapPlan(root_key_id, goal.id, root_updates, data_updates)

    async def _snapshots(
        self, conn: Connection, scope_ids: list[str]
    ) -> dict[str, tuple[str, list[repo.RootKeyVersionRow], list[repo.DataKeyVersionRow]]]:
        """Each scope's root key id, root key versions and data key versions
        (three queries per 1,000 scopes)."""
        owners = await self._root_keys_of(conn, scope_ids)
        versions = await repo.key_versions_of_roots(conn, self._q, list(owners.values()))
        return {scope_id: (owners[scope_id], *versions[owners[scope_id]]) for scope_id in scope_ids}

    async def _root_keys_of(self, conn: Connection, scope_ids: list[str]) -> dict[str, str]:
        """scope id -> root key id; KeyNotFoundError names the first scope without keys."""
        owners = await repo.root_keys_of_scopes(conn, self._q, scope_ids)
        missing = [scope_id for scope_id in scope_ids if scope_id not in owners]
        if missing:
            others = f" (and {len(missing) - 1} more scopes)" if len(missing) > 1 else ""
            raise KeyNotFoundError(
                f"scope {_show(missing[0])}{others} has no keys; create them with create_keys()"
            )
        return owners

    async def _check_plans(self, tx: Connection, plans: dict[str, _RewrapPlan]) -> None:
        versions = await repo.key_versions_of_roots(
            tx, self._q, [plan.root_key_id for plan in plans.values()]
        )
        for plan in plans.values():
            root_rows, data_rows = versions[plan.root_key_id]
            now = ({(r.id, r.wrapped) for r in root_rows}, {(d.id, d.wrapped) for d in data_rows})
            if now != plan.expected:
                raise _Stale

    async def _apply_rewraps(self, tx: Connection, plans: dict[str, _RewrapPlan]) -> None:
        await tx.executemany(
            self._q.update_root_key_version_key,
            [update for plan in plans.values() for update in plan.root_updates],
        )
        await tx.executemany(
            self._q.update_data_key_version_key,
            [update for plan in plans.values() for update in plan.data_updates],
        )

    async def revoke_key_version(
        self, key_version_id: str, *, scope_id: str | None = None, conn: Any = None
    ) -> None:
        """Delete one root or data key version for good.

        Refused (nothing is deleted) for the newest version of a key; for a
        version superseded less than ``revoke_grace`` seconds ago (by the
        database clock), since other instances may still encrypt under it;
        for a root key version that data key versions still point at (run
        :meth:`rewrap_keys` first); and for a data key version that
        application rows still reference through any foreign key, including
        cascading and nulling ones (re-encrypt them first). With
        ``scope_id`` the version must belong to that scope.

        Raises:
            InvalidParameterError: not a key version id.
            KeyNotFoundError: no such version (in that scope).
            RevokeTooSoonError: superseded too recently; ``retry_after`` says
                how many seconds remain.
            KeyInUseError: the version is still needed.
        """
        self._check_open()
        if not isinstance(key_version_id, str) or not key_version_id:
            raise InvalidParameterError("missing key version id")
        _check_text("key version id", key_version_id, MAX_SCOPE_BYTES)
        if scope_id is not None:
            _check_scope(scope_id)
        is_root = key_version_id.startswith(ROOT_KEY_VERSION_PREFIX + "_")
        if not is_root and not key_version_id.startswith(DATA_KEY_VERSION_PREFIX + "_"):
            raise InvalidParameterError(
                f"{_show(key_version_id)} is not a valid key version id: it must start with "
                f"{ROOT_KEY_VERSION_PREFIX}_ or {DATA_KEY_VERSION_PREFIX}_"
            )
        q = self._q
        owners: list[str] = []
        try:
            async with self._invalidating(owners), self._db.transaction(conn) as tx:
                changed = await repo.bump_collection_version(tx, q)
                if is_root:
                    row = await tx.fetchrow(q.root_key_version_for_revoke, key_version_id)
                else:
                    row = await tx.fetchrow(q.data_key_version_for_revoke, key_version_id)
                if row is None or (scope_id is not None and row[0] != scope_id):
                    where = "" if scope_id is None else f" in scope {_show(scope_id)}"
                    raise KeyNotFoundError(f"no key version {_show(key_version_id)}{where}")
                owner, newest, superseded_for, detail = row
                owners.append(owner)
                kind = "root" if is_root else repr(detail)
                if newest:
                    raise KeyInUseError(
                        f"{key_version_id} is the newest {kind} key version of scope "
                        f"{_show(owner)}; rotate_keys() first"
                    )
                # What is still in use first: that needs work, the grace only time.
                if is_root and detail:
                    raise KeyInUseError(
                        f"{key_version_id} still wraps {detail} data key version(s); run "
                        f"rewrap_keys({_show(owner)}) so they move to the newest root key version"
                    )
                if not is_root:
                    await self._refuse_if_referenced(tx, key_version_id)
                self._check_grace(key_version_id, float(superseded_for))
                await tx.execute(
                    q.delete_root_key_version if is_root else q.delete_data_key_version,
                    key_version_id,
                )
                await repo.announce(tx, q, changed, [owner])
        except IntegrityError as exc:
            # A row that appeared since the check, under a restrict foreign
            # key, or under a deferred one (which fails at commit).
            if exc.kind != "foreign_key":
                raise
            raise KeyInUseError(
                f"{key_version_id} still protects application rows ({exc.detail}); "
                "re-encrypt them under the newest version before revoking it"
            ) from exc
        if is_root:
            self._cache.roots.pop(key_version_id, None)
        logger.debug("kms_async: revoked key version %s of scope %s", key_version_id, owner)

    def _check_grace(self, key_version_id: str, superseded_for: float) -> None:
        """Refuse to revoke what other instances may still be encrypting under."""
        remaining = self._revoke_grace - superseded_for
        if self._revoke_grace > 0 and remaining > 0:
            raise RevokeTooSoonError(
                f"{key_version_id} was superseded {max(superseded_for, 0.0):.1f} s ago; other "
                "instances may still encrypt under it until it has been superseded for "
                f"{self._revoke_grace:g} s (revoke_grace): retry in {remaining:.1f} s",
                retry_after=remaining,
            )

    async def _refuse_if_referenced(self, tx: Connection, key_version_id: str) -> None:
        """KeyInUseError if application rows use the version, whatever their foreign key does.

        A cascading or nulling foreign key would otherwise delete or blank
        the application's rows along with the key; a deferred one would fail
        only at commit.
        """
        found = await repo.version_referencers(tx, self._q, key_version_id)
        if not found:
            return
        effects = {"CASCADE": "delete", "SET NULL": "null", "SET DEFAULT": "reset"}
        table, action = found[0]
        effect = effects.get(action)
        what = (
            f"revoking it would {effect} rows of {table} (ON DELETE {action})"
            if effect
            else f"rows of {table} still use it"
        )
        raise KeyInUseError(
            f"{key_version_id} still protects application rows: {what}; re-encrypt them under "
            "the newest version (reencrypt_key_version) before revoking it"
        )

    async def reconcile_keys(
        self, scope_ids: Iterable[str], purposes: Iterable[str] | None = None
    ) -> list[tuple[str, str]]:
        """Create whatever keys are missing for the scopes and purposes.

        A scope without any keys gets a root key too. All of it is one
        transaction. ``purposes`` defaults to every purpose of this KMS.
        Returns the (scope, purpose) pairs that were created, sorted.

        Raises:
            InvalidParameterError: bad scope ids or purposes.
            KeyNotFoundError: no root wrapper is registered.
            WrapperError: the root wrapper failed.
        """
        self._check_open()
        scopes = list(dict.fromkeys(self._check_scope_list(scope_ids)))
        wanted = self._check_purpose_list(purposes)
        if not wanted:
            raise InvalidParameterError("missing purposes")
        self.get_external_root_wrapper()
        for _attempt in range(_WRITE_ATTEMPTS):
            async with self._db.read() as reader:
                missing = await repo.missing_data_keys(reader, self._q, scopes, wanted)
                with_root = sorted({m[2] for m in missing if m[2] is not None})
                latest = await repo.latest_root_key_versions(reader, self._q, with_root)
            if not missing:
                return []
            roots: dict[str, VersionKey] = {}
            for root_key_id, row in latest.items():
                roots[root_key_id] = await self._unwrap_root(row.id, row.version, row.wrapped)
            rootless = list(dict.fromkeys(m[0] for m in missing if m[2] is None))
            new_roots: dict[str, repo.NewRootKey] = {}
            fresh: list[VersionKey] = []
            for scope_id, (root, wrapped) in zip(
                rootless, await self._new_roots(len(rootless)), strict=True
            ):
                new_roots[scope_id] = repo.NewRootKey(
                    new_id(ROOT_KEY_PREFIX), scope_id, root.id, wrapped
                )
                roots[new_roots[scope_id].id] = root
                fresh.append(root)
            rows = []
            for scope_id, purpose, existing_root in missing:
                owner = existing_root if existing_root is not None else new_roots[scope_id].id
                if owner not in roots:
                    break  # a root key without versions appeared; read again
                root = roots[owner]
                rows.append(
                    repo.NewDataKey(
                        new_id(DATA_KEY_PREFIX),
                        owner,
                        purpose,
                        new_id(DATA_KEY_VERSION_PREFIX),
                        root.id,
                        _wrap_local(root.aead, root.id, os.urandom(KEY_SIZE)),
                    )
                )
            else:
                try:
                    async with (
                        self._invalidating([m[0] for m in missing]),
                        self._db.transaction() as tx,
                    ):
                        changed = await repo.bump_collection_version(tx, self._q)
                        await repo.insert_root_keys(tx, self._q, list(new_roots.values()))
                        await repo.insert_data_keys(tx, self._q, rows)
                        await repo.announce(tx, self._q, changed, [m[0] for m in missing])
                except IntegrityError as exc:
                    # Another process created some of these keys, or revoked a
                    # root version we used, since the read: read again.
                    if exc.kind not in ("unique", "foreign_key"):
                        raise
                    continue
                for version in fresh[:_PRIME_LIMIT]:
                    self._cache.put_root(version.id, version)
                created = sorted((m[0], m[1]) for m in missing)
                logger.debug("kms_async: reconcile created %d data keys", len(created))
                return created
        raise TransientStorageError("other processes kept creating the same keys; retry")

    # -- reads -------------------------------------------------------------

    async def list_keys(self, scope_id: str) -> list[Key]:
        """The scope's root key and data keys with their versions, oldest first.

        The root key comes first, then data keys by purpose.

        Raises:
            KeyNotFoundError: the scope has no keys.
        """
        self._check_open()
        _check_scope(scope_id)
        q = self._q
        to_time = self._db.to_datetime
        async with self._db.read() as conn:
            root_key_id, root_created = await repo.require_root_key(conn, q, scope_id)
            data_rows = await repo.data_keys(conn, q, root_key_id)
            root_rows, version_rows = (await repo.key_versions_of_roots(conn, q, [root_key_id]))[
                root_key_id
            ]
        keys = [
            Key(
                id=root_key_id,
                scope=scope_id,
                type="kek",
                purpose=ROOT_PURPOSE,
                create_time=to_time(root_created),
                versions=tuple(
                    KeyVersion(r.id, r.version, to_time(r.create_time)) for r in root_rows
                ),
            )
        ]
        for data_key_id, purpose, created in sorted(data_rows, key=lambda r: r[1]):
            versions = sorted(
                (v for v in version_rows if v.data_key_id == data_key_id), key=lambda v: v.version
            )
            keys.append(
                Key(
                    id=data_key_id,
                    scope=scope_id,
                    type="dek",
                    purpose=purpose,
                    create_time=to_time(created),
                    versions=tuple(
                        KeyVersion(v.id, v.version, to_time(v.create_time)) for v in versions
                    ),
                )
            )
        return keys

    async def list_data_key_version_referencers(self) -> list[str]:
        """Tables with a foreign key to ``<prefix>_data_key_version``, each once, sorted."""
        self._check_open()
        async with self._db.read() as conn:
            return await repo.referencing_tables(conn, self._q)

    async def list_scopes(self, *, after: str | None = None, limit: int = 1000) -> list[Scope]:
        """One page of the scopes that have keys, in the database's order of scope ids.

        Pass the last id of a page as ``after`` to get the next page; a page
        shorter than ``limit`` is the last. Each page is one indexed query,
        so paging holds no transaction open and works as well at the
        millionth scope as at the first; :meth:`iter_scopes` does the paging.

        Raises:
            InvalidParameterError: ``after`` is not a valid scope id, or
                ``limit`` is not a whole number from 1 to 10,000.
        """
        self._check_open()
        if after is not None:
            _check_scope(after)
        self._check_page_size("limit", limit)
        async with self._db.read() as conn:
            return await repo.scopes_after(conn, self._q, after or "", limit, self._db.to_datetime)

    def iter_scopes(self, *, batch_size: int = 1000) -> AsyncIterator[Scope]:
        """Every scope that has keys, in the database's order of scope ids.

        Reads :meth:`list_scopes` pages of ``batch_size`` as it goes, so only
        one page is ever in memory. A scope created or deleted meanwhile is
        seen if the iteration has not passed its id yet.

        Raises:
            InvalidParameterError: ``batch_size`` is not a whole number from 1
                to 10,000 (raised by this call, before iterating).
            ClosedError: the KMS was closed.
        """
        self._check_open()
        self._check_page_size("batch_size", batch_size)

        async def pages() -> AsyncIterator[Scope]:
            after: str | None = None
            while True:
                page = await self.list_scopes(after=after, limit=batch_size)
                for scope in page:
                    yield scope
                if len(page) < batch_size:
                    return
                after = page[-1].id

        return pages()

    async def get_scopes(self, scope_ids: Iterable[str]) -> list[Scope]:
        """The scopes among ``scope_ids`` that have keys, in the order given, each once.

        Scopes without keys are left out. Any number of ids is read in
        batches.

        Raises:
            InvalidParameterError: ``scope_ids`` is one string, or holds an
                invalid scope id.
        """
        self._check_open()
        if isinstance(scope_ids, (str, bytes)):
            raise InvalidParameterError(
                "scope_ids must be a list of scope ids, not one string; write [scope_id]"
            )
        wanted = list(dict.fromkeys(_check_scope(scope_id) for scope_id in scope_ids))
        async with self._db.read() as conn:
            return await repo.scopes_by_id(conn, self._q, wanted, self._db.to_datetime)

    async def database_time(self) -> datetime.datetime:
        """The database's current time, in UTC: the clock that sets every ``create_time``.

        Compare key ages with this rather than the local clock, which may
        differ. SQLite keeps whole seconds.

        Raises:
            StorageError: the database failed.
        """
        self._check_open()
        async with self._db.read() as conn:
            return await repo.database_time(conn, self._q, self._db.to_datetime)

    @staticmethod
    def _check_page_size(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
            raise InvalidParameterError(
                f"{name} must be a whole number from 1 to 10000, not {value!r}"
            )

    # -- keeping the cache fresh (logic in _freshness) ----------------------

    async def refresh(self) -> None:
        """Check now for key changes made elsewhere and reload what changed.

        The background check calls this every ``max_staleness / 2`` seconds
        (and PostgreSQL notifications trigger targeted checks sooner); cached
        keys keep serving while changed pairs reload.

        Raises:
            StorageError: the database could not be read; nothing was
                marked as seen, so the next check compares again.
        """
        self._check_open()
        await self._freshness.refresh()

    async def _purpose_keys_reload(self, scope_id: str, purpose: str) -> PurposeKeys:
        """Load the pair again (shared with any concurrent load) and cache it."""
        return await self._cache.load(
            (scope_id, purpose), lambda: self._load_purpose(scope_id, purpose)
        )

    # -- re-encrypting application rows (logic in _reencrypt) ----------------

    async def version_usage(
        self, columns: Sequence[EncryptedColumn], *, key_version_id: str | None = None
    ) -> list[VersionUsage]:
        """Rows per (table, data key version) of the described columns, sorted.

        The dry run of :meth:`destroy_key_version`: what uses which version,
        or only ``key_version_id``. A table with two described columns counts
        a row once per column.

        Raises:
            InvalidParameterError: a bad description, a name missing from the
                database, or a column without a foreign key to the data key
                version table.
        """
        return await _reencrypt.version_usage(self, columns, key_version_id=key_version_id)

    async def reencrypt_key_version(
        self,
        key_version_id: str,
        columns: Sequence[EncryptedColumn],
        *,
        batch_size: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> ReencryptReport:
        """Re-encrypt every described row using a data key version under the newest one.

        Each row is decrypted with its scope, purpose and AAD and encrypted
        again under the newest version of that (scope, purpose); ciphertext
        and key version column change together, ``batch_size`` rows per
        transaction, and ``progress(n)`` is called after each committed
        batch. The application keeps running meanwhile. Safe to cancel, to
        run again after a failure (it continues) and to run twice at once.

        Raises:
            InvalidParameterError: bad arguments or descriptions (see
                :meth:`version_usage`).
            KeyNotFoundError: no such data key version.
            KeyInUseError: it is the newest version of its key; rotate first.
            DecryptionError: a row cannot be decrypted (the message names the
                table and primary key); batches committed before stay.
        """
        return await _reencrypt.reencrypt_key_version(
            self, key_version_id, columns, batch_size=batch_size, progress=progress
        )

    async def destroy_key_version(
        self,
        key_version_id: str,
        columns: Sequence[EncryptedColumn],
        *,
        batch_size: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> ReencryptReport:
        """Re-encrypt every row using a data key version, then revoke the version.

        ``columns`` must describe every column with a foreign key to the data
        key version table, so that no row can be left behind.

        Raises:
            InvalidParameterError: as :meth:`reencrypt_key_version`, or a
                referencing column is not described.
            KeyNotFoundError: no such data key version.
            KeyInUseError: it is the newest version of its key (rotate
                first), or rows using it kept appearing.
            DecryptionError: a row cannot be decrypted; nothing was revoked.
        """
        return await _reencrypt.destroy_key_version(
            self, key_version_id, columns, batch_size=batch_size, progress=progress
        )
