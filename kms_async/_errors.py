"""The exceptions kms_async raises.

Every error the library raises derives from :class:`KMSError`; exceptions from
the database drivers and from ``cryptography`` are translated at the edge of
the layer that called them, with the original kept as ``__cause__``::

    KMSError
    ├── InvalidParameterError (ValueError)   bad argument; fix the call
    ├── KeyNotFoundError (LookupError)       no such scope, purpose or version
    ├── KeyExistsError                       create_keys for a scope that already has keys
    ├── KeyInUseError                        revoke refused; something still uses the version
    │   └── RevokeTooSoonError               superseded too recently; other instances may use it
    ├── DecryptionError                      bad tag, bad format, wrong AAD or wrong key
    │   ├── UnknownKeyVersionError           ciphertext names a version this scope and purpose lack
    │   ├── KeySuspendedError                the version is suspended; resume it to decrypt
    │   └── KeyIntegrityError                a stored key fails its binding or the scope's key
    │       │                                state record (moved, renumbered, revoked, unbound
    │       │                                under integrity="strict")
    │       └── KeyRollbackError             the database shows an older key state than this
    │                                        instance has seen (restored or tampered)
    ├── WrapperError                         a wrapper (root key service, HSM) failed
    │   └── KeyUnusableError                 a stored version the root wrapper cannot unwrap
    │                                        (also a DecryptionError)
    ├── SchemaVersionError                   database schema missing or at another version
    ├── StorageError                         the database failed
    │   ├── TransientStorageError            lost connection, lock timeout, serialization failure
    │   ├── OutcomeUnknownError              the connection died during COMMIT; check, then retry
    │   └── DurabilityTimeoutError           durability="replicated": no standby confirmed a key
    │                                        write in time (``committed`` says whether it was
    │                                        written on the primary)
    ├── ClosedError                          the KMS was used after aclose()
    └── ForeignContextError                  used in a forked child or from another event loop

``retryable`` is true on the errors that are worth retrying unchanged: the
operation left nothing behind, and the same call may succeed on a second try.
That is every ``TransientStorageError``, a ``DurabilityTimeoutError`` that
wrote nothing (``committed`` false), and a ``WrapperError`` whose root
key service failed for a while (throttling, a timeout), never one for a
wrong key. ``index`` is set on the errors ``encrypt_many`` and ``decrypt_many`` raise
for one item: its position in the list (the message names it too).

Messages never contain key material; they name the fix. Where the fix is
another call, the error also carries it as data, ``remedy`` (a
:class:`Remedy`), with ``problem``, the message without its advice, so a
client that speaks differently (the command line) can word the advice its
own way.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Literal, TypeVar

__all__ = [
    "Action",
    "ClosedError",
    "DecryptionError",
    "DurabilityTimeoutError",
    "ForeignContextError",
    "InvalidParameterError",
    "KMSError",
    "KeyExistsError",
    "KeyInUseError",
    "KeyIntegrityError",
    "KeyNotFoundError",
    "KeyRollbackError",
    "KeySuspendedError",
    "KeyUnusableError",
    "OutcomeUnknownError",
    "Remedy",
    "RevokeTooSoonError",
    "SchemaVersionError",
    "StorageError",
    "TransientStorageError",
    "UnknownKeyVersionError",
    "WrapperError",
    "advised",
    "reason",
]

#: What a :class:`Remedy` asks for: a KMS call (or ``migrate``), or, for
#: ``previous_root_key``, opening the KMS with ``PooledWrapper(new, old)``.
Action = Literal[
    "migrate",
    "create_keys",
    "rotate_keys",
    "rewrap_keys",
    "reconcile_keys",
    "reencrypt_key_version",
    "list_keys",
    "previous_root_key",
    "wait_revoke_grace",
    "replace_unusable",
    "resume_key_version",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Remedy:
    """The fix an error's message advises, as data.

    ``action`` is what to do; the ids say what to do it on, where the error
    knows: ``key_id`` is the root key id that stored blobs name (for
    ``previous_root_key``).
    """

    action: Action
    scope_id: str | None = None
    key_version_id: str | None = None
    key_id: str | None = None


class KMSError(Exception):
    """Base class of every error raised by kms_async."""

    retryable: bool = False
    #: The fix the message advises, as data (``None`` when it names no call).
    remedy: Remedy | None = None
    #: The message without its advice, set along with ``remedy``.
    problem: str | None = None
    #: The position of the item a batch call failed on, or None.
    index: int | None = None


E = TypeVar("E", bound=KMSError)


def advised(kind: type[E], problem: str, advice: str, remedy: Remedy, **kwargs: Any) -> E:
    """A ``kind`` error saying ``problem; advice``, carrying ``remedy`` and ``problem``."""
    error = kind(f"{problem}; {advice}", **kwargs)
    error.problem = problem
    error.remedy = remedy
    return error


def reason(exc: BaseException) -> str:
    """What went wrong, for a message: never empty (``str(TimeoutError())`` is)."""
    text = str(exc).strip()
    if text:
        return text
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    return type(exc).__name__


class InvalidParameterError(KMSError, ValueError):
    """An argument is missing, malformed or not allowed."""


class KeyNotFoundError(KMSError, LookupError):
    """A scope, purpose, key or key version does not exist."""


class KeyExistsError(KMSError):
    """Keys already exist where the call would create them."""


class KeyInUseError(KMSError):
    """A key version cannot be revoked because something still depends on it."""


class RevokeTooSoonError(KeyInUseError):
    """The version was superseded too recently to be revoked safely.

    Other instances may still be encrypting under it until their caches
    catch up; ``retry_after`` is how many seconds remain (by the database
    clock) until it becomes revocable.
    """

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DecryptionError(KMSError):
    """A ciphertext could not be decrypted.

    Deliberately one opaque error for a bad tag, a malformed envelope, the
    wrong AAD or the wrong key, so that callers cannot be used as an oracle.
    """


class UnknownKeyVersionError(DecryptionError, KeyNotFoundError):
    """A ciphertext names a key version the scope and purpose do not have.

    Either the version was revoked, or the ciphertext belongs to another scope
    or purpose.
    """


class KeySuspendedError(DecryptionError):
    """The ciphertext's key version is suspended: decryption under it is refused.

    Suspension is reversible (:meth:`KMS.resume_key_version`, or
    ``kms-async resume``); ``key_version_id`` names the version.
    """

    def __init__(self, message: str, *, key_version_id: str = "") -> None:
        super().__init__(message)
        self.key_version_id = key_version_id


class KeyIntegrityError(DecryptionError):
    """A stored key version, or the scope's key state record, fails verification.

    The version's binding names another place (scope, purpose, key, version
    id or number) or is missing under ``integrity="strict"``, the version was
    revoked and its row came back, or the state record is missing or forged.
    The key tables were changed outside kms_async (or by the Go package under
    ``strict``); ``key_version_id`` names the version when there is one.
    """

    def __init__(self, message: str, *, key_version_id: str = "") -> None:
        super().__init__(message)
        self.key_version_id = key_version_id


class KeyRollbackError(KeyIntegrityError):
    """The database holds an older key state than this instance has already seen.

    A backup was restored, or a writer put back an older state record: keys
    this instance saw revoked could come back. Nothing of the scope is used
    until the newer state is back, or the instance is restarted after a
    deliberate restore.
    """


class WrapperError(KMSError):
    """A wrapper failed to encrypt or decrypt a key (for example a root key service)."""


class KeyUnusableError(WrapperError, DecryptionError):
    """A stored key version cannot be unwrapped with this KMS's root wrapper.

    It was written under another root key (by another tool, a misconfigured
    instance or a restored backup). The scope's other versions keep working;
    encrypting is refused while the newest version is unusable. The message
    names the recovery; ``key_version_id`` names the version. It is also a
    :class:`DecryptionError`, since a ciphertext under such a version cannot
    be decrypted.
    """

    def __init__(self, message: str, *, key_version_id: str = "") -> None:
        super().__init__(message)
        self.key_version_id = key_version_id


class SchemaVersionError(KMSError):
    """The database schema is missing or is not the version this library needs.

    ``found`` holds the version string read from the database, or ``None`` when
    the schema tables do not exist.
    """

    def __init__(self, message: str, *, found: str | None = None) -> None:
        super().__init__(message)
        self.found = found


class StorageError(KMSError):
    """The database failed in a way the library cannot recover from."""


class TransientStorageError(StorageError):
    """The database failed in a way that a retry of the same call may fix.

    Raised for lost connections, lock or busy timeouts, deadlocks and
    serialization failures; the failed operation left nothing half-written.
    """

    retryable = True


class OutcomeUnknownError(StorageError):
    """The connection was lost while the database committed a write.

    The write may or may not have been applied. It is not retryable as it
    stands: look first (for example with ``list_keys``), then decide.
    """


class DurabilityTimeoutError(StorageError):
    """``durability="replicated"``: no standby confirmed a key write in time.

    ``committed`` false: no standby was there to take the write, and nothing
    was written (``retryable``: the same call may succeed once a standby is
    connected). ``committed`` true: the write committed on the primary (or,
    with synchronous standbys, waits there to commit) but no standby
    confirmed it within ``durability_timeout``; do not repeat it (a rotation
    would make yet another version). This instance does not use the
    new versions to encrypt until a standby has them: each cold load waits
    for that again (and raises this error while none does).
    """

    def __init__(self, message: str, *, committed: bool = True) -> None:
        super().__init__(message)
        self.committed = committed
        self.retryable = not committed


class ClosedError(KMSError):
    """The KMS was used after ``aclose()``."""


class ForeignContextError(KMSError):
    """The KMS was used in a forked child process or from another event loop.

    Its connections belong to the process and the event loop that opened it;
    open a new KMS in each worker process, after the fork, on its own loop.
    """
