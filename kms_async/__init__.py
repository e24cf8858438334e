"""kms_async: envelope-encryption keys for asyncio services, kept in PostgreSQL or SQLite.

A root wrapper (local AES key, cloud KMS, HSM) wraps one root key per scope,
which wraps one data key per purpose; every key is versioned, rotatable,
rewrappable and revocable. The storage format is that of HashiCorp's Go
package ``go-kms-wrapping/extras/kms``.
"""

from ._blob import BlobInfo
from ._errors import (
    ClosedError,
    DecryptionError,
    DurabilityTimeoutError,
    ForeignContextError,
    InvalidParameterError,
    KeyExistsError,
    KeyIntegrityError,
    KeyInUseError,
    KeyNotFoundError,
    KeyRollbackError,
    KeySuspendedError,
    KeyUnusableError,
    KMSError,
    OutcomeUnknownError,
    Remedy,
    RevokeTooSoonError,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    UnknownKeyVersionError,
    WrapperError,
)
from ._events import Actor, DecryptionRefused, KeyEvent
from ._kms import KMS
from ._migrations import SCHEMA_VERSION, Migration, migrate, migrations
from ._reencrypt import EncryptedColumn, ReencryptReport, VersionUsage
from ._root_wrapper import open_root_wrapper
from ._types import (
    ROOT_PURPOSE,
    CensusRow,
    Key,
    KeyVersion,
    KeyVersionInfo,
    ReplicaReads,
    RotationPolicy,
    Scope,
    VersionReference,
)
from ._wrappers import AeadWrapper, PooledWrapper, Wrapper

__version__ = "0.1.0"

__all__ = [
    "KMS",
    "ROOT_PURPOSE",
    "SCHEMA_VERSION",
    "Actor",
    "AeadWrapper",
    "BlobInfo",
    "CensusRow",
    "ClosedError",
    "DecryptionError",
    "DecryptionRefused",
    "DurabilityTimeoutError",
    "EncryptedColumn",
    "ForeignContextError",
    "InvalidParameterError",
    "KMSError",
    "Key",
    "KeyEvent",
    "KeyExistsError",
    "KeyInUseError",
    "KeyIntegrityError",
    "KeyNotFoundError",
    "KeyRollbackError",
    "KeySuspendedError",
    "KeyUnusableError",
    "KeyVersion",
    "KeyVersionInfo",
    "Migration",
    "OutcomeUnknownError",
    "PooledWrapper",
    "ReencryptReport",
    "Remedy",
    "ReplicaReads",
    "RevokeTooSoonError",
    "RotationPolicy",
    "SchemaVersionError",
    "Scope",
    "StorageError",
    "TransientStorageError",
    "UnknownKeyVersionError",
    "VersionReference",
    "VersionUsage",
    "Wrapper",
    "WrapperError",
    "migrate",
    "migrations",
    "open_root_wrapper",
]
