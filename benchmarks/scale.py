"""Issue 12 at scale: bulk writes in bounded memory, cold loads, freshness at N cached pairs.

    python benchmarks/scale.py --quick                  # smoke mode (1,000 scopes; CI)
    python benchmarks/scale.py                          # 100,000 scopes (run.py's full run)
    python benchmarks/scale.py --scopes 1000000 --dialect postgres   # the once-off big run

For each dialect, on one database that grows as it goes:

1. **Bulk writes** (target 3): ``create_keys_many`` (one purpose),
   ``reconcile_keys`` (adds the second purpose to every scope),
   ``rotate_keys_many`` and ``rewrap_keys_many``, each over all N scopes in
   one call, against a loop of the single-scope call over a sample of other
   scopes, run right after it on the same (grown) database. Each reports the
   peak RSS of this process during the call (VmHWM, reset before it through
   /proc/self/clear_refs; goal < 500 MB), and the CPU time per scope of the
   bulk call and of the loop: this process's (all its threads, so SQLite's
   work too) plus, on PostgreSQL, that of the server backends serving the
   benchmark's connections (found by application_name, read from
   /proc/<pid>/stat: the server runs on this machine). Autovacuum and the
   WAL writer are not counted. The speedup is loop CPU per scope / bulk CPU
   per scope (goal >= 10).
2. **Cold loads** (target 3): a fresh instance encrypts once for each of
   1,000 scopes nobody loaded, one at a time; p50 / p99 of each call (goal:
   p99 < 1 ms on PostgreSQL). On PostgreSQL first on tables that were never
   analyzed (autovacuum off, statistics removed, as right after a bulk load),
   where it also times the load statement alone three ways: as kms_async
   sends it, in the shape it had before (whose estimate crossed
   jit_above_cost at a million scopes), and that shape inside
   ``begin; set local jit = off`` ... ``commit``; then after ``analyze``.
3. **Freshness** (target 1): an instance with ``cache_size`` above N, in
   polling mode (``max_staleness`` 1 s; on PostgreSQL
   ``notifications=False``), caches one pair for each of the N scopes (the
   benchmark reads them 1,000 scopes a query and unwraps them as cold loads
   do: loading a million one by one takes a quarter of an hour). With nothing
   changing, its CPU time over a
   quiet window (this process; nothing else runs in it; goal < 2 % of a
   core). Then another instance rotates a random cached scope 20 times (a
   random pause between, so rotations land anywhere in the polling cycle);
   each sample is the time from the rotation's commit to the first
   ciphertext of the cached instance naming the new version (goal: max <=
   max_staleness).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import secrets
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import _common as c
import asyncpg
from _common import PURPOSE, Bench
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TARGET = "scale"
TABLES = ["kms_root_key", "kms_root_key_version", "kms_data_key", "kms_data_key_version"]

#: Set from the command line (see __main__).
OPTIONS = argparse.Namespace(scopes=None, dialect=None, only=None)


# -- measuring ---------------------------------------------------------------


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmHWM, VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _proc_cpu(pid: int) -> float | None:
    """user + system CPU seconds of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_param(dsn: str, key: str, value: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = [*urllib.parse.parse_qsl(parts.query), (key, value)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class CPU:
    """CPU seconds of this process and of the server backends named ``app``."""

    def __init__(self, admin: Any, app: str | None) -> None:
        self.admin = admin
        self.app = app

    async def _backends(self) -> dict[int, float]:
        if self.admin is None:
            return {}
        pids = await self.admin.fetch(
            "select pid from pg_stat_activity where application_name = $1", self.app
        )
        found = {}
        for (pid,) in pids:
            used = _proc_cpu(pid)
            if used is not None:
                found[pid] = used
        return found

    async def mark(self) -> tuple[float, dict[int, float]]:
        return time.process_time(), await self._backends()

    async def since(self, mark: tuple[float, dict[int, float]]) -> tuple[float, float]:
        """(this process, server backends) CPU seconds since ``mark``."""
        client = time.process_time() - mark[0]
        now = await self._backends()
        server = sum(used - mark[1].get(pid, 0.0) for pid, used in now.items())
        return client, server


# -- 1. bulk writes -------------------------------------------------------------


async def _bulk(bench: Bench, dialect: str, kms: Any, cpu: CPU, n: int, n_loop: int) -> None:
    report = bench.report
    scopes = c.scope_ids("scale", n)
    loop = c.scope_ids("loop", n_loop)
    operations: list[
        tuple[str, Callable[[], Awaitable[Any]], str, Callable[[str], Awaitable[Any]]]
    ] = [
        (
            "create_keys_many (1 purpose)",
            lambda: kms.create_keys_many(scopes, [PURPOSE]),
            "create_keys",
            lambda s: kms.create_keys(s, [PURPOSE]),
        ),
        (
            "reconcile_keys (adds the 2nd purpose)",
            lambda: kms.reconcile_keys(scopes),
            "reconcile_keys([scope])",
            lambda s: kms.reconcile_keys([s]),
        ),
        (
            "rotate_keys_many",
            lambda: kms.rotate_keys_many(scopes),
            "rotate_keys",
            lambda s: kms.rotate_keys(s),
        ),
        (
            "rewrap_keys_many",
            lambda: kms.rewrap_keys_many(scopes),
            "rewrap_keys",
            lambda s: kms.rewrap_keys(s),
        ),
    ]
    base_rss = _status("VmRSS")
    for name, bulk, loop_name, single in operations:
        gc.collect()
        _peak_rss_reset()
        mark = await cpu.mark()
        start = time.perf_counter()
        result = await bulk()
        wall = time.perf_counter() - start
        client, server = await cpu.since(mark)
        peak = _status("VmHWM")
        del result
        gc.collect()
        mark = await cpu.mark()
        loop_start = time.perf_counter()
        for scope in loop:
            await single(scope)
        loop_wall = time.perf_counter() - loop_start
        loop_client, loop_server = await cpu.since(mark)
        bulk_per_scope = (client + server) / n
        loop_per_scope = (loop_client + loop_server) / n_loop
        tag = f"{name}, {n:,} scopes [{dialect}]"
        report.add(
            TARGET,
            f"peak RSS during {tag}",
            peak / 2**20,
            "MB",
            "< 500",
            note=f"RSS before the bulk calls {base_rss / 2**20:.0f} MB (the scope list included)",
        )
        report.add(
            TARGET,
            f"CPU per million scopes, {tag}",
            bulk_per_scope * 1e6,
            "s",
            note=f"client {client:.1f} s + server {server:.1f} s; wall {wall:.1f} s "
            f"({wall / n * 1e6:,.0f} s per million)",
        )
        report.add(
            TARGET,
            f"CPU per scope, loop of {loop_name} [{dialect}]",
            loop_per_scope * 1e3,
            "ms",
            note=f"{n_loop} scopes: client {loop_client:.2f} s + server {loop_server:.2f} s; "
            f"wall {loop_wall / n_loop * 1e3:.2f} ms per scope",
        )
        report.add(
            TARGET,
            f"speedup in CPU time, {name} vs {loop_name} [{dialect}]",
            loop_per_scope / bulk_per_scope,
            "x",
            ">= 10",
        )


# -- 2. cold loads --------------------------------------------------------------


async def _forget_statistics(admin: Any, schema: str) -> None:
    """Tables as right after a bulk load: no statistics, and autovacuum kept away."""
    oids = []
    for table in TABLES:
        await admin.execute(f"alter table {schema}.{table} set (autovacuum_enabled = false)")
        oids.append(await admin.fetchval("select $1::regclass::oid", f"{schema}.{table}"))
    await admin.execute("delete from pg_statistic where starelid = any($1::oid[])", oids)
    await admin.execute(
        "update pg_class set reltuples = -1, relpages = 0 where oid = any($1::oid[])", oids
    )


async def _cold_kms(
    bench: Bench, db: c.BenchDB, dialect: str, cpu: CPU, scopes: list[str], label: str
) -> None:
    kms = await db.open(db=cpu_dsn(db, cpu), max_staleness=None)
    try:
        await kms.encrypt(scopes[0], PURPOSE, b"x")  # opens the pool's connection
        times = []
        mark = await cpu.mark()
        for scope in scopes[1:]:
            start = time.perf_counter()
            await kms.encrypt(scope, PURPOSE, b"x")
            times.append((time.perf_counter() - start) * 1e3)
        client, server = await cpu.since(mark)
    finally:
        await c.close(kms)
    label = f", {label}" if label else ""
    bench.report.add(
        TARGET,
        f"cold load p50{label} [{dialect}]",
        c.percentile(times, 50),
        "ms",
        note=f"CPU per load: client {client / len(times) * 1e3:.3f} ms"
        + (f" + server {server / len(times) * 1e3:.3f} ms" if dialect == "postgres" else ""),
    )
    bench.report.add(
        TARGET,
        f"cold load p99{label} [{dialect}]",
        c.percentile(times, 99),
        "ms",
        "< 1" if dialect == "postgres" else None,
        note=f"{len(times)} first encrypts, one at a time",
    )


async def _load_statement_variants(bench: Bench, db: c.BenchDB, scopes: list[str]) -> None:
    """The load statement alone, three ways, on a connection of its own."""
    q = kms_async_queries()
    old = q.load_purpose.replace(q.every_version("rv"), "").replace(q.every_version("v"), "")
    conn = await asyncpg.connect(db.dsn)
    try:
        plans = {}
        for name, sql in (("as sent", q.load_purpose), ("former shape", old)):
            plan = await conn.fetchval("explain (format json) " + sql, scopes[0], PURPOSE)
            plans[name] = plan
        variants: dict[str, Callable[[str], Awaitable[Any]]] = {
            "as kms_async sends it": lambda s: conn.fetch(q.load_purpose, s, PURPOSE),
            "former shape": lambda s: conn.fetch(old, s, PURPOSE),
        }

        async def set_local(s: str) -> Any:
            await conn.execute("begin; set local jit = off")
            rows = await conn.fetch(old, s, PURPOSE)
            await conn.execute("commit")
            return rows

        variants["former shape in begin; set local jit = off; ...; commit (3 round trips)"] = (
            set_local
        )
        per = len(scopes) // len(variants)
        for i, (name, run) in enumerate(variants.items()):
            times = []
            for scope in scopes[i * per : (i + 1) * per]:
                start = time.perf_counter()
                await run(scope)
                times.append((time.perf_counter() - start) * 1e3)
            bench.report.add(
                TARGET,
                f"load statement p50 / p99, never analyzed, {name} [postgres]",
                c.percentile(times, 99),
                "ms",
                note=f"p50 {c.percentile(times, 50):.3f} ms; {len(times)} scopes",
            )
        for name, plan in plans.items():
            top = json.loads(plan)[0]["Plan"]
            bench.report.note(
                TARGET,
                f"[postgres] load statement, {name}: estimated cost {top['Total Cost']:,.0f}, "
                f"rows {top['Plan Rows']:,} (jit_above_cost "
                f"{await conn.fetchval('show jit_above_cost')})",
            )
    finally:
        await conn.close()


def kms_async_queries() -> Any:
    from kms_async._sql._postgres import PostgresQueries

    return PostgresQueries("kms")


async def _cold(bench: Bench, db: c.BenchDB, dialect: str, admin: Any, cpu: CPU, n: int) -> None:
    count = bench.pick(100, 1_000)
    picked = random.Random(7).sample(range(n), 3 * count + 2)
    scopes = [f"scale-{i:07d}" for i in picked]
    if dialect == "postgres":
        schema = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(db.dsn).query))["search_path"]
        await _forget_statistics(admin, schema)
        await _load_statement_variants(bench, db, scopes[count + 1 :])
        await _cold_kms(bench, db, dialect, cpu, scopes[: count + 1], "tables never analyzed")
        for table in TABLES:
            await admin.execute(f"analyze {schema}.{table}")
        await _cold_kms(bench, db, dialect, cpu, scopes[-count - 1 :], "after analyze")
    else:
        await _cold_kms(bench, db, dialect, cpu, scopes[: count + 1], "")


# -- 3. freshness ---------------------------------------------------------------


async def _fill(kms: Any, scopes: list[str]) -> None:
    """Cache the "database" pair of every scope: what a cold load of each would
    cache, read 1,000 scopes a query and unwrapped the way cold loads unwrap
    (cold loads one by one take about 15 minutes a million here; their cost
    is ``cold_load.py``'s subject, not this one's)."""
    from kms_async._cache import PurposeKeys, VersionKey
    from kms_async._sql import _store as repo
    from kms_async._wrappers import unwrap_key

    q = kms._q
    for start in range(0, len(scopes), 1_000):
        batch = scopes[start : start + 1_000]
        async with kms._db.read() as conn:
            owners = await repo.root_keys_of_scopes(conn, q, batch)
            roots = list(owners.values())
            versions = await repo.key_versions_of_roots(conn, q, roots)
            purposes = {k: p for k, _, p in await repo.data_keys_of_roots(conn, q, roots)}
        loaded_at = time.monotonic()
        for scope in batch:
            root_rows, data_rows = versions[owners[scope]]
            unwrapped = {
                r.id: await kms._keyring.unwrap_root(r.id, r.version, r.wrapped) for r in root_rows
            }
            keys = []
            for d in data_rows:
                if purposes[d.data_key_id] == PURPOSE:
                    root = unwrapped[d.root_key_version_id]
                    key = unwrap_key(root.aead, root.id, d.id, d.wrapped)
                    keys.append(VersionKey(d.id, d.version, AESGCM(key), key))
            kms._cache.put((scope, PURPOSE), PurposeKeys(keys, loaded_at=loaded_at))
            if len(kms._cache.entries) % 100 == 0:
                await asyncio.sleep(0)  # the watcher's checks go on meanwhile


async def _freshness(
    bench: Bench, db: c.BenchDB, dialect: str, writer: Any, cpu: CPU, n: int
) -> None:
    report = bench.report
    scopes = c.scope_ids("scale", n)
    options: dict[str, Any] = {"cache_size": n + 1_000}
    if dialect == "postgres":
        options["notifications"] = False
        options["db"] = cpu_dsn(db, cpu)
    rss0 = _status("VmRSS")
    watcher = await db.open(**options)  # max_staleness: the default 1.0 s
    try:
        # A full garbage collection with a million cached pairs (3 million
        # tracked objects) takes about a second here and stalls the event
        # loop; during a fill they come every 25 % of growth, and stalls
        # past the hard limit (4 x max_staleness) demote the whole cache. So
        # the fill runs without automatic collections and the filled cache
        # is frozen (gc.freeze), as a service holding that many pairs should
        # do after warming up.
        gc.disable()
        await _fill(watcher, scopes)
        gc.freeze()
        gc.enable()
        cached = len(watcher._entries)
        rss = _status("VmRSS") - rss0
        report.add(
            TARGET,
            f"RSS of the cached instance, {cached:,} pairs cached [{dialect}]",
            rss / 2**20,
            "MB",
            note=f"{rss / cached:,.0f} B a pair; cache_size={n + 1_000:,}",
        )
        gc.collect()
        await asyncio.sleep(2.0)
        quiet = bench.pick(2.0, 20.0)
        mark = await cpu.mark()
        thread0 = time.thread_time()
        checks0 = watcher._freshness.failed_checks
        await asyncio.sleep(quiet)
        client, server = await cpu.since(mark)
        thread = time.thread_time() - thread0
        report.add(
            TARGET,
            f"background checks' CPU with nothing changing, {cached:,} pairs cached "
            f"[{dialect}, polling]",
            client / quiet * 100,
            "%",
            "< 2",
            note=f"process CPU over {quiet:.0f} s (event-loop thread "
            f"{thread / quiet * 100:.2f} %); server backends {server / quiet * 100:.2f} %; "
            f"failed checks {watcher._freshness.failed_checks - checks0}",
        )
        rng = random.Random(11)
        delays = []
        for _ in range(bench.pick(3, 20)):
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            scope = scopes[rng.randrange(n)]
            before = c.kms_async.BlobInfo.from_bytes(
                await watcher.encrypt(scope, PURPOSE, b"x")
            ).key_id
            await writer.rotate_keys(scope)
            committed = time.perf_counter()
            while True:
                seen = c.kms_async.BlobInfo.from_bytes(
                    await watcher.encrypt(scope, PURPOSE, b"x")
                ).key_id
                if seen != before:
                    break
                if time.perf_counter() - committed > 10:
                    raise RuntimeError("the cached instance never saw the rotation")
                await asyncio.sleep(0.001)
            delays.append((time.perf_counter() - committed) * 1e3)
        report.add(
            TARGET,
            f"rotation visible to the cached instance, max of {len(delays)}, "
            f"{cached:,} pairs cached [{dialect}, polling]",
            max(delays),
            "ms",
            "<= 1000",
            note=f"p50 {c.percentile(delays, 50):.0f} ms; max_staleness 1.0 s; "
            f"{len(watcher._entries):,} pairs still cached at the end",
        )
    finally:
        await c.close(watcher)


def cpu_dsn(db: c.BenchDB, cpu: CPU) -> str:
    return db.dsn if cpu.app is None else _with_param(db.dsn, "application_name", cpu.app)


# -- the run -----------------------------------------------------------------------


async def run(bench: Bench) -> None:
    c.section("Issue 12 at scale: bulk writes, cold loads, freshness")
    n = OPTIONS.scopes or bench.pick(1_000, 100_000)
    n_loop = bench.pick(20, 200)
    parts = set((OPTIONS.only or "bulk,cold,freshness").split(","))
    dialects = [OPTIONS.dialect] if OPTIONS.dialect else bench.dialects
    for dialect in dialects:
        async with c.database(bench, dialect) as db:
            admin = None
            app = None
            if dialect == "postgres":
                admin = await asyncpg.connect(bench.postgres)
                app = "kms_scale_" + secrets.token_hex(4)
            cpu = CPU(admin, app)
            writer = await db.open(db=cpu_dsn(db, cpu), max_staleness=None)
            try:
                if "bulk" in parts:
                    await _bulk(bench, dialect, writer, cpu, n, n_loop)
                else:
                    await writer.create_keys_many(c.scope_ids("scale", n), [PURPOSE])
                    if admin is not None:
                        schema = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(db.dsn).query))
                        for table in TABLES:
                            await admin.execute(f"analyze {schema['search_path']}.{table}")
                if "cold" in parts:
                    await _cold(bench, db, dialect, admin, cpu, n)
                if "freshness" in parts:
                    await _freshness(bench, db, dialect, writer, cpu, n)
            finally:
                await c.close(writer)
                if admin is not None:
                    await admin.close()
    bench.report.note(TARGET, f"machine: {os.cpu_count()} CPUs; sizes: {n:,} scopes")


if __name__ == "__main__":
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--scopes", type=int)
    extra.add_argument("--dialect", choices=["sqlite", "postgres"])
    extra.add_argument("--only", help="bulk,cold,freshness (default: all)")
    OPTIONS, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    c.main_for(run)
