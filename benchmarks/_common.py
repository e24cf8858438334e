"""Shared helpers for the benchmarks: figures, timing, databases and statement counting.

Every benchmark module exposes ``async def run(bench: Bench) -> None`` and can
also be started alone (``python benchmarks/hot_path.py [--quick]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import aiosqlite  # noqa: E402
import asyncpg  # noqa: E402

import kms_async  # noqa: E402

PURPOSE = "database"
PURPOSES = ["database", "oidc"]
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_dsn() -> str:
    return (
        os.environ.get("KMS_BENCH_POSTGRES_DSN")
        or os.environ.get("KMS_TEST_POSTGRES_DSN")
        or DEFAULT_DSN
    )


# -- figures -----------------------------------------------------------------


@dataclasses.dataclass
class Figure:
    """One measured number, with its goal when it has one."""

    target: str
    name: str
    value: float | None
    unit: str
    goal: str | None = None  # e.g. "<= 2"
    passed: bool | None = None
    note: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "MISS"


def _check(value: float, goal: str) -> bool:
    op, _, bound_text = goal.partition(" ")
    bound = float(bound_text)
    return {
        "<=": value <= bound,
        ">=": value >= bound,
        "==": value == bound,
        "<": value < bound,
    }[op]


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e15):
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("x", "%") else f"{text} {unit}"


class Report:
    """Collects figures and notes; prints each as it arrives."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.notes: list[tuple[str, str]] = []
        self.meta: dict[str, Any] = {}

    def add(
        self,
        target: str,
        name: str,
        value: float | None,
        unit: str,
        goal: str | None = None,
        *,
        note: str = "",
        **data: Any,
    ) -> Figure:
        passed = None if goal is None or value is None else _check(value, goal)
        figure = Figure(target, name, value, unit, goal, passed, note, data)
        self.figures.append(figure)
        goal_text = f"   goal {goal} {unit}".rstrip() if goal else ""
        tail = f"   ({note})" if note else ""
        print(f"  [{figure.status:>4}] {name}: {fmt(value, unit)}{goal_text}{tail}", flush=True)
        return figure

    def note(self, target: str, text: str) -> None:
        self.notes.append((target, text))
        print(f"  note: {text}", flush=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "figures": [dataclasses.asdict(f) | {"status": f.status} for f in self.figures],
            "notes": [{"target": t, "text": x} for t, x in self.notes],
        }

    def markdown(self) -> str:
        """The figures as one markdown table per target (for the README)."""
        lines: list[str] = []
        targets = list(dict.fromkeys(f.target for f in self.figures))
        for target in targets:
            lines += [
                f"#### {target}",
                "",
                "| figure | measured | goal | status |",
                "|---|---|---|---|",
            ]
            for f in self.figures:
                if f.target != target:
                    continue
                goal = f"{f.goal} {f.unit}".replace("<=", "≤").replace(">=", "≥") if f.goal else ""
                note = f" ({f.note})" if f.note else ""
                lines.append(f"| {f.name}{note} | {fmt(f.value, f.unit)} | {goal} | {f.status} |")
            lines.append("")
        return "\n".join(lines)


@dataclasses.dataclass
class Bench:
    """What every benchmark module receives."""

    quick: bool
    report: Report
    postgres: str | None  # the server DSN, or None when it is unreachable

    @property
    def dialects(self) -> list[str]:
        return ["sqlite", "postgres"] if self.postgres else ["sqlite"]

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


# -- statistics and timing ---------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on the sorted values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


Timing = tuple[float, float]
"""(wall seconds, seconds of the process's CPU time) of some work."""

Runner = Callable[[int], Awaitable[Timing]]
"""Runs n operations and returns what they took (timed inside, see :func:`now`)."""


def now() -> Timing:
    """Start a measurement: pass the result to :func:`since`."""
    return time.perf_counter(), time.process_time()


def since(start: Timing) -> Timing:
    return time.perf_counter() - start[0], time.process_time() - start[1]


async def calibrate(runner: Runner, slice_seconds: float) -> int:
    """How many operations fill ``slice_seconds`` of wall time (after a warm-up)."""
    await runner(1)
    n = 1
    while True:
        elapsed = (await runner(n))[0]
        if elapsed >= min(0.05, slice_seconds / 2) or n >= 1 << 24:
            break
        n *= 2
    per_op = elapsed / n
    return max(1, round(slice_seconds / per_op))


@dataclasses.dataclass
class Rounds:
    """Per contender, the seconds per operation of each slice, by both clocks.

    ``paired[name]`` holds, per slice of ``name``, the base's slice run just
    before or after it (same round, adjacent in time).
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    paired: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)
    paired_base: str | None = None

    def per_op(self, name: str, clock: str) -> list[float]:
        return (self.cpu if clock == "cpu" else self.wall)[name]

    def median(self, name: str, clock: str) -> float:
        return median(self.per_op(name, clock))

    def ratios(self, name: str, base: str, clock: str) -> list[float]:
        """(name / base) per slice of name, against the adjacent base slice if paired."""
        times = self.per_op(name, clock)
        if base == self.paired_base and name in self.paired:
            index = 1 if clock == "cpu" else 0
            bases = [pair[index] for pair in self.paired[name]]
        else:
            bases = self.per_op(base, clock)
        return [t / b for t, b in zip(times, bases, strict=True)]

    def ratio(self, name: str, base: str, clock: str) -> float:
        """Median over rounds of (name / base) in the same round, by one clock."""
        return median(self.ratios(name, base, clock))

    def spread(self, name: str, base: str, clock: str) -> tuple[float, float]:
        """The 25th and 75th percentiles of the per-round ratios."""
        values = self.ratios(name, base, clock)
        return percentile(values, 25), percentile(values, 75)


async def interleave(
    runners: dict[str, Runner],
    *,
    rounds: int,
    slice_seconds: float,
    paired_with: str | None = None,
) -> Rounds:
    """Time per operation of each runner, one value per round and clock.

    Contenders run one after another inside each round (A, B, C, A, B, C, ...),
    with the order rotated each round, so slow drifts of a noisy machine hit
    them all alike. With ``paired_with`` (the base), the base runs again
    right before each other contender's slice (after it, every other round),
    and each ratio is taken against that adjacent slice: the two are a few
    hundred milliseconds apart at most.

    Each slice is timed by the wall clock and by the process's CPU time (all
    its threads, so work handed to a worker thread counts): while other
    processes hold the CPU, this one is not running and its CPU time does not
    advance. Waiting for a server is not in it: contenders that wait are
    compared by the wall clock.
    """
    counts = {name: await calibrate(r, slice_seconds) for name, r in runners.items()}
    names = list(runners)
    result = Rounds({name: [] for name in names}, {name: [] for name in names})
    result.paired_base = paired_with

    async def timed(name: str) -> tuple[float, float]:
        n = counts[name]
        wall, cpu = await runners[name](n)
        result.wall[name].append(wall / n)
        result.cpu[name].append(cpu / n)
        return wall / n, cpu / n

    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            if paired_with is None or name == paired_with:
                await timed(name)
                continue
            if i % 2 == 0:
                base = await timed(paired_with)
                await timed(name)
            else:
                await timed(name)
                base = await timed(paired_with)
            result.paired.setdefault(name, []).append(base)
    return result


def sync_runner(op: Callable[[], object]) -> Runner:
    async def run(n: int) -> Timing:
        start = now()
        for _ in range(n):
            op()
        return since(start)

    return run


# -- databases ---------------------------------------------------------------


def with_search_path(dsn: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def postgres_reachable(dsn: str) -> str | None:
    """``None`` if PostgreSQL answers at ``dsn``, else why not."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn), 5)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


@dataclasses.dataclass
class BenchDB:
    """A fresh, migrated database of one dialect; its KMS instances share a root key."""

    dialect: str
    dsn: str
    root: kms_async.AeadWrapper
    path: str | None = None  # SQLite file

    async def open(self, **kwargs: Any) -> kms_async.KMS:
        """A KMS over this database (from its DSN unless ``db=`` is given)."""
        db = kwargs.pop("db", self.dsn)
        kwargs.setdefault("purposes", PURPOSES)
        kwargs.setdefault("root_wrapper", self.root)
        kms = await kms_async.KMS.open(db, **kwargs)
        counter = _COUNTERS.get(id(db))
        if counter is not None:
            await _count_kms_reader(kms, counter)
        return kms

    async def raw_connect(self) -> Any:
        """A plain driver connection to the same database."""
        if self.dialect == "postgres":
            return await asyncpg.connect(self.dsn)
        assert self.path is not None
        return await aiosqlite.connect(self.path, isolation_level=None)


@contextlib.asynccontextmanager
async def database(bench: Bench, dialect: str) -> AsyncIterator[BenchDB]:
    """A migrated database: a temp SQLite file, or a new PostgreSQL schema dropped after."""
    root = kms_async.AeadWrapper(os.urandom(32), key_id="bench-root")
    if dialect == "sqlite":
        folder = tempfile.mkdtemp(prefix="kms_bench_")
        try:
            path = os.path.join(folder, "kms.db")
            db = BenchDB("sqlite", f"sqlite:///{path}", root, path)
            await kms_async.migrate(db.dsn)
            yield db
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    assert bench.postgres is not None
    schema = "kms_bench_" + secrets.token_hex(5)
    admin = await asyncpg.connect(bench.postgres)
    try:
        await admin.execute(f"create schema {schema}")
        db = BenchDB("postgres", with_search_path(bench.postgres, schema), root)
        await kms_async.migrate(db.dsn)
        yield db
    finally:
        await admin.execute(f"drop schema if exists {schema} cascade")
        await admin.close()


#: KMS.aclose() calls that had not returned after CLOSE_TIMEOUT seconds.
HUNG_CLOSES = 0
CLOSE_TIMEOUT = 10.0


async def close(kms: kms_async.KMS) -> None:
    """``kms.aclose()``, but never wait forever.

    On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that
    arrives just as the awaited future completes; the KMS watcher waits with
    ``wait_for(queue.get(), ...)``, so a key-change notification arriving
    while ``aclose()`` cancels it can leave the watcher running and
    ``aclose()`` waiting for it forever. The benchmark notes it and goes on.
    """
    global HUNG_CLOSES
    closing = asyncio.ensure_future(kms.aclose())
    done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)
    if closing in done:
        closing.result()
        return
    HUNG_CLOSES += 1
    print(
        f"  note: KMS.aclose() had not returned after {CLOSE_TIMEOUT:.0f} s (its watcher task "
        "survived cancellation); cancelling the watcher again",
        flush=True,
    )
    for task in (kms._watcher, kms._listener):
        if task is not None:
            task.cancel()
    await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)


def scope_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


async def create_scopes(kms: kms_async.KMS, scopes: list[str], purposes: list[str]) -> None:
    """Create keys for many scopes with the existing bulk API (reconcile_keys)."""
    for start in range(0, len(scopes), 20_000):
        await kms.reconcile_keys(scopes[start : start + 20_000], purposes)


# -- counting statements with the drivers' own hooks -------------------------

#: True while the benchmark is inside a hot-path call (encrypt/decrypt).
IN_HOT_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("in_hot_path", default=False)


def statement_kind(sql: str) -> str:
    """A short label for a statement, for reports."""
    text = " ".join(sql.split()).lower()
    if "union all" in text and "root_key_version" in text:
        return "load (scope, purpose)"
    if "pg_advisory_unlock_all" in text or "reset all" in text:
        return "asyncpg pool reset on release"
    if (
        text.startswith("select")
        and "data_key_version" in text
        and ("unnest($1::text[], $2::text[])" in text or "pu on pu.key = s.key" in text)
    ):
        return "version ids of cached pairs"
    for marker, label in (
        ("pragma data_version", "pragma data_version"),
        ("select version from", "select collection version"),
        ("update", "update"),
        ("insert", "insert"),
        ("pg_notify", "pg_notify"),
        ("listen", "listen"),
    ):
        if text.startswith(marker) or (marker == "pg_notify" and marker in text):
            return label
    return " ".join(text.split()[:3])[:40]


class StatementCounter:
    """Counts statements a driver sends, split by whether a hot-path call issued them.

    asyncpg calls query loggers with ``loop.call_soon``, which runs them in a
    copy of the context of the task that ran the query, so a contextvar set
    around each hot-path call tells whose statement it was. aiosqlite runs
    statements on its worker thread, where the caller's contextvars are not
    visible; :class:`ContextSqliteConnection` carries them over.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hot: Counter[str] = Counter()
        self.other: Counter[str] = Counter()

    def record(self, sql: str) -> None:
        kind = statement_kind(sql)
        with self._lock:
            (self.hot if IN_HOT_PATH.get() else self.other)[kind] += 1

    def reset(self) -> None:
        with self._lock:
            self.hot.clear()
            self.other.clear()

    @property
    def hot_total(self) -> int:
        return sum(self.hot.values())

    @property
    def other_total(self) -> int:
        return sum(self.other.values())


class ContextSqliteConnection(aiosqlite.Connection):
    """An aiosqlite connection whose worker thread runs each call in the caller's context.

    aiosqlite queues every call (execute, fetch, commit, cursor calls) through
    ``_execute`` and runs it on its own thread, outside the calling task's
    contextvars. Running the queued call inside a copy of the caller's
    context, as ``asyncio.to_thread`` does, lets the sqlite3 trace callback
    see which task asked for the statement. Nothing else changes.
    """

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        context = contextvars.copy_context()
        return await super()._execute(context.run, fn, *args, **kwargs)


#: Counting SQLite connections by id(), and the counter each reports to.
_COUNTERS: dict[int, StatementCounter] = {}


async def counting_sqlite(path: str, counter: StatementCounter) -> aiosqlite.Connection:
    """An aiosqlite connection that reports every statement to ``counter``.

    A KMS opened on it with :meth:`BenchDB.open` has its own reader counted too.
    """
    conn = ContextSqliteConnection(lambda: sqlite3.connect(path, isolation_level=None), 64)
    await conn
    await conn.set_trace_callback(counter.record)
    _COUNTERS[id(conn)] = counter
    return conn


async def _count_kms_reader(kms: kms_async.KMS, counter: StatementCounter) -> None:
    """Count the statements of the KMS's own SQLite reader, in the caller's context.

    Given the application's SQLite connection, the KMS reads committed rows
    through a second connection it opens itself (rows of the application's
    open transaction must never reach its cache). The benchmark reaches into
    the KMS for it: there is no public handle, nor should there be.
    """
    reader = getattr(kms._db, "_reader", None)
    if reader is None:
        return
    reader.__class__ = ContextSqliteConnection  # same object layout, calls keep the context
    await reader.set_trace_callback(counter.record)


async def counting_pool(dsn: str, counter: StatementCounter, **kwargs: Any) -> asyncpg.Pool:
    """An asyncpg pool whose connections report every query to ``counter``."""

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: counter.record(record.query))

    return await asyncpg.create_pool(dsn, init=init, **kwargs)


@contextlib.asynccontextmanager
async def counting_db(
    db: BenchDB, counter: StatementCounter, *, pool_reset: Any = None
) -> AsyncIterator[Any]:
    """A hooked pool (PostgreSQL) or connection (SQLite) to pass as ``db=``.

    ``pool_reset`` is the asyncpg pool's ``reset`` (None: asyncpg's default).
    """
    if db.dialect == "postgres":
        extra = {} if pool_reset is None else {"reset": pool_reset}
        pool = await counting_pool(db.dsn, counter, min_size=1, max_size=10, **extra)
        try:
            yield pool
        finally:
            await pool.close()
    else:
        assert db.path is not None
        conn = await counting_sqlite(db.path, counter)
        try:
            yield conn
        finally:
            _COUNTERS.pop(id(conn), None)
            await conn.close()


async def counted(coro: Coroutine[Any, Any, Any]) -> tuple[Any, int]:
    """Run ``coro`` inside the hot-path context; return (result, suspensions).

    A suspension is a point where the coroutine gave control back to the
    event loop (it awaited something not yet done: a database reply, a lock,
    a sleep). A hot-path call that never suspends cannot have waited for any
    round trip.
    """
    token = IN_HOT_PATH.set(True)
    suspensions = 0
    try:
        while True:
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                return stop.value, suspensions
            suspensions += 1
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # Wait for the future the coroutine is blocked on, then let the
                # coroutine read its result or exception itself.
                yielded._asyncio_future_blocking = False
                await asyncio.wait({yielded})
    finally:
        IN_HOT_PATH.reset(token)


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# -- environment -------------------------------------------------------------

#: Set by --default-malloc: leave glibc's allocator heuristics alone.
DEFAULT_MALLOC = False


def steady_allocator(*, one_arena: bool = False) -> str:
    """Pin glibc's heap-trim and mmap thresholds for payloads of a MiB and more.

    By default glibc returns the top of the heap to the OS once more than
    M_TRIM_THRESHOLD is free, and moves that threshold as buffers come and
    go; a loop allocating and freeing 1 MiB buffers then page-faults on some
    allocations and not on others, depending on what the process allocated
    before. That swamps the cost being measured (kms_async / raw AES-GCM at
    1 MiB measured anywhere from 0.2x to 2.9x depending on which contender
    ran first). Services can pin them too (MALLOC_TRIM_THRESHOLD_,
    MALLOC_MMAP_THRESHOLD_).

    ``one_arena`` also sets M_ARENA_MAX to 1 (MALLOC_ARENA_MAX=1): worker
    threads then allocate from the main heap, which the pinned trim threshold
    keeps mapped. Without it each thread has its own arena, whose heaps glibc
    shrinks regardless of M_TRIM_THRESHOLD, so a 16 MiB buffer made in a
    worker thread page-faults again on every call.
    """
    if DEFAULT_MALLOC:
        return "glibc malloc defaults (--default-malloc)"
    if platform.libc_ver()[0] != "glibc":
        return "allocator left alone (not glibc)"
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    m_arena_max = -8
    ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
    if ok and one_arena:
        ok = libc.mallopt(m_arena_max, 1)
    if not ok:
        return "mallopt failed; glibc malloc defaults"
    arena = ", M_ARENA_MAX=1" if one_arena else ""
    return f"glibc malloc pinned: M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB{arena}"


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    kib = int(line.split()[1])
                    return f"{kib / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git_revision() -> tuple[str, str]:
    try:
        rev = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--", "kms_async"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        rev, dirty = "", ""
    return rev, dirty


async def describe(bench: Bench) -> dict[str, Any]:
    """The machine and package versions, for the report."""
    rev, dirty = await asyncio.to_thread(_git_revision)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": bench.quick,
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _memory(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kms_async_commit": rev + (" + uncommitted changes" if dirty else ""),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "sqlite": sqlite3.sqlite_version,
        "postgres": None,
    }
    for dist in (
        "cryptography",
        "asyncpg",
        "aiosqlite",
        "anyio",
        "tink",
        "aws-encryption-sdk",
        "psycopg",
    ):
        meta[dist] = _version(dist)
    if bench.postgres:
        conn = await asyncpg.connect(bench.postgres)
        try:
            meta["postgres"] = await conn.fetchval("show server_version")
        finally:
            await conn.close()
    return meta


def parse_args(argv: list[str] | None = None, *, with_only: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, < 60 s")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the figures as markdown tables")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="do not pin glibc's heap-trim threshold for the large-payload measurements",
    )
    if with_only:
        parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these benchmarks")
    return parser.parse_args(argv)


async def make_bench(quick: bool) -> Bench:
    if os.environ.get("KMS_BENCH_CHILD") == "no-postgres":
        return Bench(quick, Report(), None)  # run.py already said why
    dsn = postgres_dsn()
    problem = await postgres_reachable(dsn)
    if problem is not None:
        print(f"note: PostgreSQL is unreachable at {_redact(dsn)} ({problem}); running SQLite only")
        return Bench(quick, Report(), None)
    return Bench(quick, Report(), dsn)


def _redact(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return dsn


def write_outputs(bench: Bench, args: argparse.Namespace) -> None:
    quiet = bool(os.environ.get("KMS_BENCH_CHILD"))  # run.py collects the file itself
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.report.to_json(), f, indent=2, default=str)
        if not quiet:
            print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench.report.markdown())
        print(f"wrote {args.markdown}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main_for(run: Callable[[Bench], Awaitable[None]]) -> None:
    """Entry point of one module run alone (run.py starts each module this way)."""
    global DEFAULT_MALLOC
    args = parse_args()
    DEFAULT_MALLOC = args.default_malloc
    # A terminated benchmark still drops its schema and temp files.
    signal.signal(signal.SIGTERM, _interrupt)

    async def main() -> None:
        bench = await make_bench(args.quick)
        bench.report.meta = await describe(bench)
        await run(bench)
        if HUNG_CLOSES:
            bench.report.note(
                "library",
                f"KMS.aclose() hung {HUNG_CLOSES} time(s) (watcher lost its cancellation)",
            )
        write_outputs(bench, args)

    asyncio.run(main())
