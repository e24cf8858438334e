"""Key ids: a type prefix, an underscore and 10 random base62 characters."""

from __future__ import annotations

import os
import re

__all__ = [
    "DATA_KEY_PREFIX",
    "DATA_KEY_VERSION_PREFIX",
    "ID_LENGTH",
    "ROOT_KEY_PREFIX",
    "ROOT_KEY_VERSION_PREFIX",
    "is_id",
    "new_id",
]

ROOT_KEY_PREFIX = "krk"
ROOT_KEY_VERSION_PREFIX = "krkv"
DATA_KEY_PREFIX = "kdk"
DATA_KEY_VERSION_PREFIX = "kdkv"

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: Random characters after the prefix and its underscore (the Go package's length).
ID_LENGTH = 10
_ID = re.compile(rf"([a-z]+)_[A-Za-z0-9]{{{ID_LENGTH}}}")
# 248 is the largest multiple of 62 below 256: bytes at or above it are
# discarded so that every character is equally likely.
_REJECT_FROM = 248


# Byte -> base62 character for the accepted bytes; bytes.translate applies it
# (and drops the rejected bytes) in C, several times faster than a Python loop.
_TO_CHAR = bytes(ord(_ALPHABET[b % 62]) if b < _REJECT_FROM else 0 for b in range(256))
_REJECTED = bytes(range(_REJECT_FROM, 256))


def new_id(prefix: str) -> str:
    """Return ``prefix_XXXXXXXXXX`` with characters drawn from the OS CSPRNG."""
    chars = os.urandom(16).translate(_TO_CHAR, _REJECTED)
    while len(chars) < ID_LENGTH:  # 16 bytes hold fewer than 10 accepted ones: rare
        chars += os.urandom(16).translate(_TO_CHAR, _REJECTED)
    return f"{prefix}_{chars[:ID_LENGTH].decode('ascii')}"


def is_id(value: object, prefix: str) -> bool:
    """Whether ``value`` is an id of the kind ``prefix`` names (``kdkv``, ``krkv``, ...)."""
    if not isinstance(value, str):
        return False
    match = _ID.fullmatch(value)
    return match is not None and match[1] == prefix
