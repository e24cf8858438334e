"""Keeping cached keys in step with the committed database.

The database is the only authority. A check reads the collection version
(bumped by every key write); when it moved, the key change log says which
scopes the writes in between changed, and the check compares those scopes'
cached pairs against committed rows (every cached pair, when the log cannot
tell: a write that did not log, such as the Go package's). Only when the
pairs are compared, and the ones that differ reloaded or dropped, does it
record the version as seen. A check that fails records nothing: the next
one compares again.

PostgreSQL notifications are hints: one makes the watcher compare the named
scopes soon, never marks anything as seen. Payloads are validated (anything
malformed is ignored) and bursts are coalesced: at most one check runs at a
time, and hint checks are spaced so a flood of forged notifications costs a
few queries, not one reload each.

An instance must never go on encrypting under keys it has not been able to
confirm for long: revoking a superseded version elsewhere would strand what
it writes. Each successful check confirms the cache as of the moment it
started; when no check has succeeded for ``hard_limit`` seconds, a timer (not
the check, which may be stuck on a dead connection) demotes every cached
pair. Encrypting under a demoted pair needs a fresh load from the database;
decrypting may still use it while the database cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio

from ._cache import CacheKey, KeyCache, PurposeKeys
from ._errors import KeyNotFoundError, KMSError
from ._sql import Database
from ._sql import _store as repo
from ._validate import show

__all__ = ["Freshness", "Horizon"]

logger = logging.getLogger("kms_async")

#: Hint checks start at most this often; notifications in between are merged.
HINT_SPACING = 0.005
#: Scopes remembered from notifications before a full check is cheaper.
MAX_HINTED_SCOPES = 10_000
#: After a failed check, the next one starts this soon (bounded by the interval).
RETRY_DELAY = 0.1
#: An instance encrypts under keys it could not confirm for at most this many
#: times max_staleness (the hard limit; revoke_grace must exceed it).
HARD_LIMIT_FACTOR = 4

Reload = Callable[[str, str], Awaitable[PurposeKeys]]


class Horizon:
    """The newest collection version this instance knows to be committed.

    Raised by each version a check reads on the primary and by the
    instance's own writes; never lowered. A replica's answer to a cold load
    is trusted only if the snapshot it was read from is at least this new:
    a replica that has not replayed a change this instance knows of could
    hand back keys the change replaced, and no later check would fix them.
    """

    __slots__ = ("version",)

    def __init__(self) -> None:
        self.version = 0

    def saw(self, version: int) -> None:
        if version > self.version:
            self.version = version


class Freshness:
    """Change tracking for one KMS: checks, notification hints and the watcher."""

    def __init__(
        self,
        database: Database,
        cache: KeyCache,
        reload: Reload,
        max_staleness: float | None,
        horizon: Horizon | None = None,
    ) -> None:
        self._db = database
        self._horizon = Horizon() if horizon is None else horizon
        self._q = database.queries
        self._cache = cache
        self._reload = reload
        self.max_staleness = max_staleness
        self.hard_limit = None if max_staleness is None else HARD_LIMIT_FACTOR * max_staleness
        self._seen: int | None = None
        self._marker: object = None
        self._check_lock = asyncio.Lock()
        self._hinted: set[str] = set()
        self._hint_all = False
        self._wake = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None
        #: time.monotonic() at the start of the newest successful check.
        self.confirmed_at = time.monotonic()
        #: Checks that failed since the KMS opened (for operators and tests).
        self.failed_checks = 0
        self._warned = False

    async def start(self) -> None:
        """Record the current state of an empty cache (called once, at open)."""
        started = time.monotonic()
        self._marker = await self._db.change_marker()
        async with self._db.read() as conn:
            await repo.find_change_log(conn, self._q)
            await repo.find_suspensions(conn, self._q)
            await repo.find_bindings(conn, self._q)
            self._seen = await repo.collection_version(conn, self._q)
        self._horizon.saw(self._seen)
        self._confirmed(started)

    def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    # -- checks ------------------------------------------------------------

    async def refresh(self) -> None:
        """Compare the cache with the committed database and reload what changed.

        Runs after any check already in flight, so it always reflects every
        change committed before it was called.
        """
        async with self._check_lock:
            started = time.monotonic()
            try:
                await self._refresh(started)
            finally:
                on_refresh = self._cache.stats.on_refresh
                if on_refresh is not None:
                    on_refresh(time.monotonic() - started)

    async def _refresh(self, started: float) -> None:
        """One check (see :meth:`refresh`), under the check lock."""
        marker = await self._db.change_marker()
        if marker is None or marker != self._marker:
            async with self._db.read() as conn:
                version = await repo.collection_version(conn, self._q)
            # Before the reloads below, which must see this version.
            self._horizon.saw(version)
            if version != self._seen:
                if not self._q.has_suspensions:
                    # Another instance may have migrated since this one opened.
                    async with self._db.read() as conn:
                        await repo.find_suspensions(conn, self._q)
                scopes = None
                if self._seen is not None and version > self._seen:
                    async with self._db.read() as conn:
                        scopes = await repo.changed_scopes(conn, self._q, self._seen, version)
                # Loads in flight may have read the rows before the change.
                self._cache.mark_stale(scopes)
                if scopes is None:
                    await self._compare(list(self._cache.entries))
                else:
                    await self._compare(
                        [pair for s in scopes for pair in self._cache.cached_pairs(s)]
                    )
                # Only now, with the changed pairs compared against rows
                # committed at or after `version`, is the change seen.
                self._seen = version
            self._marker = marker
        self._confirmed(started)

    async def check_scopes(self, scope_ids: Iterable[str]) -> None:
        """Compare the cached pairs of some scopes (a notification's hint)."""
        pairs = [pair for scope_id in scope_ids for pair in self._cache.cached_pairs(scope_id)]
        if pairs:
            async with self._check_lock:
                await self._compare(pairs)

    async def _compare(self, pairs: list[CacheKey]) -> None:
        """Reload each pair whose cached versions differ from the committed rows."""
        if not pairs:
            return
        async with self._db.read() as conn:
            current = await repo.version_ids(conn, self._q, pairs)
        stale = []
        for pair in pairs:
            cached = self._cache.entries.get(pair)
            if cached is not None and current.get(pair) != cached.ids():
                stale.append(pair)
        await self._reload_pairs(stale)

    async def _reload_pairs(self, pairs: list[CacheKey]) -> None:
        """Reload cached pairs; the hot path serves the old keys until each is replaced.

        A pair that fails to reload is dropped from the cache (its next use
        loads it and reports the error), so it can never stay stale.
        """
        for scope_id, purpose in pairs:
            if (scope_id, purpose) not in self._cache.entries:
                continue
            try:
                await self._reload(scope_id, purpose)
            except KMSError as exc:
                if not isinstance(exc, KeyNotFoundError):
                    logger.warning("kms_async: reloading scope %s failed: %s", show(scope_id), exc)
                self._cache.invalidate_scope(scope_id)

    # -- the hard limit ----------------------------------------------------

    def _confirmed(self, started: float) -> None:
        if started < self.confirmed_at:
            return
        self.confirmed_at = started
        if self._warned:
            logger.warning("kms_async: key change checks succeed again")
            self._warned = False
        # Demoted pairs were not part of this check: they load again when used.
        self._cache.forget_demoted()
        self._arm(started)

    def _arm(self, started: float) -> None:
        if self.hard_limit is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, started + self.hard_limit - time.monotonic())
        self._expiry = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        """No check succeeded within the hard limit: stop encrypting under cached keys."""
        self._expiry = None
        if self._cache.entries:
            logger.warning(
                "kms_async: no key change check succeeded for %.1f s; cached keys are used "
                "for decryption only until the database answers",
                self.hard_limit,
            )
            self._warned = True
        self._cache.demote_all()
        self._hint_all = True
        self._wake.set()
        # Pairs loaded from now on are confirmed by their own load; demote
        # them too if checks keep failing.
        self._arm(time.monotonic())

    # -- notifications -----------------------------------------------------

    def on_notification(self, payload: str | None) -> None:
        """A hint from the database (``None``: the listener (re)connected)."""
        if payload is None:
            self._hint_all = True
        else:
            try:
                scopes = repo.parse_change_notice(payload)
            except ValueError:
                # Anyone who can connect can notify: no noise, no work.
                logger.debug("kms_async: ignored a malformed key change notification")
                return
            if scopes is None:
                self._hint_all = True
            else:
                self._hinted.update(scopes)
                if len(self._hinted) > MAX_HINTED_SCOPES:
                    self._hinted.clear()
                    self._hint_all = True
        self._wake.set()

    # -- the watcher -------------------------------------------------------

    async def watch(self, is_closed: Callable[[], bool]) -> None:
        """Check every ``max_staleness / 2`` seconds, and soon after each hint."""
        assert self.max_staleness is not None and self.hard_limit is not None
        interval = self.max_staleness / 2
        next_check = time.monotonic() + interval
        hint_after = 0.0
        failures = 0
        while not is_closed():
            now = time.monotonic()
            if self._hint_all or self._hinted:
                # Hints are pending: wait out the spacing (later hints merge
                # into this check) or the clock, whichever comes first.
                due = min(next_check, max(hint_after, now))
                if due > now:
                    await asyncio.sleep(due - now)
            elif next_check > now:
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    # asyncio.wait, not wait_for: on Python 3.11 wait_for can
                    # swallow a cancellation that lands as the event is set.
                    await asyncio.wait({waiter}, timeout=next_check - now)
                finally:
                    waiter.cancel()
                self._wake.clear()
                continue
            full = self._hint_all or time.monotonic() >= next_check
            scopes, self._hinted = self._hinted, set()
            self._hint_all = False
            try:
                with anyio.fail_after(self.hard_limit):
                    if full:
                        await self.refresh()
                    else:
                        await self.check_scopes(scopes)
            except (KMSError, TimeoutError) as exc:
                if is_closed():
                    return
                self.failed_checks += 1
                failures += 1
                # Nothing was marked as seen: the same changes are compared again.
                self._hinted |= scopes
                self._hint_all = self._hint_all or full
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "kms_async: checking for key changes failed (%d in a row), retrying: %s",
                    failures,
                    exc,
                )
                next_check = time.monotonic() + min(RETRY_DELAY, interval)
                hint_after = next_check
                continue
            failures = 0
            end = time.monotonic()
            if full:
                # Counted from the end of the check, so a slow check is
                # followed by a pause, not by another check.
                next_check = end + interval
            hint_after = end + HINT_SPACING
