"""Concurrency: several writers on one scope, single-flight loads, the stale-install race.

Every test runs on SQLite and PostgreSQL. Nothing is timed: tests assert on
database rows, version numbers and call counts, and wait for conditions with
bounded polling loops.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import CountingWrapper, GatedWrapper

from kms_async import KMS, AeadWrapper, BlobInfo, KeyExistsError

PURPOSES = ("database", "oidc")

OpenKMS = Callable[..., Awaitable[KMS]]


# -- helpers ----------------------------------------------------------------


def key_id(ciphertext: bytes) -> str:
    """The key version id an envelope names."""
    return BlobInfo.from_bytes(ciphertext).key_id


async def newest_version(kms: KMS, scope_id: str, purpose: str) -> str:
    """The id of the newest version of the scope's ``purpose`` key, from the database."""
    for key in await kms.list_keys(scope_id):
        if key.purpose == purpose:
            return key.versions[-1].id
    raise AssertionError(f"scope {scope_id!r} has no {purpose!r} key")


async def wait_until(condition: Callable[[], bool], *, limit: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached within the polling limit")
        await asyncio.sleep(0.01)


def count_loads(kms: KMS) -> list[tuple[str, str]]:
    """Record every call of this instance's own cold-load routine.

    The wrapper is set on the instance object and calls the real loader, so
    the database work is real; only the number of loads is observed.
    """
    calls: list[tuple[str, str]] = []
    original = kms._keyring.load

    async def counted(scope_id: str, purpose: str, **options: Any) -> Any:
        calls.append((scope_id, purpose))
        return await original(scope_id, purpose, **options)

    kms._keyring.load = counted  # type: ignore[method-assign]
    return calls


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collect what the event loop reports (e.g. 'Task exception was never retrieved')."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    assert not errors, [str(e.get("message")) for e in errors]


# -- concurrent writers -------------------------------------------------------


async def test_concurrent_rotations_from_three_instances_keep_versions_contiguous(
    db: Any, kms: KMS, open_kms: OpenKMS, loop_errors: list[dict[str, Any]]
) -> None:
    await kms.create_keys("org")
    instances = [kms, await open_kms(), await open_kms()]
    try:
        made: list[tuple[str, bytes, bytes]] = []
        for purpose in PURPOSES:
            made.append((purpose, b"before", await kms.encrypt("org", purpose, b"before")))
        rotating = True

        async def rotate(instance: KMS, rewrap: bool) -> None:
            await instance.rotate_keys("org", rewrap=rewrap)

        async def encrypt_meanwhile(instance: KMS, n: int) -> None:
            i = 0
            while rotating or i < 3:
                for purpose in PURPOSES:
                    plaintext = f"during-{n}-{i}".encode()
                    made.append(
                        (purpose, plaintext, await instance.encrypt("org", purpose, plaintext))
                    )
                i += 1
                await asyncio.sleep(0)

        rotations = [
            rotate(instance, rewrap=(n + i) % 2 == 0)
            for n, instance in enumerate(instances)
            for i in range(4)
        ]
        encrypting = [
            asyncio.ensure_future(encrypt_meanwhile(instance, n))
            for n, instance in enumerate(instances)
        ]
        try:
            await asyncio.gather(*rotations)
        finally:
            rotating = False
            await asyncio.gather(*encrypting)

        keys = await kms.list_keys("org")
        assert [k.purpose for k in keys] == ["rootKey", *PURPOSES]
        for key in keys:
            assert [v.version for v in key.versions] == list(range(1, 14)), key.purpose
        cv = await db.fetchval("select version from kms_collection_version")
        assert cv == 1 + 1 + 12
        for instance in instances:
            for purpose, plaintext, ciphertext in made:
                assert await instance.decrypt("org", purpose, ciphertext) == plaintext
            for purpose in PURPOSES:
                assert key_id(await instance.encrypt("org", purpose, b"x")) == await newest_version(
                    kms, "org", purpose
                )
    finally:
        for instance in instances[1:]:
            await instance.aclose()


async def test_concurrent_create_keys_of_one_scope_lets_exactly_one_win(
    db: Any, open_kms: OpenKMS, loop_errors: list[dict[str, Any]]
) -> None:
    instances = [await open_kms() for _ in range(5)]
    try:
        results = await asyncio.gather(
            *(instance.create_keys("org") for instance in instances), return_exceptions=True
        )
        winners = [r for r in results if r is None]
        losers = [r for r in results if r is not None]
        assert len(winners) == 1
        assert all(isinstance(r, KeyExistsError) for r in losers), [type(r) for r in losers]
        assert (
            await db.fetchval("select count(*) from kms_root_key where scope_id = $1", "org") == 1
        )
        assert await db.fetchval("select count(*) from kms_root_key_version") == 1
        assert await db.fetchval("select count(*) from kms_data_key") == len(PURPOSES)
        assert await db.fetchval("select count(*) from kms_data_key_version") == len(PURPOSES)
        # Every instance, winner or loser, serves the one set of keys that exists.
        for purpose in PURPOSES:
            newest = await newest_version(instances[0], "org", purpose)
            made = [await i.encrypt("org", purpose, b"secret") for i in instances]
            assert {key_id(c) for c in made} == {newest}
            for instance in instances:
                for ciphertext in made:
                    assert await instance.decrypt("org", purpose, ciphertext) == b"secret"
    finally:
        for instance in instances:
            await instance.aclose()


async def test_concurrent_reconcile_over_overlapping_scopes_creates_each_key_once(
    db: Any, kms: KMS, open_kms: OpenKMS, loop_errors: list[dict[str, Any]]
) -> None:
    scopes = [f"tenant-{i}" for i in range(10)]
    await kms.create_keys(scopes[0])
    await kms.create_keys(scopes[1], purposes=["database"])
    await kms.create_keys(scopes[2], purposes=[])
    missing = sorted(
        {(s, p) for s in scopes for p in PURPOSES}
        - {(scopes[0], p) for p in PURPOSES}
        - {(scopes[1], "database")}
    )
    scope_sets = [scopes[0:6], scopes[4:10], scopes[::2], scopes[::-1], scopes[1:4]]
    instances = [kms, *[await open_kms() for _ in range(len(scope_sets) - 1)]]
    try:
        results = await asyncio.gather(
            *(i.reconcile_keys(s) for i, s in zip(instances, scope_sets, strict=True))
        )
        created = sorted(pair for result in results for pair in result)
        assert created == missing  # each missing key made by exactly one caller

        rows = await db.fetch(
            "select r.scope_id, k.purpose, count(*) from kms_root_key r"
            " join kms_data_key k on k.root_key_id = r.private_id"
            " join kms_data_key_version v on v.data_key_id = k.private_id"
            " group by r.scope_id, k.purpose"
        )
        assert sorted((r[0], r[1]) for r in rows) == sorted(
            (s, p) for s in scopes for p in PURPOSES
        )
        assert {r[2] for r in rows} == {1}
        roots = await db.fetch("select scope_id, count(*) from kms_root_key group by scope_id")
        assert sorted(roots) == sorted((s, 1) for s in scopes)

        for scope_id in scopes:
            for purpose in PURPOSES:
                ciphertext = await instances[-1].encrypt(scope_id, purpose, b"hello")
                for instance in instances:
                    assert await instance.decrypt(scope_id, purpose, ciphertext) == b"hello"
    finally:
        for instance in instances[1:]:
            await instance.aclose()


# -- single-flight loads and the stale-install race ---------------------------


async def test_a_thousand_concurrent_first_requests_cause_one_load(
    kms: KMS, open_kms: OpenKMS, root_wrapper: AeadWrapper, loop_errors: list[dict[str, Any]]
) -> None:
    await kms.create_keys("org")
    await kms.rotate_keys("org")
    await kms.rotate_keys("org")
    root_versions = len((await kms.list_keys("org"))[0].versions)
    assert root_versions == 3
    counting = CountingWrapper(root_wrapper)
    fresh = await open_kms(root_wrapper=counting)
    try:
        loads = count_loads(fresh)
        made = await asyncio.gather(
            *(fresh.encrypt("org", "database", b"m%d" % i) for i in range(1000))
        )
        assert loads == [("org", "database")]
        # Without rewrap each data key version is wrapped by its own root version.
        assert counting.decrypts == root_versions
        assert {key_id(c) for c in made} == {await newest_version(kms, "org", "database")}
        for i in (0, 499, 999):
            assert await kms.decrypt("org", "database", made[i]) == b"m%d" % i
    finally:
        await fresh.aclose()


@pytest.mark.parametrize("invalidation", ["refresh", "own_rotation"])
async def test_a_load_started_before_a_rotation_does_not_install_the_old_keys(
    kms: KMS,
    open_kms: OpenKMS,
    root_wrapper: AeadWrapper,
    invalidation: str,
    loop_errors: list[dict[str, Any]],
) -> None:
    """Reference §3.5: a slow load that read the rows before a rotation must not
    overwrite what the rotation made current."""
    await kms.create_keys("org")
    # The load waits at the wrapper; a rotation's proof of possession passes.
    gated = GatedWrapper(root_wrapper, first_only=True)
    slow = await open_kms(root_wrapper=gated)
    try:
        first = asyncio.ensure_future(slow.encrypt("org", "database", b"first"))
        # The load has read the rows and now waits for the root key service.
        await wait_until(gated.entered.is_set)
        if invalidation == "refresh":
            await kms.rotate_keys("org")
            await slow.refresh()
        else:
            await slow.rotate_keys("org")
        gated.gate.set()
        # The request that started before the rotation may use either version.
        assert await kms.decrypt("org", "database", await first) == b"first"

        newest = await newest_version(kms, "org", "database")
        assert key_id(await slow.encrypt("org", "database", b"after")) == newest
    finally:
        gated.gate.set()
        await slow.aclose()


async def test_mixed_load_while_another_instance_rotates(
    kms: KMS, open_kms: OpenKMS, loop_errors: list[dict[str, Any]]
) -> None:
    scopes = [f"tenant-{i}" for i in range(20)]
    for scope_id in scopes:
        await kms.create_keys(scope_id)
    pairs = [(scope_id, purpose) for scope_id in scopes for purpose in PURPOSES]
    first = {pair: await newest_version(kms, *pair) for pair in pairs}
    worker = await open_kms(max_staleness=0.2)
    try:
        done = asyncio.Event()
        newest: dict[tuple[str, str], str] = {}
        # Rotations start once every client holds a ciphertext made before
        # them (otherwise fast rotations can finish before the first loads).
        clients = 200
        ready = asyncio.Semaphore(0)

        async def rotate_all() -> None:
            try:
                for _ in range(clients):
                    await ready.acquire()
                for round_ in range(2):
                    for scope_id in scopes:
                        await kms.rotate_keys(scope_id, rewrap=round_ == 1)
                for scope_id in scopes:
                    for purpose in PURPOSES:
                        newest[scope_id, purpose] = await newest_version(kms, scope_id, purpose)
            finally:
                done.set()

        async def client(n: int) -> list[tuple[str, str, bytes, bytes]]:
            # Five clients on each of the 40 (scope, purpose) pairs.
            scope_id, purpose = pairs[n % len(pairs)]
            aad = scope_id.encode()
            made = []
            i = 0
            deadline = None
            while True:
                plaintext = f"{n}-{i}".encode()
                ciphertext = await worker.encrypt(scope_id, purpose, plaintext, aad=aad)
                assert await worker.decrypt(scope_id, purpose, ciphertext, aad=aad) == plaintext
                made.append((scope_id, purpose, plaintext, ciphertext))
                if i == 0:
                    ready.release()
                i += 1
                if done.is_set():
                    # Keep going until the worker's background check has
                    # brought this pair's newest version (bounded).
                    if key_id(ciphertext) == newest.get((scope_id, purpose)):
                        return made
                    loop = asyncio.get_running_loop()
                    deadline = deadline or loop.time() + 5.0
                    assert loop.time() < deadline, "the worker never saw the rotations"
                # Paced so that 200 clients leave the rotating task room to run.
                await asyncio.sleep(0.01)

        results = await asyncio.gather(rotate_all(), *(client(n) for n in range(clients)))
        made = [m for result in results[1:] for m in result]
        # Every pair was used before the rotations (its first version) and
        # after them (its newest); whether a client also caught the version
        # between the two rounds depends on timing, so it is allowed, not
        # required.
        seen: dict[tuple[str, str], set[str]] = {pair: set() for pair in pairs}
        for scope_id, purpose, _, ciphertext in made:
            seen[scope_id, purpose].add(key_id(ciphertext))
        for scope_id, purpose in pairs:
            versions = {
                version.id
                for key in await kms.list_keys(scope_id)
                if key.purpose == purpose
                for version in key.versions
            }
            assert len(versions) == 3
            pair = (scope_id, purpose)
            assert {first[pair], newest[pair]} <= seen[pair] <= versions, pair
        # Ciphertexts from before, during and after the rotations, on both instances.
        for scope_id, purpose, plaintext, ciphertext in made:
            aad = scope_id.encode()
            assert await worker.decrypt(scope_id, purpose, ciphertext, aad=aad) == plaintext
            assert await kms.decrypt(scope_id, purpose, ciphertext, aad=aad) == plaintext
    finally:
        await worker.aclose()
