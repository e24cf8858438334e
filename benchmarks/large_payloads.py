"""Target 8: large payloads and the event loop.

A worker task encrypts and decrypts 1 MiB and 16 MiB payloads through
``kms.encrypt``/``kms.decrypt`` in a loop, yielding to the event loop after
each call as a request handler would; a ticker task sleeps 1 ms at a time and
records how late it wakes up (the event-loop lag other requests would see).
Two instances over one database: ``offload_threshold=None`` (everything
inline) and the default (payloads of 4 MiB and more go to a worker thread;
AES-GCM releases the GIL). Runs alternate (inline, default, default, inline,
...) for each size; lag percentiles pool the ticks of all runs of a mode and
throughput is the median over runs.

The allocator is pinned as in ``hot_path`` and, here, also kept to one arena
(``steady_allocator(one_arena=True)``, what ``MALLOC_ARENA_MAX=1`` does): with
a thread arena per worker, glibc returns each freed 16 MiB buffer to the OS
and the next one page-faults while cryptography zero-fills it with the GIL
held, which shows up as ~8 ms of loop lag at p99. ``--default-malloc``
measures glibc's defaults instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import _common as c
from _common import PURPOSE, Bench

TARGET = "large_payloads"
SCOPE = "large-scope"
SIZES = [1 << 20, 16 << 20]


async def _measure(kms: Any, pt: bytes, seconds: float) -> tuple[list[float], float]:
    """(lags in seconds, round trips per second) over ``seconds``."""
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        ct = await kms.encrypt(SCOPE, PURPOSE, pt)
        await asyncio.sleep(0)
        out = await kms.decrypt(SCOPE, PURPOSE, ct)
        await asyncio.sleep(0)
        count += 1
    stop = True
    await task
    assert out == pt
    return lags, count / elapsed


async def run(bench: Bench) -> None:
    c.section("8. Large payloads: event-loop lag and throughput, inline vs offloaded")
    report = bench.report
    report.note(TARGET, c.steady_allocator(one_arena=True))
    rounds = bench.pick(1, 3)
    seconds = bench.pick(0.2, 1.0)
    async with c.database(bench, "sqlite") as db:
        try:
            inline = await db.open(offload_threshold=None)
        except TypeError:
            report.add(
                TARGET,
                "event-loop lag, inline vs offloaded",
                None,
                "ms",
                note="not available: KMS.open() has no offload_threshold option",
            )
            return
        default = await db.open()
        try:
            await default.create_keys(SCOPE)
            modes = {
                "inline (offload_threshold=None)": inline,
                "default (offload >= 4 MiB)": default,
            }
            for size in SIZES:
                pt = os.urandom(size)
                for kms in modes.values():
                    await kms.decrypt(SCOPE, PURPOSE, await kms.encrypt(SCOPE, PURPOSE, pt))
                lags: dict[str, list[float]] = {m: [] for m in modes}
                rates: dict[str, list[float]] = {m: [] for m in modes}
                names = list(modes)
                for r in range(rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        got, rate = await _measure(modes[name], pt, seconds)
                        lags[name].extend(got)
                        rates[name].append(rate)
                label = f"{size >> 20} MiB"
                for name in names:
                    ms = [x * 1e3 for x in lags[name]]
                    for q in (50, 99):
                        report.add(
                            TARGET,
                            f"loop lag p{q} @ {label}, {name}",
                            c.percentile(ms, q),
                            "ms",
                        )
                    report.add(TARGET, f"loop lag max @ {label}, {name}", max(ms), "ms")
                    report.add(
                        TARGET,
                        f"throughput @ {label}, {name}",
                        c.median(rates[name]) * size / (1 << 20),
                        "MiB/s",
                        note="payload MiB encrypted and decrypted per second",
                    )
        finally:
            await c.close(default)
            await c.close(inline)


if __name__ == "__main__":
    c.main_for(run)
