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
            await c.create_scopes(setup, [*scopes, "first-1", "first-2", "crowd"], c.PURPOSES)
            await c.close(setup)

            counter = c.StatementCounter()
            async with c.counting_db(db, counter) as hooked:
                kms = await db.open(db=hooked)  # defaults: the watcher runs meanwhile
                try:
                    await asyncio.sleep(0.05)
                    counter.reset()
                    await c.counted(kms.encrypt("first-1", PURPOSE, b"x"))
                    await asyncio.sleep(0.01)  # asyncpg's logger runs on the next iteration
                    first = dict(counter.hot)
                    counter.reset()
                    ct = await kms.encrypt("first-2", PURPOSE, b"x")
                    kms._cache.invalidate_scope("first-2")
                    counter.reset()
                    await c.counted(kms.decrypt("first-2", PURPOSE, ct))
                    await asyncio.sleep(0.01)
                    first_decrypt = dict(counter.hot)
                    counter.reset()
                    results = await asyncio.gather(
                        *(c.counted(kms.encrypt("crowd", PURPOSE, b"x")) for _ in range(crowd))
                    )
                    await asyncio.sleep(0.01)
                    crowd_counts = dict(counter.hot)
                    assert len(results) == crowd
                finally:
                    await c.close(kms)

            library = first.get(LOAD, 0)
            resets = first.get(RESET, 0)
            report.add(
                TARGET,
                f"round trips of a first encrypt [{dialect}]",
                sum(first.values()),
                "round trips",
                "== 1",
                note=f"kms_async SQL: {library}; asyncpg pool reset on release: {resets}",
            )
            if dialect == "postgres" and resets:
                report.note(
                    TARGET,
                    "asyncpg's Pool sends its reset query (pg_advisory_unlock_all; CLOSE ALL; "
                    "UNLISTEN *; RESET ALL) whenever a connection goes back to the pool, and the "
                    "releasing task waits for it. KMS.open(dsn) creates its pool with the same "
                    "default, so each read costs two round trips; create_pool(..., reset=<no-op>) "
                    "would avoid it for the KMS's own pool",
                )
            report.add(
                TARGET,
                f"round trips of a first decrypt [{dialect}]",
                sum(first_decrypt.values()),
                "round trips",
                "== 1",
                note=f"kms_async SQL: {first_decrypt.get(LOAD, 0)}",
            )
            report.add(
                TARGET,
                f"loads for {crowd:,} concurrent first requests, one scope [{dialect}]",
                crowd_counts.get(LOAD, 0),
                "loads",
                "== 1",
                note=f"all statements: {sum(crowd_counts.values())}",
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
