"""Run every kms_async benchmark and print each figure with its goal.

    python benchmarks/run.py                      # full run (about 10 minutes)
    python benchmarks/run.py --quick              # smoke mode for CI (under a minute)
    python benchmarks/run.py --only hot_path,memory --json results.json
    python benchmarks/chart.py results.json       # draws benchmarks/hot_path.png

PostgreSQL comes from KMS_BENCH_POSTGRES_DSN or KMS_TEST_POSTGRES_DSN
(default postgresql://postgres@127.0.0.1:5432/postgres); each benchmark makes
its own schema and drops it. Without a reachable server only SQLite runs.
Peers that are not installed (tink, aws-encryption-sdk) are skipped with a note.
Each benchmark runs in a fresh Python process, so one benchmark's heap (the
memory benchmark caches 100,000 scopes) does not slow or skew the next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import _common as c

BENCHMARKS = {
    "hot_path": "1. hot path vs raw AES-GCM and peers",
    "statements": "2. zero statements on the hot path",
    "concurrency": "3. 1,000 concurrent tasks vs one",
    "cold_load": "4. cold load round trips, single-flight, loads/s",
    "freshness": "5. rotation reaching another instance; targeted invalidation",
    "bulk": "6. bulk create / reconcile / rotate vs loops",
    "memory": "7. heap per cached version; LRU bound",
    "large_payloads": "8. large payloads: event-loop lag, offloading",
    "batch": "9. encrypt_many + decrypt_many vs raw AES-GCM",
    "scale": "issue 12: bulk writes' memory and CPU, cold loads, freshness at N cached pairs",
    "metrics": "issue 14: the hot path with metrics on / off / the floor",
}


#: Seconds one benchmark may run before it is stopped (a hang must not stall CI).
QUICK_LIMIT = 300
FULL_LIMIT = 1800


def _select(only: str | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


def _summary(report: c.Report, failed: dict[str, int]) -> None:
    print("\n== Summary: figures with a goal")
    for f in report.figures:
        if f.goal is not None:
            print(
                f"  [{f.status:>4}] {f.target}: {f.name}: {c.fmt(f.value, f.unit)} (goal {f.goal})"
            )
    for name, code in failed.items():
        print(f"  [FAIL] {name}: crashed (exit status {code}); its figures are missing or partial")
    counts = {
        s: sum(f.status == s for f in report.figures if f.goal) for s in ("PASS", "MISS", "n/a")
    }
    print(
        f"  {counts['PASS']} PASS, {counts['MISS']} MISS, {counts['n/a']} not available, "
        f"{len(failed)} benchmark(s) FAILED"
    )


async def _prepare(quick: bool) -> c.Bench:
    bench = await c.make_bench(quick)
    bench.report.meta = await c.describe(bench)
    return bench


def _run_child(name: str, bench: c.Bench, args: argparse.Namespace) -> int:
    """Run one benchmark in a fresh interpreter and collect its figures."""
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        command = [sys.executable, os.path.join(here, f"{name}.py"), "--json", out]
        command += ["--quick"] if args.quick else []
        command += ["--default-malloc"] if args.default_malloc else []
        # The child inherits stdout/stderr: its figures print as they come.
        env = dict(os.environ, KMS_BENCH_CHILD="1" if bench.postgres else "no-postgres")
        child_process = subprocess.Popen(command, env=env)
        limit = QUICK_LIMIT if args.quick else FULL_LIMIT
        try:
            code = child_process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"  {name} ran longer than {limit} s: stopping it", flush=True)
            child_process.terminate()  # the child drops its schema on SIGTERM
            try:
                code = child_process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child_process.kill()
                code = child_process.wait()
            code = code or 1
        if os.path.exists(out):
            with open(out) as f:
                child = json.load(f)
            for fig in child["figures"]:
                fig.pop("status", None)
                bench.report.figures.append(c.Figure(**fig))
            bench.report.notes += [(n["target"], n["text"]) for n in child["notes"]]
    return code


def main() -> int:
    args = c.parse_args(with_only=True)
    names = _select(args.only)
    bench = asyncio.run(_prepare(args.quick))
    meta = bench.report.meta
    print(
        f"kms_async benchmarks ({'quick' if args.quick else 'full'}): {meta['nproc']} CPUs "
        f"({meta['cpu']}), {meta['memory']}; Python {meta['python']}, cryptography "
        f"{meta['cryptography']}, PostgreSQL {meta['postgres'] or 'unreachable'}, "
        f"SQLite {meta['sqlite']}"
    )
    failed: dict[str, int] = {}
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            code = _run_child(name, bench, args)
        except Exception as exc:  # the figures file was unreadable, say: the run failed
            print(f"  {name}: collecting its figures failed: {exc!r}", flush=True)
            code = 1
        if code != 0:
            print(f"  {name} exited with status {code}", flush=True)
            failed[name] = code
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["failed"] = list(failed)
    meta["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    _summary(bench.report, failed)
    c.write_outputs(bench, args)
    if failed:
        print(f"\nFAILED: {', '.join(failed)} crashed (see the tracebacks above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
