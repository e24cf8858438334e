"""Key bindings and the key state record: the cryptography, no I/O.

**Bindings.** The Go storage format wraps keys without associated data, so a
database writer can copy a wrapped key to another scope, purpose or version
number and it still unwraps. Beside each version this library keeps a
binding: HMAC-SHA256 over the version's place (scope id, purpose, key id,
version id, version number), keyed by a key derived with HKDF-SHA256 from
the version's own key material. Making one needs that key, which only a
holder of the root wrapper can unwrap; checking one needs nothing more than
what a cold load unwraps anyway. The wrapped columns stay exactly as the Go
package writes them (associated data in the root wrapper would make the Go
package unable to unwrap), and a rewrap, which keeps the key material,
keeps the binding valid.

Every bound version also gets a **fingerprint**: another HKDF output of its
key, one-way, stored (and kept when the version is revoked) so that a copy of
a bound or revoked key under another id (a transplant into another scope, an
old key put back as a "new" version) is recognised even though the copy has
no binding of its own.

**State record.** One per scope: a serial number raised by every write, the
newest version (id and number) of each of the scope's keys and the ids of
every version revoked through this library, MACed with a key derived from
the scope's newest root key version. A writer without the root wrapper
cannot forge it, drop an id from it or raise its serial; it can only delete
it or put an older one back, which the loader notices (bound versions
without a record; a serial below the one this instance has seen).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "Integrity",
    "KeyState",
    "bind_version",
    "fingerprint",
    "seal_state",
    "unseal_state",
    "verify_version",
]

Integrity = Literal["bind", "strict"]

_BINDING_INFO = b"kms_async/key-binding/v1"
_FINGERPRINT_INFO = b"kms_async/key-fingerprint/v1"
_STATE_INFO = b"kms_async/key-state/v1"


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def _fields(*fields: str | int) -> bytes:
    # Length-prefixed, so no two different tuples encode alike.
    out = bytearray()
    for field in fields:
        raw = field.encode() if isinstance(field, str) else field.to_bytes(8, "big", signed=True)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def bind_version(
    key: bytes, scope_id: str, purpose: str, key_id: str, version_id: str, version: int
) -> bytes:
    """The binding of one key version (root: ``purpose`` is ``rootKey``) to its place."""
    message = _fields(scope_id, purpose, key_id, version_id, version)
    return hmac.digest(_derive(key, _BINDING_INFO), message, hashlib.sha256)


def verify_version(
    binding: bytes,
    key: bytes,
    scope_id: str,
    purpose: str,
    key_id: str,
    version_id: str,
    version: int,
) -> bool:
    expected = bind_version(key, scope_id, purpose, key_id, version_id, version)
    return hmac.compare_digest(expected, bytes(binding))


def fingerprint(key: bytes) -> bytes:
    """A one-way value identifying a key, whatever row it is stored in."""
    return _derive(key, _FINGERPRINT_INFO)


@dataclasses.dataclass(frozen=True, slots=True)
class KeyState:
    """A scope's key state record, as sealed by the newest root key version."""

    scope_id: str
    serial: int
    root_version_id: str
    #: key id -> (version id, number) of its newest version.
    newest: dict[str, tuple[str, int]]
    revoked: frozenset[str]

    def body(self) -> bytes:
        return json.dumps(
            {
                "scope": self.scope_id,
                "serial": self.serial,
                "root_version": self.root_version_id,
                "newest": {k: list(v) for k, v in sorted(self.newest.items())},
                "revoked": sorted(self.revoked),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


def seal_state(state: KeyState, root_key: bytes) -> tuple[bytes, bytes]:
    """(body, mac) of the record, MACed with a key derived from ``root_key``."""
    body = state.body()
    return body, hmac.digest(_derive(root_key, _STATE_INFO), body, hashlib.sha256)


def unseal_state(
    scope_id: str, root_version_id: str, body: bytes, mac: bytes, root_key: bytes
) -> KeyState | None:
    """The record if its MAC verifies under ``root_key`` and it names this scope, else None."""
    expected = hmac.digest(_derive(root_key, _STATE_INFO), bytes(body), hashlib.sha256)
    if not hmac.compare_digest(expected, bytes(mac)):
        return None
    try:
        raw = json.loads(bytes(body))
        state = KeyState(
            scope_id=str(raw["scope"]),
            serial=int(raw["serial"]),
            root_version_id=str(raw["root_version"]),
            newest={str(k): (str(v[0]), int(v[1])) for k, v in raw["newest"].items()},
            revoked=frozenset(str(v) for v in raw["revoked"]),
        )
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if state.scope_id != scope_id or state.root_version_id != root_version_id:
        return None
    return state
