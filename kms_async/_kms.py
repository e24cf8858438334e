"""The KMS facade: lifecycle, the hot path, and thin public methods.

The work lives below it: key loading and root unwrapping in ``_keyring``,
every write in ``_writer``, cache freshness in ``_freshness``, argument
checks in ``_validate``, re-encryption of application rows in
``_reencrypt``, and every SQL statement in ``_sql``. Only the hot path
(``encrypt``/``decrypt`` of a cached pair) is written out here, because a
function call less per operation is measurable; it knows the cache entry
layout, and nothing else outside ``_cache`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

import anyio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _reencrypt
from ._batch import aad_list, item_list, open_many, seal_many
from ._blob import (
    NONCE_SIZE,
    SEALED_HEADERS,
    TAG_SIZE,
    BlobInfo,
    Layout,
    decode,
    encode_suffix,
    envelope_header,
    envelope_layout,
    field_length,
    nonce_batch,
    nonces,
    sealed_header,
    take_nonce,
)
from ._cache import KeyCache, PurposeKeys, Refusal
from ._durability import Durability
from ._errors import (
    ClosedError,
    DecryptionError,
    ForeignContextError,
    InvalidParameterError,
    KeyNotFoundError,
    KMSError,
    Remedy,
    SchemaVersionError,
    UnknownKeyVersionError,
    advised,
)
from ._events import Actor, Callback, Events, RefusalReason, refusal_reason
from ._freshness import Freshness
from ._ids import DATA_KEY_VERSION_PREFIX, ID_LENGTH
from ._keyring import Keyring
from ._metrics import Readings, Stats, check_provider, global_provider, instrument
from ._migrations import SCHEMA_VERSION
from ._reencrypt import EncryptedColumn, ReencryptReport, VersionUsage
from ._resource import AsyncResource
from ._sql import DEFAULT_POOL_TIMEOUT, Database, open_database
from ._sql import _store as repo
from ._types import (
    ROOT_PURPOSE,
    CensusRow,
    Key,
    KeyVersion,
    KeyVersionInfo,
    ReplicaReads,
    RotationPolicy,
    Scope,
)
from ._usage import Usage
from ._validate import (
    MAX_SCOPE_BYTES,
    check_data_purpose,
    check_key_version_id,
    check_known_purpose,
    check_list,
    check_open_purposes,
    check_page_size,
    check_purpose_list,
    check_scope,
    check_scope_list,
    check_seconds,
    check_text,
    show,
)
from ._wrappers import PooledWrapper, Wrapper, aead_wrapper
from ._writer import Writer

__all__ = ["DEFAULT_REVOKE_GRACE", "KMS"]

logger = logging.getLogger("kms_async")

#: Default seconds a superseded version must wait before it can be revoked.
DEFAULT_REVOKE_GRACE = 60.0
#: Default seconds a key write waits for a standby under durability="replicated".
DEFAULT_DURABILITY_TIMEOUT = 5.0

#: Length of the key_info suffix naming a data key version id.
_SUFFIX_SIZE = len(encode_suffix(f"{DATA_KEY_VERSION_PREFIX}_{'0' * ID_LENGTH}"))
_TAIL = slice(-_SUFFIX_SIZE, None)
_FIELD_1 = b"\x0a"
_FIRST_BYTE = slice(0, 1)
#: From this size on, decrypt slices through a memoryview instead of copying.
_COPY_LIMIT = 4096
#: envelope_layout() by envelope size, filled on first use (False: none fits),
#: for the sizes where a few hundred nanoseconds matter: at most about 3 MB
#: once every size has been seen.
_LAYOUTS_LIMIT = 0x4000
_LAYOUTS: list[Layout | Literal[False] | None] = [None] * _LAYOUTS_LIMIT
_join = b"".join


def _read_layout(ciphertext: bytes, size: int) -> Layout | Literal[False]:
    """The layout of an envelope too large for the table, read from its header."""
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
    if ciphertext[0] != 0x0A or start + length != size - _SUFFIX_SIZE:
        return False
    nonce_end = start + NONCE_SIZE
    return (_FIELD_1, _FIRST_BYTE, slice(start, nonce_end), slice(nonce_end, start + length))


def _version() -> str:
    from . import __version__

    return __version__


def _layout(size: int) -> Layout | Literal[False]:
    found = envelope_layout(size, _SUFFIX_SIZE)
    layout: Layout | Literal[False] = False if found is None else found
    if size < _LAYOUTS_LIMIT:
        _LAYOUTS[size] = layout
    return layout


#: What one item of a batch weighs against ``offload_threshold``, on top of its
#: bytes: a batch of many small items also runs in a worker thread once it
#: would hold the event loop about as long as one large payload.
_ITEM_WEIGHT = 1024

#: Open instances, so a forked child can make the ones it inherited unusable.
_instances: weakref.WeakSet[KMS] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for kms in list(_instances):
        kms._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _seal_envelope(
    aead: AESGCM | Refusal, nonce: bytes, plaintext: bytes, aad: bytes | None, suffix: bytes
) -> bytes:
    """Encrypt and build the envelope (run in a worker thread for large payloads)."""
    sealed = aead.encrypt(nonce, plaintext, aad)
    return b"".join((envelope_header(len(sealed) + NONCE_SIZE), nonce, sealed, suffix))


class KMS(AsyncResource):
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
        cache_size: int,
        max_staleness: float | None,
        revoke_grace: float,
        offload_threshold: int | None,
        usage_flush_interval: float | None = None,
        on_event: Callback | None = None,
        actor: str | None = None,
        durability: Literal["local", "replicated"] = "local",
        durability_timeout: float = DEFAULT_DURABILITY_TIMEOUT,
    ) -> None:
        self._closed = False
        # Counted by the hot path when metrics are on (one integer increment
        # per call, see _counted_encrypt); batches count apart, so cache hits
        # can be told from values.
        self._encryptions = 0
        self._decryptions = 0
        self._batch_encrypted = 0
        self._batch_decrypted = 0
        # Connections belong to the process and the event loop that opened them.
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db = database
        self._q = database.queries
        self._purposes = purposes
        self._stats = Stats()
        self._events = Events(on_event, Actor.of_this_process(actor))
        self._cache = KeyCache(cache_size, purposes, self._stats)
        # The hot path reads the LRU directly.
        self._entries = self._cache.entries
        self._offload_threshold = sys.maxsize if offload_threshold is None else offload_threshold
        self._durability = Durability(database, durability, durability_timeout)
        self._keyring = Keyring(database, self._cache, purposes, self._durability)
        self._writer = Writer(
            database, self._keyring, self._cache, revoke_grace, self._events, self._durability
        )
        self._freshness = Freshness(
            database,
            self._cache,
            self._keyring.reload_changed,
            max_staleness,
            self._keyring.horizon,
        )
        self._usage = Usage(database, self._cache, usage_flush_interval)
        self._watcher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
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
        check_root_wrapper: bool = True,
        integrity: Literal["bind", "strict"] = "bind",
        durability: Literal["local", "replicated"] = "local",
        durability_timeout: float = DEFAULT_DURABILITY_TIMEOUT,
        usage_flush_interval: float | None = 5.0,
        auto_rotate: bool = True,
        pooler: Literal["auto", "transaction", "none"] = "auto",
        listen_dsn: str | None = None,
        read_dsn: object = None,
        on_event: Callback | None = None,
        actor: str | None = None,
        meter_provider: Any = None,
        metrics: bool = False,
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
            check_root_wrapper: check that ``root_wrapper`` unwraps one of a
                few root key versions of the database (if it has any) and
                refuse to open if it unwraps none: a wrong root key is caught
                at startup. Costs up to three root wrapper calls; turn it off
                for a wrapper that charges per call (writes still prove the
                wrapper before they wrap anything).
            integrity: ``"bind"`` (the default) writes a binding for every new
                key version and a key state record per scope, verifies them on
                every cold load, and accepts versions without a binding
                (written by the Go package), logging and listing them
                (``KeyVersion.bound``). ``"strict"`` refuses unbound versions
                too, and needs schema file 06. See SECURITY.md.
            durability: ``"local"`` (the default): a new key version is used
                once it is committed on the database server, and survives
                what that server survives. ``"replicated"`` (PostgreSQL with
                streaming standbys): create, rotate and reconcile write only
                while a standby is streaming, and a new version is used (and
                the call returns) only once a standby has it, so that a
                failover cannot lose a version that encrypted anything. With
                synchronous standbys configured the key transaction commits
                with ``synchronous_commit = on``; without, the write waits for
                a standby's reported flush position. See the deployment guide.
            durability_timeout: seconds a key write (or a cold load after
                one) waits for a standby under ``"replicated"`` before raising
                DurabilityTimeoutError.
            usage_flush_interval: seconds between additions of this
                instance's encryption counts to the usage table (schema file
                07), which sums them over every instance for :meth:`census`
                and :meth:`rotate_due`; they are added on :meth:`aclose`
                too. A crash loses at most one interval's counts. ``None``
                turns counting off (so does a database without the table,
                with one log line).
            auto_rotate: rotate a scope on its own, logging a warning, once
                the newest version of one of its data keys has
                2^31 encryptions counted over the fleet (AES-GCM with random
                nonces must stay under 2^32 per key); checked after each
                flush. Needs counting and a root wrapper.
            pooler: on PostgreSQL, whether a connection pooler in transaction
                mode (PgBouncer's ``pool_mode = transaction``) stands between
                the KMS and the server. Behind one, consecutive statements
                may run in different server sessions: the KMS then uses no
                named prepared statements and no session state, and listens
                for key changes only through ``listen_dsn`` (else it polls).
                ``"auto"`` (the default) finds out when it connects (a pooler
                answers with a process id of its own); ``"transaction"`` says
                so without asking; ``"none"`` for a direct connection or a
                pooler in session mode. A caller's pool behind such a pooler
                must be created with ``statement_cache_size=0``.
            listen_dsn: on PostgreSQL, a DSN reaching the primary directly
                (not through a pooler) on which one dedicated connection
                LISTENs for other instances' key changes. Needed for
                notifications behind a pooler in transaction mode; also lets
                a KMS on a caller's pool listen without holding one of its
                connections (notifications then default to on).
            read_dsn: on PostgreSQL, a read replica (a streaming standby) for
                cold loads of keys, as a DSN or an asyncpg ``Pool`` (which
                stays the caller's). Each load is read from the replica
                together with the change counter of the snapshot it came
                from, and is used only if the replica has replayed every key
                change this instance knows of (its own writes, what its
                checks saw, its loads from the primary); otherwise, when
                the pair is not there, or when the replica fails, the load
                goes to the primary (see
                :attr:`replica_reads`). Reloads of cached pairs that changed,
                writes, checks and everything else always use ``db``.
            on_event: called with a :class:`KeyEvent` for every key change
                committed through this instance and a
                :class:`DecryptionRefused` for every refused decryption (see
                docs/how-to/observe.md). A plain function is called inline
                after the commit; a coroutine function runs in a task of
                its own, events in order, and ``aclose`` waits up to 5 s for
                it. Errors it raises are logged, never raised.
            actor: a name for who makes changes through this instance (a
                service name, say), reported in every event's ``actor``
                beside the process's user, host and pid.
            meter_provider: an OpenTelemetry ``MeterProvider``: report
                metrics through it (needs ``pip install 'kms-async[otel]'``).
            metrics: ``True`` reports metrics through OpenTelemetry's global
                meter provider (``opentelemetry.metrics.get_meter_provider()``
                at open time). Metrics are off unless one of these is given.

        Raises:
            InvalidParameterError: an argument is not usable.
            SchemaVersionError: the schema is missing or at another version.
            StorageError: the database cannot be reached.
            WrapperError: ``root_wrapper`` holds another root key than the
                database's (see ``check_root_wrapper``).
        """
        checked = check_open_purposes(purposes)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise InvalidParameterError("cache_size must be a positive integer")
        if offload_threshold is not None and (
            isinstance(offload_threshold, bool)
            or not isinstance(offload_threshold, int)
            or offload_threshold < 1
        ):
            raise InvalidParameterError("offload_threshold must be a positive integer or None")
        check_seconds("max_staleness", max_staleness, none=True)
        check_seconds("revoke_grace", revoke_grace, zero=True)
        check_seconds("pool_timeout", pool_timeout)
        check_seconds("usage_flush_interval", usage_flush_interval, none=True)
        if not isinstance(auto_rotate, bool):
            raise InvalidParameterError(f"auto_rotate must be True or False, not {auto_rotate!r}")
        if integrity not in ("bind", "strict"):
            raise InvalidParameterError(f"integrity must be 'bind' or 'strict', not {integrity!r}")
        if durability not in ("local", "replicated"):
            raise InvalidParameterError(
                f"durability must be 'local' or 'replicated', not {durability!r}"
            )
        check_seconds("durability_timeout", durability_timeout)
        if on_event is not None and not callable(on_event):
            raise InvalidParameterError(
                f"on_event must be a function or coroutine function, not {type(on_event).__name__}"
            )
        if actor is not None:
            check_text("actor", actor, MAX_SCOPE_BYTES)
        if not isinstance(metrics, bool):
            raise InvalidParameterError("metrics must be True or False")
        if meter_provider is not None:
            check_provider(meter_provider)
        elif metrics:
            meter_provider = global_provider()
        database = await open_database(
            db,
            prefix=table_prefix,
            pool_timeout=pool_timeout,
            pooler=pooler,
            listen_dsn=listen_dsn,
            read_dsn=read_dsn,
        )
        # With metrics, a subclass whose hot path counts; without, this one, unchanged.
        kind = cls if meter_provider is None else _metered(cls)
        kms: KMS | None = None
        try:
            kms = kind(
                database,
                purposes=checked,
                cache_size=cache_size,
                max_staleness=max_staleness,
                revoke_grace=float(revoke_grace),
                offload_threshold=offload_threshold,
                usage_flush_interval=usage_flush_interval,
                on_event=on_event,
                actor=actor,
                durability=durability,
                durability_timeout=float(durability_timeout),
            )
            if durability == "replicated" and not database.has_standbys():
                raise InvalidParameterError(
                    f"durability='replicated' needs PostgreSQL with streaming standbys; a "
                    f"{database.dialect} database has none: use durability='local'"
                )
            kms._events.bind_loop(asyncio.get_running_loop())
            if meter_provider is not None:
                instrument(
                    meter_provider,
                    kms._metric_readings(),
                    {"kms_async.dialect": database.dialect},
                    kms._stats,
                    _version(),
                )
            if root_wrapper is not None:
                kms.add_external_wrapper(ROOT_PURPOSE, root_wrapper)
            kms._loop = asyncio.get_running_loop()
            kms._keyring.integrity = integrity
            await kms.validate_schema()
            if root_wrapper is not None and check_root_wrapper:
                await kms._keyring.prove_any(None, at_open=True)
            channel = await database.find_notify_channel()
            await kms._freshness.start()
            await kms._usage.start()
            if integrity == "strict" and not database.queries.has_bindings:
                raise SchemaVersionError(
                    "integrity='strict' needs the key binding tables "
                    f"({database.queries.binding_table}); run kms_async.migrate() or apply "
                    "sql/<dialect>/06_kms_key_binding.up.sql with your migration tool"
                )
            listen = channel is not None and (
                notifications
                or (notifications is None and (isinstance(db, str) or listen_dsn is not None))
            )
            if database.pooled:
                listen = kms._behind_pooler(listen, notifications, max_staleness)
            elif listen and max_staleness is not None and not database.can_listen():
                raise InvalidParameterError(
                    "notifications=True would hold the only connection of your pool; "
                    "give the pool max_size=2 or more, or leave notifications off"
                )
        except BaseException:
            if kms is not None:
                kms._events.cancel()
            await database.aclose()
            raise
        if max_staleness is not None:
            loop = asyncio.get_running_loop()
            kms._watcher = loop.create_task(kms._freshness.watch(lambda: kms._closed))
            if listen and channel is not None:
                kms._listener = loop.create_task(
                    database.listen_forever(channel, kms._freshness.on_notification)
                )
        if kms._usage.counting:
            kms._flusher = asyncio.get_running_loop().create_task(
                kms._usage.run(kms._rotate_worn if auto_rotate else None)
            )
        logger.debug("kms_async: opened %s database, purposes %s", database.dialect, checked)
        return kms

    def _behind_pooler(
        self, listen: bool, notifications: bool | None, max_staleness: float | None
    ) -> bool:
        """Whether to listen, behind a pooler in transaction mode; says which in one line."""
        if max_staleness is None:
            how = "not at all (max_staleness=None)"
        elif listen and self._db.can_listen():
            how = f"by notifications through listen_dsn ({self._db.listens_on})"
        elif listen or notifications:
            how = (
                f"by polling every {max_staleness / 2:g} s: LISTEN does not work through such "
                "a pooler; pass listen_dsn= with a direct connection for notifications"
            )
        else:
            how = f"by polling every {max_staleness / 2:g} s"
        logger.log(
            logging.WARNING if notifications and "polling" in how else logging.INFO,
            "kms_async: the database connection goes through a pooler in transaction mode "
            "(PgBouncer?): no prepared statements, no session state; other instances' key "
            "changes arrive %s",
            how,
        )
        return listen and self._db.can_listen()

    @property
    def replica_reads(self) -> ReplicaReads:
        """Where cold loads went since the KMS opened with ``read_dsn`` (zeros without)."""
        return self._keyring.replica_reads

    async def aclose(self) -> None:
        """Drop every cached key and close what the KMS opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cache.clear()
        self._keyring.clear()
        self._freshness.stop()
        if os.getpid() != self._pid:
            # A forked child: the connections are the parent's; closing them
            # here would break them there. Drop them without any I/O.
            return
        try:
            await self._events.aclose()
            tasks = [t for t in (self._watcher, self._listener, self._flusher) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._cache.drain()
            await self._usage.close()
        finally:
            self._cache.clear()
            await self._db.aclose()

    def _metric_readings(self) -> Callable[[], Readings | None]:
        """What the metrics read at collection time (None once closed); holds no
        strong reference, so a forgotten KMS is not kept alive by its meter provider."""
        ref = weakref.ref(self)

        def read() -> Readings | None:
            kms = ref()
            if kms is None or kms._closed:
                return None
            stats = kms._stats
            lookups = kms._encryptions + kms._decryptions + stats.batch_lookups
            return Readings(
                encryptions=kms._encryptions + kms._batch_encrypted,
                decryptions=kms._decryptions + kms._batch_decrypted,
                cache_hits=max(0, lookups - stats.misses),
                loads=stats.loads,
                evictions=stats.evictions,
                cache_size=len(kms._entries),
                staleness=(
                    None
                    if kms._freshness.max_staleness is None
                    else max(0.0, time.monotonic() - kms._freshness.confirmed_at)
                ),
                refusals=dict(kms._events.refusals),
                changes=dict(kms._events.changes),
            )

        return read

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

    def add_external_wrapper(self, purpose: str, wrapper: Wrapper) -> None:
        """Register the wrapper for ``purpose``; ``"rootKey"`` sets the root wrapper.

        A wrapper replaces any registered before it; cached keys stay valid.
        To replace the root of trust, register ``PooledWrapper(new, old)`` and
        run :meth:`rewrap_keys` for every scope.

        Raises:
            InvalidParameterError: unknown purpose, or ``wrapper`` is not a Wrapper.
        """
        self._check_open()
        # add_wrapper checks the purpose; a bad one must not reach the dict first.
        before = self._keyring.wrappers.get(purpose) if isinstance(purpose, str) else None
        self._keyring.add_wrapper(purpose, wrapper)
        if purpose == ROOT_PURPOSE and before is not wrapper:
            key_id = getattr(wrapper, "key_id", None)
            self._events.changed(
                "root_wrapper_added" if before is None else "root_wrapper_replaced",
                1,
                lambda: [(None, ROOT_PURPOSE, None)],
                detail=f"key id {key_id}" if isinstance(key_id, str) else None,
            )

    def get_external_wrapper(self, purpose: str) -> Wrapper:
        """The wrapper registered for ``purpose``.

        Raises:
            InvalidParameterError: unknown purpose.
            KeyNotFoundError: nothing registered for it.
        """
        self._check_open()
        return self._keyring.wrapper(purpose)

    def get_external_root_wrapper(self) -> Wrapper:
        """The root wrapper.

        Raises:
            KeyNotFoundError: none registered.
        """
        self._check_open()
        return self._keyring.root_wrapper()

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
            raise advised(
                SchemaVersionError,
                f"invalid schema version, expected version {SCHEMA_VERSION} and got {version}",
                "run kms_async.migrate() or apply the sql/ files with your migration tool",
                Remedy("migrate"),
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
            keys = await self._missed(scope_id, purpose)
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
                envelope = await anyio.to_thread.run_sync(
                    _seal_envelope, keys.aead, nonce, plaintext, aad, keys.suffix
                )
                keys.tally.n += 1
                return envelope
        except (TypeError, BufferError, OverflowError):
            # Not bytes-like, not contiguous, or 2 GiB or more (AES-GCM's limit here).
            raise InvalidParameterError(
                "plaintext and aad must be contiguous bytes of less than 2 GiB"
            ) from None
        # Usage counting (see _usage): the whole cost on the hot path.
        keys.tally.n += 1
        # sealed_header(), inlined for the common sizes: one call less.
        size = len(sealed)
        header = SEALED_HEADERS[size] if size < 0x4000 else None
        if header is None:
            header = sealed_header(size)
        return _join((header, nonce, sealed, keys.suffix))

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
            keys = await self._missed(scope_id, purpose, decrypting=True, ciphertext=ciphertext)
        if type(ciphertext) is bytes:
            # Fast path: an envelope this library wrote is field 1 with the
            # shortest length varint, then key_info naming one of the cached
            # versions. Where each part is depends only on the size.
            size = len(ciphertext)
            if size < _LAYOUTS_LIMIT:
                layout = _LAYOUTS[size]
                if layout is None:
                    layout = _layout(size)
            else:
                layout = _read_layout(ciphertext, size)
            if layout:
                header, header_at, nonce_at, body_at = layout
                tail = ciphertext[_TAIL]
                aead: AESGCM | Refusal | None = (
                    keys.aead if tail == keys.suffix else keys.find(tail)
                )
                if aead is not None and ciphertext[header_at] == header:
                    try:
                        if size < _COPY_LIMIT and size < self._offload_threshold:
                            return aead.decrypt(ciphertext[nonce_at], ciphertext[body_at], aad)
                        body = memoryview(ciphertext)[body_at]
                        if size < self._offload_threshold:
                            return aead.decrypt(ciphertext[nonce_at], body, aad)
                        return await anyio.to_thread.run_sync(
                            aead.decrypt, ciphertext[nonce_at], body, aad
                        )
                    except InvalidTag:
                        self._refused(scope_id, purpose, keys.named_by(tail), "authentication")
                        raise DecryptionError(
                            "decryption failed: wrong AAD, wrong scope or purpose, "
                            "or tampered ciphertext"
                        ) from None
                    except (TypeError, BufferError, OverflowError):
                        raise InvalidParameterError("aad must be contiguous bytes") from None
                    except KMSError as exc:  # a suspended or unusable version's Refusal
                        self._refused_by(scope_id, purpose, exc, ciphertext)
                        raise
        try:
            blob = decode(ciphertext)
        except DecryptionError:
            self._refused(scope_id, purpose, None, "malformed")
            raise
        return await self._decrypt_blob(scope_id, purpose, keys, blob, aad)

    # -- the hot path, counted (metrics on) ----------------------------------
    #
    # The same two methods plus one integer increment each: a KMS opened with
    # metrics is an instance of a subclass that uses these (see _metered), so
    # that a KMS without metrics runs the hot path above unchanged.
    # tests/test_metrics.py checks that they are the hot path plus the
    # counter, statement for statement.

    async def _counted_encrypt(
        self, scope_id: str, purpose: str, plaintext: bytes, *, aad: bytes | None = None
    ) -> bytes:
        """:meth:`encrypt`, counting each call for the metrics (see _metrics)."""
        try:
            keys = self._entries[(scope_id, purpose)]
            keys.used = True
        except KeyError:
            keys = None  # loaded below, so a miss does not chain a KeyError into errors
        except TypeError:
            raise InvalidParameterError("scope id and purpose must be strings") from None
        if keys is None:
            keys = await self._missed(scope_id, purpose)
        self._encryptions += 1
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
                envelope = await anyio.to_thread.run_sync(
                    _seal_envelope, keys.aead, nonce, plaintext, aad, keys.suffix
                )
                keys.tally.n += 1
                return envelope
        except (TypeError, BufferError, OverflowError):
            # Not bytes-like, not contiguous, or 2 GiB or more (AES-GCM's limit here).
            raise InvalidParameterError(
                "plaintext and aad must be contiguous bytes of less than 2 GiB"
            ) from None
        # Usage counting (see _usage): the whole cost on the hot path.
        keys.tally.n += 1
        # sealed_header(), inlined for the common sizes: one call less.
        size = len(sealed)
        header = SEALED_HEADERS[size] if size < 0x4000 else None
        if header is None:
            header = sealed_header(size)
        return _join((header, nonce, sealed, keys.suffix))

    async def _counted_decrypt(
        self, scope_id: str, purpose: str, ciphertext: bytes, *, aad: bytes | None = None
    ) -> bytes:
        """:meth:`decrypt`, counting each call for the metrics (see _metrics)."""
        try:
            keys = self._entries[(scope_id, purpose)]
            keys.used = True
        except KeyError:
            keys = None  # loaded below, so a miss does not chain a KeyError into errors
        except TypeError:
            raise InvalidParameterError("scope id and purpose must be strings") from None
        if keys is None:
            keys = await self._missed(scope_id, purpose, decrypting=True, ciphertext=ciphertext)
        self._decryptions += 1
        if type(ciphertext) is bytes:
            # Fast path: an envelope this library wrote is field 1 with the
            # shortest length varint, then key_info naming one of the cached
            # versions. Where each part is depends only on the size.
            size = len(ciphertext)
            if size < _LAYOUTS_LIMIT:
                layout = _LAYOUTS[size]
                if layout is None:
                    layout = _layout(size)
            else:
                layout = _read_layout(ciphertext, size)
            if layout:
                header, header_at, nonce_at, body_at = layout
                tail = ciphertext[_TAIL]
                aead: AESGCM | Refusal | None = (
                    keys.aead if tail == keys.suffix else keys.find(tail)
                )
                if aead is not None and ciphertext[header_at] == header:
                    try:
                        if size < _COPY_LIMIT and size < self._offload_threshold:
                            return aead.decrypt(ciphertext[nonce_at], ciphertext[body_at], aad)
                        body = memoryview(ciphertext)[body_at]
                        if size < self._offload_threshold:
                            return aead.decrypt(ciphertext[nonce_at], body, aad)
                        return await anyio.to_thread.run_sync(
                            aead.decrypt, ciphertext[nonce_at], body, aad
                        )
                    except InvalidTag:
                        self._refused(scope_id, purpose, keys.named_by(tail), "authentication")
                        raise DecryptionError(
                            "decryption failed: wrong AAD, wrong scope or purpose, "
                            "or tampered ciphertext"
                        ) from None
                    except (TypeError, BufferError, OverflowError):
                        raise InvalidParameterError("aad must be contiguous bytes") from None
                    except KMSError as exc:  # a suspended or unusable version's Refusal
                        self._refused_by(scope_id, purpose, exc, ciphertext)
                        raise
        try:
            blob = decode(ciphertext)
        except DecryptionError:
            self._refused(scope_id, purpose, None, "malformed")
            raise
        return await self._decrypt_blob(scope_id, purpose, keys, blob, aad)

    def _refused(
        self, scope_id: str, purpose: str, version_id: str | None, reason: RefusalReason
    ) -> None:
        self._events.refused(scope_id, purpose, version_id, reason)

    def _refused_by(
        self,
        scope_id: str,
        purpose: str,
        exc: BaseException,
        ciphertext: object = None,
        version_id: str | None = None,
    ) -> None:
        """Report ``exc`` as a refused decryption, if it is one (see refusal_reason)."""
        reason = refusal_reason(exc)
        if reason is None:
            return
        version_id = getattr(exc, "key_version_id", None) or version_id
        if version_id is None and isinstance(ciphertext, bytes):
            with contextlib.suppress(KMSError):
                version_id = decode(ciphertext).key_id or None
        self._refused(scope_id, purpose, version_id, reason)

    async def _decrypt_blob(
        self,
        scope_id: str,
        purpose: str,
        keys: PurposeKeys,
        blob: BlobInfo,
        aad: bytes | None,
    ) -> bytes:
        """Decrypt any well-formed envelope: the general path."""
        version_id = blob.key_id or None
        aead = keys.find_id(blob.key_id)
        if aead is None:
            self._check_open()
            try:
                aead = await self._keyring.unknown_version(scope_id, purpose, blob.key_id)
            except KMSError as exc:
                self._refused_by(scope_id, purpose, exc, version_id=version_id)
                raise
        sealed = blob.ciphertext
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            self._refused(scope_id, purpose, version_id, "malformed")
            raise DecryptionError("ciphertext is too short")
        try:
            if len(sealed) >= self._offload_threshold:
                return await anyio.to_thread.run_sync(
                    aead.decrypt, sealed[:NONCE_SIZE], memoryview(sealed)[NONCE_SIZE:], aad
                )
            return aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
        except KMSError as exc:  # a suspended or unusable version's Refusal
            self._refused_by(scope_id, purpose, exc, version_id=version_id)
            raise
        except InvalidTag:
            self._refused(scope_id, purpose, version_id, "authentication")
            raise DecryptionError(
                "decryption failed: wrong AAD, wrong scope or purpose, or tampered ciphertext"
            ) from None
        except (TypeError, BufferError, OverflowError):
            raise InvalidParameterError("aad must be contiguous bytes") from None

    # -- many values for one pair ------------------------------------------

    async def encrypt_many(
        self,
        scope_id: str,
        purpose: str,
        plaintexts: Sequence[bytes],
        *,
        aad: Sequence[bytes | None] | None = None,
    ) -> list[bytes]:
        """:meth:`encrypt` each plaintext with the newest key of (scope, purpose), in order.

        Each envelope is the one :meth:`encrypt` would return, under its own
        nonce, so :meth:`decrypt` reads it. ``aad`` is ``None`` or one AAD per
        plaintext (``None`` or ``b""`` for none). An empty list returns ``[]``
        without reading any key. Large batches (their bytes plus 1 KiB per
        item reaching ``offload_threshold``) are encrypted in a worker thread.

        Raises:
            InvalidParameterError: bad scope or purpose; ``plaintexts`` or
                ``aad`` not a list, or of different lengths; an item that is
                not bytes (its position is in the message and in ``index``).
            KeyNotFoundError: the scope has no key for the purpose.
        """
        items = item_list("plaintexts", plaintexts)
        aads = aad_list(aad, len(items), "plaintexts")
        if not items:
            self._check_pair(scope_id, purpose)
            return []
        keys = await self._batch_keys(scope_id, purpose, decrypting=False)
        try:
            weight = sum(map(len, items)) + _ITEM_WEIGHT * len(items)
            if weight < self._offload_threshold:
                sealed = seal_many(keys.aead, keys.suffix, nonce_batch(len(items)), items, aads)
            else:
                sealed = await anyio.to_thread.run_sync(
                    seal_many, keys.aead, keys.suffix, nonce_batch(len(items)), items, aads
                )
        except (TypeError, BufferError, OverflowError, KMSError):
            pass  # an unusable item or version: encrypt them one by one to name it
        else:
            keys.tally.n += len(sealed)
            self._batch_encrypted += len(items)
            return sealed
        return await self._each(self.encrypt, "plaintexts", scope_id, purpose, items, aads)

    async def _batch_keys(self, scope_id: str, purpose: str, *, decrypting: bool) -> PurposeKeys:
        """The pair's cached keys for a batch, or a load (the hot path's lookup, once a batch)."""
        try:
            keys = self._entries.get((scope_id, purpose))
        except TypeError:
            raise InvalidParameterError("scope id and purpose must be strings") from None
        self._stats.batch_lookups += 1
        if keys is None:
            # Loaded outside the except clause: a miss chains nothing into errors.
            return await self._missed(scope_id, purpose, decrypting=decrypting)
        keys.used = True
        return keys

    async def decrypt_many(
        self,
        scope_id: str,
        purpose: str,
        ciphertexts: Sequence[bytes],
        *,
        aad: Sequence[bytes | None] | None = None,
    ) -> list[bytes]:
        """:meth:`decrypt` each ciphertext of (scope, purpose), in order.

        Takes any mix of envelopes :meth:`encrypt` and :meth:`encrypt_many`
        made, under any version of the pair. ``aad`` is ``None`` or one AAD
        per ciphertext. All or nothing: if any item cannot be decrypted, the
        call raises the error :meth:`decrypt` raises for the first such item,
        with its position in the message and in the error's ``index``, and
        returns no plaintext. An empty list returns ``[]`` without reading
        any key.

        Raises:
            DecryptionError: an item is tampered, malformed, under the wrong
                AAD or the wrong key (``index`` says which).
            UnknownKeyVersionError: an item names a version that is revoked
                or not this pair's (``index`` says which).
            InvalidParameterError: bad scope or purpose; ``ciphertexts`` or
                ``aad`` not a list, or of different lengths; an unusable AAD.
            KeyNotFoundError: the scope has no key for the purpose.
        """
        items = item_list("ciphertexts", ciphertexts)
        aads = aad_list(aad, len(items), "ciphertexts")
        if not items:
            self._check_pair(scope_id, purpose)
            return []
        keys = await self._batch_keys(scope_id, purpose, decrypting=True)
        try:
            sizes = list(map(len, items))
            if sum(sizes) + _ITEM_WEIGHT * len(items) < self._offload_threshold:
                opened = open_many(keys.aead, keys.suffix, keys.older, items, sizes, aads)
            else:
                opened = await anyio.to_thread.run_sync(
                    open_many, keys.aead, keys.suffix, keys.older, items, sizes, aads
                )
        except (InvalidTag, TypeError, BufferError, OverflowError, KMSError):
            opened = None  # one by one below, to name the item
        if opened is not None:
            self._batch_decrypted += len(opened)
            return opened
        return await self._each(self.decrypt, "ciphertexts", scope_id, purpose, items, aads)

    async def _each(
        self,
        call: Callable[..., Awaitable[bytes]],
        name: str,
        scope_id: str,
        purpose: str,
        items: Sequence[Any],
        aads: Sequence[Any],
    ) -> list[bytes]:
        """A batch item by item: the general path, which names the item that fails."""
        done = []
        for index, (item, item_aad) in enumerate(zip(items, aads, strict=True)):
            try:
                done.append(await call(scope_id, purpose, item, aad=item_aad))
            except KMSError as exc:
                exc.index = index
                exc.args = (f"{name}[{index}]: {exc}",)
                raise
        return done

    def _check_pair(self, scope_id: str, purpose: str) -> None:
        self._check_open()
        check_scope(scope_id)
        check_data_purpose(purpose, self._purposes)

    async def _missed(
        self,
        scope_id: str,
        purpose: str,
        *,
        decrypting: bool = False,
        ciphertext: object = None,
    ) -> PurposeKeys:
        """A cache miss: validate, then load once for every concurrent caller."""
        self._check_open()
        check_scope(scope_id)
        check_data_purpose(purpose, self._purposes)
        if not decrypting:
            keys = await self._keyring.reload(scope_id, purpose)
        else:
            try:
                keys = await self._keyring.for_decrypt(scope_id, purpose)
            except KMSError as exc:
                self._refused_by(scope_id, purpose, exc, ciphertext)
                raise
        self._stats.misses += 1
        return keys

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
        check_scope(scope_id)
        check_known_purpose(purpose, self._purposes)
        if key_version_id is not None:
            # Any text: an id of the wrong form is simply not found.
            check_text("key_version_id", key_version_id, MAX_SCOPE_BYTES)
        if purpose == ROOT_PURPOSE:
            versions = await self._keyring.root_versions(scope_id)
        else:
            keys = await self._missed(scope_id, purpose)
            if key_version_id is not None and keys.find_id(key_version_id) is None:
                with contextlib.suppress(UnknownKeyVersionError):
                    await self._keyring.unknown_version(scope_id, purpose, key_version_id)
                keys = self._entries.get((scope_id, purpose), keys)
            versions = list(keys.versions)
            # The newest encrypts for a pooled wrapper; a refused one refuses here.
            wanted = versions[0] if key_version_id is None else keys.version(key_version_id)
            if wanted is not None and wanted.refused is not None:
                raise wanted.refused.refuse()
        wrappers = [aead_wrapper(v.cipher, v.key, v.id) for v in versions if not v.refused]
        if key_version_id is None:
            return PooledWrapper(*wrappers)
        for wrapper in wrappers:
            if wrapper.key_id == key_version_id:
                return wrapper
        raise KeyNotFoundError(
            f"unable to find specified key version ID {show(key_version_id)} among the "
            f"{purpose!r} keys of scope {show(scope_id)}"
        )

    # -- writes (logic in _writer) -----------------------------------------

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
        scopes = check_scope_list(scope_ids)
        if len(set(scopes)) != len(scopes):
            raise InvalidParameterError("scope_ids lists a scope more than once")
        wanted = check_purpose_list(purposes, self._purposes)
        self.get_external_root_wrapper()
        await self._writer.create(scopes, wanted, conn)

    async def rotate_keys(
        self,
        scope_id: str,
        *,
        rewrap: bool = False,
        replace_unusable: bool = False,
        conn: Any = None,
    ) -> None:
        """Add a new root key version and a new version of each data key.

        New data is encrypted with the new versions; old versions still
        decrypt. With ``rewrap=True`` every existing key version is also
        re-wrapped (root versions by the current root wrapper, data versions
        by the new root version). Every data key the scope has is rotated,
        also those of purposes this KMS was not opened with.

        The root wrapper must first unwrap the scope's newest root key
        version: a wrong root key is refused and nothing is written. If the
        newest version was written under another root key (by another tool
        or a misconfigured instance) and nobody can unwrap it,
        ``replace_unusable=True`` accepts a root wrapper that unwraps an older
        version of the scope instead, so that new data goes under keys it
        can unwrap; revoke the unusable versions afterwards, once nothing
        needs them. It cannot be combined with ``rewrap``.

        Raises:
            KeyNotFoundError: the scope has no keys, or no root wrapper.
            WrapperError: the root wrapper failed, or cannot unwrap the
                scope's newest root key version (nothing was written).
        """
        await self.rotate_keys_many(
            [scope_id], rewrap=rewrap, replace_unusable=replace_unusable, conn=conn
        )

    async def rotate_keys_many(
        self,
        scope_ids: Iterable[str],
        *,
        rewrap: bool = False,
        replace_unusable: bool = False,
        conn: Any = None,
    ) -> None:
        """:meth:`rotate_keys` for many scopes in one transaction: all or none.

        Raises:
            KeyNotFoundError: one of the scopes has no keys; nothing was rotated.
            WrapperError: the root wrapper failed.
        """
        self._check_open()
        scopes = list(dict.fromkeys(check_scope_list(scope_ids)))
        if rewrap and replace_unusable:
            raise advised(
                InvalidParameterError,
                "replace_unusable cannot rewrap: the unusable versions cannot be unwrapped",
                "rotate with replace_unusable=True, revoke the unusable versions, then rewrap",
                Remedy("replace_unusable", scope_id=scopes[0] if len(scopes) == 1 else None),
            )
        self.get_external_root_wrapper()
        await self._writer.rotate(
            scopes, rewrap=rewrap, conn=conn, replace_unusable=bool(replace_unusable)
        )

    async def rewrap_keys(self, scope_id: str, *, conn: Any = None) -> None:
        """Re-wrap every key version of the scope without making new versions.

        Root key versions are re-wrapped by the current root wrapper (its
        primary, for a PooledWrapper), and every data key version by the
        newest root key version. Run it for every scope after replacing the
        root wrapper; afterwards the old root key is no longer needed.

        Raises:
            KeyNotFoundError: the scope has no keys, or no root wrapper.
            WrapperError: the root wrapper failed.
        """
        await self.rewrap_keys_many([scope_id], conn=conn)

    async def rewrap_keys_many(self, scope_ids: Iterable[str], *, conn: Any = None) -> None:
        """:meth:`rewrap_keys` for many scopes in one transaction: all or none.

        Raises:
            KeyNotFoundError: one of the scopes has no keys; nothing was rewrapped.
            WrapperError: the root wrapper failed.
        """
        self._check_open()
        scopes = list(dict.fromkeys(check_scope_list(scope_ids)))
        self.get_external_root_wrapper()
        await self._writer.rewrap(scopes, conn=conn)

    async def bind_keys(self, scope_ids: Iterable[str], *, conn: Any = None) -> int:
        """Bind the scopes' unbound key versions and seal their key state records.

        For keys written by the Go package or before schema file 06: after
        this, ``integrity="strict"`` accepts them. One transaction for all
        the scopes; running it again binds nothing new and is harmless, so a
        bulk run can resume anywhere. A version whose binding does not match
        stays refused (binding it again would bless tampering), and a root
        key version that is a copy of one bound elsewhere is not bound. A
        state record that is missing or does not verify is replaced by one
        sealing the current state, so run it only on key tables known to be
        right. Returns how many versions were bound.

        Raises:
            KeyNotFoundError: one of the scopes has no keys; nothing was bound.
            SchemaVersionError: the binding tables are missing; run migrate().
            WrapperError: the root wrapper cannot unwrap the scopes' keys.
        """
        self._check_open()
        scopes = list(dict.fromkeys(check_scope_list(scope_ids)))
        self.get_external_root_wrapper()
        return await self._writer.bind(scopes, conn=conn)

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
        kind = check_key_version_id(key_version_id)
        if scope_id is not None:
            check_scope(scope_id)
        await self._writer.revoke(
            key_version_id, is_root=kind == "root", scope_id=scope_id, conn=conn
        )

    async def suspend_key_version(
        self, key_version_id: str, *, scope_id: str | None = None, conn: Any = None
    ) -> None:
        """Refuse decryption under a data key version, reversibly.

        The step before :meth:`revoke_key_version`: while suspended, every
        instance of this library refuses to decrypt under the version
        (:class:`KeySuspendedError`) within ``max_staleness``, so whatever
        still needs it shows up as errors you can undo with
        :meth:`resume_key_version`, not as data nobody can read. The state is
        kept in ``<prefix>_key_version_suspension``, a table of this
        library's own (schema file 04): the Go package ignores it and still
        decrypts under a suspended version. Suspending a suspended version
        does nothing. The newest version of a key cannot be suspended (new
        data is encrypted under it): rotate first.

        Raises:
            InvalidParameterError: not a data key version id.
            KeyNotFoundError: no such version (in that scope).
            KeyInUseError: it is the newest version of its key.
            SchemaVersionError: the suspension table is missing; run migrate().
        """
        await self._set_suspended(key_version_id, True, scope_id, conn)

    async def resume_key_version(
        self, key_version_id: str, *, scope_id: str | None = None, conn: Any = None
    ) -> None:
        """Undo :meth:`suspend_key_version`: the version decrypts again.

        Resuming a version that is not suspended does nothing.

        Raises:
            InvalidParameterError: not a data key version id.
            KeyNotFoundError: no such version (in that scope).
            SchemaVersionError: the suspension table is missing; run migrate().
        """
        await self._set_suspended(key_version_id, False, scope_id, conn)

    async def _set_suspended(
        self, key_version_id: str, suspend: bool, scope_id: str | None, conn: Any
    ) -> None:
        self._check_open()
        if check_key_version_id(key_version_id) == "root":
            raise InvalidParameterError(
                f"{key_version_id} is a root key version; only data key versions can be "
                "suspended (root key versions encrypt no data: retire one with rewrap_keys() "
                "and revoke_key_version())"
            )
        if scope_id is not None:
            check_scope(scope_id)
        await self._writer.set_suspended(
            key_version_id, suspend=suspend, scope_id=scope_id, conn=conn
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
        scopes = list(dict.fromkeys(check_scope_list(scope_ids)))
        wanted = check_purpose_list(purposes, self._purposes)
        self.get_external_root_wrapper()
        return await self._writer.reconcile(scopes, wanted)

    async def rotate_due(
        self,
        policy: RotationPolicy,
        *,
        scope_ids: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Rotate every scope the policy says is due; return the scopes rotated, sorted.

        A scope is due when the newest version of any of its data keys is at
        least ``policy.max_age`` old by the database's clock, or has more
        than ``policy.max_encryptions`` encryptions counted (the usage
        table: what every instance has flushed, see ``usage_flush_interval``).
        Due scopes are rotated as :meth:`rotate_keys` does, in bulk, one
        transaction per few thousand scopes; each is checked again under the
        write lock every key writer takes, so instances running this at the
        same time rotate each due scope once. ``scope_ids`` limits the
        candidates, ``limit`` the number rotated.

        Raises:
            InvalidParameterError: ``policy`` is not a RotationPolicy, bad
                scope ids, or ``limit`` not a positive whole number.
            KeyNotFoundError: no root wrapper is registered.
            WrapperError: the root wrapper failed; scopes of earlier
                transactions stay rotated.
        """
        self._check_open()
        if not isinstance(policy, RotationPolicy):
            raise InvalidParameterError(
                f"policy must be a RotationPolicy, not {type(policy).__name__}"
            )
        scopes = None if scope_ids is None else list(dict.fromkeys(check_scope_list(scope_ids)))
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InvalidParameterError(
                f"limit must be a positive whole number or None, not {limit!r}"
            )
        self.get_external_root_wrapper()
        rotated = await self._writer.rotate_due(
            max_age=policy.max_age_seconds,
            max_encryptions=policy.max_encryptions,
            scope_ids=scopes,
            limit=limit,
        )
        return sorted(rotated)

    async def _rotate_worn(self, scope_ids: list[str], limit: int) -> list[str]:
        """Automatic rotation (see ``auto_rotate``) of scopes whose count passed ``limit``."""
        if self._closed:
            return []
        self.get_external_root_wrapper()
        return await self._writer.rotate_due(
            max_age=None, max_encryptions=limit, scope_ids=scope_ids, limit=None, cause="automatic"
        )

    async def flush_usage(self) -> None:
        """Add the encryptions counted here to the usage table now.

        The background task does it every ``usage_flush_interval`` seconds
        and :meth:`aclose` at the end; call this before a :meth:`census`
        that must include this instance's latest counts. Does nothing when
        counting is off.

        Raises:
            StorageError: the database failed; the counts are kept for the
                next flush.
        """
        self._check_open()
        if self._usage.counting:
            await self._usage.flush()

    # -- reads -------------------------------------------------------------

    async def census(
        self, scope_id: str | None = None, *, referencing_rows: bool = False
    ) -> list[CensusRow]:
        """Every data key version (of one scope, or of all), by scope, purpose and version.

        Each row says when the version was made, how many encryptions every
        instance has counted under it (as flushed: see
        ``usage_flush_interval``; ``None`` without the usage table), whether
        it is suspended and whether it is its pair's newest. With
        ``referencing_rows`` it also counts the rows of every table with a
        foreign key to the data key version table that name it
        (:meth:`list_data_key_version_referencers`), which scans those
        tables. All scopes are read a page of scopes at a time, but the
        result is one list: for millions of versions, ask per scope.

        Raises:
            InvalidParameterError: bad scope id.
            KeyNotFoundError: ``scope_id`` has no keys.
            StorageError: the database failed.
        """
        self._check_open()
        if scope_id is not None:
            check_scope(scope_id)
        q = self._q
        to_time = self._db.to_datetime
        lines: list[repo.CensusLine] = []
        async with self._db.read() as conn:
            if not q.has_usage:
                await repo.find_usage(conn, q)  # migrated since this instance opened?
            if scope_id is not None:
                await repo.require_root_key(conn, q, scope_id)
                lines = await repo.census_rows(conn, q, [scope_id])
            else:
                after = ""
                while True:
                    page = await repo.scopes_after(conn, q, after, 1000, to_time)
                    if not page:
                        break
                    lines.extend(await repo.census_rows(conn, q, [s.id for s in page]))
                    after = page[-1].id
            counts = await repo.rows_per_version(conn, q) if referencing_rows else None
        return [
            CensusRow(
                scope=line.scope_id,
                purpose=line.purpose,
                key_id=line.data_key_id,
                version=line.version,
                key_version_id=line.version_id,
                create_time=to_time(line.create_time),
                encryptions=line.encryptions,
                referencing_rows=None if counts is None else counts.get(line.version_id, 0),
                suspended=line.suspended,
                newest=line.newest,
            )
            for line in lines
        ]

    # -- reads -------------------------------------------------------------

    async def list_keys(self, scope_id: str, *, verify: bool = True) -> list[Key]:
        """The scope's root key and data keys with their versions, oldest first.

        The root key comes first, then data keys by purpose. Each version
        says whether it is suspended and, with ``verify`` (the default, when
        a root wrapper is registered), whether this KMS's root wrapper cannot
        unwrap it (``KeyVersion.unusable`` gives the reason): that costs a
        root wrapper call per root key version not in the cache.

        Raises:
            KeyNotFoundError: the scope has no keys.
            WrapperError: ``verify`` and the root wrapper failed in a way
                worth retrying.
        """
        self._check_open()
        check_scope(scope_id)
        q = self._q
        to_time = self._db.to_datetime
        async with self._db.read() as conn:
            root_key_id, root_created = await repo.require_root_key(conn, q, scope_id)
            data_rows = await repo.data_keys(conn, q, root_key_id)
            root_rows, version_rows = (await repo.key_versions_of_roots(conn, q, [root_key_id]))[
                root_key_id
            ]
            suspended = await repo.suspended_versions(conn, q, scope_id)
            bound = await repo.bindings_of_scopes(conn, q, [scope_id]) if q.has_bindings else None
        unusable: dict[str, str] = {}
        if verify and ROOT_PURPOSE in self._keyring.wrappers:
            unusable = await self._keyring.unusable_versions(root_rows, version_rows)

        def version_of(row: repo.RootKeyVersionRow | repo.DataKeyVersionRow) -> KeyVersion:
            return KeyVersion(
                row.id,
                row.version,
                to_time(row.create_time),
                suspended=row.id in suspended,
                unusable=unusable.get(row.id),
                bound=None if bound is None else row.id in bound,
            )

        keys = [
            Key(
                id=root_key_id,
                scope=scope_id,
                type="kek",
                purpose=ROOT_PURPOSE,
                create_time=to_time(root_created),
                versions=tuple(version_of(r) for r in root_rows),
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
                    versions=tuple(version_of(v) for v in versions),
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
            check_scope(after)
        check_page_size("limit", limit)
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
        check_page_size("batch_size", batch_size)

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
        given = check_list("scope_ids", scope_ids, "scope id")
        wanted = list(dict.fromkeys(check_scope(scope_id) for scope_id in given))
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

    # -- re-encrypting application rows (logic in _reencrypt) ----------------

    def _session(self) -> _reencrypt.Session:
        self._check_open()
        return _reencrypt.Session(self, self._db, revoke=self._revoke_destroyed)

    async def _revoke_destroyed(self, key_version_id: str) -> None:
        """destroy_key_version's revoke, reported as "destroyed"."""
        self._check_open()
        await self._writer.revoke(
            key_version_id, is_root=False, scope_id=None, conn=None, kind="destroyed"
        )

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
        return await _reencrypt.version_usage(
            self._session(), columns, key_version_id=key_version_id
        )

    async def describe_key_version(
        self, key_version_id: str, *, scope_id: str | None = None
    ) -> KeyVersionInfo:
        """A key version and how many rows still reference it: what revoking it would delete.

        For a data key version, the rows of every table with a foreign key
        to the data key version table (as
        :meth:`list_data_key_version_referencers` finds them) that name it,
        counted per table and column; for a root key version, the data key
        versions it wraps. With ``scope_id`` the version must belong to that
        scope. A read: nothing is locked, so a revoke decides again.

        Raises:
            InvalidParameterError: not a key version id, or a bad scope id.
            KeyNotFoundError: no such version (in that scope).
        """
        return await _reencrypt.describe_key_version(
            self._session(), key_version_id, scope_id=scope_id
        )

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
            self._session(), key_version_id, columns, batch_size=batch_size, progress=progress
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
            self._session(), key_version_id, columns, batch_size=batch_size, progress=progress
        )


_METERED: dict[type[KMS], type[KMS]] = {}


def _metered(cls: type[KMS]) -> type[KMS]:
    """``cls`` with the counting hot path: the class of a KMS opened with metrics.

    A subclass rather than methods set on the instance: an attribute added
    after ``__init__`` would make every attribute read of the hot path slower.
    """
    metered = _METERED.get(cls)
    if metered is None:
        metered = type(
            cls.__name__,
            (cls,),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "encrypt": KMS._counted_encrypt,
                "decrypt": KMS._counted_decrypt,
            },
        )
        _METERED[cls] = metered
    return metered
