"""Target 4: the first use of a (scope, purpose) costs one round trip, shared by concurrent callers.

Round trips are counted with the drivers' hooks exactly as in
``statements.py``: statements whose hook runs with ``IN_HOT_PATH`` set, on a
pool / connection this script made and passed as ``db``. The load runs in a
task of its own (single-flight); a task copies the context it was created
in, so its statements are attributed to the call that started it.

The Go package needs five queries for the same miss (collection version,
root key, root key versions, data keys, data key versions:
reference/go-kms-behaviour.md, "Performance notes"); that figure is quoted,
not measured here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _common as c
import asyncpg
from _common import PURPOSE, Bench

TARGET = "cold_load"
LOAD = "load (scope, purpose)"
RESET = "asyncpg pool reset on release"


async def _no_reset(conn: object) -> None:
    """A pool ``reset`` that sends nothing (kms_async leaves no session state behind)."""


async def _rollback_if_open(conn: Any) -> None:
    """The pool ``reset`` KMS.open(dsn) uses: undo only an open transaction."""
    if conn.is_in_transaction():
        await conn.execute("rollback")


async def _count_first_uses(
    db: Any, names: list[str], crowd: int, reset: Any
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Statements of a first encrypt, a first decrypt, and ``crowd`` concurrent
    first encrypts of one scope, on a hooked pool with this ``reset``."""
    first_scope, second_scope, crowd_scope = names
    counter = c.StatementCounter()
    async with c.counting_db(db, counter, pool_reset=reset) as hooked:
        kms = await db.open(db=hooked)  # defaults: the watcher runs meanwhile
        try:
            await asyncio.sleep(0.05)
            counter.reset()
            await c.counted(kms.encrypt(first_scope, PURPOSE, b"x"))
            await asyncio.sleep(0.01)  # asyncpg's logger runs on the next iteration
            first = dict(counter.hot)
            ct = await kms.encrypt(second_scope, PURPOSE, b"x")
            kms._cache.invalidate_scope(second_scope)
            counter.reset()
            await c.counted(kms.decrypt(second_scope, PURPOSE, ct))
            await asyncio.sleep(0.01)
            first_decrypt = dict(counter.hot)
            counter.reset()
            results = await asyncio.gather(
                *(c.counted(kms.encrypt(crowd_scope, PURPOSE, b"x")) for _ in range(crowd))
            )
            await asyncio.sleep(0.01)
            crowd_counts = dict(counter.hot)
            assert len(results) == crowd
        finally:
            await c.close(kms)
    return first, first_decrypt, crowd_counts


async def _first_use(kms: Any, scopes: list[str], in_flight: int) -> None:
    """Encrypt once per scope, ``in_flight`` scopes at a time."""
    if in_flight == 1:
        for scope in scopes:
            await kms.encrypt(scope, PURPOSE, b"x")
        return
    gate = asyncio.Semaphore(in_flight)

    async def one(scope: str) -> None:
        async with gate:
            await kms.encrypt(scope, PURPOSE, b"x")

    await asyncio.gather(*(one(s) for s in scopes))


async def run(bench: Bench) -> None:
    c.section("4. Cold load: round trips per first use, single-flight, loads per second")
    report = bench.report
    per_mode = bench.pick(100, 1_000)
    rounds = bench.pick(1, 2)
    crowd = bench.pick(200, 1_000)
    concurrency = 32
    for dialect in bench.dialects:
        async with c.database(bench, dialect) as db:
            setup = await db.open(max_staleness=None)
            scopes = c.scope_ids("cold", 3 * rounds * per_mode)
            await c.create_scopes(
                setup,
                [*scopes, "crowd-0", "crowd-1"]
                + [f"first-{n}-{k}" for n in (0, 1) for k in (1, 2)],
                c.PURPOSES,
            )
            await c.close(setup)

            # PostgreSQL: first a pool set up as KMS.open(dsn) sets up its own
            # (the goal), then a caller's pool with asyncpg's default reset.
            pools: list[tuple[str, Any]] = [("", None)]
            if dialect == "postgres":
                pools = [
                    (", pool as KMS.open(dsn) makes it", _rollback_if_open),
                    (", caller's pool with asyncpg's default reset", None),
                ]
            for n, (label, reset) in enumerate(pools):
                first, first_decrypt, crowd_counts = await _count_first_uses(
                    db, [f"first-{n}-1", f"first-{n}-2", f"crowd-{n}"], crowd, reset
                )
                goal = "== 1" if n == 0 else None
                resets = first.get(RESET, 0)
                report.add(
                    TARGET,
                    f"round trips of a first encrypt{label} [{dialect}]",
                    sum(first.values()),
                    "round trips",
                    goal,
                    note=f"kms_async SQL: {first.get(LOAD, 0)}; asyncpg pool reset on release: "
                    f"{resets}",
                )
                report.add(
                    TARGET,
                    f"round trips of a first decrypt{label} [{dialect}]",
                    sum(first_decrypt.values()),
                    "round trips",
                    goal,
                    note=f"kms_async SQL: {first_decrypt.get(LOAD, 0)}",
                )
                report.add(
                    TARGET,
                    f"loads for {crowd:,} concurrent first requests, one scope{label} [{dialect}]",
                    crowd_counts.get(LOAD, 0),
                    "loads",
                    goal,
                    note=f"all statements: {sum(crowd_counts.values())}",
                )
            if dialect == "postgres":
                report.note(
                    TARGET,
                    "asyncpg's Pool sends its reset query (pg_advisory_unlock_all; CLOSE ALL; "
                    "UNLISTEN *; RESET ALL) whenever a connection goes back to the pool, and the "
                    "releasing task waits for it. KMS.open(dsn) builds its pool with a reset "
                    "that only rolls back an open transaction; a caller's pool keeps the "
                    "caller's choice",
                )

            # Loads per second: fresh instances over scopes nobody has loaded,
            # one at a time and `concurrency` at a time; on PostgreSQL also
            # one at a time on a caller's pool that skips asyncpg's reset.
            modes = ["sequential", f"{concurrency} in flight"]
            if dialect == "postgres":
                modes.append("sequential, caller's pool with reset=no-op")
            rates: dict[str, list[float]] = {m: [] for m in modes}
            chunks = iter([scopes[i : i + per_mode] for i in range(0, len(scopes), per_mode)])
            for r in range(rounds):
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    chunk = next(chunks)
                    pool = None
                    if "no-op" in mode:
                        pool = await asyncpg.create_pool(
                            db.dsn, min_size=1, max_size=10, reset=_no_reset
                        )
                    kms = await (db.open(db=pool) if pool is not None else db.open())
                    try:
                        in_flight = concurrency if "in flight" in mode else 1
                        start = time.perf_counter()
                        await _first_use(kms, chunk, in_flight)
                        rates[mode].append(len(chunk) / (time.perf_counter() - start))
                    finally:
                        await c.close(kms)
                        if pool is not None:
                            await pool.close()
            for mode, values in rates.items():
                report.add(
                    TARGET,
                    f"cold loads per second, {mode} [{dialect}]",
                    c.median(values),
                    "loads/s",
                    note=f"{per_mode:,} fresh scopes per run, {rounds} run(s)",
                )
    report.note(
        TARGET,
        "the Go package costs 5 queries per cold (scope, purpose) plus one per call "
        "(reference/go-kms-behaviour.md; quoted, not measured)",
    )


if __name__ == "__main__":
    c.main_for(run)
