"""Key ids: a type prefix, an underscore and 10 random base62 characters."""

from __future__ import annotations

import os

__all__ = [
    "DATA_KEY_PREFIX",
    "DATA_KEY_VERSION_PREFIX",
    "ROOT_KEY_PREFIX",
    "ROOT_KEY_VERSION_PREFIX",
    "new_id",
]

ROOT_KEY_PREFIX = "krk"
ROOT_KEY_VERSION_PREFIX = "krkv"
DATA_KEY_PREFIX = "kdk"
DATA_KEY_VERSION_PREFIX = "kdkv"

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ID_LENGTH = 10
# 248 is the largest multiple of 62 below 256: bytes at or above it are
# discarded so that every character is equally likely.
_REJECT_FROM = 248


def new_id(prefix: str) -> str:
    """Return ``prefix_XXXXXXXXXX`` with characters drawn from the OS CSPRNG."""
    chars: list[str] = []
    while len(chars) < _ID_LENGTH:
        for byte in os.urandom(16):
            if byte < _REJECT_FROM:
                chars.append(_ALPHABET[byte % 62])
                if len(chars) == _ID_LENGTH:
                    break
    return f"{prefix}_{''.join(chars)}"
