"""Target 2: cached encrypt/decrypt send zero statements, also while keys change elsewhere.

Method. Instance A (the one measured) runs on a pool / connection this
script creates and hooks with the drivers' own statement hooks: asyncpg's
``Connection.add_query_logger`` and aiosqlite's ``set_trace_callback``.
A second instance B, on its own connections, rotates other scopes that A
also has cached, so A's watcher (and on PostgreSQL its LISTEN connection)
keeps reloading them while the hot loop runs.

A statement counts against the hot path when the contextvar
``IN_HOT_PATH``, set around each encrypt/decrypt call, is true in the
context the hook runs in. asyncpg runs query loggers with
``loop.call_soon``, i.e. in a copy of the context of the task that awaited
the query (checked below with a probe query); aiosqlite runs statements on
its worker thread, so the benchmark's connection subclass runs each queued
call in a copy of the caller's context, as ``asyncio.to_thread`` does.
Independently, each call is stepped by hand: a call that never gives control
back to the event loop cannot have waited for a database reply.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import _common as c
from _common import PURPOSE, Bench

TARGET = "statements"
HOT = "hot-scope"


async def _probe_context(pool_or_conn: Any, dialect: str, counter: c.StatementCounter) -> bool:
    """Does the hook see the contextvar of the task that sent the statement?"""
    counter.reset()
    token = c.IN_HOT_PATH.set(True)
    try:
        if dialect == "postgres":
            await pool_or_conn.fetchval("select 1 as probe")
        else:
            await pool_or_conn.execute_fetchall("select 1 as probe")
    finally:
        c.IN_HOT_PATH.reset(token)
    await asyncio.sleep(0.01)  # asyncpg's logger runs on the next loop iteration
    seen = counter.hot.get("select 1 as", 0) >= 1
    counter.reset()
    return seen


async def _rotate(rotator: Any, scopes: list[str], stop: asyncio.Event, done: list[str]) -> None:
    """Rotate the scopes round-robin, one every 10 ms, until ``stop``."""
    while not stop.is_set():
        scope = scopes[len(done) % len(scopes)]
        await rotator.rotate_keys(scope)
        done.append(scope)
        await asyncio.sleep(0.01)


async def run(bench: Bench) -> None:
    c.section("2. Statements on the hot path (driver hooks), with concurrent rotations elsewhere")
    report = bench.report
    pairs = bench.pick(2_000, 10_000)
    duration = bench.pick(0.6, 3.0)
    batch = 10
    n_others = bench.pick(10, 50)
    for dialect in bench.dialects:
        async with c.database(bench, dialect) as db:
            counter = c.StatementCounter()
            async with c.counting_db(db, counter) as hooked:
                if not await _probe_context(hooked, dialect, counter):
                    report.note(TARGET, f"[{dialect}] the hook did not see the caller's context")
                rotator = await db.open(max_staleness=None)
                others = c.scope_ids("other", n_others)
                await rotator.reconcile_keys([HOT, *others], [PURPOSE])
                # A: defaults (watcher every max_staleness / 2 = 0.5 s); on PostgreSQL
                # also LISTEN, on one connection of the hooked pool.
                a = await db.open(db=hooked, notifications=True if dialect == "postgres" else None)
                try:
                    for scope in (HOT, *others):
                        await a.encrypt(scope, PURPOSE, b"warm")
                    entries_before = {s: a._entries.get((s, PURPOSE)) for s in others}
                    await asyncio.sleep(0.05)
                    counter.reset()

                    stop = asyncio.Event()
                    rotations: list[str] = []
                    task = asyncio.create_task(_rotate(rotator, others, stop, rotations))
                    pt = os.urandom(64)
                    suspended = 0
                    calls = 0
                    pause = duration / (pairs // batch)
                    start = time.perf_counter()
                    for _ in range(pairs // batch):
                        for _ in range(batch):
                            ct, s1 = await c.counted(a.encrypt(HOT, PURPOSE, pt))
                            out, s2 = await c.counted(a.decrypt(HOT, PURPOSE, ct))
                            assert out == pt
                            suspended += (s1 > 0) + (s2 > 0)
                            calls += 2
                        await asyncio.sleep(pause)
                    elapsed = time.perf_counter() - start
                    stop.set()
                    await task
                    await asyncio.sleep(0.05)  # let the last hook callbacks run
                    reloaded = sum(
                        a._entries.get((s, PURPOSE)) is not entries_before[s] for s in others
                    )
                    hot, other = dict(counter.hot), dict(counter.other)
                finally:
                    await c.close(a)
                    await c.close(rotator)
            report.add(
                TARGET,
                f"statements sent by {pairs:,} cached encrypt+decrypt [{dialect}]",
                sum(hot.values()),
                "statements",
                "== 0",
                note=f"while B made {len(rotations)} rotations of {n_others} other cached scopes",
            )
            if hot:
                report.note(TARGET, f"[{dialect}] hot-path statements by kind: {hot}")
            report.add(
                TARGET,
                f"hot-path calls that gave control to the event loop [{dialect}]",
                suspended,
                f"of {calls:,} calls",
            )
            report.add(
                TARGET,
                f"statements A's background tasks sent meanwhile [{dialect}]",
                sum(other.values()),
                "statements",
                note=f"over {elapsed:.1f} s; reloaded {reloaded} of {n_others} rotated scopes",
            )
            report.note(TARGET, f"[{dialect}] background statements by kind: {other}")
    report.note(
        TARGET,
        "attribution: a contextvar set around each encrypt/decrypt, read by the driver hook "
        "(asyncpg query logger: runs in a copy of the querying task's context; aiosqlite trace "
        "callback: the benchmark's connection runs each queued call in the caller's context)",
    )


if __name__ == "__main__":
    c.main_for(run)
