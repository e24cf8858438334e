"""Metrics through OpenTelemetry, read back with the SDK's in-memory reader, on both databases."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from kms_async import KMS, ROOT_PURPOSE, BlobInfo, InvalidParameterError, KeySuspendedError

OpenKMS = Callable[..., Awaitable[KMS]]
Points = dict[str, dict[tuple[tuple[str, Any], ...], float]]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> MeterProvider:
    return MeterProvider(metric_readers=[reader])


def collect(reader: InMemoryMetricReader) -> Points:
    """name -> {sorted attributes: value (sums and gauges) or count (histograms)}."""
    points: Points = {}
    data = reader.get_metrics_data()
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name != "kms_async":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = tuple(sorted((point.attributes or {}).items()))
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # a histogram
                    points.setdefault(metric.name, {})[attributes] = value
    return points


def value(points: Points, name: str, dialect: str, **labels: str) -> float:
    wanted = tuple(sorted({"kms_async.dialect": dialect, **labels}.items()))
    return points.get(name, {}).get(wanted, 0)


async def versions(kms: KMS, scope: str, purpose: str) -> list[str]:
    for key in await kms.list_keys(scope, verify=False):
        if key.purpose == purpose:
            return [v.id for v in key.versions]
    raise AssertionError(purpose)


async def test_encryptions_decryptions_and_cache_hits_are_counted(
    open_kms: OpenKMS, db: Any, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with await open_kms(meter_provider=provider) as kms:
        await kms.create_keys("s1")  # primes the cache: no load
        cts = [await kms.encrypt("s1", "database", b"v%d" % i) for i in range(5)]
        for ct in cts[:3]:
            await kms.decrypt("s1", "database", ct)
        many = await kms.encrypt_many("s1", "oidc", [b"a", b"b"])
        assert await kms.decrypt_many("s1", "oidc", many) == [b"a", b"b"]
        points = collect(reader)
        d = db.dialect
        assert value(points, "kms_async.encryptions", d) == 7
        assert value(points, "kms_async.decryptions", d) == 5
        # 5 + 3 single calls and 2 batch lookups, all served from the cache.
        assert value(points, "kms_async.cache.hits", d) == 10
        assert value(points, "kms_async.cache.loads", d) == 0
        assert value(points, "kms_async.cache.size", d) == 2
        # Counters are cumulative: more calls add to them.
        await kms.encrypt("s1", "database", b"more")
        assert value(collect(reader), "kms_async.encryptions", d) == 8


async def test_a_cold_load_is_counted_and_timed(
    open_kms: OpenKMS, db: Any, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with await open_kms() as writer:
        await writer.create_keys_many(["s1", "s2"])
    async with await open_kms(meter_provider=provider, cache_size=1) as kms:
        await kms.encrypt("s1", "database", b"x")
        points = collect(reader)
        d = db.dialect
        assert value(points, "kms_async.cache.loads", d) == 1
        assert value(points, "kms_async.load.duration", d) == 1  # one histogram point
        assert value(points, "kms_async.cache.hits", d) == 0
        assert value(points, "kms_async.cache.size", d) == 1
        await kms.encrypt("s2", "database", b"y")  # cache_size=1: s1 goes
        points = collect(reader)
        assert value(points, "kms_async.cache.loads", d) == 2
        assert value(points, "kms_async.cache.evictions", d) == 1
        assert value(points, "kms_async.cache.size", d) == 1
        await kms.refresh()
        assert value(collect(reader), "kms_async.refresh.duration", d) == 1


async def test_refusals_are_counted_by_reason(
    open_kms: OpenKMS, db: Any, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with await open_kms(meter_provider=provider) as kms:
        await kms.create_keys("s1")
        old_ct = await kms.encrypt("s1", "database", b"old")
        await kms.rotate_keys("s1")
        await kms.suspend_key_version(BlobInfo.from_bytes(old_ct).key_id)
        for _ in range(2):
            with pytest.raises(KeySuspendedError):
                await kms.decrypt("s1", "database", old_ct)
        with pytest.raises(KeySuspendedError):
            await kms.decrypt_many("s1", "database", [old_ct])
        new_ct = await kms.encrypt("s1", "database", b"new", aad=b"a")
        with pytest.raises(Exception, match="decryption failed"):
            await kms.decrypt("s1", "database", new_ct, aad=b"b")
        points = collect(reader)
        d = db.dialect
        name = "kms_async.decryption.refusals"
        assert value(points, name, d, reason="suspended") == 3
        assert value(points, name, d, reason="authentication") == 1
        assert value(points, name, d, reason="unknown_version") == 0
        # Every reason is reported, zero or not, so dashboards see the series.
        assert len(points[name]) == 7


async def test_key_changes_are_counted_by_kind(
    open_kms: OpenKMS, db: Any, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with await open_kms(meter_provider=provider) as kms:
        await kms.create_keys_many(["s1", "s2", "s3"])
        await kms.rotate_keys_many(["s1", "s2"])
        await kms.rewrap_keys("s1")
        await kms.revoke_key_version((await versions(kms, "s1", "database"))[0])
        await kms.revoke_key_version((await versions(kms, "s1", ROOT_PURPOSE))[0])
        await kms.reconcile_keys(["s4"], ["oidc"])
        points = collect(reader)
        d = db.dialect
        name = "kms_async.key.changes"
        assert value(points, name, d, kind="root_wrapper_added") == 1
        assert value(points, name, d, kind="created") == 4  # three scopes, one pair
        assert value(points, name, d, kind="rotated") == 2
        assert value(points, name, d, kind="rewrapped") == 1
        assert value(points, name, d, kind="revoked") == 2
        assert value(points, name, d, kind="suspended") == 0


async def test_staleness_gauge_follows_the_freshness_checks(
    open_kms: OpenKMS, db: Any, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with await open_kms(meter_provider=provider, max_staleness=60) as kms:
        before = value(collect(reader), "kms_async.cache.staleness", db.dialect)
        assert 0 <= before < 60
        await kms.refresh()
        after = value(collect(reader), "kms_async.cache.staleness", db.dialect)
        assert 0 <= after < 60
    async with await open_kms(meter_provider=provider, max_staleness=None):
        # No checks at all: nothing to report rather than a growing number.
        assert "kms_async.cache.staleness" not in collect(reader)


async def test_a_closed_kms_reports_nothing(
    open_kms: OpenKMS, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    kms = await open_kms(meter_provider=provider)
    await kms.create_keys("s1")
    assert collect(reader)["kms_async.cache.size"]
    await kms.aclose()
    assert "kms_async.cache.size" not in collect(reader)


async def test_metrics_true_uses_the_global_provider(
    open_kms: OpenKMS,
    db: Any,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import opentelemetry.metrics

    monkeypatch.setattr(opentelemetry.metrics, "get_meter_provider", lambda: provider)
    async with await open_kms(metrics=True) as kms:
        await kms.create_keys("s1")
        await kms.encrypt("s1", "database", b"x")
        assert value(collect(reader), "kms_async.encryptions", db.dialect) == 1


async def test_metrics_are_off_by_default(
    open_kms: OpenKMS, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async with await open_kms() as kms:
        await kms.create_keys("s1")
        await kms.encrypt("s1", "database", b"x")
    assert collect(reader) == {}


async def test_meter_provider_must_be_a_meter_provider(open_kms: OpenKMS) -> None:
    with pytest.raises(InvalidParameterError, match="MeterProvider"):
        await open_kms(meter_provider=object())
    with pytest.raises(InvalidParameterError, match="metrics"):
        await open_kms(metrics="yes")


def test_importing_and_using_kms_async_does_not_import_opentelemetry(tmp_path: Any) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, secrets, sys
        import kms_async

        async def main():
            dsn = "sqlite:///{tmp_path}/k.db"
            await kms_async.migrate(dsn)
            root = kms_async.AeadWrapper(secrets.token_bytes(32), key_id="r")
            async with await kms_async.KMS.open(
                dsn, purposes=["database"], root_wrapper=root, on_event=print
            ) as kms:
                await kms.create_keys("s1")
                await kms.encrypt("s1", "database", b"x")

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print("LOADED", loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "LOADED []" in out


# -- the hot path ---------------------------------------------------------------------------


def _body(function: Any, drop: str | None) -> list[str]:
    """The statements of a method, without its docstring and without ``drop``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = tree.body[0]
    assert isinstance(node, ast.AsyncFunctionDef)
    statements = node.body[1:]  # the docstring
    return [ast.dump(s) for s in statements if drop is None or ast.unparse(s) != drop]


@pytest.mark.parametrize(
    ("plain", "counted", "counter"),
    [
        (KMS.encrypt, KMS._counted_encrypt, "self._encryptions += 1"),
        (KMS.decrypt, KMS._counted_decrypt, "self._decryptions += 1"),
    ],
)
def test_the_counted_hot_path_is_the_hot_path_plus_one_counter(
    plain: Any, counted: Any, counter: str
) -> None:
    # Metrics off runs the plain methods, which count nothing; metrics on runs
    # the copies, which must not drift from them.
    assert counter not in inspect.getsource(plain)
    assert len(_body(counted, None)) == len(_body(counted, counter)) + 1
    assert _body(counted, counter) == _body(plain, None)
    assert inspect.signature(counted) == inspect.signature(plain)


async def test_only_a_kms_with_metrics_counts(open_kms: OpenKMS, provider: MeterProvider) -> None:
    async with await open_kms() as off, await open_kms(meter_provider=provider) as on:
        assert type(off) is KMS and type(off).encrypt is KMS.encrypt
        assert isinstance(on, KMS) and type(on).encrypt is KMS._counted_encrypt
        assert type(on).decrypt is KMS._counted_decrypt
        await off.create_keys("s1")
        await off.decrypt("s1", "database", await off.encrypt("s1", "database", b"x"))
        await on.decrypt("s1", "database", await on.encrypt("s1", "database", b"x"))
        assert (off._encryptions, off._decryptions) == (0, 0)
        assert (on._encryptions, on._decryptions) == (1, 1)
