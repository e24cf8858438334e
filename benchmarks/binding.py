"""The cold-load cost of verifying key bindings and the key state record (issue 15).

Two measurements, both in one run:

1. **CPU per cold load**, by thread CPU time: ``Keyring.load`` of the same
   fresh (scope, purpose) pairs on a database with schema file 06 (bindings
   and records verified) and on a copy without its two tables (nothing to
   verify), in interleaved rounds; each load's statement is the same one
   round trip either way. The ratio is the median over rounds of
   (with / without) in the same round.
2. **The verification alone**: the HKDF + HMAC checks a load of one pair
   does (a data key version, its root key version, the state record),
   against one AES-GCM unwrap of a 32-byte key, by thread CPU time.

SQLite only (the check is CPU work; the SQL differs by one subquery per row
and the state row). The hot path (encrypt/decrypt of a cached pair) does not
run any of this code. Usage: ``python benchmarks/binding.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import kms_async
from kms_async import _integrity as integrity

PURPOSE = "database"


async def _prepare(directory: str, scopes: int) -> tuple[str, str, kms_async.AeadWrapper]:
    root = kms_async.AeadWrapper(os.urandom(32), key_id="bench-root")
    bound = f"{directory}/bound.db"
    await kms_async.migrate(f"sqlite:///{bound}")
    async with await kms_async.KMS.open(
        f"sqlite:///{bound}", purposes=[PURPOSE], root_wrapper=root, max_staleness=None
    ) as kms:
        names = [f"s{n:06d}" for n in range(scopes)]
        for start in range(0, scopes, 1000):
            await kms.create_keys_many(names[start : start + 1000])
    plain = f"{directory}/plain.db"
    shutil.copy(bound, plain)
    import sqlite3

    with sqlite3.connect(plain) as conn:
        conn.execute("drop table kms_key_version_binding")
        conn.execute("drop table kms_key_state")
    return bound, plain, root


async def _load_cpu(path: str, root: kms_async.AeadWrapper, scopes: list[str]) -> float:
    """Thread CPU seconds per cold load of ``scopes`` on a fresh instance."""
    async with await kms_async.KMS.open(
        f"sqlite:///{path}", purposes=[PURPOSE], root_wrapper=root, max_staleness=None
    ) as kms:
        keyring = kms._keyring
        start = time.thread_time()
        for scope in scopes:
            await keyring.load(scope, PURPOSE)
        return (time.thread_time() - start) / len(scopes)


def _verify_cpu(rounds: int) -> tuple[float, float]:
    """(CPU seconds of one pair's checks, of one AES-GCM key unwrap)."""
    root_key, data_key = os.urandom(32), os.urandom(32)
    root_binding = integrity.bind_version(root_key, "s", "rootKey", "krk_x", "krkv_x", 1)
    data_binding = integrity.bind_version(data_key, "s", PURPOSE, "kdk_x", "kdkv_x", 1)
    state = integrity.KeyState("s", 1, "krkv_x", {"kdk_x": ("kdkv_x", 1)}, frozenset())
    body, mac = integrity.seal_state(state, root_key)
    start = time.thread_time()
    for _ in range(rounds):
        integrity.verify_version(root_binding, root_key, "s", "rootKey", "krk_x", "krkv_x", 1)
        integrity.verify_version(data_binding, data_key, "s", PURPOSE, "kdk_x", "kdkv_x", 1)
        integrity.unseal_state("s", "krkv_x", body, mac, root_key)
    checks = (time.thread_time() - start) / rounds
    aead, nonce = AESGCM(root_key), os.urandom(12)
    wrapped = aead.encrypt(nonce, data_key, None)
    start = time.thread_time()
    for _ in range(rounds):
        AESGCM(root_key).decrypt(nonce, wrapped, None)
    unwrap = (time.thread_time() - start) / rounds
    return checks, unwrap


async def main(quick: bool) -> None:
    per_round, rounds = (200, 3) if quick else (1000, 5)
    with tempfile.TemporaryDirectory() as directory:
        bound, plain, root = await _prepare(directory, per_round * rounds * 2)
        names = [f"s{n:06d}" for n in range(per_round * rounds * 2)]
        chunks = iter([names[i : i + per_round] for i in range(0, len(names), per_round)])
        with_v, without_v, ratios = [], [], []
        for r in range(rounds):
            order = [("bound", bound), ("plain", plain)]
            if r % 2:
                order.reverse()
            got = {}
            for label, path in order:
                got[label] = await _load_cpu(path, root, next(chunks))
            with_v.append(got["bound"])
            without_v.append(got["plain"])
            ratios.append(got["bound"] / got["plain"])
    checks, unwrap = _verify_cpu(2_000 if quick else 20_000)
    print(
        f"cold load, CPU per (scope, purpose), {per_round} fresh pairs x {rounds} rounds [sqlite]"
    )
    print(f"  with bindings verified:  {statistics.median(with_v) * 1e6:8.1f} us")
    print(f"  without (no 06 tables):  {statistics.median(without_v) * 1e6:8.1f} us")
    print(f"  ratio with/without (median of per-round ratios): {statistics.median(ratios):.2f}")
    print("verification alone, CPU (2 bindings + 1 state record, as one pair's load)")
    print(f"  checks: {checks * 1e6:.1f} us; one AES-GCM key unwrap: {unwrap * 1e6:.1f} us")


if __name__ == "__main__":
    asyncio.run(main("--quick" in sys.argv))
