"""Key loading: the wrapper registry, root unwrapping, cold loads and reloads.

A cold load of one (scope, purpose) is one query for its data key versions
and the root key versions that wrap them; the connection goes back to the
pool before the root wrapper (perhaps a remote key service) is called.
Concurrent misses of one pair share a single load (see :class:`KeyCache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blob import BlobInfo, decode
from ._cache import KeyCache, PurposeKeys, Refusal, VersionKey
from ._durability import Durability
from ._errors import (
    DecryptionError,
    InvalidParameterError,
    KeyIntegrityError,
    KeyNotFoundError,
    KeyRollbackError,
    KeySuspendedError,
    KeyUnusableError,
    KMSError,
    Remedy,
    StorageError,
    TransientStorageError,
    UnknownKeyVersionError,
    WrapperError,
    advised,
    reason,
)
from ._freshness import Horizon
from ._ids import DATA_KEY_VERSION_PREFIX, ROOT_KEY_VERSION_PREFIX, is_id, new_id
from ._integrity import Integrity, KeyState, fingerprint, unseal_state, verify_version
from ._sql import Connection, Database
from ._sql import _store as repo
from ._types import ROOT_PURPOSE, ReplicaReads
from ._validate import check_known_purpose, show
from ._wrappers import KEY_SIZE, Wrapper, unwrap_key, wrapper_error

__all__ = ["Keyring"]

logger = logging.getLogger("kms_async")

#: Root keys wrapped concurrently by bulk operations (for remote root wrappers).
WRAP_CONCURRENCY = 16
#: A ciphertext naming an unknown version reloads its scope at most this often.
RELOAD_SPACING = 0.2
#: Seconds cold loads skip a replica that failed, before trying it again.
REPLICA_RETRY = 5.0


class Keyring:
    """The root wrappers and everything that unwraps keys into the cache."""

    def __init__(
        self,
        database: Database,
        cache: KeyCache,
        purposes: tuple[str, ...],
        durability: Durability,
    ) -> None:
        self._db = database
        self._durability = durability
        self._q = database.queries
        self._cache = cache
        self.purposes = purposes
        self._wrappers: dict[str, Wrapper] = {}
        #: The root wrapper unwrapped one of the database's root key versions.
        self._proven_any = False
        #: "bind" or "strict" (see KMS.open); bindings are used where the tables exist.
        self.integrity: Integrity = "bind"
        #: scope id -> the highest key state serial this instance has seen.
        self.seen: dict[str, int] = {}
        #: Versions loaded without a binding (written by the Go package or before binding).
        self.unbound: set[str] = set()
        #: The newest change this instance knows of: fences replica reads.
        self.horizon = Horizon()
        #: Where cold loads went (see ReplicaReads); counted only with a replica.
        self._reads = {"replica": 0, "behind": 0, "missing": 0, "failed": 0}
        self._replica_retry_at = 0.0

    # -- the wrapper registry ----------------------------------------------

    def add_wrapper(self, purpose: str, wrapper: Wrapper) -> None:
        check_known_purpose(purpose, self.purposes)
        if wrapper is None or not isinstance(wrapper, Wrapper):
            raise InvalidParameterError(
                "missing wrapper: pass an object with key_id, encrypt() and decrypt()"
            )
        if purpose == ROOT_PURPOSE and self._wrappers.get(purpose) is not wrapper:
            # Unwrapped root keys prove possession of the wrapper that
            # unwrapped them: a new root wrapper proves itself again before
            # it wraps anything (see prove_scopes).
            self._cache.roots.clear()
            self._proven_any = False
        self._wrappers[purpose] = wrapper

    def wrapper(self, purpose: str) -> Wrapper:
        check_known_purpose(purpose, self.purposes)
        wrapper = self._wrappers.get(purpose)
        if wrapper is None:
            raise KeyNotFoundError(f"missing external wrapper for {purpose!r}")
        return wrapper

    def root_wrapper(self) -> Wrapper:
        wrapper = self._wrappers.get(ROOT_PURPOSE)
        if wrapper is None:
            raise KeyNotFoundError(
                "missing external root wrapper: pass root_wrapper= to KMS.open() or call "
                "add_external_wrapper('rootKey', wrapper)"
            )
        return wrapper

    @property
    def wrappers(self) -> dict[str, Wrapper]:
        return self._wrappers

    def clear(self) -> None:
        # Registered wrappers may hold root key material.
        self._wrappers.clear()

    # -- root keys -----------------------------------------------------------

    async def wrap_root(self, key: bytes) -> bytes:
        wrapper = self.root_wrapper()
        try:
            blob = await wrapper.encrypt(key)
        except Exception as exc:
            raise wrapper_error(
                f"the root wrapper failed to wrap a root key: {reason(exc)}", exc
            ) from exc
        if not isinstance(blob, BlobInfo):
            raise WrapperError(
                f"the root wrapper returned {type(blob).__name__} instead of a BlobInfo"
            )
        return blob.to_bytes()

    async def unwrap_root(self, version_id: str, version: int, wrapped: bytes) -> VersionKey:
        cached = self._cache.get_root(version_id)
        if cached is not None:
            # A rotation caches its new root before the database numbers it.
            return (
                cached
                if cached.version == version
                else dataclasses.replace(cached, version=version)
            )
        wrapper = self.root_wrapper()
        blob = decode(wrapped)
        try:
            key = await wrapper.decrypt(blob)
        except Exception as exc:
            problem = (
                f"the root wrapper cannot unwrap root key version {version_id} (wrapped under "
                f"key id {show(blob.key_id)}): {reason(exc)}"
            )
            error = wrapper_error(problem, exc)
            if not error.retryable:
                # Not a passing failure: the wrapper lacks that key.
                error = advised(
                    WrapperError,
                    problem,
                    "if the root key was replaced, register PooledWrapper(new, old) until "
                    "rewrap_keys() has run for every scope",
                    Remedy(
                        "previous_root_key", key_version_id=version_id, key_id=blob.key_id or None
                    ),
                )
            raise error from exc
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise WrapperError(f"root key version {version_id} did not unwrap to a 32-byte key")
        unwrapped = VersionKey(version_id, version, AESGCM(key), key)
        self._cache.put_root(version_id, unwrapped)
        return unwrapped

    # -- proof of possession ------------------------------------------------
    #
    # A root wrapper holding the wrong key (the right key id, another key)
    # would wrap new root key versions that no correctly configured instance
    # can unwrap, locking the tenant out. So before a write wraps anything
    # with it, the root wrapper must unwrap what the database already holds.
    # Every root key in the cache was unwrapped by the current root wrapper
    # (the cache is emptied when it is replaced), so a cached one counts.

    async def prove_scopes(
        self, scope_ids: list[str], conn: Any, *, replace_unusable: bool = False
    ) -> None:
        """Unwrap each scope's newest root key version with the root wrapper.

        With ``conn`` (the caller's transaction) the rows are read there; the
        connection goes back before the root wrapper is called. With
        ``replace_unusable``, a newest version the wrapper cannot unwrap is
        accepted if an older version of the scope unwraps instead: the
        recovery from a version written under another root key.

        Raises:
            WrapperError: it cannot: nothing may be written with it.
        """
        async with self.reading(conn) as reader:
            owners, latest = await self._newest_roots(reader, scope_ids)
        await self._prove(owners, latest, lambda: self.reading(conn), replace_unusable)

    async def prove_scopes_in(
        self, tx: Connection, scope_ids: list[str], *, replace_unusable: bool = False
    ) -> None:
        """:meth:`prove_scopes`, reading through a transaction already open (a bulk
        write's later chunks, under its write lock)."""
        owners, latest = await self._newest_roots(tx, scope_ids)
        await self._prove(owners, latest, lambda: contextlib.nullcontext(tx), replace_unusable)

    async def _newest_roots(
        self, reader: Connection, scope_ids: list[str]
    ) -> tuple[dict[str, str], dict[str, repo.RootKeyVersionRow]]:
        owners = await repo.root_keys_of_scopes(reader, self._q, scope_ids)
        return owners, await repo.latest_root_key_versions(reader, self._q, list(owners.values()))

    async def _prove(
        self,
        owners: dict[str, str],
        latest: dict[str, repo.RootKeyVersionRow],
        reading: Callable[[], AbstractAsyncContextManager[Connection]],
        replace_unusable: bool,
    ) -> None:
        scope_of = {root_key_id: scope_id for scope_id, root_key_id in owners.items()}
        for root_key_id, row in latest.items():
            try:
                await self.unwrap_root(row.id, row.version, row.wrapped)
            except WrapperError as exc:
                if exc.retryable:
                    raise
                older = await self._older_unwraps(root_key_id, row.id, reading)
                if older is None:
                    if replace_unusable:
                        raise KeyUnusableError(
                            f"{exc}; replace_unusable needs a root wrapper that unwraps at "
                            "least one of the scope's older root key versions, and this one "
                            "unwraps none: it is the wrong root key",
                            key_version_id=row.id,
                        ) from exc
                    raise
                scope_id = scope_of[root_key_id]
                if not replace_unusable:
                    # The right key, and a newest version written under another one.
                    raise advised(
                        KeyUnusableError,
                        f"the newest root key version {row.id} of scope {show(scope_id)} cannot "
                        f"be unwrapped with this root wrapper ({exc.problem or exc}), which "
                        f"unwraps the older version {older}: the newest was written under "
                        "another root key",
                        f"if this root key is the right one, run rotate_keys({show(scope_id)}, "
                        "replace_unusable=True), then revoke the unusable versions",
                        Remedy("replace_unusable", scope_id=scope_id, key_version_id=row.id),
                        key_version_id=row.id,
                    ) from exc
                logger.warning(
                    "kms_async: replacing unusable root key version %s of scope %s: the root "
                    "wrapper unwraps the older version %s",
                    row.id,
                    show(scope_id),
                    older,
                )
        if latest:
            self._proven_any = True

    async def _older_unwraps(
        self,
        root_key_id: str,
        newest_id: str,
        reading: Callable[[], AbstractAsyncContextManager[Connection]],
    ) -> str | None:
        """The id of an older root key version the root wrapper unwraps, if any."""
        async with reading() as reader:
            rows = await repo.root_key_versions(reader, self._q, root_key_id)
        for row in sorted(rows, key=lambda r: r.version, reverse=True):
            if row.id == newest_id:
                continue
            try:
                await self.unwrap_root(row.id, row.version, row.wrapped)
            except WrapperError as exc:
                if exc.retryable:
                    raise
                continue
            return row.id
        return None

    async def prove_any(self, conn: Any, *, at_open: bool = False) -> None:
        """Unwrap one of a few of the database's root key versions (if it has
        any) with the root wrapper: before it wraps the root keys of new
        scopes, and when a KMS opens.

        Raises:
            WrapperError: it unwraps none of them (nothing may be written
                with it), or failed in a way worth retrying.
        """
        if self._proven_any:
            return
        async with self.reading(conn) as reader:
            rows = await repo.some_root_key_versions(reader, self._q)
        failure: WrapperError | None = None
        for row in rows:
            try:
                await self.unwrap_root(row.id, row.version, row.wrapped)
            except WrapperError as exc:
                if exc.retryable:
                    raise
                failure = exc
                continue
            self._proven_any = True
            return
        if failure is not None:
            skip = (
                "; or pass check_root_wrapper=False to KMS.open() to skip this check"
                if at_open
                else ""
            )
            problem = (
                f"the root wrapper unwraps none of the {len(rows)} root key version(s) of this "
                f"database it was tried on, so it holds another root key than the database's "
                f"({failure.problem or failure})"
            )
            advice = f"fix the root key configuration{skip}"
            if failure.remedy is None:
                raise WrapperError(f"{problem}; {advice}") from failure
            raise advised(WrapperError, problem, advice, failure.remedy) from failure

    def reading(self, conn: Any) -> AbstractAsyncContextManager[Connection]:
        # Inside the caller's transaction when there is one: never a second
        # connection from a pool the caller may be holding one of.
        return self._db.read() if conn is None else self._db.transaction(conn)

    async def new_roots(self, count: int) -> list[tuple[VersionKey, bytes]]:
        """Make ``count`` root key versions, wrapped, several wrapper calls at a time.

        Runs before any transaction opens: no connection or lock is held
        while a root key service answers.
        """
        keys = [os.urandom(KEY_SIZE) for _ in range(count)]
        wrapped = [b""] * count
        pending = iter(range(count))

        async def worker() -> None:
            for i in pending:
                wrapped[i] = await self.wrap_root(keys[i])

        workers = [asyncio.ensure_future(worker()) for _ in range(min(count, WRAP_CONCURRENCY))]
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

    async def unusable_versions(
        self,
        root_rows: list[repo.RootKeyVersionRow],
        data_rows: list[repo.DataKeyVersionRow],
    ) -> dict[str, str]:
        """version id -> why the root wrapper cannot unwrap it, for the versions it cannot."""
        found: dict[str, str] = {}
        roots: dict[str, VersionKey] = {}
        for row in root_rows:
            try:
                roots[row.id] = await self.unwrap_root(row.id, row.version, row.wrapped)
            except WrapperError as exc:
                if exc.retryable:
                    raise
                found[row.id] = str(exc)
        for d in data_rows:
            root = roots.get(d.root_key_version_id)
            if root is None:
                found[d.id] = (
                    f"its root key version {d.root_key_version_id} cannot be unwrapped"
                    if d.root_key_version_id in found
                    else f"its root key version {d.root_key_version_id} is missing"
                )
                continue
            try:
                unwrap_key(root.cipher, root.id, d.id, d.wrapped)
            except DecryptionError as exc:
                found[d.id] = str(exc)
        return found

    async def root_versions(self, scope_id: str) -> list[VersionKey]:
        """The scope's root key versions, unwrapped, newest first."""
        async with self._db.read() as conn:
            root_key_id, _ = await repo.require_root_key(conn, self._q, scope_id)
            rows = await repo.root_key_versions(conn, self._q, root_key_id)
        if not rows:
            raise KeyNotFoundError(f"scope {show(scope_id)} has no root key versions")
        unwrapped = [await self.unwrap_root(r.id, r.version, r.wrapped) for r in rows]
        return sorted(unwrapped, key=lambda v: v.version, reverse=True)

    # -- data keys -----------------------------------------------------------

    @property
    def replica_reads(self) -> ReplicaReads:
        return ReplicaReads(**self._reads)

    async def _read_pair(self, scope_id: str, purpose: str, *, primary: bool) -> repo.PurposeRows:
        """The pair's rows: from the replica when it is current enough, else the primary."""
        if self._db.has_replica:
            if not primary:
                replica_rows = await self._read_replica(scope_id, purpose)
                if replica_rows is not None:
                    return replica_rows
            # The primary's snapshot raises the horizon: a replica must not
            # later answer for this pair from before what was read here
            # (its key state record would look rolled back).
            async with self._db.read() as conn:
                rows, version = await repo.load_purpose_fenced(conn, self._q, scope_id, purpose)
                self.horizon.saw(version)
                if rows is not None:
                    return rows
        async with self._db.read() as conn:
            return await repo.load_purpose(conn, self._q, scope_id, purpose)

    async def _read_replica(self, scope_id: str, purpose: str) -> repo.PurposeRows | None:
        """The pair's rows from the replica, or None if they cannot be trusted or read.

        Key writes commit in collection version order, so a replica snapshot
        at version V holds every change up to V: it is trusted only if V is
        at least the newest change this instance knows of (the horizon,
        compared after the read, so a change learnt meanwhile counts too).
        """
        if time.monotonic() < self._replica_retry_at:
            self._reads["failed"] += 1
            return None
        try:
            async with self._db.read_replica() as conn:
                rows, version = await repo.load_purpose_fenced(conn, self._q, scope_id, purpose)
        except KMSError as exc:
            self._reads["failed"] += 1
            self._replica_retry_at = time.monotonic() + REPLICA_RETRY
            logger.warning(
                "kms_async: the read replica failed (%s); cold loads go to the primary for %g s",
                exc,
                REPLICA_RETRY,
            )
            return None
        if version < self.horizon.version:
            self._reads["behind"] += 1
            return None
        if rows is None:
            # Created elsewhere after the newest change this instance knows
            # of, or absent: the primary says which (and with what error).
            self._reads["missing"] += 1
            return None
        self._reads["replica"] += 1
        return rows

    async def load(self, scope_id: str, purpose: str, *, primary: bool = False) -> PurposeKeys:
        """Read and unwrap the pair's versions (no caching here).

        A version the root wrapper cannot unwrap (written under another root
        key by another tool, a misconfigured instance or a restored backup)
        does not take the pair down: it stays in the pair as a refusal, and
        the other versions keep working. Only when none can be unwrapped
        does the load fail. Transient wrapper failures (``retryable``) fail
        the load as they are.
        """
        # The connection goes back to the pool before any wrapper is called.
        rows = await self._read_pair(scope_id, purpose, primary=primary)
        if self._durability.replicated:
            # Nothing this instance wrote enters the cache before a standby has it.
            await self._durability.admit(
                [v[0] for v in rows.data_versions] + [v[0] for v in rows.root_versions]
            )
        roots: dict[str, VersionKey | KMSError] = {}
        for version_id, version, wrapped in rows.root_versions:
            try:
                roots[version_id] = await self.unwrap_root(version_id, version, wrapped)
            except WrapperError as exc:
                if exc.retryable:
                    raise
                roots[version_id] = exc
        state = None
        if self._q.has_bindings:
            state = self._check_state(scope_id, rows, roots)
            for version_id, _, _ in rows.root_versions:
                unwrapped = roots[version_id]
                if isinstance(unwrapped, VersionKey):
                    problem = await self._root_problem(scope_id, rows, unwrapped, state)
                    if problem is not None:
                        roots[version_id] = KeyIntegrityError(problem, key_version_id=version_id)
        newest = max(v[1] for v in rows.data_versions)
        versions = []
        failure: KMSError | None = None
        for version_id, version, wrapped, root_version_id, suspended in rows.data_versions:
            root = roots.get(root_version_id)
            if root is None:
                raise StorageError(
                    f"data key version {version_id} points at a missing root key version"
                )
            try:
                if isinstance(root, KMSError):
                    raise root
                key = unwrap_key(root.cipher, root_version_id, version_id, wrapped)
                problem = await self._data_problem(
                    scope_id, purpose, rows, version_id, version, key, state
                )
                if problem is not None:
                    raise KeyIntegrityError(problem, key_version_id=version_id)
            except KeyIntegrityError as exc:
                failure = exc
                why = (
                    str(exc)
                    if exc.key_version_id == version_id
                    else f"{purpose!r} key version {version_id} of scope {show(scope_id)} is "
                    f"refused: its root key version fails verification: {exc}"
                )
                refusal = Refusal(
                    KeyIntegrityError,
                    version_id,
                    why,
                    "the key tables were changed outside kms_async (see SECURITY.md, 'Key "
                    "bindings and the key state record')",
                    None,
                )
                versions.append(VersionKey(version_id, version, refusal, b"", suspended))
                continue
            except (WrapperError, DecryptionError) as exc:
                failure = exc
                refusal = _unusable(scope_id, purpose, version_id, version == newest, exc)
                versions.append(VersionKey(version_id, version, refusal, b"", suspended))
                continue
            if suspended:
                refusal = _suspended(scope_id, purpose, version_id)
                versions.append(VersionKey(version_id, version, refusal, b"", True))
            else:
                versions.append(VersionKey(version_id, version, AESGCM(key), key))
        if state is not None:
            self._check_newest(scope_id, purpose, rows, state, versions)
        if failure is not None:
            if all(v.refused is not None and not v.suspended for v in versions):
                raise failure  # nothing usable: the pair fails as a whole, as it always did
            logger.warning(
                "kms_async: %d %r key version(s) of scope %s are refused; the others still "
                "work: %s",
                sum(1 for v in versions if v.refused is not None and not v.suspended),
                purpose,
                show(scope_id),
                failure,
            )
        logger.debug(
            "kms_async: loaded %d %r key versions of scope %s", len(versions), purpose, scope_id
        )
        return PurposeKeys(versions, loaded_at=time.monotonic())

    # -- integrity (see _integrity) -----------------------------------------

    def _check_state(
        self, scope_id: str, rows: repo.PurposeRows, roots: dict[str, VersionKey | KMSError]
    ) -> KeyState | None:
        """The scope's verified key state record, or None for a scope that has none.

        Raises:
            KeyRollbackError: the record is older than one this instance saw, or gone.
            KeyIntegrityError: the record is forged, or missing beside bound versions.
        """
        seen = self.seen.get(scope_id, 0)
        if rows.state is None:
            if seen:
                raise KeyRollbackError(
                    f"the key state record of scope {show(scope_id)} is gone, though this "
                    f"instance has seen it at serial {seen}: the key tables were rolled back or "
                    "tampered with; restore the newer state (restart the instances after a "
                    "deliberate restore of the whole database)"
                )
            if rows.bindings:
                raise KeyIntegrityError(
                    f"scope {show(scope_id)} has bound key versions but no key state record: "
                    "it was deleted outside kms_async; restore it from the database's newest "
                    "backup, or run bind_keys() (kms-async bind) to seal the current state"
                )
            return None
        stored = rows.state
        root = roots.get(stored.root_version_id)
        if isinstance(root, WrapperError):
            # This root wrapper cannot unwrap the root key version that
            # sealed the record (one written under another root key, as by a
            # misconfigured instance): the record cannot be checked here.
            # strict refuses; bind carries on with the bindings alone, loudly
            # (SECURITY.md: a writer can cause this on purpose).
            if self.integrity == "strict":
                raise KeyIntegrityError(
                    f"the key state record of scope {show(scope_id)} is sealed by root key "
                    f"version {stored.root_version_id}, which this root wrapper cannot unwrap "
                    f"({root}); integrity='strict' refuses what it cannot verify"
                ) from root
            logger.warning(
                "kms_async: the key state record of scope %s cannot be checked: its root key "
                "version %s cannot be unwrapped with this root wrapper; revocations it records "
                "are not enforced by this instance",
                show(scope_id),
                stored.root_version_id,
            )
            return None
        state = (
            unseal_state(scope_id, stored.root_version_id, stored.body, stored.mac, root.key)
            if isinstance(root, VersionKey)
            else None
        )
        if state is None:
            raise KeyIntegrityError(
                f"the key state record of scope {show(scope_id)} does not verify (sealed by "
                f"root key version {stored.root_version_id}): it was forged or damaged outside "
                "kms_async; restore it from a backup, or run bind_keys() (kms-async bind) to "
                "seal the current state if the key tables are known to be right"
            )
        if state.serial < seen:
            raise KeyRollbackError(
                f"the key state record of scope {show(scope_id)} is at serial {state.serial}, "
                f"older than serial {seen} this instance has seen: the key tables were rolled "
                "back; restore the newer state (restart the instances after a deliberate "
                "restore of the whole database)"
            )
        self.seen[scope_id] = state.serial
        return state

    async def _root_problem(
        self, scope_id: str, rows: repo.PurposeRows, root: VersionKey, state: KeyState | None
    ) -> str | None:
        """Why the root key version must not be used, or None."""
        if state is not None and root.id in state.revoked:
            return _revoked_message(scope_id, "root", root.id)
        binding = rows.bindings.get(root.id)
        if binding is not None:
            owner = rows.owners[root.id]
            if verify_version(
                binding, root.key, scope_id, ROOT_PURPOSE, owner, root.id, root.version
            ):
                return None
            return _mismatch_message(scope_id, "root", root.id)
        # Unbound: is it a copy of a bound root key version from elsewhere?
        copy = await self._copy_of(root.key, root.id)
        if copy is not None:
            return (
                f"root key version {root.id} of scope {show(scope_id)} holds the same root "
                f"key as {copy}: it was copied there outside kms_async; delete it"
            )
        return self._unbound(scope_id, "root", root.id)

    async def _copy_of(self, key: bytes, version_id: str) -> str | None:
        """Which bound (or revoked) version elsewhere holds this key, if any.

        One query, only for versions without a binding (written by the Go
        package, or copied): bound versions cost nothing here.
        """
        async with self._db.read() as conn:
            copies = await repo.binding_by_fingerprint(conn, self._q, fingerprint(key))
        for other_id, other_scope in copies:
            if other_id != version_id:
                return f"key version {other_id} of scope {show(other_scope)}"
        return None

    async def _data_problem(
        self,
        scope_id: str,
        purpose: str,
        rows: repo.PurposeRows,
        version_id: str,
        version: int,
        key: bytes,
        state: KeyState | None,
    ) -> str | None:
        if state is not None and version_id in state.revoked:
            return _revoked_message(scope_id, repr(purpose), version_id)
        binding = rows.bindings.get(version_id)
        if binding is None:
            if not self._q.has_bindings:
                return None
            if self.integrity != "strict":
                # Unbound: is it a copy of a bound (or revoked) version's key?
                copy = await self._copy_of(key, version_id)
                if copy is not None:
                    return (
                        f"{purpose!r} key version {version_id} of scope {show(scope_id)} holds "
                        f"the same key as {copy}: it was copied outside kms_async; delete it"
                    )
            return self._unbound(scope_id, repr(purpose), version_id)
        owner = rows.owners[version_id]
        if verify_version(binding, key, scope_id, purpose, owner, version_id, version):
            return None
        return _mismatch_message(scope_id, repr(purpose), version_id)

    def _unbound(self, scope_id: str, kind: str, version_id: str) -> str | None:
        if self.integrity == "strict":
            return (
                f"{kind} key version {version_id} of scope {show(scope_id)} has no binding, and "
                "integrity='strict' refuses unbound versions: if it is genuine (written by the "
                "Go package), run bind_keys() (kms-async bind) with the root wrapper"
            )
        if version_id not in self.unbound:
            self.unbound.add(version_id)
            logger.warning(
                "kms_async: %s key version %s of scope %s has no binding (written by the Go "
                "package or before binding); accepted under integrity='bind': run "
                "kms-async bind to bind it",
                kind,
                version_id,
                show(scope_id),
            )
        return None

    def _check_newest(
        self,
        scope_id: str,
        purpose: str,
        rows: repo.PurposeRows,
        state: KeyState,
        versions: list[VersionKey],
    ) -> None:
        """Refuse a pair whose newest recorded version is gone, or newer than the record."""
        data_key_id = rows.owners[rows.data_versions[0][0]]
        recorded = state.newest.get(data_key_id)
        if recorded is None:
            return
        newest_id, newest_number = recorded
        numbers = {v.id: v.version for v in versions}
        if numbers.get(newest_id) != newest_number and not self._superseded_by_go(
            rows, versions, newest_number
        ):
            raise KeyRollbackError(
                f"the newest {purpose!r} key version of scope {show(scope_id)} recorded in its "
                f"key state record, {newest_id} (number {newest_number}), is missing or "
                "renumbered: it was deleted or the key tables were rolled back outside kms_async, "
                "and new data would go under an older key; restore it, or run bind_keys() "
                "(kms-async bind) to seal the current state if that is intended"
            )
        for v in versions:
            if v.version > newest_number and v.refused is None and v.id in rows.bindings:
                raise KeyRollbackError(
                    f"the key state record of scope {show(scope_id)} is older than its "
                    f"{purpose!r} key version {v.id}: the record was rolled back outside "
                    "kms_async, so revocations made since may be missing; restore the newer "
                    "record"
                )

    def _superseded_by_go(
        self, rows: repo.PurposeRows, versions: list[VersionKey], recorded: int
    ) -> bool:
        """Under bind: whether a usable unbound version newer than the recorded
        newest explains its absence (the Go package rotated, then revoked it)."""
        return self.integrity == "bind" and any(
            v.version > recorded and v.refused is None and v.id not in rows.bindings
            for v in versions
        )

    async def reload(self, scope_id: str, purpose: str, *, primary: bool = False) -> PurposeKeys:
        """Load the pair (shared with any concurrent load of it) and cache it.

        With ``primary``, never from a replica.
        """
        primary = primary and self._db.has_replica
        return await self._cache.load(
            (scope_id, purpose), lambda: self._timed(scope_id, purpose, primary)
        )

    async def _timed(self, scope_id: str, purpose: str, primary: bool) -> PurposeKeys:
        """:meth:`load`, counted and timed for the metrics."""
        stats = self._cache.stats
        stats.loads += 1
        started = time.perf_counter()
        try:
            return await self.load(scope_id, purpose, primary=primary)
        finally:
            if stats.on_load is not None:
                stats.on_load(time.perf_counter() - started)

    async def reload_changed(self, scope_id: str, purpose: str) -> PurposeKeys:
        """Reload a cached pair found to differ from the primary's rows, from the primary.

        A check compares against the primary; a replica may not have replayed
        the change yet (a notification's check does not raise the horizon).
        """
        return await self.reload(scope_id, purpose, primary=True)

    async def for_decrypt(self, scope_id: str, purpose: str) -> PurposeKeys:
        """A cache miss on decrypt: load, or while the database is away, use a
        pair demoted for lack of confirmation (never used to encrypt)."""
        try:
            return await self.reload(scope_id, purpose)
        except TransientStorageError:
            demoted = self._cache.demoted.get((scope_id, purpose))
            if demoted is None:
                raise
            return demoted

    async def unknown_version(self, scope_id: str, purpose: str, key_id: str) -> AESGCM | Refusal:
        """A ciphertext names a version not in the cache: reload the pair once.

        Reloads of one pair are spaced by ``RELOAD_SPACING`` so that hostile
        ciphertexts cannot turn every call into a database query.
        """
        if is_id(key_id, DATA_KEY_VERSION_PREFIX):
            key = (scope_id, purpose)
            current = self._cache.entries.get(key)
            if current is not None:
                wait = current.loaded_at + RELOAD_SPACING - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                current = self._cache.entries.get(key)
            found = None if current is None else current.find_id(key_id)
            if found is not None:
                return found
            # From the primary: the version may be newer than anything this
            # instance knows of, and than what a replica has replayed.
            found = (await self.reload(scope_id, purpose, primary=True)).find_id(key_id)
            if found is not None:
                return found
        raise UnknownKeyVersionError(
            f"ciphertext names key version {show(key_id)}, which "
            f"{purpose!r} keys of scope {show(scope_id)} do not have: it was revoked, or the "
            "ciphertext belongs to another scope or purpose"
        )


def _unusable(
    scope_id: str, purpose: str, version_id: str, newest: bool, cause: Exception
) -> Refusal:
    which = "newest " if newest else ""
    problem = (
        f"the {which}{purpose!r} key version {version_id} of scope {show(scope_id)} cannot be "
        f"unwrapped with this KMS's root wrapper ({cause}); it was written under another root "
        "key, and the pair's other versions still work"
    )
    if not newest:
        advice = "data under it can be read only with the root key that wrapped it"
        return Refusal(KeyUnusableError, version_id, problem, advice, None)
    advice = (
        f"if this instance's root key is the right one, run rotate_keys({show(scope_id)}, "
        "replace_unusable=True) so that new data goes under keys it can unwrap, then revoke "
        "the unusable versions once nothing needs them; if it is the wrong one, fix its "
        "configuration"
    )
    remedy = Remedy("replace_unusable", scope_id=scope_id, key_version_id=version_id)
    return Refusal(KeyUnusableError, version_id, problem, advice, remedy)


def _revoked_message(scope_id: str, kind: str, version_id: str) -> str:
    return (
        f"{kind} key version {version_id} of scope {show(scope_id)} was revoked (its key state "
        "record says so) and its row is back, restored from a backup or written outside "
        "kms_async; it is refused: delete the row"
    )


def _mismatch_message(scope_id: str, kind: str, version_id: str) -> str:
    return (
        f"{kind} key version {version_id} of scope {show(scope_id)} does not match its binding "
        "(scope, purpose, key, id and number): the row was moved, renumbered or its binding "
        "swapped outside kms_async; it is refused"
    )


def _suspended(scope_id: str, purpose: str, version_id: str) -> Refusal:
    return Refusal(
        KeySuspendedError,
        version_id,
        f"{purpose!r} key version {version_id} of scope {show(scope_id)} is suspended: "
        "decryption under it is refused",
        f"resume_key_version({version_id!r}) if the data under it is still needed",
        Remedy("resume_key_version", scope_id=scope_id, key_version_id=version_id),
    )
