"""What a read replica takes off the primary during a cold-start storm.

    python benchmarks/read_replica.py                 # 10,000 scopes
    python benchmarks/read_replica.py --scopes 1000   # quicker

A private primary with a streaming hot standby (tests/_pg_cluster.py: initdb,
pg_basebackup -R, loopback ports), both with pg_stat_statements. The primary
gets N scopes (create_keys_many), the standby replays them. Then, twice, a
fresh KMS (default settings: max_staleness=1.0, so its background checks run
as in production) loads every scope's "database" pair cold, 64 tasks at a
time: once without read_dsn, once with read_dsn pointing at the standby, and
once more with read_dsn while another instance rotates a scope every 20 ms
(so the fence keeps moving and some loads must go to the primary). For
each run the primary's statements are counted (pg_stat_statements calls and
rows, without this script's own statements), with pg_stat_database's
committed transactions and tuples returned as a cross-check, and the ratio
printed. The standby's own count shows where the loads went instead.

Counts, not times, are the figure: both servers share this machine, so
moving work to the standby saves no wall-clock time here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import secrets
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import asyncpg  # noqa: E402
from _pg_cluster import PrimaryStandby  # noqa: E402

import kms_async  # noqa: E402

PURPOSES = ["database", "oidc"]
CONCURRENCY = 64
#: Seconds between the rotating instance's rotations (in the third run).
ROTATE_EVERY = 0.02

_OWN = (
    "pg_stat_statements",
    "pg_stat_database",
    "pg_stat_reset",
    "pg_current_wal_insert_lsn",
    "pg_last_wal_replay_lsn",
)


async def _stats(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        calls, rows = 0, 0
        # Only the storm's user: the rotator connects as another.
        for query, q_calls, q_rows in await conn.fetch(
            "select query, calls, rows from pg_stat_statements"
            " where userid = (select oid from pg_roles where rolname = current_user)"
        ):
            if not any(own in query for own in _OWN):
                calls += q_calls
                rows += q_rows
        db = await conn.fetchrow(
            "select xact_commit, tup_returned, tup_fetched from pg_stat_database"
            " where datname = current_database()"
        )
        return {
            "statements": calls,
            "rows": rows,
            "xact_commit": int(db["xact_commit"]),
            "tup_returned": int(db["tup_returned"]),
        }
    finally:
        await conn.close()


async def _reset(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("select pg_stat_statements_reset()")
        await conn.execute("select pg_stat_reset()")
    finally:
        await conn.close()


async def _storm(
    pair: PrimaryStandby, scopes: list[str], root: bytes, replica: bool, rotating: bool = False
) -> dict[str, Any]:
    await _reset(pair.primary_dsn)
    await _reset(pair.standby_dsn)
    primary_before = await _stats(pair.primary_dsn)
    standby_before = await _stats(pair.standby_dsn)
    kwargs: dict[str, Any] = {"read_dsn": pair.standby_dsn} if replica else {}
    wrapper = kms_async.AeadWrapper(root, key_id="root-1")
    rotations = 0
    done = asyncio.Event()

    async def rotator() -> None:
        # Another instance, as another database user (left out of the counts).
        nonlocal rotations
        other = pair.primary_dsn.replace("postgres@", "kms_rotator@")
        async with await kms_async.KMS.open(
            other, purposes=PURPOSES, root_wrapper=wrapper, max_staleness=None
        ) as writer:
            while not done.is_set():
                await writer.rotate_keys(random.choice(scopes))
                rotations += 1
                await asyncio.sleep(ROTATE_EVERY)

    rotating_task = asyncio.ensure_future(rotator()) if rotating else None
    started = time.perf_counter()
    kms = await kms_async.KMS.open(
        pair.primary_dsn, purposes=PURPOSES, root_wrapper=wrapper, **kwargs
    )
    try:
        pending = iter(scopes)

        async def worker() -> None:
            for scope_id in pending:
                await kms.encrypt(scope_id, "database", b"x")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        reads = kms.replica_reads
    finally:
        done.set()
        if rotating_task is not None:
            await rotating_task
        await kms.aclose()
    # Backends report pg_stat_database counts when they exit.
    await asyncio.sleep(1.0)
    primary_after = await _stats(pair.primary_dsn)
    standby_after = await _stats(pair.standby_dsn)
    return {
        "rotations": rotations,
        "seconds": elapsed,
        "reads": reads,
        "primary": {k: primary_after[k] - primary_before[k] for k in primary_after},
        "standby": {k: standby_after[k] - standby_before[k] for k in standby_after},
    }


def _show(name: str, run: dict[str, Any]) -> None:
    p, s = run["primary"], run["standby"]
    print(
        f"  {name:<22} {run['seconds']:6.2f} s  primary: {p['statements']:>7} statements, "
        f"{p['rows']:>7} rows, {p['xact_commit']:>7} transactions, "
        f"{p['tup_returned']:>9} tuples returned | standby: {s['statements']:>7} statements"
    )


async def main(scopes_count: int) -> None:
    pair = PrimaryStandby(
        extra="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=1000"
    )
    pair.start()
    try:
        conn = await asyncpg.connect(pair.primary_dsn)
        try:
            await conn.execute("create extension if not exists pg_stat_statements")
            await conn.execute("create role kms_rotator login superuser")
        finally:
            await conn.close()
        await kms_async.migrate(pair.primary_dsn)
        root = secrets.token_bytes(32)
        scopes = [f"tenant-{n:06d}" for n in range(scopes_count)]
        async with await kms_async.KMS.open(
            pair.primary_dsn,
            purposes=PURPOSES,
            root_wrapper=kms_async.AeadWrapper(root, key_id="root-1"),
            max_staleness=None,
        ) as writer:
            await writer.create_keys_many(scopes)
        conn = await asyncpg.connect(pair.primary_dsn)
        try:
            await conn.execute("analyze")
        finally:
            await conn.close()
        await pair.wait_for_replay(timeout=120)
        print(
            f"cold-start storm: a fresh KMS loads {scopes_count:,} scopes' 'database' pairs, "
            f"{CONCURRENCY} tasks (PostgreSQL primary + streaming standby on this machine)"
        )
        without = await _storm(pair, scopes, root, replica=False)
        _show("without read_dsn", without)
        with_replica = await _storm(pair, scopes, root, replica=True)
        _show("with read_dsn", with_replica)
        print(f"  replica_reads with read_dsn: {with_replica['reads']}")
        rotating = await _storm(pair, scopes, root, replica=True, rotating=True)
        _show("with read_dsn, rotating", rotating)
        print(
            f"  ... while another instance rotated {rotating['rotations']} scopes (every "
            f"{ROTATE_EVERY * 1000:g} ms; its statements are not counted, but its transactions "
            f"and tuples are): replica_reads {rotating['reads']}"
        )
        for key in ("statements", "rows", "xact_commit", "tup_returned"):
            before, after = without["primary"][key], with_replica["primary"][key]
            ratio = before / after if after else float("inf")
            print(f"  primary {key}: {before} -> {after} ({ratio:.1f}x fewer with read_dsn)")
    finally:
        pair.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scopes", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 scopes")
    args = parser.parse_args()
    if os.geteuid() == 0 and not os.access("/usr/lib/postgresql", os.R_OK):
        sys.exit("PostgreSQL binaries not found")
    asyncio.run(main(1000 if args.quick else args.scopes))
