"""Audit events (KMS.open(on_event=...)): one per committed change, one per refused decryption."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import sqlite_args, sqlite_sql
from test_no_key_leaks import Secrets, harvest, harvest_cache

import kms_async
from kms_async import (
    KMS,
    ROOT_PURPOSE,
    AeadWrapper,
    BlobInfo,
    DecryptionError,
    DecryptionRefused,
    EncryptedColumn,
    InvalidParameterError,
    KeyEvent,
    KeyExistsError,
    KeyInUseError,
    KeyNotFoundError,
    KeySuspendedError,
    PooledWrapper,
    UnknownKeyVersionError,
)

OpenKMS = Callable[..., Awaitable[KMS]]


class Recorder:
    """A sync on_event callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[KeyEvent] = []

    def __call__(self, event: KeyEvent) -> None:
        self.events.append(event)

    def take(self) -> list[KeyEvent]:
        taken, self.events = self.events, []
        return taken


async def versions(kms: KMS, scope: str, purpose: str) -> list[str]:
    """Version ids of the pair, oldest first."""
    for key in await kms.list_keys(scope, verify=False):
        if key.purpose == purpose:
            return [v.id for v in key.versions]
    raise AssertionError(purpose)


def check_common(event: KeyEvent, kind: str, scope: str | None) -> None:
    assert type(event) is KeyEvent
    assert event.kind == kind
    assert event.scope_id == scope
    assert event.time.tzinfo is not None
    assert abs(datetime.datetime.now(datetime.timezone.utc) - event.time).total_seconds() < 600
    assert event.actor.name == "events-test"
    assert event.actor.pid == os.getpid()
    assert event.actor.host
    assert event.in_transaction is False


async def test_each_change_produces_exactly_one_event_with_its_fields(
    open_kms: OpenKMS, db: Any, root_wrapper: AeadWrapper
) -> None:
    rec = Recorder()
    kms = await open_kms(on_event=rec, actor="events-test")
    async with kms:
        (added,) = rec.take()
        check_common(added, "root_wrapper_added", None)
        assert added.purpose == ROOT_PURPOSE and added.detail == "key id root-1"

        await kms.create_keys("s1")
        (created,) = rec.take()
        check_common(created, "created", "s1")
        assert created.purpose is None
        assert [created.version_id] == await versions(kms, "s1", ROOT_PURPOSE)

        await kms.rotate_keys("s1")
        (rotated,) = rec.take()
        check_common(rotated, "rotated", "s1")
        assert rotated.version_id == (await versions(kms, "s1", ROOT_PURPOSE))[-1]
        assert rotated.purpose is None and rotated.detail is None

        await kms.rewrap_keys("s1")
        (rewrapped,) = rec.take()
        check_common(rewrapped, "rewrapped", "s1")
        assert (rewrapped.purpose, rewrapped.version_id) == (None, None)

        old = (await versions(kms, "s1", "database"))[0]
        await kms.suspend_key_version(old)
        (suspended,) = rec.take()
        check_common(suspended, "suspended", "s1")
        assert (suspended.purpose, suspended.version_id) == ("database", old)
        await kms.suspend_key_version(old)  # already suspended: nothing changes
        assert rec.take() == []
        await kms.resume_key_version(old)
        (resumed,) = rec.take()
        check_common(resumed, "resumed", "s1")
        assert (resumed.purpose, resumed.version_id) == ("database", old)

        await kms.revoke_key_version(old)
        (revoked,) = rec.take()
        check_common(revoked, "revoked", "s1")
        assert (revoked.purpose, revoked.version_id) == ("database", old)

        old_root = (await versions(kms, "s1", ROOT_PURPOSE))[0]
        await kms.revoke_key_version(old_root)
        (revoked_root,) = rec.take()
        assert (revoked_root.kind, revoked_root.purpose) == ("revoked", ROOT_PURPOSE)
        assert revoked_root.version_id == old_root

        created_pairs = await kms.reconcile_keys(["s2"])
        events = rec.take()
        assert [(e.kind, e.scope_id, e.purpose) for e in events] == [
            ("created", "s2", "database"),
            ("created", "s2", "oidc"),
        ]
        assert created_pairs == [("s2", "database"), ("s2", "oidc")]
        for e in events:
            assert e.purpose is not None
            assert [e.version_id] == await versions(kms, "s2", e.purpose)
        assert await kms.reconcile_keys(["s2"]) == []
        assert rec.take() == []

        await db.add_app_table()
        await kms.rotate_keys("s1")
        rec.take()
        doomed = (await versions(kms, "s1", "oidc"))[0]
        column = EncryptedColumn("app_secret", "ciphertext", "key_version_id", "scope_id", "oidc")
        await kms.destroy_key_version(doomed, [column])
        (destroyed,) = rec.take()
        check_common(destroyed, "destroyed", "s1")
        assert (destroyed.purpose, destroyed.version_id) == ("oidc", doomed)

        new_root = AeadWrapper(secrets.token_bytes(32), key_id="root-2")
        kms.add_external_wrapper(ROOT_PURPOSE, PooledWrapper(new_root, root_wrapper))
        (replaced,) = rec.take()
        check_common(replaced, "root_wrapper_replaced", None)
        assert replaced.detail == "key id root-2"
        assert await kms.bind_keys(["s1"]) == 0
        assert rec.take() == []


async def test_bulk_changes_give_one_event_per_scope(open_kms: OpenKMS) -> None:
    rec = Recorder()
    scopes = [f"bulk{i}" for i in range(7)]
    async with await open_kms(on_event=rec, actor="events-test") as kms:
        rec.take()
        await kms.create_keys_many(scopes)
        created = rec.take()
        assert [(e.kind, e.scope_id) for e in created] == [("created", s) for s in scopes]
        for e in created:
            assert [e.version_id] == await versions(kms, e.scope_id or "", ROOT_PURPOSE)
        await kms.rotate_keys_many(scopes, rewrap=True)
        rotated = rec.take()
        assert [(e.kind, e.scope_id) for e in rotated] == [("rotated", s) for s in scopes]
        for e in rotated:
            assert e.version_id == (await versions(kms, e.scope_id or "", ROOT_PURPOSE))[-1]
        await kms.rewrap_keys_many(scopes)
        assert [(e.kind, e.scope_id) for e in rec.take()] == [("rewrapped", s) for s in scopes]


async def test_refused_writes_emit_nothing(open_kms: OpenKMS) -> None:
    rec = Recorder()
    async with await open_kms(on_event=rec) as kms:
        await kms.create_keys("s1")
        rec.take()
        with pytest.raises(KeyExistsError):
            await kms.create_keys_many(["s2", "s1"])
        with pytest.raises(KeyInUseError):
            await kms.revoke_key_version((await versions(kms, "s1", "database"))[0])
        with pytest.raises(KeyNotFoundError):
            await kms.rotate_keys("nobody")
        assert rec.take() == []


async def test_a_change_in_the_callers_transaction_is_reported_as_in_transaction(
    open_kms: OpenKMS, db: Any
) -> None:
    # The library cannot see the caller's commit or rollback: the event goes
    # out when its part is written, marked in_transaction (documented).
    rec = Recorder()
    conn = await db.connect()
    try:
        async with await open_kms(on_event=rec) as kms:
            rec.take()
            if db.dialect == "postgres":
                tx = conn.transaction()
                await tx.start()
                await kms.create_keys("s1", conn=conn)
                await tx.rollback()
            else:
                await conn.execute("BEGIN")
                await kms.create_keys("s1", conn=conn)
                await conn.execute("ROLLBACK")
            (event,) = rec.take()
            assert (event.kind, event.scope_id, event.in_transaction) == ("created", "s1", True)
            assert await kms.get_scopes(["s1"]) == []
    finally:
        await conn.close()


# -- refused decryptions ------------------------------------------------------------------


def refusals(rec: Recorder) -> list[tuple[str | None, str | None, str | None, str]]:
    out = []
    for e in rec.take():
        assert isinstance(e, DecryptionRefused) and e.kind == "decryption_refused"
        assert e.in_transaction is False
        out.append((e.scope_id, e.purpose, e.version_id, e.reason))
    return out


async def test_each_refused_decryption_produces_exactly_one_event(open_kms: OpenKMS) -> None:
    rec = Recorder()
    async with await open_kms(on_event=rec) as kms:
        await kms.create_keys_many(["s1", "s2"])
        old_ct = await kms.encrypt("s1", "database", b"old", aad=b"a")
        old = BlobInfo.from_bytes(old_ct).key_id
        await kms.rotate_keys("s1")
        await kms.suspend_key_version(old)
        rec.take()

        with pytest.raises(KeySuspendedError):
            await kms.decrypt("s1", "database", old_ct, aad=b"a")
        assert refusals(rec) == [("s1", "database", old, "suspended")]
        with pytest.raises(KeySuspendedError):
            await kms.decrypt_many("s1", "database", [old_ct, old_ct], aad=[b"a", b"a"])
        assert refusals(rec) == [("s1", "database", old, "suspended")]
        await kms.resume_key_version(old)
        rec.take()

        new_ct = await kms.encrypt("s1", "database", b"new", aad=b"a")
        new = BlobInfo.from_bytes(new_ct).key_id
        with pytest.raises(DecryptionError):
            await kms.decrypt("s1", "database", new_ct, aad=b"wrong")
        assert refusals(rec) == [("s1", "database", new, "authentication")]
        with pytest.raises(DecryptionError):
            await kms.decrypt("s1", "database", old_ct, aad=b"wrong")  # an older version
        assert refusals(rec) == [("s1", "database", old, "authentication")]

        other = await kms.encrypt("s2", "database", b"elsewhere")
        with pytest.raises(UnknownKeyVersionError):
            await kms.decrypt("s1", "database", other)
        assert refusals(rec) == [
            ("s1", "database", BlobInfo.from_bytes(other).key_id, "unknown_version")
        ]
        with pytest.raises(DecryptionError):
            await kms.decrypt("s1", "database", b"\x0a\x05garbage")
        assert refusals(rec) == [("s1", "database", None, "malformed")]
        with pytest.raises(KeyNotFoundError):
            await kms.decrypt("nobody", "database", new_ct)
        assert refusals(rec) == [("nobody", "database", new, "no_keys")]

        # Not refusals: a bad argument is the caller's mistake, not a decision.
        with pytest.raises(InvalidParameterError):
            await kms.decrypt("s1", "nope", new_ct)
        assert await kms.decrypt("s1", "database", new_ct, aad=b"a") == b"new"
        assert rec.take() == []


# -- callbacks that fail or take their time -----------------------------------------------


async def test_a_raising_sync_callback_is_logged_and_the_operation_succeeds(
    open_kms: OpenKMS, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def explode(event: KeyEvent) -> None:
        calls.append(event.kind)
        raise RuntimeError("audit sink is down")

    caplog.set_level(logging.WARNING, logger="kms_async")
    async with await open_kms(on_event=explode) as kms:
        await kms.create_keys("s1")
        assert await kms.decrypt("s1", "database", await kms.encrypt("s1", "database", b"x"))
    assert calls == ["root_wrapper_added", "created"]
    failures = [r for r in caplog.records if "on_event callback raised" in r.getMessage()]
    assert len(failures) == 2
    assert "RuntimeError" in failures[1].getMessage() and "'created'" in failures[1].getMessage()


async def test_a_raising_async_callback_is_logged_and_the_operation_succeeds(
    open_kms: OpenKMS, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    failed = asyncio.Event()

    async def explode(event: KeyEvent) -> None:
        seen.append(event.kind)
        if event.kind == "created":
            failed.set()
            raise RuntimeError("audit sink is down")

    caplog.set_level(logging.WARNING, logger="kms_async")
    async with await open_kms(on_event=explode) as kms:
        await kms.create_keys("s1")
        await failed.wait()
        await kms.rotate_keys("s1")  # the task goes on after a failure
    assert seen == ["root_wrapper_added", "created", "rotated"]
    failures = [r for r in caplog.records if "on_event callback raised" in r.getMessage()]
    assert len(failures) == 1 and "'created'" in failures[0].getMessage()


async def test_an_async_callback_never_holds_up_the_operation(open_kms: OpenKMS) -> None:
    gate = asyncio.Event()
    delivered: list[tuple[str, str | None]] = []

    async def slow(event: KeyEvent) -> None:
        await gate.wait()
        delivered.append((event.kind, event.scope_id))

    kms = await open_kms(on_event=slow)
    try:
        await kms.create_keys_many(["s1", "s2"])  # returns with the callback parked
        await kms.rotate_keys("s1")
        assert delivered == []
        gate.set()
    finally:
        await kms.aclose()  # waits (boundedly) for what is pending
    assert delivered == [
        ("root_wrapper_added", None),
        ("created", "s1"),
        ("created", "s2"),
        ("rotated", "s1"),
    ]


async def test_aclose_gives_up_on_a_callback_that_never_returns(
    open_kms: OpenKMS, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kms_async._events.DRAIN_SECONDS", 0.05)
    cancelled = asyncio.Event()

    async def stuck(event: KeyEvent) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    kms = await open_kms(on_event=stuck)
    await kms.create_keys("s1")
    with caplog.at_level(logging.WARNING, logger="kms_async"):
        await kms.aclose()
    assert cancelled.is_set()
    assert any("did not take every event" in r.getMessage() for r in caplog.records)


async def test_on_event_and_actor_are_checked(open_kms: OpenKMS) -> None:
    with pytest.raises(InvalidParameterError, match="on_event"):
        await open_kms(on_event="print")
    with pytest.raises(InvalidParameterError, match="actor"):
        await open_kms(actor="")
    with pytest.raises(InvalidParameterError, match="actor"):
        await open_kms(actor=42)


# -- the events themselves ------------------------------------------------------------------


def test_events_are_frozen_slotted_dataclasses() -> None:
    actor = kms_async.Actor(name=None, user="u", host="h", pid=1)
    event = DecryptionRefused(
        kind="decryption_refused",
        time=datetime.datetime.now(datetime.timezone.utc),
        scope_id="s1",
        purpose="database",
        version_id=None,
        actor=actor,
        reason="suspended",
    )
    for value in (actor, event):
        assert dataclasses.is_dataclass(value)
        assert not hasattr(value, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.reason = "unusable"  # type: ignore[misc]
    assert isinstance(event, KeyEvent)
    data = event.as_dict()
    assert data["reason"] == "suspended" and data["actor"]["pid"] == 1
    assert json.loads(json.dumps(data)) == data


async def test_no_key_material_in_events(open_kms: OpenKMS, db: Any) -> None:
    rec = Recorder()
    async with await open_kms(on_event=rec, actor="events-test") as kms:
        scopes = ["s1", "s2"]
        await kms.create_keys_many(scopes)
        await kms.rotate_keys_many(scopes, rewrap=True)
        await kms.reconcile_keys(["s3"])
        ct = await kms.encrypt("s1", "database", b"payload", aad=b"a")
        old = (await versions(kms, "s1", "oidc"))[0]
        await kms.suspend_key_version(old)
        with pytest.raises(DecryptionError):
            await kms.decrypt("s1", "database", ct, aad=b"b")
        await kms.resume_key_version(old)
        await kms.revoke_key_version(old)
        keys = Secrets()
        await harvest(kms, [*scopes, "s3"], keys, _Seen())
        harvest_cache(kms, keys, _Seen())
        assert len(keys) >= 10
        events = rec.take()
        assert {e.kind for e in events} >= {
            "created",
            "rotated",
            "suspended",
            "resumed",
            "revoked",
            "decryption_refused",
        }
        texts = []
        for n, e in enumerate(events):
            texts += [(f"repr #{n}", repr(e)), (f"str #{n}", str(e))]
            texts.append((f"json #{n}", json.dumps(e.as_dict())))
        assert keys.findings(texts) == []
        # And nothing of them in the rows the events talk about either.
        conn = await db.connect()
        try:
            sql = "select count(*) from kms_data_key_version where private_id = $1"
            for e in events:
                if e.version_id and e.version_id.startswith("kdkv_") and e.kind == "created":
                    if db.dialect == "postgres":
                        assert await conn.fetchval(sql, e.version_id) == 1
                    else:
                        cur = await conn.execute(sqlite_sql(sql), sqlite_args((e.version_id,)))
                        assert (await cur.fetchone())[0] == 1
        finally:
            await conn.close()


class _Seen:
    def add(self, where: str, obj: object) -> None:
        pass


async def test_a_callback_that_falls_behind_loses_events_not_memory(
    open_kms: OpenKMS, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kms_async._events.MAX_QUEUED", 3)
    gate = asyncio.Event()
    delivered: list[str] = []

    async def slow(event: KeyEvent) -> None:
        await gate.wait()
        delivered.append(event.kind)

    caplog.set_level(logging.WARNING, logger="kms_async")
    kms = await open_kms(on_event=slow)
    try:
        await kms.create_keys("s1")
        for _ in range(6):
            with pytest.raises(DecryptionError):
                await kms.decrypt("s1", "database", b"\x0a\x05garbage")
        gate.set()
    finally:
        await kms.aclose()
    # The consumer took the first delivery at once; three more waited; the rest were dropped.
    assert len(delivered) == 4
    assert kms._events.dropped == 4
    assert kms._events.refusals["malformed"] == 6  # counted for the metrics all the same
    assert sum("deliveries behind" in r.getMessage() for r in caplog.records) == 1


async def test_a_decryption_under_a_root_key_this_instance_lacks_is_refused_as_unusable(
    open_kms: OpenKMS,
) -> None:
    async with await open_kms() as kms:
        await kms.create_keys("s1")
        ciphertext = await kms.encrypt("s1", "database", b"x")
    rec = Recorder()
    wrong = AeadWrapper(secrets.token_bytes(32), key_id="root-1")
    async with await open_kms(root_wrapper=wrong, on_event=rec) as other:
        rec.take()
        with pytest.raises(kms_async.WrapperError):
            await other.decrypt("s1", "database", ciphertext)
        named = BlobInfo.from_bytes(ciphertext).key_id
        assert refusals(rec) == [("s1", "database", named, "unusable")]
