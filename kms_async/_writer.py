"""Every key write: create, rotate, rewrap, reconcile and revoke.

Each is one transaction: it all commits or none of it does, also when
cancelled. None wraps anything with a root wrapper before that wrapper has
unwrapped what the database holds (proof of possession, see ``_keyring``):
a wrong root key is refused, never written. Root wrapper calls (perhaps a
remote key service) happen before the transaction opens wherever possible,
so no lock is held while they run.

Rotations with ``rewrap`` and rewraps follow one path, read top to bottom:

1. **plan** outside the transaction: read the scopes' key versions and
   compute their new wrappings (wrapper calls, no lock held);
2. **check** the plan inside the transaction, under the write lock: if
   another writer changed the rows meanwhile, plan again, now under the lock,
   where nobody can overtake (contention costs holding the lock, never a
   failure);
3. **apply** the inserts and updates, announce the change, commit.

Bulk calls keep that shape and bounded memory: their scopes are handled
``CHUNK`` at a time, each chunk made, written and dropped before the next,
all in the call's one transaction (all or nothing). The first chunk (the
only one of most calls) is made before the transaction opens; later chunks
are made under the write lock, so a call over more than ``CHUNK`` scopes
calls the root wrapper while it holds that lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._cache import KeyCache, PurposeKeys, VersionKey
from ._durability import Durability, Ticket
from ._errors import (
    InvalidParameterError,
    KeyExistsError,
    KeyIntegrityError,
    KeyInUseError,
    KeyNotFoundError,
    KeyRollbackError,
    KMSError,
    OutcomeUnknownError,
    Remedy,
    RevokeTooSoonError,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    WrapperError,
    advised,
)
from ._events import EventKind, Events
from ._ids import DATA_KEY_PREFIX, DATA_KEY_VERSION_PREFIX, ROOT_KEY_PREFIX, new_id
from ._integrity import KeyState, bind_version, fingerprint, seal_state, unseal_state
from ._keyring import Keyring
from ._sql import Connection, Database, IntegrityError
from ._sql import _store as repo
from ._types import ROOT_PURPOSE
from ._validate import show
from ._wrappers import KEY_SIZE, unwrap_key, wrap_key

__all__ = ["Writer"]

logger = logging.getLogger("kms_async")

#: reconcile reads again this often when other processes create the same keys.
WRITE_ATTEMPTS = 5
#: Bulk writes of at most this many scopes put the new keys in the cache.
PRIME_LIMIT = 100
#: Bulk writes make and write this many scopes at a time (one transaction).
CHUNK = 5_000

Snapshot = tuple[str, list[repo.RootKeyVersionRow], list[repo.DataKeyVersionRow]]


class _StraddledCommit(Exception):
    """An unlocked snapshot's two reads saw different commits of another writer."""


class _ReadAgain(Exception):
    """Another writer changed what a reconcile read before it took the write lock."""


class _NothingDue(KMSError):
    """Under the write lock, none of the candidate scopes was due any more.

    Raised inside the transaction to roll it back; never escapes the writer.
    A library error, so the durability bookkeeping knows nothing committed.
    """


@dataclasses.dataclass(slots=True)
class _Write:
    """The collection version one write set (0 until it has bumped it)."""

    version: int = 0


def _chunks(scopes: list[str]) -> Iterator[list[str]]:
    """The scopes ``CHUNK`` at a time (at least one chunk)."""
    for start in range(0, max(len(scopes), 1), CHUNK):
        yield scopes[start : start + CHUNK]


@dataclasses.dataclass(frozen=True, slots=True)
class _NewScopes:
    """Keys for one chunk of new scopes, wrapped and ready to insert."""

    roots: list[tuple[VersionKey, bytes]]
    root_keys: list[repo.NewRootKey]
    data_keys: list[tuple[str, repo.NewDataKey, bytes]]  # scope, row, unwrapped key


@dataclasses.dataclass(frozen=True, slots=True)
class _Reconciliation:
    """The missing keys of one chunk of scopes, wrapped and ready to insert."""

    root_keys: list[repo.NewRootKey]
    data_keys: list[repo.NewDataKey]
    created: list[tuple[str, str]]  # (scope, purpose)
    fresh_roots: list[VersionKey]
    new_keys: dict[str, bytes]  # version id -> key, for the bindings


@dataclasses.dataclass(frozen=True, slots=True)
class _RewrapPlan:
    """New wrappings for one scope's key versions, and the rows they were made from."""

    root_key_id: str
    root_updates: list[tuple[bytes, str, bytes]]  # new wrapped, id, old wrapped
    data_updates: list[tuple[bytes, str, str, bytes]]  # new wrapped, root version, id, old

    def made_from(self) -> tuple[set[tuple[str, bytes]], set[tuple[str, bytes]]]:
        return (
            {(u[1], u[2]) for u in self.root_updates},
            {(u[2], u[3]) for u in self.data_updates},
        )


class Writer:
    """The write half of a KMS: one method per kind of write."""

    def __init__(
        self,
        database: Database,
        keyring: Keyring,
        cache: KeyCache,
        revoke_grace: float,
        events: Events,
        durability: Durability,
    ) -> None:
        self._db = database
        self._events = events
        self._durability = durability
        self._q = database.queries
        self._keyring = keyring
        self._cache = cache
        self.revoke_grace = revoke_grace

    @contextlib.asynccontextmanager
    async def _invalidating(self, scope_ids: list[str]) -> AsyncIterator[_Write]:
        """Drop the scopes' cached keys when a write ends, however it ends.

        A write cancelled while its commit was in flight may still have
        committed, so the cache is invalidated on every exit, not only on
        success; the next use reloads from what the database holds. The
        write's collection version joins the horizon unless the write surely
        rolled back, so no replica older than it answers a later cold load
        (a caller's transaction counts when its savepoint is released: it may
        commit at any moment after).
        """
        write = _Write()
        try:
            yield write
        except OutcomeUnknownError:
            self._keyring.horizon.saw(write.version)
            raise
        except Exception:
            raise
        except BaseException:
            # Cancelled, perhaps with the commit in flight.
            self._keyring.horizon.saw(write.version)
            raise
        else:
            self._keyring.horizon.saw(write.version)
        finally:
            self._cache.invalidate_scopes(scope_ids)

    async def _bump(self, tx: Connection, write: _Write) -> int:
        """The first statement of every key write (see ``repo.bump_collection_version``)."""
        write.version = await repo.bump_collection_version(tx, self._q)
        return write.version

    @contextlib.asynccontextmanager
    async def _versions_write(
        self, scope_ids: list[str], conn: Any
    ) -> AsyncIterator[tuple[Connection, Ticket, int]]:
        """A write that makes key versions: the scopes' cache entries dropped at
        its end, the durability wait around it, and its transaction, opened
        with the collection version bump; yields (transaction, ticket, version)."""
        async with (
            self._invalidating(scope_ids) as write,
            self._durability.write(conn) as ticket,
            self._db.transaction(conn, replicated=ticket.timeout) as tx,
        ):
            yield tx, ticket, await self._bump(tx, write)

    def _whole_scopes(self, kind: EventKind, scopes: list[str], conn: Any) -> None:
        """Report a change to every key of each scope (one event per scope)."""
        self._events.changed(
            kind,
            len(scopes),
            lambda: ((scope_id, None, None) for scope_id in scopes),
            in_transaction=conn is not None,
        )

    # -- create ------------------------------------------------------------

    async def create(self, scopes: list[str], purposes: list[str], conn: Any) -> None:
        await self._keyring.prove_any(conn)
        chunks = _chunks(scopes)
        first = await self._new_scopes(next(chunks), purposes)
        # The new root key version of each scope, for the events (kept only for a callback).
        made: list[str] | None = [] if self._events.enabled else None
        async with self._versions_write(scopes, conn) as (tx, ticket, changed):
            await self._insert_scopes(tx, scopes, first, ticket, made)
            for chunk in chunks:
                new = await self._new_scopes(chunk, purposes)
                await self._insert_scopes(tx, scopes, new, ticket, made)
            await repo.announce(tx, self._q, changed, scopes)
        self._events.changed(
            "created",
            len(scopes),
            lambda: zip(scopes, [None] * len(scopes), made or (), strict=True),
            in_transaction=conn is not None,
        )
        if conn is None and len(scopes) <= PRIME_LIMIT:
            # Committed: the first encrypt for a new scope needs no query.
            for root, _ in first.roots:
                self._cache.put_root(root.id, root)
            for scope_id, row, key in first.data_keys:
                version = VersionKey(row.version_id, 1, AESGCM(key), key)
                self._cache.put((scope_id, row.purpose), PurposeKeys([version]))
        logger.debug("kms_async: created keys for %d scope(s): %s", len(scopes), purposes)

    async def _new_scopes(self, scopes: list[str], purposes: list[str]) -> _NewScopes:
        """Root and data keys for new scopes, wrapped (root wrapper calls)."""
        roots = await self._keyring.new_roots(len(scopes))
        root_keys = []
        data_keys = []
        for scope_id, (root, wrapped) in zip(scopes, roots, strict=True):
            root_key = repo.NewRootKey(new_id(ROOT_KEY_PREFIX), scope_id, root.id, wrapped)
            root_keys.append(root_key)
            for purpose in purposes:
                key = os.urandom(KEY_SIZE)
                row = repo.NewDataKey(
                    new_id(DATA_KEY_PREFIX),
                    root_key.id,
                    purpose,
                    new_id(DATA_KEY_VERSION_PREFIX),
                    root.id,
                    wrap_key(root.cipher, root.id, key),
                )
                data_keys.append((scope_id, row, key))
        return _NewScopes(roots, root_keys, data_keys)

    async def _insert_scopes(
        self,
        tx: Connection,
        scopes: list[str],
        new: _NewScopes,
        ticket: Ticket,
        made: list[str] | None,
    ) -> None:
        try:
            await repo.insert_root_keys(tx, self._q, new.root_keys)
        except IntegrityError as exc:
            if exc.kind != "unique":
                raise
            which = (
                f"scope {show(scopes[0])} already has"
                if len(scopes) == 1
                else "one of the scopes already has"
            )
            raise advised(
                KeyExistsError,
                f"{which} keys and nothing was created",
                "use rotate_keys() to make new versions or reconcile_keys() to add purposes",
                Remedy("reconcile_keys", scope_id=scopes[0] if len(scopes) == 1 else None),
            ) from exc
        await repo.insert_data_keys(tx, self._q, [row for _, row, _ in new.data_keys])
        new_keys = {root.id: root.key for root, _ in new.roots}
        new_keys.update((row.version_id, key) for _, row, key in new.data_keys)
        ticket.created(new_keys)
        await self._seal(tx, [k.scope_id for k in new.root_keys], new_keys)
        if made is not None:
            made.extend(root.id for root, _ in new.roots)

    # -- rotate and rewrap -------------------------------------------------

    async def rotate(
        self,
        scopes: list[str],
        *,
        rewrap: bool,
        conn: Any,
        replace_unusable: bool = False,
        cause: str | None = None,
    ) -> None:
        """Rotate the scopes; ``cause`` goes into the events' ``detail`` (e.g. ``"policy"``)."""
        chunks = _chunks(scopes)
        first = next(chunks)
        await self._keyring.prove_scopes(first, conn, replace_unusable=replace_unusable)
        roots = await self._new_rotation(first)
        plans = await self._plan_outside(first, conn, _targets(roots)) if rewrap else None
        made: list[str] | None = [] if self._events.enabled else None
        async with self._versions_write(scopes, conn) as (tx, ticket, changed):
            if rewrap:
                plans = await self._plan_checked(tx, first, plans, _targets(roots))
            await self._write_rotation(tx, roots, plans, ticket)
            if made is not None:
                made.extend(root.id for root, _ in roots.values())
            for chunk in chunks:
                # Under the write lock: nobody can change these rows before we commit.
                await self._keyring.prove_scopes_in(tx, chunk, replace_unusable=replace_unusable)
                more = await self._new_rotation(chunk)
                plans = None
                if rewrap:
                    snapshots = await self._snapshots(tx, chunk)
                    plans = await self._plans(chunk, snapshots, _targets(more), locked=True)
                await self._write_rotation(tx, more, plans, ticket)
                if made is not None:
                    made.extend(root.id for root, _ in more.values())
            await repo.announce(tx, self._q, changed, scopes)
        self._events.changed(
            "rotated",
            len(scopes),
            lambda: zip(scopes, [None] * len(scopes), made or (), strict=True),
            in_transaction=conn is not None,
            detail=cause,
        )
        if conn is None and len(scopes) <= PRIME_LIMIT:
            for root, _ in roots.values():
                self._cache.put_root(root.id, root)
        logger.debug("kms_async: rotated %d scope(s) (rewrap=%s)", len(scopes), rewrap)

    async def rotate_due(
        self,
        *,
        max_age: float | None,
        max_encryptions: int | None,
        scope_ids: list[str] | None,
        limit: int | None,
        cause: str = "policy",
    ) -> list[str]:
        """Rotate every scope due under the policy, ``CHUNK`` at a time; the scopes rotated.

        ``cause`` goes into each scope's ``rotated`` event (``detail``).

        Each chunk is found by a read, made (root wrapper calls, no lock), and
        then checked again inside its own transaction after the collection
        version bump: that row lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite)
        is the one every key writer of every instance takes first, so a scope
        another instance rotated meanwhile is seen as rotated, no longer due,
        and left alone. Concurrent runs rotate each due scope once.
        """
        # "No criterion" as a bound no key reaches: one statement serves every policy.
        age = 1e18 if max_age is None else max_age
        count = 2**63 - 1 if max_encryptions is None else max_encryptions
        rotated: list[str] = []
        after = ""
        pending = sorted(set(scope_ids)) if scope_ids is not None else None
        while limit is None or len(rotated) < limit:
            size = CHUNK if limit is None else min(CHUNK, limit - len(rotated))
            listed = None
            if pending is not None:
                if not pending:
                    break
                listed, pending = pending[:size], pending[size:]
            async with self._db.read() as reader:
                candidates = await repo.due_scopes(
                    reader,
                    self._q,
                    after="" if listed is not None else after,
                    max_age=age,
                    max_encryptions=count,
                    limit=size,
                    scope_ids=listed,
                )
            if candidates:
                after = candidates[-1]
                rotated.extend(await self._rotate_if_due(candidates, age, count, cause))
            if listed is None and len(candidates) < size:
                break
        logger.debug("kms_async: rotate_due rotated %d scope(s)", len(rotated))
        return rotated

    async def _rotate_if_due(
        self, candidates: list[str], max_age: float, count: int, cause: str
    ) -> list[str]:
        """Rotate those of ``candidates`` still due under the write lock (one transaction)."""
        await self._keyring.prove_scopes(candidates, None)
        roots = await self._new_rotation(candidates)
        due: list[str] = []
        try:
            async with self._versions_write(due, None) as (tx, ticket, changed):
                due.extend(
                    await repo.due_scopes(
                        tx,
                        self._q,
                        after="",
                        max_age=max_age,
                        max_encryptions=count,
                        limit=len(candidates),
                        scope_ids=candidates,
                    )
                )
                if not due:
                    raise _NothingDue  # roll back: no write, no version bump
                await self._write_rotation(tx, {s: roots[s] for s in due}, None, ticket)
                await repo.announce(tx, self._q, changed, due)
        except _NothingDue:
            return []
        self._events.changed(
            "rotated",
            len(due),
            lambda: [(scope_id, None, roots[scope_id][0].id) for scope_id in due],
            detail=cause,
        )
        if len(due) <= PRIME_LIMIT:
            for scope_id in due:
                root = roots[scope_id][0]
                self._cache.put_root(root.id, root)
        return due

    async def _new_rotation(self, scopes: list[str]) -> dict[str, tuple[VersionKey, bytes]]:
        """A new root key version per scope, wrapped (root wrapper calls)."""
        return dict(zip(scopes, await self._keyring.new_roots(len(scopes)), strict=True))

    async def _write_rotation(
        self,
        tx: Connection,
        roots: dict[str, tuple[VersionKey, bytes]],
        plans: dict[str, _RewrapPlan] | None,
        ticket: Ticket,
    ) -> None:
        new_keys = await self._insert_rotation(tx, roots)
        ticket.created(new_keys)
        if plans:
            await self._apply(tx, plans)
        await self._seal(tx, list(roots), new_keys)

    async def rewrap(self, scopes: list[str], *, conn: Any) -> None:
        chunks = _chunks(scopes)
        first = next(chunks)
        plans = await self._plan_outside(first, conn, None)
        async with self._invalidating(scopes) as write, self._db.transaction(conn) as tx:
            changed = await self._bump(tx, write)
            await self._apply(tx, await self._plan_checked(tx, first, plans, None))
            for chunk in chunks:
                # Under the write lock: nobody can change these rows before we commit.
                snapshots = await self._snapshots(tx, chunk)
                await self._apply(tx, await self._plans(chunk, snapshots, None, locked=True))
            await repo.announce(tx, self._q, changed, scopes)
        self._whole_scopes("rewrapped", scopes, conn)
        logger.debug("kms_async: rewrapped %d scope(s)", len(scopes))

    async def _insert_rotation(
        self, tx: Connection, roots: dict[str, tuple[VersionKey, bytes]]
    ) -> dict[str, bytes]:
        """A new root key version per scope, and a new version of each data key under it.

        Every data key the scope has gets a new version, whatever purposes this
        KMS was opened with: a rotation after a compromise must not leave a key
        behind because this process does not use it.
        """
        owners = await self._root_keys_of(tx, list(roots))
        await repo.insert_root_key_versions(
            tx,
            self._q,
            [(root.id, owners[scope_id], wrapped) for scope_id, (root, wrapped) in roots.items()],
        )
        new_root_of = {owners[scope_id]: root for scope_id, (root, _) in roots.items()}
        new_keys = {root.id: root.key for root in new_root_of.values()}
        new_versions = []
        for data_key_id, root_key_id, purpose in await repo.data_keys_of_roots(
            tx, self._q, list(new_root_of)
        ):
            root = new_root_of[root_key_id]
            version_id = new_id(DATA_KEY_VERSION_PREFIX)
            new_keys[version_id] = key = os.urandom(KEY_SIZE)
            new_versions.append(
                repo.NewDataKey(
                    data_key_id,
                    root_key_id,
                    purpose,
                    version_id,
                    root.id,
                    wrap_key(root.cipher, root.id, key),
                    new_key=False,
                )
            )
        await repo.insert_data_keys(tx, self._q, new_versions)
        return new_keys

    async def _plan_outside(
        self, scopes: list[str], conn: Any, targets: dict[str, VersionKey] | None
    ) -> dict[str, _RewrapPlan] | None:
        """Step 1: plans from reads outside the write transaction (None: plan under the lock)."""
        if conn is not None:
            # The caller's transaction: read inside it, in a savepoint.
            async with self._db.transaction(conn) as tx:
                snapshots = await self._snapshots(tx, scopes)
        else:
            async with self._db.read() as reader:
                snapshots = await self._snapshots(reader, scopes)
        try:
            return await self._plans(scopes, snapshots, targets, locked=False)
        except _StraddledCommit:
            return None

    async def _plan_checked(
        self,
        tx: Connection,
        scopes: list[str],
        plans: dict[str, _RewrapPlan] | None,
        targets: dict[str, VersionKey] | None,
    ) -> dict[str, _RewrapPlan]:
        """Step 2: the plans if the rows are still what they were made from, else new ones."""
        if plans is not None:
            versions = await repo.key_versions_of_roots(
                tx, self._q, [plan.root_key_id for plan in plans.values()]
            )
            if all(
                _rows_of(*versions[plan.root_key_id]) == plan.made_from() for plan in plans.values()
            ):
                return plans
        # Under the write lock: nobody can change the rows before we commit.
        return await self._plans(scopes, await self._snapshots(tx, scopes), targets, locked=True)

    async def _apply(self, tx: Connection, plans: dict[str, _RewrapPlan]) -> None:
        """Step 3: write the new wrappings."""
        await repo.update_wrapped_keys(
            tx,
            self._q,
            [u for plan in plans.values() for u in plan.root_updates],
            [u for plan in plans.values() for u in plan.data_updates],
        )

    async def _plans(
        self,
        scopes: list[str],
        snapshots: dict[str, Snapshot],
        targets: dict[str, VersionKey] | None,
        *,
        locked: bool,
    ) -> dict[str, _RewrapPlan]:
        return {
            scope_id: await self._plan(
                scope_id,
                snapshots[scope_id],
                None if targets is None else targets[scope_id],
                locked=locked,
            )
            for scope_id in scopes
        }

    async def _plan(
        self, scope_id: str, snapshot: Snapshot, target: VersionKey | None, *, locked: bool
    ) -> _RewrapPlan:
        """New wrappings for every key version of one scope.

        Root versions are re-wrapped by the root wrapper, data versions by
        ``target`` (a rotation's new root version) or else the newest root
        version.
        """
        root_key_id, root_rows, data_rows = snapshot
        if not root_rows:
            raise KeyNotFoundError(f"scope {show(scope_id)} has no root key versions")
        roots: dict[str, VersionKey] = {}
        root_updates = []
        for row in root_rows:
            roots[row.id] = await self._keyring.unwrap_root(row.id, row.version, row.wrapped)
            rewrapped = await self._keyring.wrap_root(roots[row.id].key)
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
                raise _StraddledCommit
            key = unwrap_key(parent.cipher, parent.id, d.id, d.wrapped)
            data_updates.append((wrap_key(goal.cipher, goal.id, key), goal.id, d.id, d.wrapped))
        return _RewrapPlan(root_key_id, root_updates, data_updates)

    async def _snapshots(self, conn: Connection, scopes: list[str]) -> dict[str, Snapshot]:
        """Each scope's root key id, root key versions and data key versions
        (three queries per 1,000 scopes)."""
        owners = await self._root_keys_of(conn, scopes)
        versions = await repo.key_versions_of_roots(conn, self._q, list(owners.values()))
        return {scope_id: (owners[scope_id], *versions[owners[scope_id]]) for scope_id in scopes}

    async def _root_keys_of(self, conn: Connection, scopes: list[str]) -> dict[str, str]:
        """scope id -> root key id; KeyNotFoundError names the first scope without keys."""
        owners = await repo.root_keys_of_scopes(conn, self._q, scopes)
        missing = [scope_id for scope_id in scopes if scope_id not in owners]
        if missing:
            others = f" (and {len(missing) - 1} more scopes)" if len(missing) > 1 else ""
            raise advised(
                KeyNotFoundError,
                f"scope {show(missing[0])}{others} has no keys",
                "create them with create_keys()",
                Remedy("create_keys", scope_id=missing[0]),
            )
        return owners

    # -- revoke ------------------------------------------------------------

    async def revoke(
        self,
        key_version_id: str,
        *,
        is_root: bool,
        scope_id: str | None,
        conn: Any,
        kind: EventKind = "revoked",
    ) -> None:
        if self._q.has_bindings and ROOT_PURPOSE not in self._keyring.wrappers:
            raise KeyNotFoundError(
                "missing external root wrapper: a revocation is recorded in the scope's sealed "
                "key state record (so a restored row stays revoked), which needs the root "
                "wrapper; pass root_wrapper= to KMS.open()"
            )
        owners: list[str] = []
        purpose: str | None = ROOT_PURPOSE
        try:
            async with self._invalidating(owners) as write, self._db.transaction(conn) as tx:
                changed = await self._bump(tx, write)
                found = await repo.version_for_revoke(tx, self._q, key_version_id, root=is_root)
                if found is None or (scope_id is not None and found.scope_id != scope_id):
                    where = "" if scope_id is None else f" in scope {show(scope_id)}"
                    raise KeyNotFoundError(f"no key version {show(key_version_id)}{where}")
                owners.append(found.scope_id)
                if not is_root:
                    purpose = found.purpose
                which = "root" if is_root else repr(found.purpose)
                if found.newest:
                    raise advised(
                        KeyInUseError,
                        f"{key_version_id} is the newest {which} key version of scope "
                        f"{show(found.scope_id)}",
                        "rotate_keys() first",
                        Remedy("rotate_keys", scope_id=found.scope_id),
                    )
                # What is still in use first: that needs work, the grace only time.
                if found.wrapped_data_versions:
                    raise advised(
                        KeyInUseError,
                        f"{key_version_id} still wraps {found.wrapped_data_versions} data key "
                        "version(s)",
                        f"run rewrap_keys({show(found.scope_id)}) so they move to the newest "
                        "root key version",
                        Remedy("rewrap_keys", scope_id=found.scope_id),
                    )
                if not is_root:
                    await self._refuse_if_referenced(tx, key_version_id)
                self._check_grace(key_version_id, found.superseded_for)
                await repo.delete_key_version(tx, self._q, key_version_id, root=is_root)
                if not is_root:
                    await repo.set_suspended(tx, self._q, key_version_id, found.scope_id, False)
                    await repo.delete_usage(tx, self._q, key_version_id)
                # The binding stays: its fingerprint recognises a copy of the
                # revoked key put back under another id.
                await self._seal(tx, [found.scope_id], {}, revoked=[key_version_id])
                await repo.announce(tx, self._q, changed, owners)
        except IntegrityError as exc:
            # A row that appeared since the check, under a restrict foreign
            # key, or under a deferred one (which fails at commit).
            if exc.kind != "foreign_key":
                raise
            raise advised(
                KeyInUseError,
                f"{key_version_id} still protects application rows ({exc.detail})",
                "re-encrypt them under the newest version (reencrypt_key_version) before "
                "revoking it",
                Remedy("reencrypt_key_version", key_version_id=key_version_id),
            ) from exc
        self._events.changed(
            kind,
            1,
            lambda: [(owners[0], purpose, key_version_id)],
            in_transaction=conn is not None,
        )
        if is_root:
            self._cache.roots.pop(key_version_id, None)
        logger.debug("kms_async: revoked key version %s of scope %s", key_version_id, owners)

    # -- suspend and resume ------------------------------------------------

    async def set_suspended(
        self, key_version_id: str, *, suspend: bool, scope_id: str | None, conn: Any
    ) -> None:
        if not self._q.has_suspensions:
            async with self._keyring.reading(conn) as reader:
                await repo.find_suspensions(reader, self._q)
            if not self._q.has_suspensions:
                raise SchemaVersionError(
                    "the database has no table for suspended key versions "
                    f"({self._q.suspension_table}); run kms_async.migrate() or apply "
                    "sql/<dialect>/04_kms_key_version_suspension.up.sql with your migration tool"
                )
        owners: list[str] = []
        async with self._invalidating(owners) as write, self._db.transaction(conn) as tx:
            changed = await self._bump(tx, write)
            found = await repo.version_for_revoke(tx, self._q, key_version_id, root=False)
            if found is None or (scope_id is not None and found.scope_id != scope_id):
                where = "" if scope_id is None else f" in scope {show(scope_id)}"
                raise KeyNotFoundError(f"no data key version {show(key_version_id)}{where}")
            owners.append(found.scope_id)
            if suspend and found.newest:
                raise KeyInUseError(
                    f"{key_version_id} is the newest {found.purpose!r} key version of scope "
                    f"{show(found.scope_id)}, which new data is encrypted under; rotate_keys() "
                    "first, then suspend it"
                )
            did = await repo.set_suspended(tx, self._q, key_version_id, found.scope_id, suspend)
            await repo.announce(tx, self._q, changed, owners)
            purpose = found.purpose
        if did:
            self._events.changed(
                "suspended" if suspend else "resumed",
                1,
                lambda: [(owners[0], purpose, key_version_id)],
                in_transaction=conn is not None,
            )
        logger.info(
            "kms_async: %s key version %s of scope %s",
            "suspended" if suspend else "resumed",
            key_version_id,
            show(owners[0]),
        )

    def _check_grace(self, key_version_id: str, superseded_for: float) -> None:
        """Refuse to revoke what other instances may still be encrypting under."""
        remaining = self.revoke_grace - superseded_for
        if self.revoke_grace > 0 and remaining > 0:
            raise advised(
                RevokeTooSoonError,
                f"{key_version_id} was superseded {max(superseded_for, 0.0):.1f} s ago; other "
                "instances may still encrypt under it until it has been superseded for "
                f"{self.revoke_grace:g} s (the revoke grace)",
                f"retry in {remaining:.1f} s",
                Remedy("wait_revoke_grace", key_version_id=key_version_id),
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
        raise advised(
            KeyInUseError,
            f"{key_version_id} still protects application rows: {what}",
            "re-encrypt them under the newest version (reencrypt_key_version) before revoking it",
            Remedy("reencrypt_key_version", key_version_id=key_version_id),
        )

    # -- bindings and the key state record (see _integrity) ------------------

    async def _seal(
        self,
        tx: Connection,
        scopes: list[str],
        new_keys: dict[str, bytes],
        *,
        revoked: list[str] | None = None,
        reset: bool = False,
    ) -> None:
        """Bind the versions in ``new_keys`` and seal each scope's new key state record.

        Runs inside the write's transaction, after its inserts (the database
        has numbered the new versions). The previous record must verify
        (``reset``, for bind_keys, starts a fresh one where it does not).

        Raises:
            KeyIntegrityError: a scope's record does not verify.
            KeyRollbackError: it is older than one this instance has seen.
        """
        if not self._q.has_bindings or not scopes:
            return
        q = self._q
        owners = await self._root_keys_of(tx, scopes)
        versions = await repo.key_versions_of_roots(tx, q, list(owners.values()))
        purposes = {r[0]: r[2] for r in await repo.data_keys_of_roots(tx, q, list(owners.values()))}
        bound = set(await repo.bindings_of_scopes(tx, q, scopes))
        states = await repo.states_of_scopes(tx, q, scopes)
        new_bindings: list[tuple[str, str, bytes, bytes | None]] = []
        new_states: list[tuple[str, int, str, bytes, bytes]] = []
        for scope_id in scopes:
            root_key_id = owners[scope_id]
            root_rows, data_rows = versions[root_key_id]
            if not root_rows:
                continue
            for r in root_rows:
                if r.id in new_keys:
                    key = new_keys[r.id]
                    binding = bind_version(
                        key, scope_id, ROOT_PURPOSE, root_key_id, r.id, r.version
                    )
                    new_bindings.append((r.id, scope_id, binding, fingerprint(key)))
                    bound.add(r.id)
            for d in data_rows:
                if d.id in new_keys:
                    binding = bind_version(
                        new_keys[d.id],
                        scope_id,
                        purposes[d.data_key_id],
                        d.data_key_id,
                        d.id,
                        d.version,
                    )
                    new_bindings.append((d.id, scope_id, binding, fingerprint(new_keys[d.id])))
                    bound.add(d.id)
            previous = await self._previous_state(
                scope_id, states.get(scope_id), root_rows, new_keys, reset=reset
            )
            newest: dict[str, tuple[str, int]] = {}
            for owner, row_id, number in [(root_key_id, r.id, r.version) for r in root_rows] + [
                (d.data_key_id, d.id, d.version) for d in data_rows
            ]:
                if row_id in bound and number > newest.get(owner, ("", 0))[1]:
                    newest[owner] = (row_id, number)
            sealer = root_rows[-1]
            sealer_key = new_keys.get(sealer.id)
            if sealer_key is None:
                sealer_key = (
                    await self._keyring.unwrap_root(sealer.id, sealer.version, sealer.wrapped)
                ).key
            serial = max(
                0 if previous is None else previous.serial, self._keyring.seen.get(scope_id, 0)
            )
            state = KeyState(
                scope_id=scope_id,
                serial=serial + 1,
                root_version_id=sealer.id,
                newest=newest,
                revoked=(frozenset() if previous is None else previous.revoked)
                | frozenset(revoked or ()),
            )
            body, mac = seal_state(state, sealer_key)
            new_states.append((scope_id, state.serial, sealer.id, body, mac))
        await repo.put_bindings(tx, q, new_bindings)
        await repo.put_states(tx, q, new_states)

    async def _previous_state(
        self,
        scope_id: str,
        stored: repo.StateRow | None,
        root_rows: list[repo.RootKeyVersionRow],
        new_keys: dict[str, bytes],
        *,
        reset: bool,
    ) -> KeyState | None:
        seen = self._keyring.seen.get(scope_id, 0)
        if stored is None:
            if seen and not reset:
                raise KeyRollbackError(
                    f"the key state record of scope {show(scope_id)} is gone, though this "
                    f"instance has seen it at serial {seen}; nothing was written: restore the "
                    "newer state, or run bind_keys() (kms-async bind) to seal the current one"
                )
            return None
        row = next((r for r in root_rows if r.id == stored.root_version_id), None)
        state = None
        why = "does not verify"
        if row is not None:
            key = new_keys.get(row.id)
            try:
                if key is None:
                    key = (await self._keyring.unwrap_root(row.id, row.version, row.wrapped)).key
            except WrapperError as exc:
                if exc.retryable:
                    raise
                # Carrying on without it would drop the revocations it records.
                why = f"cannot be checked: its root key version {row.id} cannot be unwrapped"
            else:
                state = unseal_state(scope_id, row.id, stored.body, stored.mac, key)
        if state is None:
            if reset:
                return None
            raise KeyIntegrityError(
                f"the key state record of scope {show(scope_id)} {why}; nothing was written: "
                "restore it from a backup, or run bind_keys() (kms-async bind) to seal the "
                "current state if the key tables are known to be right"
            )
        if state.serial < seen and not reset:
            raise KeyRollbackError(
                f"the key state record of scope {show(scope_id)} is at serial {state.serial}, "
                f"older than serial {seen} this instance has seen; nothing was written: "
                "restore the newer state"
            )
        return state

    async def bind(self, scopes: list[str], *, conn: Any = None) -> int:
        """Bind the scopes' unbound key versions and seal their state; the count bound.

        Versions whose binding does not match are left as they are (and stay
        refused): binding them again would bless the tampering.

        Raises:
            SchemaVersionError: the database has no binding tables.
            WrapperError: the root wrapper cannot unwrap the scopes' keys.
        """
        if not self._q.has_bindings:
            async with self._keyring.reading(conn) as reader:
                await repo.find_bindings(reader, self._q)
            if not self._q.has_bindings:
                raise SchemaVersionError(
                    f"the database has no key binding tables ({self._q.binding_table}, "
                    f"{self._q.state_table}); run kms_async.migrate() or apply "
                    "sql/<dialect>/06_kms_key_binding.up.sql with your migration tool"
                )
        await self._keyring.prove_scopes(scopes, conn)
        async with self._keyring.reading(conn) as reader:
            snapshots = await self._snapshots(reader, scopes)
            bound = await repo.bindings_of_scopes(reader, self._q, scopes)
            sealed = await repo.states_of_scopes(reader, self._q, scopes)
            copies = {}
            keys: dict[str, bytes] = {}
            todo: list[str] = []
            for scope_id in scopes:
                count = len(keys)
                _, root_rows, data_rows = snapshots[scope_id]
                roots: dict[str, VersionKey] = {}
                for r in root_rows:
                    try:
                        roots[r.id] = await self._keyring.unwrap_root(r.id, r.version, r.wrapped)
                    except KeyIntegrityError:
                        continue
                    if r.id not in bound:
                        copies[r.id] = await repo.binding_by_fingerprint(
                            reader, self._q, fingerprint(roots[r.id].key)
                        )
                        if any(other != r.id for other, _ in copies[r.id]):
                            logger.warning(
                                "kms_async: not binding root key version %s of scope %s: it "
                                "is a copy of a bound root key version of another place",
                                r.id,
                                show(scope_id),
                            )
                            del roots[r.id]
                            continue
                        keys[r.id] = roots[r.id].key
                for d in data_rows:
                    parent = roots.get(d.root_key_version_id)
                    if d.id in bound or parent is None:
                        continue
                    key = unwrap_key(parent.cipher, parent.id, d.id, d.wrapped)
                    found = await repo.binding_by_fingerprint(reader, self._q, fingerprint(key))
                    if any(other != d.id for other, _ in found):
                        logger.warning(
                            "kms_async: not binding data key version %s of scope %s: it holds "
                            "the key of a bound or revoked version of another place",
                            d.id,
                            show(scope_id),
                        )
                        continue
                    keys[d.id] = key
                # A scope with nothing left to bind and a record is done: a
                # second run (resuming a bulk one) skips it.
                if len(keys) > count or scope_id not in sealed:
                    todo.append(scope_id)
        if not todo:
            return 0
        async with self._invalidating(todo) as write, self._db.transaction(conn) as tx:
            changed = await self._bump(tx, write)
            await self._seal(tx, todo, keys, reset=True)
            await repo.announce(tx, self._q, changed, todo)
        self._whole_scopes("bound", todo, conn)
        logger.debug("kms_async: bound %d key version(s) of %d scope(s)", len(keys), len(scopes))
        return len(keys)

    # -- reconcile ---------------------------------------------------------

    async def reconcile(self, scopes: list[str], purposes: list[str]) -> list[tuple[str, str]]:
        if not purposes:
            raise InvalidParameterError("missing purposes")
        # Before any new scope's root key is wrapped, and outside the transaction.
        await self._keyring.prove_any(None)
        refused: IntegrityError | None = None
        for _attempt in range(WRITE_ATTEMPTS):
            made: dict[tuple[str, str], str] = {}
            try:
                created = await self._reconcile(scopes, purposes, made)
            except _ReadAgain as again:
                cause = again.__cause__
                refused = cause if isinstance(cause, IntegrityError) else None
                if refused is not None and self._foreign_refusal(refused):
                    break
                continue
            created.sort()
            self._report_created(created, made)
            logger.debug("kms_async: reconcile created %d data keys", len(created))
            return created
        if refused is not None and refused.kind == "foreign_key":
            # Contention clears once the other writer commits; a foreign key
            # of the application's own on the kms tables (scope ids that must
            # name a tenant row, say) refuses every attempt the same way.
            raise StorageError(
                f"a foreign key refused the new keys ({refused.detail or refused}); if an "
                "application table's foreign key constrains the kms tables, create the rows "
                "it requires (such as the scope's tenant) first"
            ) from refused
        raise TransientStorageError("other processes kept creating the same keys; retry")

    def _foreign_refusal(self, exc: IntegrityError) -> bool:
        """Whether a foreign key failure names a table that is not one of the kms tables.

        Only PostgreSQL says which table a missing row belongs in; SQLite's
        failures are told apart by repeating (see ``reconcile``).
        """
        if exc.kind != "foreign_key":
            return False
        named = re.search(r'is not present in table "([^"]+)"', exc.detail)
        return named is not None and not named.group(1).startswith(f"{self._q.prefix}_")

    def _report_created(
        self, created: list[tuple[str, str]], made: dict[tuple[str, str], str]
    ) -> None:
        self._events.changed(
            "created", len(created), lambda: [(s, p, made[s, p]) for s, p in created]
        )

    async def _reconcile(
        self, scopes: list[str], purposes: list[str], made: dict[tuple[str, str], str]
    ) -> list[tuple[str, str]]:
        """One attempt: plan the first chunk that lacks keys outside the transaction,
        the chunks after it under the write lock; write nothing if nothing lacks keys.

        Raises:
            _ReadAgain: another process changed the keys since they were read.
        """
        chunks = _chunks(scopes)
        for chunk in chunks:
            async with self._db.read() as reader:
                missing, latest = await self._missing(reader, chunk, purposes)
            if missing:
                first = await self._reconciliation(missing, latest)
                break
        else:
            return []
        created: list[tuple[str, str]] = []
        changed: list[str] = []
        try:
            async with self._versions_write(changed, None) as (tx, _ticket, version):
                await self._insert_reconciliation(tx, first, created, changed, made)
                for chunk in chunks:
                    missing, latest = await self._missing(tx, chunk, purposes)
                    if missing:
                        plan = await self._reconciliation(missing, latest)
                        await self._insert_reconciliation(tx, plan, created, changed, made)
                await repo.announce(tx, self._q, version, changed)
        except IntegrityError as exc:
            # Another process created some of these keys, or revoked a root
            # version we used, since the read.
            if exc.kind not in ("unique", "foreign_key"):
                raise
            raise _ReadAgain from exc
        for version_key in first.fresh_roots[:PRIME_LIMIT]:
            self._cache.put_root(version_key.id, version_key)
        return created

    async def _missing(
        self, reader: Connection, scopes: list[str], purposes: list[str]
    ) -> tuple[list[tuple[str, str, str | None]], dict[str, repo.RootKeyVersionRow]]:
        """(scope, purpose, root key id or None) of each missing data key, and the
        newest version of each root key they have."""
        missing = await repo.missing_data_keys(reader, self._q, scopes, purposes)
        with_root = sorted({m[2] for m in missing if m[2] is not None})
        return missing, await repo.latest_root_key_versions(reader, self._q, with_root)

    async def _reconciliation(
        self,
        missing: list[tuple[str, str, str | None]],
        latest: dict[str, repo.RootKeyVersionRow],
    ) -> _Reconciliation:
        """Wrap the missing keys (root wrapper calls: unwrap existing roots, wrap new ones).

        Raises:
            _ReadAgain: a root key has no versions (deleted since it was read).
        """
        roots: dict[str, VersionKey] = {}
        for root_key_id, row in latest.items():
            roots[root_key_id] = await self._keyring.unwrap_root(row.id, row.version, row.wrapped)
        rootless = list(dict.fromkeys(m[0] for m in missing if m[2] is None))
        new_roots: dict[str, repo.NewRootKey] = {}
        fresh: list[VersionKey] = []
        for scope_id, (root, wrapped) in zip(
            rootless, await self._keyring.new_roots(len(rootless)), strict=True
        ):
            new_roots[scope_id] = repo.NewRootKey(
                new_id(ROOT_KEY_PREFIX), scope_id, root.id, wrapped
            )
            roots[new_roots[scope_id].id] = root
            fresh.append(root)
        rows = []
        new_keys = {root.id: root.key for root in fresh}
        for scope_id, purpose, existing_root in missing:
            owner = existing_root if existing_root is not None else new_roots[scope_id].id
            if owner not in roots:
                raise _ReadAgain
            root = roots[owner]
            version_id = new_id(DATA_KEY_VERSION_PREFIX)
            new_keys[version_id] = key = os.urandom(KEY_SIZE)
            rows.append(
                repo.NewDataKey(
                    new_id(DATA_KEY_PREFIX),
                    owner,
                    purpose,
                    version_id,
                    root.id,
                    wrap_key(root.cipher, root.id, key),
                )
            )
        created = [(m[0], m[1]) for m in missing]
        return _Reconciliation(list(new_roots.values()), rows, created, fresh, new_keys)

    async def _insert_reconciliation(
        self,
        tx: Connection,
        plan: _Reconciliation,
        created: list[tuple[str, str]],
        changed: list[str],
        made: dict[tuple[str, str], str],
    ) -> None:
        # Listed first: the cache drops them however the transaction ends.
        changed.extend(dict.fromkeys(scope_id for scope_id, _ in plan.created))
        await repo.insert_root_keys(tx, self._q, plan.root_keys)
        await repo.insert_data_keys(tx, self._q, plan.data_keys)
        await self._seal(tx, list(dict.fromkeys(s for s, _ in plan.created)), plan.new_keys)
        created.extend(plan.created)
        if self._events.enabled:
            made.update(zip(plan.created, (row.version_id for row in plan.data_keys), strict=True))


def _targets(roots: dict[str, tuple[VersionKey, bytes]]) -> dict[str, VersionKey]:
    """A rotation's new root key version of each scope."""
    return {scope_id: root for scope_id, (root, _) in roots.items()}


def _rows_of(
    root_rows: list[repo.RootKeyVersionRow], data_rows: list[repo.DataKeyVersionRow]
) -> tuple[set[tuple[str, bytes]], set[tuple[str, bytes]]]:
    return ({(r.id, r.wrapped) for r in root_rows}, {(d.id, d.wrapped) for d in data_rows})
