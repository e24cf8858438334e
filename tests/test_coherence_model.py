"""Model-based test: random histories of several instances never lose a ciphertext.

Three instances share one database and do random things for a few seconds:
encrypt and store rows, rotate, rotate inside a caller transaction that rolls
back, revoke superseded versions (after re-encrypting the rows that use
them, as an operator would), fail their key change checks for a while, and,
on PostgreSQL, receive forged notifications. Every ciphertext any instance
returns is stored. At the end an instance started afterwards must decrypt
every stored row: a row written under a version that was revoked meanwhile
(an instance encrypting under stale keys) would fail that.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
from typing import Any

import pytest
from conftest import PURPOSES, TestDB
from test_coherence import FaultyReads, key_id, rolled_back

import kms_async
from kms_async import KMS, KeyInUseError, KeyNotFoundError, RevokeTooSoonError

MAX_STALENESS = 0.1
#: More than the hard limit (4 x MAX_STALENESS), with room for a loaded machine.
GRACE = float(os.environ.get("KMS_MODEL_GRACE", "1.5"))
SECONDS = 5.0
SCOPES = ["s0", "s1", "s2"]


async def store(db: TestDB, conn: Any, row: tuple[str, str, str, bytes, bytes]) -> None:
    if db.dialect == "postgres":
        await conn.execute("insert into app_row values ($1, $2, $3, $4, $5)", *row)
    else:
        await conn.execute("insert into app_row values (?, ?, ?, ?, ?)", row)


@pytest.mark.parametrize("seed", [int(os.environ.get("KMS_MODEL_SEED", "0")) or 1])
async def test_random_histories_never_lose_a_returned_ciphertext(
    db: TestDB, root_wrapper: kms_async.AeadWrapper, seed: int
) -> None:
    rng = random.Random(f"{seed}-{db.dialect}")
    await db.execute(
        "create table app_row (id text primary key, scope_id text, purpose text,"
        " ciphertext bytea, plaintext bytea)"
    )
    instances = [
        await KMS.open(
            db.dsn,
            purposes=PURPOSES,
            root_wrapper=root_wrapper,
            max_staleness=MAX_STALENESS,
            revoke_grace=GRACE,
            notifications=(db.dialect == "postgres" and i != 2),
        )
        for i in range(3)
    ]
    faults = [
        [FaultyReads(k, k._q.version_ids_of_pairs), FaultyReads(k, k._q.collection_version)]
        for k in instances
    ]
    app = await db.connect()
    counts: dict[str, int] = {}
    try:
        await instances[0].create_keys_many(SCOPES)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SECONDS
        while loop.time() < deadline:
            kms = rng.choice(instances)
            scope_id, purpose = rng.choice(SCOPES), rng.choice(PURPOSES)
            op = rng.choices(
                ["encrypt", "rotate", "rolled back", "fault", "forge", "revoke"],
                weights=[10, 2, 1, 1, 1, 2],
            )[0]
            counts[op] = counts.get(op, 0) + 1
            if op == "encrypt":
                plaintext = secrets.token_bytes(12)
                ciphertext = await kms.encrypt(scope_id, purpose, plaintext)
                row_id = secrets.token_hex(8)
                await store(db, app, (row_id, scope_id, purpose, ciphertext, plaintext))
            elif op == "rotate":
                await kms.rotate_keys(scope_id)
            elif op == "rolled back":
                async with rolled_back(db) as conn:
                    await kms.rotate_keys(scope_id, conn=conn)
                    plaintext = secrets.token_bytes(12)
                    ciphertext = await kms.encrypt(scope_id, purpose, plaintext)
                row_id = secrets.token_hex(8)
                await store(db, app, (row_id, scope_id, purpose, ciphertext, plaintext))
            elif op == "fault":
                for fault in rng.choice(faults):
                    fault.armed = not fault.armed
            elif op == "forge" and db.dialect == "postgres":
                version = await db.fetchval("select version from kms_collection_version")
                channel = instances[0]._q.notify_channel
                for payload in (
                    json.dumps({"v": version + 1, "s": []}),
                    '{"v": Infinity}',
                    json.dumps({"v": version + 1, "s": [scope_id]}),
                ):
                    await db.execute("select pg_notify($1, $2)", channel, payload)
            elif op == "revoke" and await revoke_superseded(db, kms, scope_id, purpose):
                counts["revoked"] = counts.get("revoked", 0) + 1
            await asyncio.sleep(rng.uniform(0, 0.01))
        for pair in faults:
            for fault in pair:
                fault.armed = False
    finally:
        await app.close()
        for kms in instances:
            await kms.aclose()

    fresh = await KMS.open(db.dsn, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None)
    async with fresh:
        rows = await db.fetch("select scope_id, purpose, ciphertext, plaintext from app_row")
        unreadable = []
        for scope_id, purpose, ciphertext, plaintext in rows:
            try:
                assert await fresh.decrypt(scope_id, purpose, bytes(ciphertext)) == bytes(plaintext)
            except kms_async.KMSError as exc:
                unreadable.append((key_id(bytes(ciphertext)), str(exc)))
    assert counts.get("encrypt", 0) > 0 and len(rows) >= counts["encrypt"]
    assert counts.get("revoked", 0) > 0, f"no version was revoked: {counts}"
    assert unreadable == [], f"seed {seed}: {len(unreadable)} of {len(rows)} rows lost; {counts}"


async def revoke_superseded(db: TestDB, kms: KMS, scope_id: str, purpose: str) -> bool:
    """Re-encrypt the rows under the pair's oldest superseded version, then revoke it."""
    try:
        keys = {k.purpose: k for k in await kms.list_keys(scope_id)}
    except KeyNotFoundError:
        return False
    versions = keys[purpose].versions
    if len(versions) < 2:
        return False
    old = versions[0].id
    rows = await db.fetch(
        "select id, ciphertext, plaintext from app_row where scope_id = $1 and purpose = $2",
        scope_id,
        purpose,
    )
    for row_id, ciphertext, plaintext in rows:
        if key_id(bytes(ciphertext)) != old:
            continue
        assert await kms.decrypt(scope_id, purpose, bytes(ciphertext)) == bytes(plaintext)
        again = await kms.encrypt(scope_id, purpose, bytes(plaintext))
        await db.execute("update app_row set ciphertext = $1 where id = $2", again, row_id)
    try:
        await kms.revoke_key_version(old, scope_id=scope_id)
    except (RevokeTooSoonError, KeyInUseError, KeyNotFoundError):
        return False
    return True
