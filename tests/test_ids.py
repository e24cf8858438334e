"""Key ids: prefix, underscore, 10 base62 characters from the OS CSPRNG."""

from __future__ import annotations

import collections
import re

from kms_async._ids import _ALPHABET, new_id


def test_format() -> None:
    for prefix in ("krk", "krkv", "kdk", "kdkv"):
        assert re.fullmatch(prefix + r"_[A-Za-z0-9]{10}", new_id(prefix))


def test_ids_do_not_repeat() -> None:
    ids = [new_id("kdkv") for _ in range(100_000)]
    assert len(set(ids)) == len(ids)


def test_every_character_equally_likely() -> None:
    # 2,000,000 characters over 62 symbols: 32,258 expected per symbol, with a
    # standard deviation of about 178 (900 is 5 of them). Keeping bytes
    # 248-255 would map them onto 8 symbols, each then 25% (about 7,000) too
    # frequent.
    counts = collections.Counter("".join(new_id("x")[2:] for _ in range(200_000)))
    assert set(counts) == set(_ALPHABET)
    expected = 200_000 * 10 / 62
    assert all(abs(n - expected) < 900 for n in counts.values()), counts
