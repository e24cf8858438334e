"""Issue 14: what metrics cost the hot path, on and off.

One operation = ``kms.encrypt`` then ``kms.decrypt`` of the same payload, as
in target 1. Contenders, interleaved in the same process and rounds:

- ``metrics off``: ``KMS.open`` without a meter provider (the default):
  ``encrypt``/``decrypt`` count nothing (refused decryptions are reported
  from except clauses, which cost nothing until they run);
- ``metrics on``: with an OpenTelemetry SDK ``MeterProvider`` and an
  in-memory reader, collected after the timing: the same hot path plus one
  integer increment per call (tests/test_metrics.py pins that the counted
  copies differ by that only; nothing on the hot path calls OpenTelemetry);
- the floor of target 1 (raw AES-GCM, buffered nonces).

The two increments are also timed alone (a round trip's share), since on a
shared machine a whole round trip is noisier than they are small.

Every other contender's slice is paired with an adjacent ``metrics off``
slice of the same round; a ratio is the median over rounds, by the process's
CPU time. The hot path does no database I/O, so one dialect (SQLite) is
enough, and both instances run without the background freshness check
(``max_staleness=None``), whose queries would otherwise fall into random
slices of this process's CPU time.
"""

from __future__ import annotations

import contextlib
import os
import time

import _common as c
from _common import PURPOSE, Bench, Runner
from hot_path import kms_runner, raw_floor, size_label

TARGET = "metrics"
SIZES = [64, 1024]
SCOPE = "hot-scope"
OFF = "metrics off"
ON = "metrics on"
FLOOR = "raw AES-GCM, buffered nonces"
#: metrics on / metrics off; the counters' share of a round trip (measured alone).
GOALS = {ON: "<= 1.05"}
COUNTER_GOAL = "<= 0.02"


class _Holder:
    def __init__(self) -> None:
        self._encryptions = 0
        self._decryptions = 0


def counter_cost(rounds: int, n: int = 200_000) -> float:
    """Seconds the two increments of a round trip take, alone (median over rounds).

    The same statements on an attribute of a plain object, against the same
    loop without them, by this thread's CPU time: far below the noise of a
    whole round trip on a shared machine, so measured on its own.
    """

    def with_counters(obj: _Holder) -> None:
        for _ in range(n):
            obj._encryptions += 1
            obj._decryptions += 1

    def without(obj: _Holder) -> None:
        for _ in range(n):
            pass

    costs = []
    for _ in range(rounds):
        obj = _Holder()
        t0 = time.thread_time()
        with_counters(obj)
        t1 = time.thread_time()
        without(obj)
        t2 = time.thread_time()
        costs.append(((t1 - t0) - (t2 - t1)) / n)
    return c.median(costs)


async def run(bench: Bench) -> None:
    c.section("issue 14. Metrics: the hot path with metrics on and off")
    report = bench.report
    report.note(TARGET, c.steady_allocator())
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        report.note(TARGET, "skipped: opentelemetry-sdk is not installed (pip install -e .[test])")
        return
    rounds = bench.pick(2, 41)
    slice_seconds = bench.pick(0.01, 0.08)
    print(
        f"  {rounds} rounds x {slice_seconds:.2f} s per contender per size, interleaved; each "
        f"slice paired with an adjacent '{OFF}' slice; by process CPU time"
    )
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with contextlib.AsyncExitStack() as stack:
        db = await stack.enter_async_context(c.database(bench, "sqlite"))
        # No background checks: their queries would land in random slices.
        off = await db.open(max_staleness=None)
        stack.push_async_callback(c.close, off)
        await off.create_keys(SCOPE)
        on = await db.open(meter_provider=provider, max_staleness=None)
        stack.push_async_callback(c.close, on)
        for kms in (off, on):
            await kms.decrypt(SCOPE, PURPOSE, await kms.encrypt(SCOPE, PURPOSE, b"warm"))
        for size in SIZES:
            pt = os.urandom(size)
            runners: dict[str, Runner] = {
                OFF: kms_runner(off, pt),
                ON: kms_runner(on, pt),
                FLOOR: c.sync_runner(raw_floor(pt)),
            }
            timed = await c.interleave(
                runners, rounds=rounds, slice_seconds=slice_seconds, paired_with=OFF
            )
            label = size_label(size)
            print(f"  -- {label}")
            for name in runners:
                us = timed.median(name, "cpu") * 1e6
                report.add(
                    TARGET, f"{name} @ {label}: round trip", us, "µs", kind="time", size=size
                )
                line = f"  {name}: {c.fmt(us)} µs"
                if name != OFF:
                    low, high = timed.spread(name, OFF, "cpu")
                    figure = report.add(
                        TARGET,
                        f"{name} / {OFF} @ {label}",
                        timed.ratio(name, OFF, "cpu"),
                        "x",
                        GOALS.get(name),
                        note=f"rounds' middle half {low:.3f}-{high:.3f}",
                        kind="ratio",
                        size=size,
                        rounds=timed.ratios(name, OFF, "cpu"),
                    )
                    line += f" ({figure.value:.3f}x {OFF}, middle half {low:.3f}-{high:.3f})"
                    if figure.goal is not None:
                        line += f" {figure.status}"
                print(line)
            off_over_floor = 1 / timed.ratio(FLOOR, OFF, "cpu")
            on_over_floor = off_over_floor * timed.ratio(ON, OFF, "cpu")
            for name, value in ((OFF, off_over_floor), (ON, on_over_floor)):
                report.add(TARGET, f"{name} / floor @ {label}", value, "x", kind="ratio", size=size)
            print(
                f"  {OFF} / floor {off_over_floor:.2f}x, {ON} / floor {on_over_floor:.2f}x"
                " (the floor's ratio to the adjacent off slice, inverted)"
            )
            cost = counter_cost(rounds)
            share = cost / timed.median(OFF, "cpu")
            report.add(TARGET, f"two counter increments @ {label}", cost * 1e9, "ns", kind="time")
            figure = report.add(
                TARGET,
                f"two counter increments / {OFF} round trip @ {label}",
                share,
                "x",
                COUNTER_GOAL,
                kind="ratio",
                size=size,
            )
            print(
                f"  the two increments alone: {cost * 1e9:.1f} ns, {share * 100:.2f} % of a "
                f"round trip {figure.status}"
            )
        data = reader.get_metrics_data()  # before the instances close
    encryptions = [
        p.value
        for r in (data.resource_metrics if data else [])
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "kms_async.encryptions"
        for p in m.data.data_points
    ]
    report.note(TARGET, f"the metrics-on instance reported {encryptions} encryptions")
    print(f"  the metrics-on instance reported {encryptions} encryptions")


if __name__ == "__main__":
    c.main_for(run)
