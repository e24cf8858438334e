"""Target 6: bulk key operations against a loop of the per-scope calls.

* ``create_keys_many(scopes)`` (root + data keys for many scopes in one
  transaction) vs ``create_keys(scope)`` in a loop;
* ``reconcile_keys(scopes)`` over many scopes that all lack one purpose vs
  ``reconcile_keys([scope])`` in a loop;
* ``rotate_keys_many(scopes, rewrap=False)`` vs ``rotate_keys(scope)`` in a loop;
* reported without a goal: the same with ``rewrap=True``.

The loops run on a sample of other scopes and give a per-scope cost; the
speedup is (loop cost per scope) / (bulk cost per scope). Loop and bulk runs
alternate (loop, bulk, loop, bulk, ... ; reconcile: loop, bulk, loop), and
the speedup is the median of the per-round ratios (reconcile: bulk against
the mean of the loop runs on either side).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _common as c
from _common import PURPOSE, PURPOSES, Bench

TARGET = "bulk"


async def _timed(work: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await work()
    return time.perf_counter() - start


def _loop(
    method: Callable[..., Awaitable[Any]], scopes: list[str], **kwargs: Any
) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        for scope in scopes:
            await method(scope, **kwargs)

    return work


def _report(
    bench: Bench,
    name: str,
    dialect: str,
    loop_s: list[float],
    bulk_s: list[float],
    n_loop: int,
    n_bulk: int,
    round_ratios: list[float],
    goal: str | None = ">= 10",
) -> None:
    report = bench.report
    loop_rate = n_loop / c.median(loop_s)
    bulk_rate = n_bulk / c.median(bulk_s)
    report.add(
        TARGET,
        f"{name}: loop [{dialect}]",
        loop_rate,
        "scopes/s",
        note=f"{n_loop:,} scopes per run",
    )
    report.add(
        TARGET,
        f"{name}: bulk [{dialect}]",
        bulk_rate,
        "scopes/s",
        note=f"{n_bulk:,} scopes per call",
    )
    report.add(
        TARGET,
        f"{name}: speedup [{dialect}]",
        c.median(round_ratios),
        "x",
        goal,
        note=f"median of {len(round_ratios)} round(s)",
    )


def _unavailable(bench: Bench, name: str, dialect: str, api: str) -> None:
    bench.report.add(
        TARGET,
        f"{name}: speedup [{dialect}]",
        None,
        "x",
        ">= 10",
        note=f"not available: KMS.{api} does not exist in this kms_async",
    )


async def run(bench: Bench) -> None:
    c.section("6. Bulk key operations vs loops of per-scope calls")
    rounds = bench.pick(1, 3)
    n_create = bench.pick(200, 10_000)
    n_reconcile = bench.pick(200, 100_000)
    n_rotate = bench.pick(200, 10_000)
    n_loop = bench.pick(30, 300)
    for dialect in bench.dialects:
        async with c.database(bench, dialect) as db:
            kms = await db.open(max_staleness=None)
            try:
                await _create(bench, kms, dialect, rounds, n_create, n_loop)
                await _reconcile(bench, db, kms, dialect, n_reconcile, n_loop)
                await _rotate(bench, kms, dialect, rounds, n_rotate, n_loop)
                await _rotate_rewrap(bench, kms, dialect, bench.pick(100, 2_000), n_loop // 3)
            finally:
                await c.close(kms)


async def _create(bench: Bench, kms: Any, dialect: str, rounds: int, n: int, n_loop: int) -> None:
    name = "create keys"
    if not hasattr(kms, "create_keys_many"):
        _unavailable(bench, name, dialect, "create_keys_many")
        return
    loop_s, bulk_s, ratios = [], [], []
    for r in range(rounds):
        loop_scopes = c.scope_ids(f"create-loop-{r}", n_loop)
        bulk_scopes = c.scope_ids(f"create-bulk-{r}", n)
        loop_s.append(await _timed(_loop(kms.create_keys, loop_scopes)))
        bulk_s.append(await _timed(functools.partial(kms.create_keys_many, bulk_scopes)))
        ratios.append((loop_s[-1] / n_loop) / (bulk_s[-1] / n))
    _report(bench, name, dialect, loop_s, bulk_s, n_loop, n, ratios)


async def _reconcile(
    bench: Bench, db: c.BenchDB, kms: Any, dialect: str, n: int, n_loop: int
) -> None:
    """Scopes that have a 'database' key get their missing 'oidc' key."""
    bulk_scopes = c.scope_ids("reconcile-bulk", n)
    loop_scopes = c.scope_ids("reconcile-loop", 2 * n_loop)
    setup = await db.open(purposes=[PURPOSE], max_staleness=None)
    try:
        start = time.perf_counter()
        await c.create_scopes(setup, bulk_scopes + loop_scopes, [PURPOSE])
        setup_s = time.perf_counter() - start
    finally:
        await c.close(setup)
    assert PURPOSES[1] in kms.purposes
    before = await _timed(_loop(lambda s: kms.reconcile_keys([s]), loop_scopes[:n_loop]))
    created: list[Any] = []

    async def bulk() -> None:
        created.extend(await kms.reconcile_keys(bulk_scopes))

    bulk_s = await _timed(bulk)
    after = await _timed(_loop(lambda s: kms.reconcile_keys([s]), loop_scopes[n_loop:]))
    assert len(created) == n, f"reconcile created {len(created)} keys, expected {n}"
    loop_per_scope = (before + after) / (2 * n_loop)
    _report(
        bench,
        f"reconcile_keys, 1 purpose missing in {n:,} scopes",
        dialect,
        [before, after],
        [bulk_s],
        n_loop,
        n,
        [loop_per_scope / (bulk_s / n)],
    )
    bench.report.note(
        TARGET,
        f"[{dialect}] setup: reconcile_keys created root + 1 data key for "
        f"{n + 2 * n_loop:,} scopes at {(n + 2 * n_loop) / setup_s:,.0f} scopes/s",
    )


async def _rotate(bench: Bench, kms: Any, dialect: str, rounds: int, n: int, n_loop: int) -> None:
    name = "rotate keys (rewrap=False)"
    if not hasattr(kms, "rotate_keys_many"):
        _unavailable(bench, name, dialect, "rotate_keys_many")
        return
    bulk_scopes = c.scope_ids("rotate-bulk", n)
    loop_scopes = c.scope_ids("rotate-loop", n_loop)
    await c.create_scopes(kms, bulk_scopes + loop_scopes, PURPOSES)
    loop_s, bulk_s, ratios = [], [], []
    for _ in range(rounds):
        loop_s.append(await _timed(_loop(kms.rotate_keys, loop_scopes, rewrap=False)))
        bulk_s.append(await _timed(lambda: kms.rotate_keys_many(bulk_scopes, rewrap=False)))
        ratios.append((loop_s[-1] / n_loop) / (bulk_s[-1] / n))
    _report(bench, name, dialect, loop_s, bulk_s, n_loop, n, ratios)


async def _rotate_rewrap(bench: Bench, kms: Any, dialect: str, n: int, n_loop: int) -> None:
    """Reported, no goal: rotation that also rewraps every existing version."""
    name = "rotate keys (rewrap=True), 2 versions per key after"
    bulk_scopes = c.scope_ids("rewrap-bulk", n)
    loop_scopes = c.scope_ids("rewrap-loop", n_loop)
    await c.create_scopes(kms, bulk_scopes + loop_scopes, PURPOSES)
    loop_s = await _timed(_loop(kms.rotate_keys, loop_scopes, rewrap=True))
    bulk_s = await _timed(lambda: kms.rotate_keys_many(bulk_scopes, rewrap=True))
    ratio = (loop_s / n_loop) / (bulk_s / n)
    _report(bench, name, dialect, [loop_s], [bulk_s], n_loop, n, [ratio], goal=None)


if __name__ == "__main__":
    c.main_for(run)
