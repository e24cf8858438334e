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

Other writers (PostgreSQL, schema file 05's triggers): the same latency when
the rotation is done by plain SQL the way the Go package does it (the
version bump first, then a root key version and a data key version per
purpose, in one transaction), and when a tenant is deleted with the
README's SQL (its row's foreign key cascades to the root key; then the
bump): from the commit to B serving the new version, or no longer serving
the deleted scope.
"""

from __future__ import annotations

import asyncio
import os
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


async def _rotate_by_sql(conn: Any, root: Any, scope: str) -> None:
    """RotateKeys the Go package's way, as plain SQL in one transaction."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kms_async._ids import DATA_KEY_VERSION_PREFIX, ROOT_KEY_VERSION_PREFIX, new_id
    from kms_async._wrappers import wrap_key

    root_version_id, root_version_key = new_id(ROOT_KEY_VERSION_PREFIX), os.urandom(32)
    wrapped_root = (await root.encrypt(root_version_key)).to_bytes()
    aead = AESGCM(root_version_key)
    async with conn.transaction():
        await conn.execute("update kms_collection_version set version = version + 1")
        root_key_id = await conn.fetchval(
            "select private_id from kms_root_key where scope_id = $1", scope
        )
        await conn.execute(
            "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
            root_version_id,
            root_key_id,
            wrapped_root,
        )
        for (data_key_id,) in await conn.fetch(
            "select private_id from kms_data_key where root_key_id = $1", root_key_id
        ):
            await conn.execute(
                "insert into kms_data_key_version"
                " (private_id, data_key_id, root_key_version_id, key) values ($1, $2, $3, $4)",
                new_id(DATA_KEY_VERSION_PREFIX),
                data_key_id,
                root_version_id,
                wrap_key(aead, root_version_id, os.urandom(32)),
            )


async def _other_writers(bench: Bench, samples: int) -> None:
    """PostgreSQL, B listening: a Go-style SQL rotation and the README's tenant deletion."""
    report = bench.report
    label = "postgres, LISTEN/NOTIFY"
    async with c.database(bench, "postgres") as db:
        a = await db.open(max_staleness=None)
        b = await db.open()
        conn = await db.raw_connect()
        try:
            tenants = c.scope_ids("tenant", samples // 5)
            await conn.execute("create table tenant (id text primary key)")
            await conn.execute("insert into tenant select unnest($1::text[])", [SCOPE, *tenants])
            await conn.execute(
                "alter table kms_root_key add constraint kms_root_key_scope_fkey"
                " foreign key (scope_id) references tenant (id) on delete cascade"
            )
            await c.create_scopes(a, [SCOPE, *tenants], [PURPOSE])
            await b.encrypt(SCOPE, PURPOSE, b"warm")
            await asyncio.sleep(0.2)
            rotated = []
            for _ in range(samples):
                before = _key_id(await b.encrypt(SCOPE, PURPOSE, b"x"))
                await _rotate_by_sql(conn, db.root, SCOPE)
                committed = time.perf_counter()
                while _key_id(await b.encrypt(SCOPE, PURPOSE, b"x")) == before:
                    if time.perf_counter() - committed > 5:
                        raise RuntimeError("B never saw the SQL rotation")
                    await asyncio.sleep(POLL)
                rotated.append((time.perf_counter() - committed) * 1e3)
                await asyncio.sleep(random.uniform(0.0, 0.05))
            report.add(
                TARGET,
                f"SQL rotation the Go way visible to B, p50 [{label}]",
                c.percentile(rotated, 50),
                "ms",
                note=f"{len(rotated)} samples",
            )
            report.add(
                TARGET,
                f"SQL rotation the Go way visible to B, p99 [{label}]",
                c.percentile(rotated, 99),
                "ms",
                "<= 50",
                note=f"max {max(rotated):.1f} ms",
            )
            deleted = []
            for tenant in tenants:
                await b.encrypt(tenant, PURPOSE, b"x")
                async with conn.transaction():
                    await conn.execute("delete from tenant where id = $1", tenant)
                    await conn.execute("update kms_collection_version set version = version + 1")
                committed = time.perf_counter()
                while (tenant, PURPOSE) in b._entries:
                    if time.perf_counter() - committed > 5:
                        raise RuntimeError("B never dropped the deleted tenant")
                    await asyncio.sleep(POLL)
                deleted.append((time.perf_counter() - committed) * 1e3)
                await asyncio.sleep(random.uniform(0.0, 0.05))
            report.add(
                TARGET,
                f"README tenant deletion reaching B (its keys dropped), p99 [{label}]",
                c.percentile(deleted, 99),
                "ms",
                "<= 50",
                note=f"p50 {c.percentile(deleted, 50):.1f} ms, {len(deleted)} samples",
            )
        finally:
            await conn.close()
            await c.close(b)
            await c.close(a)


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
    if bench.postgres:
        await _other_writers(bench, n_notify)


if __name__ == "__main__":
    c.main_for(run)
