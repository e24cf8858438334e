"""Target 1: the hot path through the public API against raw AES-GCM and the peers.

One round trip = encrypt then decrypt of the same payload. Every contender
runs in the same process and the same rounds (A, B, C, ... rotated each
round); a ratio is the median over rounds of (contender / floor) in the same
round, timed by the process's CPU time (contenders that wait for a database
by the wall clock, against the floor's wall time of the same round).

The floor is what the library itself does per call, by hand: one AES-GCM
encrypt and decrypt with a nonce popped from a buffer of ``os.urandom``
draws (as the library draws them). The previous baseline drew each nonce
with ``os.urandom(12)``; its ratios are reported too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import _common as c
from _common import PURPOSE, Bench, Runner
from cryptography.fernet import Fernet, MultiFernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from go_design import GoDesign, open_go_design

TARGET = "hot_path"
SIZES = [64, 1024, 64 * 1024, 1024 * 1024]
#: Per-call hot path / floor (issue 12, target 5); ahead of Tink at every size.
GOALS = {1024: "<= 1.8", 64 * 1024: "<= 1.15"}
SCOPE = "hot-scope"
FLOOR = "raw AES-GCM, buffered nonces"
URANDOM = "raw AES-GCM, os.urandom nonces"
#: The Go design imitation: scopes in use (round robin) and a key write made
#: elsewhere every this many seconds of its own wall time (each flushes its
#: whole cache, and the next use of every scope reloads it).
GO_SCOPES = 100
GO_WRITE_EVERY = 0.1


def size_label(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    if size >= 1 << 10:
        return f"{size >> 10} KiB"
    return f"{size} B"


# -- contenders --------------------------------------------------------------


class BufferedNonces:
    """Nonces as the library draws them: 512 at a time from os.urandom, popped one by one."""

    def __init__(self) -> None:
        self._pool: list[bytes] = []
        self.pop = self._pool.pop

    def refill(self) -> bytes:
        batch = os.urandom(12 * 512)
        self._pool.extend([batch[i : i + 12] for i in range(0, len(batch), 12)])
        return self.pop()


def raw_floor(pt: bytes) -> Callable[[], object]:
    """The floor: the library's own per-call work with none of its bookkeeping."""
    aead = AESGCM(os.urandom(32))
    nonces = BufferedNonces()
    pop, refill = nonces.pop, nonces.refill

    def op() -> object:
        try:
            nonce = pop()
        except IndexError:
            nonce = refill()
        ct = aead.encrypt(nonce, pt, None)
        return aead.decrypt(nonce, ct, None)

    return op


def raw_urandom(pt: bytes) -> Callable[[], object]:
    """What a user writes by hand with pyca/cryptography (the previous baseline)."""
    aead = AESGCM(os.urandom(32))

    def op() -> object:
        nonce = os.urandom(12)
        ct = aead.encrypt(nonce, pt, None)
        return aead.decrypt(nonce, ct, None)

    return op


def kms_runner(kms: Any, pt: bytes) -> Runner:
    encrypt, decrypt = kms.encrypt, kms.decrypt

    async def run(n: int) -> c.Timing:
        start = c.now()
        for _ in range(n):
            ct = await encrypt(SCOPE, PURPOSE, pt)
            await decrypt(SCOPE, PURPOSE, ct)
        return c.since(start)

    return run


def wrapper_runner(wrapper: Any, pt: bytes) -> Runner:
    async def run(n: int) -> c.Timing:
        start = c.now()
        for _ in range(n):
            blob = await wrapper.encrypt(pt)
            await wrapper.decrypt(blob)
        return c.since(start)

    return run


def go_design_runner(go: GoDesign, scopes: list[str], pt: bytes) -> Runner:
    """Round trips over the scopes in turn; a write elsewhere every GO_WRITE_EVERY s."""
    state = {"i": 0, "timed": 0.0, "next_write": GO_WRITE_EVERY}
    encrypt, decrypt = go.encrypt, go.decrypt

    async def run(n: int) -> c.Timing:
        wall = cpu = 0.0
        done = 0
        while done < n:
            chunk = min(16, n - done)
            start = c.now()
            for i in range(state["i"], state["i"] + chunk):
                scope = scopes[int(i) % len(scopes)]
                decrypt(scope, PURPOSE, encrypt(scope, PURPOSE, pt))
            w, t = c.since(start)
            state["i"] += chunk
            done += chunk
            wall += w
            cpu += t
            state["timed"] += w
            if state["timed"] >= state["next_write"]:
                go.write_elsewhere()  # another process's work: not timed
                state["next_write"] += GO_WRITE_EVERY
        return wall, cpu

    return run


def make_tink() -> Callable[[bytes], Callable[[], object]] | str:
    try:
        import tink
        from tink import aead
    except ImportError:
        return "tink is not installed (pip install tink)"
    aead.register()
    primitive = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)

    def factory(pt: bytes) -> Callable[[], object]:
        return lambda: primitive.decrypt(primitive.encrypt(pt, b""), b"")

    return factory


def make_fernet() -> Callable[[bytes], Callable[[], object]]:
    f = Fernet(Fernet.generate_key())
    return lambda pt: lambda: f.decrypt(f.encrypt(pt))


def make_multifernet() -> Callable[[bytes], Callable[[], object]]:
    # After one rotation: the newest key first, the previous one still accepted.
    mf = MultiFernet([Fernet(Fernet.generate_key()), Fernet(Fernet.generate_key())])
    return lambda pt: lambda: mf.decrypt(mf.encrypt(pt))


def make_aws_esdk(signing: bool) -> Callable[[bytes], Callable[[], object]] | str:
    """AWS Encryption SDK with a caching CMM over a local raw AES master key (no network)."""
    try:
        import aws_encryption_sdk
        from aws_encryption_sdk import CommitmentPolicy
        from aws_encryption_sdk.identifiers import (
            Algorithm,
            EncryptionKeyType,
            WrappingAlgorithm,
        )
        from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
        from aws_encryption_sdk.key_providers.raw import RawMasterKey
    except ImportError:
        return "aws-encryption-sdk is not installed (pip install aws-encryption-sdk)"
    master_key = RawMasterKey(
        provider_id="bench",
        key_id=b"bench-key",
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=os.urandom(32),
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )
    cmm = aws_encryption_sdk.CachingCryptoMaterialsManager(
        master_key_provider=master_key,
        cache=aws_encryption_sdk.LocalCryptoMaterialsCache(capacity=100),
        max_age=3600.0,
    )
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    # The SDK's default suite signs every message with ECDSA P-384; the
    # committing suite without a signature is the fair AEAD comparison.
    extra = {} if signing else {"algorithm": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY}

    def factory(pt: bytes) -> Callable[[], object]:
        def op() -> object:
            ct, _ = client.encrypt(source=pt, materials_manager=cmm, **extra)
            out, _ = client.decrypt(source=ct, materials_manager=cmm)
            return out

        return op

    return factory


# -- the benchmark -----------------------------------------------------------


async def run(bench: Bench) -> None:
    c.section("1. Hot path: kms.encrypt + kms.decrypt round trip vs raw AES-GCM and peers")
    report = bench.report
    report.note(TARGET, c.steady_allocator())
    rounds = bench.pick(2, 15)
    slice_seconds = bench.pick(0.01, 0.08)
    print(
        f"  {rounds} rounds x {slice_seconds:.2f} s per contender per size, contenders "
        "interleaved; ratio = median over rounds of (contender / floor) in the same round, "
        "by process CPU time (the Go design imitation: by wall time)"
    )

    sync_peers: dict[str, Callable[[bytes], Callable[[], object]]] = {
        URANDOM: raw_urandom,
        "Fernet": make_fernet(),
        "MultiFernet": make_multifernet(),
    }
    for name, made in (
        ("Tink AEAD", make_tink()),
        ("AWS ESDK (caching)", make_aws_esdk(signing=False)),
        ("AWS ESDK (caching, default ECDSA suite)", make_aws_esdk(signing=True)),
    ):
        if isinstance(made, str):
            report.note(TARGET, f"{name} skipped: {made}")
        else:
            sync_peers[name] = made

    async with contextlib.AsyncExitStack() as stack:
        instances: dict[str, Any] = {}
        imitations: dict[str, tuple[GoDesign, list[str]]] = {}
        for dialect in bench.dialects:
            db = await stack.enter_async_context(c.database(bench, dialect))
            kms = await db.open()  # defaults: watcher on, LISTEN on for a PostgreSQL DSN
            stack.push_async_callback(c.close, kms)
            await kms.create_keys(SCOPE)
            await kms.decrypt(SCOPE, PURPOSE, await kms.encrypt(SCOPE, PURPOSE, b"warm"))
            instances[dialect] = kms
            go = open_go_design(dialect, db.dsn, db.path, db.root)
            if isinstance(go, str):
                report.note(TARGET, f"Go design imitation [{dialect}] skipped: {go}")
                continue
            stack.callback(go.close)
            go_scopes = c.scope_ids("go", GO_SCOPES)
            await kms.create_keys_many(go_scopes)
            imitations[dialect] = (go, go_scopes)
        wrapper = await instances["sqlite"].get_wrapper(SCOPE, PURPOSE)

        table: dict[str, dict[int, str]] = {}
        for size in SIZES:
            pt = os.urandom(size)
            runners: dict[str, Runner] = {FLOOR: c.sync_runner(raw_floor(pt))}
            for dialect, kms in instances.items():
                runners[f"kms_async [{dialect}]"] = kms_runner(kms, pt)
            runners["kms_async Wrapper"] = wrapper_runner(wrapper, pt)
            for name, factory in sync_peers.items():
                runners[name] = c.sync_runner(factory(pt))
            for dialect, (go, go_scopes) in imitations.items():
                runners[f"Go-design imitation [{dialect}]"] = go_design_runner(go, go_scopes, pt)
            timed = await c.interleave(
                runners, rounds=rounds, slice_seconds=slice_seconds, paired_with=FLOOR
            )
            label = size_label(size)
            print(f"  -- {label}")
            for name in runners:
                clock = "wall" if name.startswith("Go-design") else "cpu"
                us = timed.median(name, clock) * 1e6
                report.add(
                    TARGET,
                    f"{name} @ {label}: round trip",
                    us,
                    "µs",
                    kind="time",
                    contender=name,
                    size=size,
                    clock=clock,
                )
                cell = f"{c.fmt(us)} µs"
                if name != FLOOR:
                    floor_ratio = timed.ratio(name, FLOOR, clock)
                    goal = GOALS.get(size) if name.startswith("kms_async [") else None
                    low, high = timed.spread(name, FLOOR, clock)
                    floor_fig = report.add(
                        TARGET,
                        f"{name} / floor @ {label}",
                        floor_ratio,
                        "x",
                        goal,
                        note=f"rounds' middle half {low:.2f}-{high:.2f}",
                        kind="ratio",
                        contender=name,
                        size=size,
                        clock=clock,
                        rounds=timed.ratios(name, FLOOR, clock),
                    )
                    cell += f" ({c.fmt(floor_ratio)}x"
                    if name != URANDOM:
                        urandom_ratio = timed.ratio(name, URANDOM, clock)
                        report.add(
                            TARGET,
                            f"{name} / {URANDOM} @ {label}",
                            urandom_ratio,
                            "x",
                            kind="baseline_ratio",
                            contender=name,
                            size=size,
                            clock=clock,
                        )
                        cell += f"; {c.fmt(urandom_ratio)}x"
                    cell += ")"
                    if goal is not None:
                        cell += f" **{floor_fig.status}**"
                table.setdefault(name, {})[size] = cell
            if "Tink AEAD" in runners:
                for dialect in instances:
                    name = f"kms_async [{dialect}]"
                    ahead = report.add(
                        TARGET,
                        f"{name} / Tink AEAD @ {label}",
                        timed.ratio(name, "Tink AEAD", "cpu"),
                        "x",
                        "< 1",
                        kind="tink_ratio",
                        contender=name,
                        size=size,
                    )
                    table[name][size] += f"; / Tink {c.fmt(ahead.value)}x **{ahead.status}**"
        for dialect, (go, _) in imitations.items():
            report.note(
                TARGET,
                f"Go design imitation [{dialect}]: {go.flushes} whole-cache flushes and "
                f"{go.loads} pair loads over the run",
            )
    _print_table(table)
    report.note(
        TARGET,
        "Go design imitation: before each encrypt and each decrypt, one read of "
        "kms_collection_version over libpq (psycopg's compiled pq layer, a prepared "
        "statement) or the stdlib sqlite3 module; a changed value drops every cached "
        "pair, and a miss loads the pair with the Go package's four statements and "
        f"unwraps every version. {GO_SCOPES} scopes in turn; another connection bumps "
        f"the collection version every {GO_WRITE_EVERY * 1000:.0f} ms of the imitation's "
        "own time (a key write elsewhere)",
    )


def _print_table(table: dict[str, dict[int, str]]) -> None:
    """The figures as the markdown table benchmarks/README.md shows."""
    print("\n  Round trip; in brackets: / floor; / os.urandom baseline\n")
    print("| contender | " + " | ".join(size_label(s) for s in SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells.get(s, "—") for s in SIZES) + " |")


if __name__ == "__main__":
    c.main_for(run)
