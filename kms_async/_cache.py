"""Unwrapped key versions in memory: a bounded LRU with targeted invalidation.

The LRU is the "second chance" kind: a hit only sets a flag on the entry
(cheaper on the hot path than reordering a linked list), and eviction walks
from the oldest entry, giving flagged entries another round at the end.

Entries are keyed by ``(scope, purpose)`` tuples, never concatenated strings,
so no two pairs can collide. Each load is stamped with the scope's
generation when it starts and is installed only if no invalidation of that
scope happened meanwhile, which closes the race where a slow load started
before a rotation overwrites the fresh keys installed after it. Concurrent
misses for one pair share a single load.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blob import encode_suffix
from ._errors import KeyIntegrityError, KeySuspendedError, KeyUnusableError, Remedy, advised
from ._metrics import Stats

__all__ = ["UNCOUNTED", "CacheKey", "KeyCache", "PurposeKeys", "Refusal", "Tally", "VersionKey"]

CacheKey = tuple[str, str]

_MAX_ROOTS = 10_000
#: invalidate_scopes() counts generations per scope up to this many scopes.
_COUNTED_SCOPES = 1_000


class Refusal:
    """Stands in for the AESGCM of a version that must not be used.

    A suspended version, or one the root wrapper cannot unwrap, stays in its
    pair (so the other versions keep working and the pair still matches the
    database) with this in place of its key: the hot path calls ``encrypt``
    or ``decrypt`` on it as on any version, and gets the error.
    """

    __slots__ = ("advice", "error", "problem", "remedy", "version_id")

    def __init__(
        self,
        error: type[KeySuspendedError | KeyUnusableError | KeyIntegrityError],
        version_id: str,
        problem: str,
        advice: str,
        remedy: Remedy | None,
    ) -> None:
        self.error = error
        self.version_id = version_id
        self.problem = problem
        self.advice = advice
        self.remedy = remedy

    def refuse(self) -> KeySuspendedError | KeyUnusableError | KeyIntegrityError:
        if self.remedy is None:
            return self.error(f"{self.problem}; {self.advice}", key_version_id=self.version_id)
        return advised(
            self.error, self.problem, self.advice, self.remedy, key_version_id=self.version_id
        )

    def encrypt(self, nonce: object, data: object, aad: object) -> bytes:
        raise self.refuse()

    def decrypt(self, nonce: object, data: object, aad: object) -> bytes:
        raise self.refuse()


@dataclasses.dataclass(frozen=True, slots=True)
class VersionKey:
    """One unwrapped key version. ``repr`` never shows the key.

    ``suspended`` versions, and those the root wrapper could not unwrap,
    have a :class:`Refusal` as ``aead`` and an empty ``key``.
    """

    id: str
    version: int
    aead: AESGCM | Refusal
    key: bytes = dataclasses.field(repr=False)
    suspended: bool = False

    @property
    def refused(self) -> Refusal | None:
        return self.aead if isinstance(self.aead, Refusal) else None

    @property
    def cipher(self) -> AESGCM:
        """The usable AESGCM; raises the refusal for a refused version."""
        if isinstance(self.aead, Refusal):
            raise self.aead.refuse()
        return self.aead


class Tally:
    """Encryptions under one data key version not yet added to the usage table.

    The hot path adds to ``n`` of the newest version's tally (one integer
    increment); the usage counter (``_usage``) owns the tallies, keyed by
    version id, so a count outlives the cache entry that took it: eviction,
    invalidation and reloads lose nothing, and the tally holds no key.
    """

    __slots__ = ("n", "pair", "version_id")

    def __init__(self, pair: CacheKey, version_id: str) -> None:
        self.n = 0
        self.pair = pair
        self.version_id = version_id

    def __repr__(self) -> str:
        return f"Tally({self.version_id}, n={self.n})"


#: The tally of every pair while counting is off: counts go nowhere.
UNCOUNTED = Tally(("", ""), "")


class PurposeKeys:
    """The unwrapped versions of one (scope, purpose), newest first."""

    __slots__ = ("aead", "loaded_at", "older", "suffix", "tally", "used", "versions")

    def __init__(self, versions: list[VersionKey], loaded_at: float = 0.0) -> None:
        #: Counts encryptions under the newest version (see Tally); set by the cache.
        self.tally = UNCOUNTED
        #: time.monotonic() of the database read these versions came from.
        self.loaded_at = loaded_at
        #: Set by every hit; cleared when eviction gives the entry a second chance.
        self.used = False
        versions = sorted(versions, key=lambda v: v.version, reverse=True)
        # A version failing its integrity check (a restored revoked row, a
        # renumbered one) never becomes the one new data is encrypted under,
        # whatever number the database gave it.
        trusted = [v for v in versions if not _tampered(v)]
        if trusted and trusted[0] is not versions[0]:
            versions.remove(trusted[0])
            versions.insert(0, trusted[0])
        self.versions = tuple(versions)
        newest = versions[0]
        self.aead = newest.aead
        # Encrypt appends this to every envelope: key_info naming the newest version.
        self.suffix = encode_suffix(newest.id)
        # Decrypt finds the version by the envelope's key_info suffix, which
        # makes parsing the envelope unnecessary: the newest by comparison,
        # older ones through a dict that single-version pairs (the common
        # case) do without, to keep each cached pair small.
        self.older = {encode_suffix(v.id): v.aead for v in versions[1:]} or None

    def __repr__(self) -> str:
        return f"PurposeKeys(versions={[v.id for v in self.versions]!r})"

    @property
    def newest(self) -> VersionKey:
        return self.versions[0]

    def version(self, version_id: str) -> VersionKey | None:
        return next((v for v in self.versions if v.id == version_id), None)

    def ids(self) -> set[tuple[str, bool]]:
        """(id, suspended) of each version, as the freshness check compares them."""
        return {(v.id, v.suspended) for v in self.versions}

    def find(self, suffix: bytes) -> AESGCM | Refusal | None:
        """The version whose key_info suffix is ``suffix`` (see ``encode_suffix``)."""
        if suffix == self.suffix:
            return self.aead
        return None if self.older is None else self.older.get(suffix)

    def named_by(self, suffix: bytes) -> str | None:
        """The id of the version whose key_info suffix is ``suffix`` (for error reports)."""
        return next((v.id for v in self.versions if encode_suffix(v.id) == suffix), None)

    def find_id(self, version_id: str) -> AESGCM | Refusal | None:
        """The version with id ``version_id``."""
        return self.find(encode_suffix(version_id))


def _tampered(version: VersionKey) -> bool:
    refused = version.refused
    return refused is not None and issubclass(refused.error, KeyIntegrityError)


class KeyCache:
    """LRU of :class:`PurposeKeys` plus an LRU of unwrapped root key versions."""

    def __init__(
        self, max_entries: int, purposes: tuple[str, ...], stats: Stats | None = None
    ) -> None:
        self.max_entries = max_entries
        self.stats = Stats() if stats is None else stats
        # Root keys are needed only to unwrap data keys (a cold load of a
        # pair) and by writes, so fewer of them stay unwrapped.
        self.max_roots = min(max_entries, _MAX_ROOTS)
        self.purposes = purposes
        self.entries: dict[CacheKey, PurposeKeys] = {}
        #: Entries whose freshness could not be confirmed in time: usable to
        #: decrypt while the database is away, never to encrypt.
        self.demoted: dict[CacheKey, PurposeKeys] = {}
        self.roots: collections.OrderedDict[str, VersionKey] = collections.OrderedDict()
        self._generation: dict[str, int] = {}
        self._epoch = 0
        self._loads: dict[CacheKey, tuple[asyncio.Future[PurposeKeys], tuple[int, int]]] = {}
        #: Gives the tally of a pair's newest version (set when usage is counted).
        self.tally_for: Callable[[CacheKey, str], Tally] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    # -- generations -------------------------------------------------------

    def token(self, scope_id: str) -> tuple[int, int]:
        return (self._epoch, self._generation.get(scope_id, 0))

    def mark_stale(self, scope_ids: Iterable[str] | None) -> None:
        """Keep serving the scopes' entries, but refuse loads already in flight.

        A load that read the database before a change must not be installed
        after it. ``None`` marks every scope.
        """
        if scope_ids is None:
            self._epoch += 1
            return
        for scope_id in scope_ids:
            self._generation[scope_id] = self._generation.get(scope_id, 0) + 1
        if len(self._generation) > 4 * self.max_entries + 1024:
            # Forget old counters; a new epoch keeps in-flight loads stale.
            self._generation.clear()
            self._epoch += 1

    def invalidate_scope(self, scope_id: str) -> None:
        """Drop the scope's entries and make in-flight loads of it stale."""
        self.mark_stale((scope_id,))
        for purpose in self.purposes:
            self.entries.pop((scope_id, purpose), None)
            self.demoted.pop((scope_id, purpose), None)

    def invalidate_scopes(self, scope_ids: Sequence[str]) -> None:
        """:meth:`invalidate_scope` for each scope; for many, one new epoch
        instead of a counter per scope (a bulk write over a million scopes
        would otherwise grow the counters by a million)."""
        if len(scope_ids) <= _COUNTED_SCOPES:
            for scope_id in scope_ids:
                self.invalidate_scope(scope_id)
            return
        self._epoch += 1
        if not self.entries and not self.demoted:
            return
        for scope_id in scope_ids:
            for purpose in self.purposes:
                self.entries.pop((scope_id, purpose), None)
                self.demoted.pop((scope_id, purpose), None)

    def demote_all(self) -> None:
        """Move every entry out of the hot path's reach (see ``demoted``)."""
        self.demoted.update(self.entries)
        # Cleared in place: the hot path holds a reference to this dict.
        self.entries.clear()
        self._epoch += 1

    def forget_demoted(self) -> None:
        self.demoted.clear()

    def clear(self) -> None:
        """Drop everything, including unwrapped root keys."""
        self.entries.clear()
        self.demoted.clear()
        self.roots.clear()
        self._generation.clear()
        self._epoch += 1

    # -- entries -----------------------------------------------------------

    def put(self, key: CacheKey, keys: PurposeKeys, token: tuple[int, int] | None = None) -> bool:
        """Install ``keys`` unless the scope was invalidated since ``token``."""
        if token is not None and token != self.token(key[0]):
            return False
        self.count(key, keys)
        entries = self.entries
        entries.pop(key, None)
        entries[key] = keys
        while len(entries) > self.max_entries:
            oldest = next(iter(entries))
            victim = entries.pop(oldest)
            if victim.used and oldest != key:
                victim.used = False
                entries[oldest] = victim
            else:
                self.stats.evictions += 1
        return True

    def count(self, key: CacheKey, keys: PurposeKeys) -> None:
        """Give ``keys`` the tally of its newest version, if usage is counted."""
        if self.tally_for is not None and keys.tally is UNCOUNTED:
            keys.tally = self.tally_for(key, keys.versions[0].id)

    def cached_pairs(self, scope_id: str) -> list[CacheKey]:
        """The (scope, purpose) pairs of ``scope_id`` that are cached."""
        return [(scope_id, p) for p in self.purposes if (scope_id, p) in self.entries]

    def put_root(self, version_id: str, key: VersionKey) -> None:
        self.roots[version_id] = key
        self.roots.move_to_end(version_id)
        while len(self.roots) > self.max_roots:
            self.roots.popitem(last=False)

    def get_root(self, version_id: str) -> VersionKey | None:
        return self.roots.get(version_id)

    # -- single-flight loads ----------------------------------------------

    async def load(
        self, key: CacheKey, loader: Callable[[], Awaitable[PurposeKeys]]
    ) -> PurposeKeys:
        """Run ``loader`` once for all concurrent misses of ``key`` and cache its result.

        The load runs in its own task so that one cancelled waiter does not
        cancel it for the others.
        """
        token = self.token(key[0])
        in_flight = self._loads.get(key)
        if in_flight is not None and in_flight[1] == token:
            future = in_flight[0]
        else:
            # Nothing in flight, or only a load that started before a change.

            async def run() -> PurposeKeys:
                keys = await loader()
                # Counted even if not installed: the caller encrypts with it.
                self.count(key, keys)
                if self.put(key, keys, token):
                    self.demoted.pop(key, None)
                return keys

            task = asyncio.ensure_future(run())
            self._loads[key] = (task, token)
            task.add_done_callback(lambda t: self._load_done(key, t))
            future = task
        return await asyncio.shield(future)

    def _load_done(self, key: CacheKey, task: asyncio.Future[PurposeKeys]) -> None:
        in_flight = self._loads.get(key)
        if in_flight is not None and in_flight[0] is task:
            del self._loads[key]
        if not task.cancelled():
            # Mark the exception retrieved even if every waiter was cancelled.
            task.exception()

    async def drain(self) -> None:
        """Cancel loads in flight (used by aclose)."""
        loads = [task for task, _ in self._loads.values()]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
