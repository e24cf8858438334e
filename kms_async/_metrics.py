"""Metrics through OpenTelemetry, read from plain counters at collection time.

Every count is a Python int the library keeps anyway (encryptions and
decryptions on the KMS, loads and evictions here in :class:`Stats`, changes
and refusals in ``_events``). Nothing on the hot path calls OpenTelemetry:
observable instruments read the ints when the application's reader
collects, so metrics cost the hot path nothing beyond the increments.
Histograms (load and refresh durations) are recorded where those happen,
off the hot path. ``opentelemetry`` is imported only when metrics are
turned on (the ``otel`` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._errors import InvalidParameterError

__all__ = ["Readings", "Stats", "instrument"]

METER_NAME = "kms_async"


class Stats:
    """Counts kept by the layers below the facade (cache, keyring, freshness)."""

    __slots__ = ("batch_lookups", "evictions", "loads", "misses", "on_load", "on_refresh")

    def __init__(self) -> None:
        #: Pair loads from the database (cold loads and reloads), and cache misses.
        self.loads = 0
        self.misses = 0
        #: Cached pairs pushed out by the LRU bound.
        self.evictions = 0
        #: encrypt_many/decrypt_many calls served by one cache lookup.
        self.batch_lookups = 0
        #: Called with a load's / a freshness check's seconds, when metrics are on.
        self.on_load: Callable[[float], None] | None = None
        self.on_refresh: Callable[[float], None] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Readings:
    """What the instruments report, read at one collection."""

    encryptions: int
    decryptions: int
    cache_hits: int
    loads: int
    evictions: int
    cache_size: int
    staleness: float | None
    refusals: Mapping[str, int]
    changes: Mapping[str, int]


def check_provider(provider: object) -> None:
    get_meter = getattr(provider, "get_meter", None)
    if not callable(get_meter):
        raise InvalidParameterError(
            f"meter_provider must be an OpenTelemetry MeterProvider, not "
            f"{type(provider).__name__}; pip install 'kms-async[otel]' and pass "
            "opentelemetry.metrics.get_meter_provider() or your SDK's MeterProvider"
        )


def global_provider() -> Any:
    """The global MeterProvider (``metrics=True``)."""
    try:
        from opentelemetry import metrics
    except ImportError:
        raise InvalidParameterError(
            "metrics=True needs OpenTelemetry: pip install 'kms-async[otel]'"
        ) from None
    return metrics.get_meter_provider()


def instrument(
    provider: Any,
    read: Callable[[], Readings | None],
    attributes: Mapping[str, str],
    stats: Stats,
    version: str,
) -> None:
    """Create the instruments on ``provider``'s meter; ``read()`` returns None once closed."""
    try:
        from opentelemetry.metrics import CallbackOptions, Observation
    except ImportError:
        raise InvalidParameterError(
            "metrics need OpenTelemetry: pip install 'kms-async[otel]'"
        ) from None
    check_provider(provider)
    meter = provider.get_meter(METER_NAME, version)
    base = dict(attributes)

    def one(pick: Callable[[Readings], float | None]) -> Callable[[CallbackOptions], Any]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            readings = read()
            value = None if readings is None else pick(readings)
            return [] if value is None else [Observation(value, base)]

        return callback

    def by(
        pick: Callable[[Readings], Mapping[str, int]], label: str, every: tuple[str, ...]
    ) -> Callable[[CallbackOptions], Any]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            readings = read()
            if readings is None:
                return []
            counts = pick(readings)
            return [Observation(counts.get(k, 0), {**base, label: k}) for k in every]

        return callback

    from ._events import CHANGE_KINDS, REFUSAL_REASONS

    counters: list[tuple[str, str, Callable[[CallbackOptions], Any]]] = [
        ("kms_async.encryptions", "values encrypted", one(lambda r: r.encryptions)),
        ("kms_async.decryptions", "values decrypted or refused", one(lambda r: r.decryptions)),
        (
            "kms_async.decryption.refusals",
            "decryptions refused, by reason",
            by(lambda r: r.refusals, "reason", REFUSAL_REASONS),
        ),
        ("kms_async.cache.hits", "lookups served from the cache", one(lambda r: r.cache_hits)),
        ("kms_async.cache.loads", "pair loads from the database", one(lambda r: r.loads)),
        (
            "kms_async.cache.evictions",
            "cached pairs pushed out by cache_size",
            one(lambda r: r.evictions),
        ),
        (
            "kms_async.key.changes",
            "key changes made through this instance, by kind (one per scope or pair)",
            by(lambda r: r.changes, "kind", CHANGE_KINDS),
        ),
    ]
    for name, description, callback in counters:
        meter.create_observable_counter(
            name, callbacks=[callback], unit="1", description=description
        )
    meter.create_observable_gauge(
        "kms_async.cache.size",
        callbacks=[one(lambda r: r.cache_size)],
        unit="1",
        description="(scope, purpose) pairs cached",
    )
    meter.create_observable_gauge(
        "kms_async.cache.staleness",
        callbacks=[one(lambda r: r.staleness)],
        unit="s",
        description=(
            "seconds since the newest successful key change check started: the oldest "
            "change made elsewhere that this instance may not have seen is at most this old"
        ),
    )
    loads = meter.create_histogram(
        "kms_async.load.duration", unit="s", description="cold loads and reloads of a pair"
    )
    refreshes = meter.create_histogram(
        "kms_async.refresh.duration", unit="s", description="key change checks (refresh)"
    )
    stats.on_load = lambda seconds: loads.record(seconds, base)
    stats.on_refresh = lambda seconds: refreshes.record(seconds, base)
