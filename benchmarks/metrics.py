"""Issue 14: what metrics cost the hot path, on and off.

One operation = ``kms.encrypt`` then ``kms.decrypt`` of the same payload, as
in target 1. Contenders, interleaved in the same process and rounds:

- ``metrics off``: ``KMS.open`` without a meter provider (the default);
- ``metrics on``: with an OpenTelemetry SDK ``MeterProvider`` and an
  in-memory reader, collected after the timing (collection reads plain ints
  the hot path keeps; nothing on the hot path calls OpenTelemetry);
- ``no counters``: the library's own hot path with its two integer
  increments (``self._encryptions += 1``, ``self._decryptions += 1``) taken
  out of the source, which measures what the counting costs whether metrics
  are on or off;
- the floor of target 1 (raw AES-GCM, buffered nonces).

Every other contender's slice is paired with an adjacent ``metrics off``
slice of the same round; a ratio is the median over rounds, by the process's
CPU time. The hot path does no database I/O, so one dialect (SQLite) is
enough.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import textwrap
from typing import Any

import _common as c
from _common import PURPOSE, Bench, Runner
from hot_path import kms_runner, raw_floor, size_label

import kms_async._kms
from kms_async import KMS

TARGET = "metrics"
SIZES = [64, 1024]
SCOPE = "hot-scope"
OFF = "metrics off"
ON = "metrics on"
BARE = "no counters"
FLOOR = "raw AES-GCM, buffered nonces"
#: metrics on / metrics off, and metrics off / the same code without the counters.
GOALS = {ON: "<= 1.03", BARE: ">= 0.97"}
COUNTERS = ("self._encryptions += 1", "self._decryptions += 1")


def without_counters() -> type[KMS]:
    """A KMS whose encrypt/decrypt are the library's, minus the two increments."""
    namespace: dict[str, Any] = {}
    for method in (KMS.encrypt, KMS.decrypt):
        source = textwrap.dedent(inspect.getsource(method))
        lines = source.splitlines()
        kept = [line for line in lines if line.strip() not in COUNTERS]
        if len(kept) != len(lines) - 1:
            raise RuntimeError(f"{method.__name__}: expected one counter line in its source")
        exec("\n".join(kept), vars(kms_async._kms), namespace)
    return type("KMSWithoutCounters", (KMS,), dict(namespace))


async def run(bench: Bench) -> None:
    c.section("issue 14. Metrics: the hot path with metrics on, off, and without its counters")
    report = bench.report
    report.note(TARGET, c.steady_allocator())
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        report.note(TARGET, "skipped: opentelemetry-sdk is not installed (pip install -e .[test])")
        return
    rounds = bench.pick(2, 21)
    slice_seconds = bench.pick(0.01, 0.08)
    print(
        f"  {rounds} rounds x {slice_seconds:.2f} s per contender per size, interleaved; each "
        f"slice paired with an adjacent '{OFF}' slice; by process CPU time"
    )
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with contextlib.AsyncExitStack() as stack:
        db = await stack.enter_async_context(c.database(bench, "sqlite"))
        off = await db.open()
        stack.push_async_callback(c.close, off)
        await off.create_keys(SCOPE)
        on = await db.open(meter_provider=provider)
        stack.push_async_callback(c.close, on)
        bare = await without_counters().open(db.dsn, purposes=["database"], root_wrapper=db.root)
        stack.push_async_callback(c.close, bare)
        for kms in (off, on, bare):
            await kms.decrypt(SCOPE, PURPOSE, await kms.encrypt(SCOPE, PURPOSE, b"warm"))
        for size in SIZES:
            pt = os.urandom(size)
            runners: dict[str, Runner] = {
                OFF: kms_runner(off, pt),
                ON: kms_runner(on, pt),
                BARE: kms_runner(bare, pt),
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
