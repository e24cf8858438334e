"""Rotation by policy: rotate_due() by age (database clock) and by counted encryptions,
run from several instances at once, and automatic rotation of worn keys."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable

import pytest
from conftest import TestDB, data_versions, input_validation, root_versions

from kms_async import KMS, InvalidParameterError, KeyEvent, KeyNotFoundError, RotationPolicy

OpenKMS = Callable[..., Awaitable[KMS]]

DAY = datetime.timedelta(days=1)


async def age(db: TestDB, scope_id: str, days: int, purpose: str | None = None) -> None:
    """Make the scope's data key versions (of one purpose, or all) ``days`` old in the
    database, rather than waiting."""
    when = (
        "now() - make_interval(days => $2)"
        if db.dialect == "postgres"
        else "datetime('now', '-' || $2 || ' days')"
    )
    purposes = "" if purpose is None else " and k.purpose = $3"
    args: list[object] = [scope_id, days] if purpose is None else [scope_id, days, purpose]
    update = (
        f"update kms_data_key_version set create_time = {when} where data_key_id in ("
        " select k.private_id from kms_data_key k join kms_root_key r"
        f" on r.private_id = k.root_key_id where r.scope_id = $1{purposes})"
    )
    # create_time is immutable (a trigger): lift that for the update only.
    if db.dialect == "postgres":
        trigger = "kms_data_key_version_immutable_columns"
        conn = await db.connect()
        try:
            async with conn.transaction():
                await conn.execute(f"alter table kms_data_key_version disable trigger {trigger}")
                await conn.execute(update, *args)
                await conn.execute(f"alter table kms_data_key_version enable trigger {trigger}")
        finally:
            await conn.close()
        return
    triggers = await db.fetch(
        "select name, sql from sqlite_master where type = 'trigger'"
        " and tbl_name = 'kms_data_key_version' and name like '%immutable%'"
    )
    for name, _ in triggers:
        await db.execute(f"drop trigger {name}")
    await db.execute(update, *args)
    for _, sql in triggers:
        await db.execute(sql)


async def newest_version_id(kms: KMS, scope_id: str, purpose: str) -> str:
    for key in await kms.list_keys(scope_id):
        if key.purpose == purpose:
            return key.versions[-1].id
    raise AssertionError(purpose)


async def test_max_age_rotates_the_scopes_with_an_old_newest_version(db: TestDB, kms: KMS) -> None:
    await kms.create_keys_many(["old", "half", "new"])
    await age(db, "old", 100)
    await age(db, "half", 100, "oidc")  # one purpose's key is enough
    policy = RotationPolicy(max_age=90 * DAY)
    assert await kms.rotate_due(policy) == ["half", "old"]
    versions = await data_versions(db)
    assert versions[("old", "database")] == [1, 2]
    assert versions[("half", "database")] == [1, 2]  # the whole scope rotates
    assert versions[("new", "database")] == [1]
    assert (await root_versions(db))["old"] == [1, 2]
    # The new versions are young: nothing is due any more.
    assert await kms.rotate_due(policy) == []
    assert (await data_versions(db))[("old", "database")] == [1, 2]


async def test_max_encryptions_rotates_by_counted_use(db: TestDB, kms: KMS) -> None:
    await kms.create_keys_many(["busy", "quiet"])
    busy = await newest_version_id(kms, "busy", "database")
    quiet = await newest_version_id(kms, "quiet", "database")
    await db.execute(
        "insert into kms_key_version_usage (key_version_id, encryptions) values ($1, 1000)", busy
    )
    await db.execute(
        "insert into kms_key_version_usage (key_version_id, encryptions) values ($1, 1000)", quiet
    )
    # More than max_encryptions: 1000 is not more than 1000.
    assert await kms.rotate_due(RotationPolicy(max_encryptions=1000)) == []
    assert await kms.rotate_due(RotationPolicy(max_encryptions=999), scope_ids=["busy"]) == ["busy"]
    versions = await data_versions(db)
    assert versions[("busy", "database")] == [1, 2]
    assert versions[("quiet", "database")] == [1]
    assert await kms.rotate_due(RotationPolicy(max_encryptions=999), limit=5) == ["quiet"]


async def test_limit_caps_the_scopes_rotated(db: TestDB, kms: KMS) -> None:
    scopes = [f"s{i}" for i in range(5)]
    await kms.create_keys_many(scopes)
    for scope in scopes:
        await age(db, scope, 10)
    policy = RotationPolicy(max_age=DAY)
    assert await kms.rotate_due(policy, limit=2) == ["s0", "s1"]
    assert await kms.rotate_due(policy) == ["s2", "s3", "s4"]


async def test_concurrent_runs_rotate_each_due_scope_once(
    db: TestDB, kms: KMS, open_kms: OpenKMS
) -> None:
    scopes = [f"t{i:02}" for i in range(12)]
    await kms.create_keys_many(scopes)
    due = scopes[::2]
    for scope in due:
        await age(db, scope, 30)
    counted = await newest_version_id(kms, scopes[1], "oidc")
    await db.execute(
        "insert into kms_key_version_usage (key_version_id, encryptions) values ($1, 50)", counted
    )
    due.append(scopes[1])
    events: list[KeyEvent] = []
    instances = [await open_kms(on_event=events.append) for _ in range(4)]
    try:
        policy = RotationPolicy(max_age=7 * DAY, max_encryptions=10)
        results = await asyncio.gather(*(k.rotate_due(policy) for k in instances))
    finally:
        for other in instances:
            await other.aclose()
    rotated = [scope for result in results for scope in result]
    assert sorted(rotated) == sorted(due)  # each exactly once, across the instances
    # One event per scope rotated, marked as the policy's.
    rotations = [e for e in events if e.kind == "rotated"]
    assert sorted(e.scope_id or "" for e in rotations) == sorted(due)
    assert {e.detail for e in rotations} == {"policy"}
    versions = await data_versions(db)
    roots = await root_versions(db)
    for scope in scopes:
        expected = [1, 2] if scope in due else [1]
        assert versions[(scope, "database")] == expected, scope
        assert versions[(scope, "oidc")] == expected, scope
        assert roots[scope] == expected, scope


async def test_auto_rotation_past_the_threshold(
    db: TestDB, open_kms: OpenKMS, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[KeyEvent] = []
    kms = await open_kms(usage_flush_interval=0.05, on_event=events.append)
    try:
        await kms.create_keys_many(["worn", "fresh"])
        worn = await newest_version_id(kms, "worn", "database")
        await db.execute(
            "insert into kms_key_version_usage (key_version_id, encryptions) values ($1, $2)",
            worn,
            2**31,
        )
        caplog.set_level(logging.WARNING, logger="kms_async")
        await kms.encrypt("worn", "database", b"one more")  # the count passes 2^31
        await kms.encrypt("fresh", "database", b"x")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await data_versions(db))[("worn", "database")] != [1, 2]:
            assert loop.time() < deadline, "the worn scope was never rotated"
            await asyncio.sleep(0.02)
        assert (await data_versions(db))[("fresh", "database")] == [1]
        lines = [r for r in caplog.records if "automatically" in r.getMessage()]
        assert lines and lines[0].levelno == logging.WARNING
        assert "worn" in lines[0].getMessage()
        rotations = [e for e in events if e.kind == "rotated"]
        assert [(e.scope_id, e.detail) for e in rotations] == [("worn", "automatic")]
        assert rotations[0].version_id is not None
        assert rotations[0].version_id.startswith("krkv_")
    finally:
        await kms.aclose()


async def test_rotate_due_needs_a_root_wrapper(db: TestDB, kms: KMS, open_kms: OpenKMS) -> None:
    await kms.create_keys("org")
    bare = await open_kms(root_wrapper=None)
    try:
        with pytest.raises(KeyNotFoundError):
            await bare.rotate_due(RotationPolicy(max_age=1.0))
    finally:
        await bare.aclose()


def test_a_policy_is_checked() -> None:
    assert RotationPolicy(max_age=60).max_age == datetime.timedelta(minutes=1)
    assert RotationPolicy(max_age=DAY).max_age_seconds == 86400.0
    for bad in (
        {},
        {"max_age": 0},
        {"max_age": -DAY},
        {"max_age": "90d"},
        {"max_age": float("inf")},
        {"max_encryptions": -1},
        {"max_encryptions": 1.5},
        {"max_encryptions": True},
    ):
        with pytest.raises(InvalidParameterError):
            RotationPolicy(**bad)  # type: ignore[arg-type]


@input_validation
async def test_rotate_due_checks_its_arguments(kms: KMS) -> None:
    with pytest.raises(InvalidParameterError, match="RotationPolicy"):
        await kms.rotate_due({"max_age": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="limit"):
        await kms.rotate_due(RotationPolicy(max_age=1), limit=0)
    with pytest.raises(InvalidParameterError):
        await kms.rotate_due(RotationPolicy(max_age=1), scope_ids="one-string")
