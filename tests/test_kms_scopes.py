"""Reading scopes and the database clock: list_scopes, iter_scopes, get_scopes, database_time."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

import pytest
from conftest import TestDB

import kms_async
from kms_async import KMS, InvalidParameterError, Scope

SCOPES = ["acme", "globex", "initech", "umbrella", "wayne", "stark", "tyrell", "ünïcode"]


async def db_order(db: TestDB) -> list[str]:
    """The scope ids in the database's own order (its collation)."""
    return [r[0] for r in await db.fetch("select scope_id from kms_root_key order by scope_id")]


async def test_no_scopes(kms: KMS) -> None:
    assert await kms.list_scopes() == []
    assert [s async for s in kms.iter_scopes()] == []
    assert await kms.get_scopes(["acme"]) == []


async def test_list_scopes_pages_in_scope_id_order(kms: KMS, db: TestDB) -> None:
    await kms.create_keys_many(SCOPES)
    expected = await db_order(db)
    assert sorted(expected) == sorted(SCOPES)

    pages: list[list[Scope]] = []
    after = None
    while True:
        page = await kms.list_scopes(after=after, limit=3)
        pages.append(page)
        if len(page) < 3:
            break
        after = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [s.id for p in pages for s in p] == expected
    assert [s.id for s in await kms.list_scopes()] == expected
    # A page may start after any id, also one that is not a scope.
    after_b = await db.fetch(
        "select scope_id from kms_root_key where scope_id > $1 order by scope_id", "b"
    )
    assert [s.id for s in await kms.list_scopes(after="b", limit=2)] == [r[0] for r in after_b][:2]


async def test_a_scope_tells_its_root_key_and_newest_root_version(kms: KMS) -> None:
    await kms.create_keys_many(["acme", "globex"])
    await kms.rotate_keys("acme")
    await kms.rotate_keys("acme")
    keys = await kms.list_keys("acme")
    (acme,) = await kms.get_scopes(["acme"])
    assert acme.id == "acme"
    assert acme.root_key_id == keys[0].id
    assert acme.create_time == keys[0].create_time
    # list_keys also says whether the version is bound; a Scope does not.
    assert acme.newest_root_version == dataclasses.replace(keys[0].versions[-1], bound=None)
    assert acme.newest_root_version.version == 3
    (globex,) = await kms.get_scopes(["globex"])
    assert globex.newest_root_version.version == 1
    assert globex.newest_root_version.create_time.tzinfo is not None
    listed = {s.id: s for s in await kms.list_scopes()}
    assert listed == {"acme": acme, "globex": globex}


@pytest.mark.parametrize("batch_size", [1, 4, 5, 1000])
async def test_iter_scopes_reads_every_page(kms: KMS, db: TestDB, batch_size: int) -> None:
    scopes = [f"s{n:03d}" for n in range(20)]
    await kms.create_keys_many(scopes)
    assert [s.id async for s in kms.iter_scopes(batch_size=batch_size)] == await db_order(db)


async def test_iter_scopes_reads_one_page_at_a_time(
    kms: KMS, monkeypatch: pytest.MonkeyPatch
) -> None:
    await kms.create_keys_many([f"s{n:02d}" for n in range(10)])
    calls: list[tuple[str | None, int]] = []
    list_scopes = KMS.list_scopes

    async def spy(self: KMS, *, after: str | None = None, limit: int = 1000) -> list[Scope]:
        calls.append((after, limit))
        return await list_scopes(self, after=after, limit=limit)

    monkeypatch.setattr(KMS, "list_scopes", spy)
    seen = []
    async for scope in kms.iter_scopes(batch_size=4):
        seen.append(scope.id)
        assert len(calls) == (len(seen) + 3) // 4  # the next page is read only when needed
    assert len(seen) == 10
    assert [limit for _after, limit in calls] == [4, 4, 4]
    assert [after for after, _limit in calls] == [None, seen[3], seen[7]]


async def test_iter_scopes_sees_scopes_created_ahead_of_it(kms: KMS) -> None:
    await kms.create_keys_many(["a1", "a2", "a3"])
    seen = []
    async for scope in kms.iter_scopes(batch_size=2):
        seen.append(scope.id)
        if scope.id == "a1":
            await kms.create_keys("z9")
    assert seen == ["a1", "a2", "a3", "z9"]


async def test_get_scopes_keeps_the_order_given_and_leaves_out_scopes_without_keys(
    kms: KMS,
) -> None:
    await kms.create_keys_many(["acme", "globex", "initech"])
    found = await kms.get_scopes(["initech", "nope", "acme", "initech"])
    assert [s.id for s in found] == ["initech", "acme"]
    assert await kms.get_scopes([]) == []
    assert await kms.get_scopes(iter(["globex"])) == await kms.get_scopes(("globex",))


async def test_get_scopes_reads_any_number_in_batches(kms: KMS) -> None:
    scopes = [f"s{n:04d}" for n in range(2500)]
    for start in range(0, len(scopes), 1000):
        await kms.create_keys_many(scopes[start : start + 1000])
    wanted = [*reversed(scopes), "missing"]
    assert [s.id for s in await kms.get_scopes(wanted)] == list(reversed(scopes))


async def test_database_time_is_the_clock_of_create_time(kms: KMS) -> None:
    await kms.create_keys("acme")
    now = await kms.database_time()
    assert now.tzinfo is not None
    assert now.utcoffset() == datetime.timedelta(0)
    (acme,) = await kms.get_scopes(["acme"])
    assert acme.create_time <= now
    assert acme.newest_root_version.create_time <= now


async def test_scopes_of_another_table_prefix(db: TestDB, open_kms: Callable[..., Any]) -> None:
    await kms_async.migrate(db.dsn, table_prefix="other")
    kms = await open_kms(table_prefix="other")
    async with kms:
        await kms.create_keys("elsewhere")
        assert [s.id for s in await kms.list_scopes()] == ["elsewhere"]
    plain = await open_kms()
    async with plain:
        assert await plain.list_scopes() == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda kms: kms.list_scopes(limit=0), "limit must be a whole number from 1 to 10000"),
        (lambda kms: kms.list_scopes(limit=10_001), "limit must be a whole number"),
        (lambda kms: kms.list_scopes(limit=True), "limit must be a whole number"),
        (lambda kms: kms.list_scopes(limit="10"), "limit must be a whole number"),
        (lambda kms: kms.list_scopes(after=""), "missing scope id"),
        (lambda kms: kms.list_scopes(after=3), "scope id must be a str"),
        (lambda kms: kms.list_scopes(after="a\x00"), "NUL"),
        (lambda kms: kms.list_scopes(after="x" * 2000), "the limit is 1024"),
        (lambda kms: kms.get_scopes("acme"), "not one string"),
        (lambda kms: kms.get_scopes(["acme", ""]), "missing scope id"),
        (lambda kms: kms.get_scopes([None]), "scope id must be a str"),
    ],
)
async def test_bad_arguments(kms: KMS, call: Callable[[KMS], Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        await call(kms)


@pytest.mark.parametrize("batch_size", [0, -1, 10_001, 2.5, None])
async def test_iter_scopes_rejects_a_bad_batch_size_when_called(kms: KMS, batch_size: Any) -> None:
    with pytest.raises(InvalidParameterError, match="batch_size must be a whole number"):
        kms.iter_scopes(batch_size=batch_size)


async def test_every_call_raises_after_aclose(kms: KMS) -> None:
    await kms.aclose()
    with pytest.raises(kms_async.ClosedError):
        await kms.list_scopes()
    with pytest.raises(kms_async.ClosedError):
        kms.iter_scopes()
    with pytest.raises(kms_async.ClosedError):
        await kms.get_scopes(["acme"])
    with pytest.raises(kms_async.ClosedError):
        await kms.database_time()
