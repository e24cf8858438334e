"""Counting encryptions per data key version, summed over every instance.

The hot path adds one to the :class:`~kms_async._cache.Tally` of the pair's
newest version, an integer increment and nothing more. The tallies live here,
keyed by version id, and the cache entries only point at them: a count
survives eviction, invalidation and reloads of its pair, and a tally holds no
key material.

Every ``interval`` seconds (and when the KMS closes) the counts are added to
``<prefix>_key_version_usage`` (schema file 07), ``encryptions =
encryptions + n``, so the table sums what every instance counted. A count
is taken out of its tally only after the transaction adding it committed:
a flush that fails keeps it for the next one, and increments made while a
flush runs are never lost. What this can get wrong, in which direction:

- a crash (or a kill) loses the counts since the last flush: at most one
  interval's encryptions of that instance are never counted; on PostgreSQL
  a flush commits without waiting for the server's disk, so a crash of the
  server may lose the last flush of each instance too;
- a commit whose outcome is unknown (the connection lost during COMMIT, or
  the flush cancelled from outside while committing) keeps the counts, and
  the next flush adds them again if the first did commit: an over-count of
  one batch, never an under-count (the counts guard a safety limit);
- counts for versions revoked meanwhile are dropped (the statement adds
  only versions that still exist); encryptions through ``get_wrapper()``'s
  wrappers and by the Go package are not counted.

After each periodic flush, the versions just flushed whose fleet-wide count
passed ``AUTO_ROTATE_AFTER`` get their scope rotated (see ``KMS.open``'s
``auto_rotate``), through ``rotate_due`` and its database lock, so that many
instances seeing the same count rotate the scope once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ._cache import CacheKey, KeyCache, Tally
from ._errors import KeyNotFoundError, KMSError
from ._sql import Database
from ._sql import _store as repo
from ._validate import show

__all__ = ["AUTO_ROTATE_AFTER", "Usage"]

logger = logging.getLogger("kms_async")

#: Fleet-wide counted encryptions after which a pair's newest version is
#: rotated on its own: half of AES-GCM's 2^32 limit for random 96-bit nonces
#: (NIST SP 800-38D, 8.3). The other half is the margin for what is not yet
#: counted when the rotation happens: each instance's unflushed interval,
#: and the time until every instance has seen the new version (within
#: max_staleness, at worst four times it). At 300,000 encryptions a second
#: in each of 100 processes, 2^31 more take over 70 s, against a default
#: flush interval of 5 s and a staleness bound of 1 s.
AUTO_ROTATE_AFTER = 2**31

#: Versions per flush transaction.
FLUSH_CHUNK = 5_000

Rotate = Callable[[list[str], int], Awaitable[list[str]]]


class Usage:
    """The encryption counts of one KMS and the task that flushes them."""

    def __init__(self, database: Database, cache: KeyCache, interval: float | None) -> None:
        self._db = database
        self._q = database.queries
        self._cache = cache
        self.interval = interval
        self._tallies: dict[str, Tally] = {}
        self._lock = asyncio.Lock()
        #: Whether encryptions are counted (an interval, and the table exists).
        self.counting = False
        #: Encryptions this instance added to the table (for operators and tests).
        self.flushed = 0
        #: Flushes that failed since the KMS opened.
        self.failed_flushes = 0
        self.auto_rotate_after = AUTO_ROTATE_AFTER
        self._warned_no_rotate = False

    async def start(self) -> None:
        """Find the usage table (at open); count only if it exists."""
        async with self._db.read() as conn:
            present = await repo.find_usage(conn, self._q)
        if self.interval is None:
            return
        if not present:
            logger.warning(
                "kms_async: encryptions are not counted: the table %s is missing; run "
                "kms_async.migrate() or apply sql/<dialect>/07_kms_key_version_usage.up.sql",
                self._q.usage_table,
            )
            return
        if not self._db.can_write_in_background():
            logger.warning(
                "kms_async: encryptions are not counted: an in-memory SQLite database given as "
                "a connection leaves the KMS no connection of its own to add the counts through"
            )
            return
        self.counting = True
        self._cache.tally_for = self._tally

    def _tally(self, pair: CacheKey, version_id: str) -> Tally:
        tally = self._tallies.get(version_id)
        if tally is None:
            tally = self._tallies[version_id] = Tally(pair, version_id)
        return tally

    def pending(self) -> int:
        """Encryptions counted here and not yet in the table."""
        return sum(t.n for t in self._tallies.values())

    async def flush(self) -> list[Tally]:
        """Add the pending counts to the table; return the tallies flushed.

        Raises:
            StorageError: the database failed; counts not committed are kept.
        """
        async with self._lock:
            taken = [(t, t.n) for t in list(self._tallies.values()) if t.n]
            for start in range(0, len(taken), FLUSH_CHUNK):
                chunk = taken[start : start + FLUSH_CHUNK]
                # Sorted: concurrent flushes lock the rows in one order.
                rows = sorted((t.version_id, n) for t, n in chunk)
                async with self._db.transaction(background=True) as tx:
                    await repo.add_usage(tx, self._q, rows)
                # Committed: only now do these counts leave their tallies
                # (what was added to them meanwhile stays).
                for tally, n in chunk:
                    tally.n -= n
                    self.flushed += n
            self._prune()
            return [t for t, _ in taken]

    def _prune(self) -> None:
        """Forget tallies with nothing pending that no cached pair uses any more."""
        entries = self._cache.entries
        for version_id, tally in list(self._tallies.items()):
            if tally.n == 0:
                keys = entries.get(tally.pair)
                if keys is None or keys.tally is not tally:
                    del self._tallies[version_id]

    async def run(self, rotate: Rotate | None) -> None:
        """Flush every ``interval`` seconds, then rotate what passed the limit."""
        assert self.interval is not None
        failures = 0
        while True:
            await asyncio.sleep(self.interval)
            # Shielded: aclose() cancels this task and then waits for the
            # flush in flight (the lock) before flushing the rest itself, so a
            # flush is never cut off in the middle of its commit by a close.
            flush = asyncio.ensure_future(self.flush())
            try:
                flushed = await asyncio.shield(flush)
            except KMSError as exc:
                self.failed_flushes += 1
                failures += 1
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "kms_async: adding encryption counts failed (%d in a row); %d are kept "
                    "for the next try: %s",
                    failures,
                    self.pending(),
                    exc,
                )
                continue
            failures = 0
            if rotate is not None and flushed:
                await self._rotate_worn(flushed, rotate)

    async def _rotate_worn(self, flushed: list[Tally], rotate: Rotate) -> None:
        """Rotate the scopes whose newest version passed ``auto_rotate_after``."""
        try:
            async with self._db.read() as conn:
                worn = await repo.usage_over(
                    conn, self._q, [t.version_id for t in flushed], self.auto_rotate_after
                )
            if not worn:
                return
            scope_of = {t.version_id: t.pair[0] for t in flushed}
            scopes = sorted({scope_of[v] for v in worn})
            rotated = await rotate(scopes, self.auto_rotate_after)
        except KeyNotFoundError as exc:
            # No root wrapper here: say so once, not after every flush.
            if not self._warned_no_rotate:
                logger.warning("kms_async: cannot rotate worn keys automatically: %s", exc)
                self._warned_no_rotate = True
            return
        except KMSError as exc:
            logger.warning("kms_async: rotating worn keys automatically failed: %s", exc)
            return
        if rotated:
            logger.warning(
                "kms_async: rotated %d scope(s) automatically (%s%s): the newest version of "
                "a data key passed %d counted encryptions; AES-GCM with random nonces must "
                "stay well under 2^32 per key",
                len(rotated),
                ", ".join(show(s) for s in rotated[:10]),
                ", ..." if len(rotated) > 10 else "",
                self.auto_rotate_after,
            )

    async def close(self) -> None:
        """The last flush, when the KMS closes; a failure is logged, never raised."""
        if not self.counting:
            return
        try:
            await self.flush()
        except KMSError as exc:
            logger.warning(
                "kms_async: %d encryptions counted since the last flush could not be added "
                "to the usage table and are lost: %s",
                self.pending(),
                exc,
            )
        self._tallies.clear()
