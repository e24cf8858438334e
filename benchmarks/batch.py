"""Target 9: encrypt_many + decrypt_many of a batch against the same raw AES-GCM calls.

One operation = a batch of 64 values of one size, encrypted and decrypted:
``kms.decrypt_many(scope, purpose, await kms.encrypt_many(scope, purpose, pts))``
against the floor, 64 times what the hot path's floor does (a buffered nonce
popped, one AES-GCM encrypt and one decrypt per value), and against 64
``encrypt``/``decrypt`` calls. Interleaved rounds, timed by the process's CPU
time; a ratio is the median over rounds of (contender / floor) in the same
round.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import _common as c
from _common import PURPOSE, Bench, Runner
from hot_path import BufferedNonces, size_label

from kms_async._kms import KMS

TARGET = "batch"
BATCH = 64
SIZES = [64, 1024, 64 * 1024]
GOALS = {1024: "<= 1.1"}
SCOPE = "batch-scope"
FLOOR = f"raw AES-GCM x {BATCH}, buffered nonces"


def floor_runner(pts: list[bytes]) -> Runner:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    nonces = BufferedNonces()
    pop, refill = nonces.pop, nonces.refill
    encrypt, decrypt = aead.encrypt, aead.decrypt

    async def run(n: int) -> c.Timing:
        start = c.now()
        for _ in range(n):
            for pt in pts:
                try:
                    nonce = pop()
                except IndexError:
                    nonce = refill()
                decrypt(nonce, encrypt(nonce, pt, None), None)
        return c.since(start)

    return run


def many_runner(kms: KMS, pts: list[bytes]) -> Runner:
    encrypt_many, decrypt_many = kms.encrypt_many, kms.decrypt_many

    async def run(n: int) -> c.Timing:
        start = c.now()
        for _ in range(n):
            await decrypt_many(SCOPE, PURPOSE, await encrypt_many(SCOPE, PURPOSE, pts))
        return c.since(start)

    return run


def loop_runner(kms: KMS, pts: list[bytes]) -> Runner:
    encrypt, decrypt = kms.encrypt, kms.decrypt

    async def run(n: int) -> c.Timing:
        start = c.now()
        for _ in range(n):
            for pt in pts:
                await decrypt(SCOPE, PURPOSE, await encrypt(SCOPE, PURPOSE, pt))
        return c.since(start)

    return run


async def run(bench: Bench) -> None:
    c.section(f"9. Batch: encrypt_many + decrypt_many of {BATCH} values vs raw AES-GCM")
    report = bench.report
    # A batch of 64 x 64 KiB runs in a worker thread (offload_threshold): one
    # malloc arena, as for target 8, or each call page-faults its buffers in.
    report.note(TARGET, c.steady_allocator(one_arena=True))
    rounds = bench.pick(2, 15)
    slice_seconds = bench.pick(0.01, 0.08)
    print(
        f"  {rounds} rounds x {slice_seconds:.2f} s per contender per size, interleaved; "
        "ratio = median over rounds of (contender / floor) in the same round, by process CPU time"
    )
    async with contextlib.AsyncExitStack() as stack:
        instances: dict[str, Any] = {}
        for dialect in bench.dialects:
            db = await stack.enter_async_context(c.database(bench, dialect))
            kms = await db.open()
            stack.push_async_callback(c.close, kms)
            await kms.create_keys(SCOPE)
            await kms.decrypt_many(SCOPE, PURPOSE, await kms.encrypt_many(SCOPE, PURPOSE, [b"w"]))
            instances[dialect] = kms
        table: dict[str, dict[int, str]] = {}
        for size in SIZES:
            pts = [os.urandom(size) for _ in range(BATCH)]
            runners: dict[str, Runner] = {FLOOR: floor_runner(pts)}
            for dialect, kms in instances.items():
                runners[f"encrypt_many + decrypt_many [{dialect}]"] = many_runner(kms, pts)
                runners[f"{BATCH} x encrypt + decrypt [{dialect}]"] = loop_runner(kms, pts)
            timed = await c.interleave(
                runners, rounds=rounds, slice_seconds=slice_seconds, paired_with=FLOOR
            )
            label = size_label(size)
            print(f"  -- {label}")
            for name in runners:
                per_value = timed.median(name, "cpu") * 1e6 / BATCH
                report.add(
                    TARGET,
                    f"{name} @ {label}: per value",
                    per_value,
                    "µs",
                    kind="time",
                    contender=name,
                    size=size,
                )
                cell = f"{c.fmt(per_value)} µs"
                if name != FLOOR:
                    goal = GOALS.get(size) if name.startswith("encrypt_many") else None
                    low, high = timed.spread(name, FLOOR, "cpu")
                    figure = report.add(
                        TARGET,
                        f"{name} / floor @ {label}",
                        timed.ratio(name, FLOOR, "cpu"),
                        "x",
                        goal,
                        note=f"rounds' middle half {low:.2f}-{high:.2f}",
                        kind="ratio",
                        contender=name,
                        size=size,
                        rounds=timed.ratios(name, FLOOR, "cpu"),
                    )
                    cell += f" ({c.fmt(figure.value)}x)"
                    if goal is not None:
                        cell += f" **{figure.status}**"
                table.setdefault(name, {})[size] = cell
    print(f"\n  Per value (encrypt + decrypt), batches of {BATCH}; in brackets: / floor\n")
    print("| contender | " + " | ".join(size_label(s) for s in SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells.get(s, "—") for s in SIZES) + " |")


if __name__ == "__main__":
    c.main_for(run)
