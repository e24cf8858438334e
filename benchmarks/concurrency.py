"""Target 3: many concurrent tasks on the cache cost what one task costs.

1,000 tasks over 100 cached scopes, each doing N encrypt+decrypt round trips
of 64 B (the size where per-call overhead shows most), against one task doing
the same N x 1,000 round trips over the same scopes in the same order. Two
shapes:

* interleaved: every task yields to the event loop after each round trip
  (``await asyncio.sleep(0)``), as a request handler doing other I/O would,
  so the 1,000 tasks really take turns on the cache; the single task yields
  as often, so both do the same work;
* straight: tasks do not yield; the difference is task creation and
  scheduling.

Runs alternate (one task, 1,000 tasks, one task, ...); the ratio is the median
over rounds of (1,000 tasks / one task) per operation, timed by the process's
CPU time so that other load on the machine does not move it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import _common as c
from _common import PURPOSE, Bench

TARGET = "concurrency"
TASKS = 1_000
SCOPES = 100


class _Work:
    """TASKS x per_task encrypt+decrypt round trips over the scopes, two ways."""

    def __init__(self, kms: Any, scopes: list[str], per_task: int, pt: bytes) -> None:
        self.encrypt, self.decrypt = kms.encrypt, kms.decrypt
        self.scopes, self.per_task, self.pt = scopes, per_task, pt

    async def body(self, task: int, yielding: bool) -> None:
        encrypt, decrypt, pt = self.encrypt, self.decrypt, self.pt
        scope = self.scopes[task % SCOPES]
        for _ in range(self.per_task):
            ct = await encrypt(scope, PURPOSE, pt)
            await decrypt(scope, PURPOSE, ct)
            if yielding:
                await asyncio.sleep(0)

    async def one_task(self, yielding: bool) -> float:
        start = time.process_time()
        for task in range(TASKS):
            await self.body(task, yielding)
        return time.process_time() - start

    async def many_tasks(self, yielding: bool) -> float:
        start = time.process_time()
        await asyncio.gather(*(self.body(task, yielding) for task in range(TASKS)))
        return time.process_time() - start


async def run(bench: Bench) -> None:
    c.section("3. Concurrency: 1,000 tasks over 100 cached scopes vs one task, same work")
    report = bench.report
    per_task = bench.pick(5, 40)
    rounds = bench.pick(2, 7)
    pt = os.urandom(64)
    scopes = c.scope_ids("conc", SCOPES)
    for dialect in bench.dialects:
        async with c.database(bench, dialect) as db:
            kms = await db.open()
            try:
                await kms.reconcile_keys(scopes, [PURPOSE])
                for scope in scopes:
                    await kms.encrypt(scope, PURPOSE, b"warm")
                work = _Work(kms, scopes, per_task, pt)
                one_task, many_tasks = work.one_task, work.many_tasks
                for yielding, shape in ((True, "interleaved"), (False, "straight")):
                    await one_task(yielding)  # warm-up
                    await many_tasks(yielding)
                    round_ratios = []
                    single_us = []
                    many_us = []
                    for r in range(rounds):
                        pair = (one_task, many_tasks) if r % 2 == 0 else (many_tasks, one_task)
                        times = {f.__name__: await f(yielding) for f in pair}
                        ops = TASKS * per_task
                        single_us.append(times["one_task"] / ops * 1e6)
                        many_us.append(times["many_tasks"] / ops * 1e6)
                        round_ratios.append(times["many_tasks"] / times["one_task"])
                    report.add(
                        TARGET,
                        f"{shape}: 1,000 tasks / one task, per round trip [{dialect}]",
                        c.median(round_ratios),
                        "x",
                        "<= 1.3",
                        note=(
                            f"{c.median(many_us):.2f} vs {c.median(single_us):.2f} µs per "
                            f"encrypt+decrypt, {per_task} per task"
                        ),
                        one_task_us=c.median(single_us),
                        many_tasks_us=c.median(many_us),
                    )
            finally:
                await c.close(kms)


if __name__ == "__main__":
    c.main_for(run)
