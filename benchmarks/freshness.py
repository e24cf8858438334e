"""Target 5: how soon another instance's rotation reaches a cached instance.

Two instances in one process, each with its own connections: A rotates scope
S; B has S cached and encrypts with it every 0.5 ms. A sample is the time
from ``A.rotate_keys(S)`` returning (committed) to B's first ciphertext whose
envelope names a version other than the one before; that version is then
checked to be the newest one ``A.list_keys(S)`` reports.

Modes: PostgreSQL with LISTEN/NOTIFY (B opened from a DSN, the default),
PostgreSQL with ``notifications=False`` (polling every max_staleness / 2),
and SQLite (polling ``PRAGMA data_version``); max_staleness is the default
1.0 s throughout.

Targeted invalidation: B caches many scopes, A rotates one; once B serves
the new version, every cached entry object of B is compared by identity
with the one it held before.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import _common as c
from _common import PURPOSE, Bench, kms_async

TARGET = "freshness"
SCOPE = "fresh-scope"
POLL = 0.0005


def _key_id(ciphertext: bytes) -> str:
    return kms_async.BlobInfo.from_bytes(ciphertext).key_id


async def _newest(kms: Any, scope: str) -> str:
    keys = await kms.list_keys(scope)
    data = next(k for k in keys if k.purpose == PURPOSE)
    return max(data.versions, key=lambda v: v.version).id


async def _latency_samples(
    a: Any, b: Any, samples: int, timeout: float, phase: float
) -> tuple[list[float], int, int]:
    """Seconds from A's commit to B serving the new version; (samples, timeouts, wrong)."""
    latencies: list[float] = []
    timeouts = wrong = 0
    for _ in range(samples):
        before = _key_id(await b.encrypt(SCOPE, PURPOSE, b"x"))
        await a.rotate_keys(SCOPE)
        committed = time.perf_counter()
        seen = before
        while seen == before:
            if time.perf_counter() - committed > timeout:
                break
            await asyncio.sleep(POLL)
            seen = _key_id(await b.encrypt(SCOPE, PURPOSE, b"x"))
        else:
            latencies.append(time.perf_counter() - committed)
            if seen != await _newest(a, SCOPE):
                wrong += 1
            # Start the next rotation at a random point of B's polling cycle.
            await asyncio.sleep(random.uniform(0.0, phase))
            continue
        timeouts += 1
    return latencies, timeouts, wrong


async def _targeted(
    a: Any, b: Any, scopes: list[str], samples: int, phase: float
) -> list[tuple[int, int, float]]:
    """Per rotation: (entries reloaded or dropped, entries of that scope, seconds until seen)."""
    for scope in scopes:
        await b.encrypt(scope, PURPOSE, b"x")
    await asyncio.sleep(0.2)
    results = []
    for i in range(samples):
        await asyncio.sleep(random.uniform(0.0, phase))
        target = scopes[(i + 1) * len(scopes) // (samples + 1)]
        before = dict(b._entries)
        old = _key_id(await b.encrypt(target, PURPOSE, b"x"))
        await a.rotate_keys(target)
        start = time.perf_counter()
        while _key_id(await b.encrypt(target, PURPOSE, b"x")) == old:
            if time.perf_counter() - start > 10:
                raise RuntimeError("B never saw the rotation")
            await asyncio.sleep(POLL)
        seen = time.perf_counter() - start
        await asyncio.sleep(0.05)  # anything else B would reload comes with the same check
        changed = sum(b._entries.get(k) is not v for k, v in before.items())
        own = sum(1 for k in before if k[0] == target)
        results.append((changed, own, seen))
    return results


async def run(bench: Bench) -> None:
    c.section("5. Freshness: another instance's rotation reaching a cached instance")
    report = bench.report
    n_notify = bench.pick(10, 100)
    n_poll = bench.pick(3, 30)
    n_targeted = bench.pick(300, 10_000)
    modes: list[tuple[str, str, dict[str, Any], int]] = []
    if bench.postgres:
        modes.append(("postgres, LISTEN/NOTIFY", "postgres", {}, n_notify))
        modes.append(
            ("postgres, notifications=False", "postgres", {"notifications": False}, n_poll)
        )
    else:
        report.note(TARGET, "PostgreSQL unreachable: the LISTEN/NOTIFY cases were skipped")
    modes.append(("sqlite, polling", "sqlite", {}, n_poll))
    for label, dialect, options, samples in modes:
        async with c.database(bench, dialect) as db:
            a = await db.open(max_staleness=None)
            b = await db.open(**options)  # max_staleness default 1.0 s
            try:
                scopes = c.scope_ids("many", n_targeted)
                await c.create_scopes(a, [SCOPE, *scopes], [PURPOSE])
                await b.encrypt(SCOPE, PURPOSE, b"warm")
                await asyncio.sleep(0.2)
                notify = "LISTEN" in label
                latencies, timeouts, wrong = await _latency_samples(
                    a, b, samples, timeout=5.0, phase=0.05 if notify else 0.5
                )
                ms = [x * 1e3 for x in latencies]
                bound = "<= 50" if notify else None
                report.add(
                    TARGET,
                    f"rotation visible to B, p50 [{label}]",
                    c.percentile(ms, 50),
                    "ms",
                    note=f"{len(ms)} samples",
                )
                report.add(
                    TARGET,
                    f"rotation visible to B, p99 [{label}]",
                    c.percentile(ms, 99),
                    "ms",
                    bound,
                    note="" if notify else "configured bound: max_staleness = 1000 ms",
                    samples=len(ms),
                )
                if not notify:
                    report.add(
                        TARGET,
                        f"rotation visible to B, max [{label}]",
                        max(ms),
                        "ms",
                        "<= 1000",
                        note="max_staleness = 1.0 s",
                    )
                if timeouts or wrong:
                    report.note(
                        TARGET,
                        f"[{label}] {timeouts} samples timed out after 5 s; "
                        f"{wrong} saw a version that is not the newest",
                    )
                targeted = await _targeted(
                    a, b, scopes, bench.pick(2, 5), phase=0.05 if notify else 0.5
                )
                own = max(t[1] for t in targeted)
                report.add(
                    TARGET,
                    f"B's cached entries reloaded or dropped per rotation [{label}]",
                    max(t[0] for t in targeted),
                    "entries",
                    f"== {own}",
                    note=f"max over {len(targeted)} rotations, {len(b._entries):,} cached",
                )
                seen_ms = [t[2] * 1e3 for t in targeted]
                report.add(
                    TARGET,
                    f"rotation visible to B with {len(b._entries):,} scopes cached, max [{label}]",
                    max(seen_ms),
                    "ms",
                    "<= 50" if notify else "<= 1000",
                    note=f"{len(seen_ms)} rotations: " + ", ".join(f"{x:.0f}" for x in seen_ms),
                )
            finally:
                await c.close(b)
                await c.close(a)


if __name__ == "__main__":
    c.main_for(run)
