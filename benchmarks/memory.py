"""Target 7: memory per cached key version, and the LRU bound.

Per version: a KMS with one purpose warms its cache with N scopes (one data
key version each) while tracemalloc traces the Python heap; the figure is
(heap after warming - heap before) / cached data key versions. It includes
everything the cache keeps per scope: the entry, the AES-GCM object and key
bytes of the data key version, and the scope's unwrapped root key version
(each scope has its own root key). tracemalloc sees only the Python heap;
the resident set size (RSS) growth is shown beside it, since OpenSSL
allocations live outside that heap.

The bound: ``cache_size=1000``, 5,000 scopes touched; the cache must hold at
most 1,000 entries, and the heap must stop growing once the cache is full
(evicted entries are freed). Entries are slotted objects without
``__weakref__``, so instead of weak references the live entry objects are
counted with ``gc.get_objects()``.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import weakref

import _common as c
from _common import PURPOSE, Bench

TARGET = "memory"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _live(type_name: str) -> int:
    return sum(1 for o in gc.get_objects() if type(o).__name__ == type_name)


async def run(bench: Bench) -> None:
    c.section("7. Memory: Python heap per cached key version; the LRU bound")
    report = bench.report
    n = bench.pick(2_000, 100_000)
    bound, touched = bench.pick((200, 1_000), (1_000, 5_000))
    # The cache holds the same objects whatever the database; SQLite warms fastest.
    async with c.database(bench, "sqlite") as db:
        setup = await db.open(purposes=[PURPOSE], max_staleness=None)
        scopes = c.scope_ids("mem", n)
        await c.create_scopes(setup, scopes, [PURPOSE])
        await c.close(setup)

        kms = await db.open(purposes=[PURPOSE], max_staleness=None)
        try:
            await kms.encrypt(scopes[0], PURPOSE, b"x")  # first-use allocations
            kms._cache.clear()
            tracemalloc.start(1)
            heap0, rss0 = _heap(), _rss()
            for scope in scopes:
                await kms.encrypt(scope, PURPOSE, b"x")
            heap1, rss1 = _heap(), _rss()
            versions = sum(len(e.versions) for e in kms._entries.values())
            snapshot = tracemalloc.take_snapshot()
            roots = len(kms._cache.roots)
            kms._cache.roots.clear()
            heap2 = _heap()
            tracemalloc.stop()
            entries = len(kms._entries)
        finally:
            await c.close(kms)
        top = [
            s
            for s in snapshot.statistics("filename")
            if "tracemalloc" not in s.traceback[0].filename
        ][:4]
        report.add(
            TARGET,
            f"Python heap per cached data key version ({n:,} scopes, 1 purpose)",
            (heap1 - heap0) / versions,
            "bytes",
            "<= 1024",
            note=f"{entries:,} entries, {versions:,} versions; root key versions included",
        )
        report.add(
            TARGET,
            "... of which the cached unwrapped root key versions",
            (heap1 - heap2) / versions,
            "bytes",
            note=f"{roots:,} root key versions cached",
        )
        report.add(
            TARGET,
            "RSS growth per cached data key version",
            (rss1 - rss0) / versions,
            "bytes",
            note="includes OpenSSL and allocator overhead that tracemalloc cannot see",
        )
        where = ", ".join(
            f"{os.path.basename(s.traceback[0].filename)} {s.size / versions:.0f} B" for s in top
        )
        report.note(TARGET, f"heap per version by file: {where}")
        del snapshot

        # The bound.
        kms = await db.open(purposes=[PURPOSE], cache_size=bound, max_staleness=None)
        try:
            await kms.encrypt(scopes[0], PURPOSE, b"x")
            entry = kms._entries[(scopes[0], PURPOSE)]
            try:
                weakref.ref(entry)
                weak = "weak references work"
            except TypeError:
                weak = "entries take no weak references (slotted)"
            del entry
            kms._cache.clear()
            tracemalloc.start(1)
            heaps = {}
            for i, scope in enumerate(scopes[:touched], 1):
                await kms.encrypt(scope, PURPOSE, b"x")
                if i % bound == 0:
                    heaps[i] = _heap()
            tracemalloc.stop()
            held = len(kms._entries)
            live_entries = _live("PurposeKeys")
            live_versions = _live("VersionKey")
        finally:
            await c.close(kms)
        report.add(
            TARGET,
            f"entries held after touching {touched:,} scopes, cache_size={bound:,}",
            held,
            "entries",
            f"<= {bound}",
        )
        report.add(
            TARGET,
            "live entry objects (gc.get_objects)",
            live_entries,
            "objects",
            f"<= {bound}",
            note=f"{live_versions:,} VersionKey objects (data + root); {weak}",
        )
        full = heaps[bound]
        after = [h for i, h in heaps.items() if i > bound]
        report.add(
            TARGET,
            f"heap after touching {touched:,} scopes / heap when the cache filled",
            max(after) / full,
            "x",
            note="heap at each 1x..5x cache_size touched: "
            + ", ".join(f"{h / 1024:.0f}" for h in heaps.values())
            + " KiB",
        )


if __name__ == "__main__":
    c.main_for(run)
