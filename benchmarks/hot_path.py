"""Target 1: the hot path through the public API against raw AES-GCM and the peers.

One round trip = encrypt then decrypt of the same payload. Every contender
runs in the same process and the same rounds (A, B, C, ... rotated each
round); a ratio is the median over rounds of (contender / raw AES-GCM) in the
same round.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import _common as c
from _common import PURPOSE, Bench, Runner
from cryptography.fernet import Fernet, MultiFernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TARGET = "hot_path"
SIZES = [64, 1024, 64 * 1024, 1024 * 1024]
GOALS = {64: "<= 2", 1024: "<= 1.5", 64 * 1024: "<= 1.2"}
SCOPE = "hot-scope"
OFFLOAD_DEFAULT = 256 * 1024


def size_label(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    if size >= 1 << 10:
        return f"{size >> 10} KiB"
    return f"{size} B"


# -- contenders --------------------------------------------------------------


def raw_aesgcm(pt: bytes) -> Callable[[], object]:
    """What a user writes by hand with pyca/cryptography."""
    aead = AESGCM(os.urandom(32))

    def op() -> object:
        nonce = os.urandom(12)
        ct = aead.encrypt(nonce, pt, None)
        return aead.decrypt(nonce, ct, None)

    return op


def kms_runner(kms: Any, pt: bytes) -> Runner:
    encrypt, decrypt = kms.encrypt, kms.decrypt

    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            ct = await encrypt(SCOPE, PURPOSE, pt)
            await decrypt(SCOPE, PURPOSE, ct)
        return time.perf_counter() - start

    return run


def wrapper_runner(wrapper: Any, pt: bytes) -> Runner:
    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            blob = await wrapper.encrypt(pt)
            await wrapper.decrypt(blob)
        return time.perf_counter() - start

    return run


def go_design_runner(kms: Any, check: Callable[[], Any], pt: bytes) -> Runner:
    """The Go package's design: one collection-version read before every call."""
    encrypt, decrypt = kms.encrypt, kms.decrypt

    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await check()
            ct = await encrypt(SCOPE, PURPOSE, pt)
            await check()
            await decrypt(SCOPE, PURPOSE, ct)
        return time.perf_counter() - start

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
    sizes = SIZES
    rounds = bench.pick(2, 7)
    slice_seconds = bench.pick(0.01, 0.35)
    print(
        f"  {rounds} rounds x {slice_seconds:.2f} s per contender per size, contenders "
        "interleaved; ratio = median over rounds of (contender / raw) in the same round"
    )

    sync_peers: dict[str, Callable[[bytes], Callable[[], object]]] = {
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
        checks: dict[str, Callable[[], Any]] = {}
        for dialect in bench.dialects:
            db = await stack.enter_async_context(c.database(bench, dialect))
            kms = await db.open()  # defaults: watcher on, LISTEN on for a PostgreSQL DSN
            stack.push_async_callback(c.close, kms)
            await kms.create_keys(SCOPE)
            await kms.decrypt(SCOPE, PURPOSE, await kms.encrypt(SCOPE, PURPOSE, b"warm"))
            instances[dialect] = kms
            checks[dialect] = await _version_check(stack, db)
            if dialect == "sqlite":
                try:
                    inline = await db.open(offload_threshold=None)
                except TypeError:
                    inline = None
                    report.note(TARGET, "KMS.open() has no offload_threshold: no inline row")
                else:
                    stack.push_async_callback(c.close, inline)
        wrapper = await instances["sqlite"].get_wrapper(SCOPE, PURPOSE)

        results: dict[int, dict[str, float]] = {}
        for size in sizes:
            pt = os.urandom(size)
            runners: dict[str, Runner] = {"raw AES-GCM": c.sync_runner(raw_aesgcm(pt))}
            for dialect, kms in instances.items():
                runners[f"kms_async [{dialect}]"] = kms_runner(kms, pt)
            if inline is not None and size >= OFFLOAD_DEFAULT:
                # Above the default offload threshold the default instance
                # hands each call to a worker thread; this row keeps it inline.
                runners["kms_async [sqlite, offload_threshold=None]"] = kms_runner(inline, pt)
            runners["kms_async Wrapper"] = wrapper_runner(wrapper, pt)
            for name, factory in sync_peers.items():
                runners[name] = c.sync_runner(factory(pt))
            for dialect, kms in instances.items():
                runners[f"Go-design imitation [{dialect}]"] = go_design_runner(
                    kms, checks[dialect], pt
                )
            per_op = await c.interleave(runners, rounds=rounds, slice_seconds=slice_seconds)
            ratio = c.ratios(per_op, "raw AES-GCM")
            label = size_label(size)
            print(f"  -- {label}")
            results[size] = {}
            for name, times in per_op.items():
                us = c.median(times) * 1e6
                results[size][name] = us
                report.add(
                    TARGET,
                    f"{name} @ {label}: round trip",
                    us,
                    "µs",
                    kind="time",
                    contender=name,
                    size=size,
                )
            for name in per_op:
                if name == "raw AES-GCM":
                    continue
                goal = GOALS.get(size) if name.startswith("kms_async [") else None
                report.add(
                    TARGET,
                    f"{name} / raw @ {label}",
                    ratio[name],
                    "x",
                    goal,
                    kind="ratio",
                    contender=name,
                    size=size,
                )
    report.note(
        TARGET,
        "Go-design imitation: one `select version from kms_collection_version` round trip "
        "before each encrypt and each decrypt (asyncpg pool without reset-on-release, as Go's "
        "database/sql; aiosqlite connection for SQLite), then the same cached kms_async call",
    )


async def _version_check(stack: contextlib.AsyncExitStack, db: c.BenchDB) -> Callable[[], Any]:
    query = "select version from kms_collection_version"
    if db.dialect == "postgres":
        import asyncpg

        async def no_reset(conn: Any) -> None:
            return None

        pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=4, reset=no_reset)
        stack.push_async_callback(pool.close)
        return lambda: pool.fetchval(query)
    conn = await db.raw_connect()
    stack.push_async_callback(conn.close)
    return lambda: conn.execute_fetchall(query)


if __name__ == "__main__":
    c.main_for(run)
