"""A PKCS#11 HSM as the root of trust: :class:`Pkcs11Wrapper`.

Root keys are wrapped with AES-256-GCM (``CKM_AES_GCM``, a random 96-bit IV
and a 128-bit tag) by an AES key that stays inside the token, found by its
label. Install the dependency with ``pip install 'kms-async[pkcs11]'``.

Threads and sessions: python-pkcs11 is synchronous and initialises the
library without ``CKF_OS_LOCKING_OK``, which promises the module one caller
at a time. Every call therefore runs in a worker thread and all PKCS#11 work
of this module is serialized by one process-wide lock; AES on a handful of
32-byte keys is quick, and unwrapped root keys are cached by the KMS anyway.
PKCS#11 login state belongs to the application, not to a session (a second
``C_Login`` fails, and any ``C_Logout`` logs every session out), so all
wrappers on one token share one logged-in session, which the last of them
to close logs out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import os
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from ._blob import NONCE_SIZE, TAG_SIZE, BlobInfo
from ._errors import (
    ClosedError,
    DecryptionError,
    InvalidParameterError,
    KMSError,
    WrapperError,
)
from ._resource import AsyncResource

__all__ = ["CKM_AES_GCM", "Pkcs11Wrapper"]

CKM_AES_GCM = 0x1087
"""The PKCS#11 mechanism number, stored as the blob's ``KeyInfo.mechanism``."""

_T = TypeVar("_T")

# Serializes every PKCS#11 call made by this module (see the module docstring).
_LOCK = threading.Lock()


@dataclasses.dataclass(eq=False)
class _TokenSession:
    """The one logged-in session this process keeps on a token."""

    pin: bytes
    session: Any = None
    generation: int = 0
    users: int = 0


# (library path, token label) -> its shared session; guarded by _LOCK.
_TOKENS: dict[tuple[str, str], _TokenSession] = {}


def _import_pkcs11() -> Any:
    try:
        import pkcs11
        import pkcs11.exceptions
        import pkcs11.mechanisms
    except ImportError as exc:
        raise InvalidParameterError(
            "Pkcs11Wrapper needs python-pkcs11; install it with: pip install 'kms-async[pkcs11]'"
        ) from exc
    return pkcs11


def _uri(token_label: str, key_label: str) -> str:
    quote = urllib.parse.quote
    return f"pkcs11:token={quote(token_label, safe='')};object={quote(key_label, safe='')}"


class Pkcs11Wrapper(AsyncResource):
    """Wraps root keys with an AES key held in a PKCS#11 token.

    ``lib_path`` is the vendor's PKCS#11 module (for SoftHSM2,
    ``/usr/lib/softhsm/libsofthsm2.so``); the token is found by its label,
    logged in with the user ``pin``, and the key by its ``CKA_LABEL``. The
    key may (and should) be sensitive and non-extractable: it is only ever
    used by handle.

    :attr:`key_id` defaults to the RFC 7512 URI
    ``pkcs11:token=<token_label>;object=<key_label>``; pass ``key_id=`` to
    choose another. Blob layout: ``ciphertext`` = IV || GCM output and tag,
    ``mechanism`` = ``CKM_AES_GCM``. Blobs with the IV in the separate
    ``iv`` field (the OpenBao pkcs11 wrapper's layout) decrypt as well.

    Nothing is opened by the constructor: the first call (or ``async with``,
    or :meth:`connect`) loads the module and logs in, in a worker thread.
    Close with :meth:`aclose` (or ``close()`` from synchronous code).
    """

    __slots__ = (
        "_closed",
        "_key",
        "_key_generation",
        "_key_id",
        "_key_label",
        "_lib_path",
        "_p11",
        "_pin",
        "_token",
        "_token_label",
    )

    def __init__(
        self,
        lib_path: str | os.PathLike[str],
        *,
        token_label: str,
        pin: str,
        key_label: str,
        key_id: str | None = None,
    ) -> None:
        try:
            path = os.fsdecode(lib_path)
        except TypeError:
            raise InvalidParameterError(
                f"lib_path must be the path of a PKCS#11 module, not {type(lib_path).__name__}"
            ) from None
        if not path:
            raise InvalidParameterError("lib_path must be the path of the HSM's PKCS#11 module")
        for name, value in (("token_label", token_label), ("key_label", key_label)):
            if not isinstance(value, str) or not value:
                raise InvalidParameterError(f"Pkcs11Wrapper needs a non-empty {name}")
        if not isinstance(pin, str) or not pin:
            raise InvalidParameterError("Pkcs11Wrapper needs the token's user PIN as a string")
        if key_id is not None and (not isinstance(key_id, str) or not key_id):
            raise InvalidParameterError("key_id must be a non-empty string or None")
        self._p11 = _import_pkcs11()
        self._lib_path = path
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin.encode("utf-8")
        self._key_id = key_id if key_id is not None else _uri(token_label, key_label)
        self._token: _TokenSession | None = None
        self._key: Any = None
        self._key_generation = -1
        self._closed = False

    def __repr__(self) -> str:
        return f"Pkcs11Wrapper(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    # -- lifecycle ---------------------------------------------------------

    async def _enter(self) -> None:
        await self.connect()

    async def connect(self) -> None:
        """Load the module, log in and find the key now rather than on first use.

        Raises:
            InvalidParameterError: wrong module path, token label, PIN or key label.
            WrapperError: the token failed.
            ClosedError: the wrapper was closed.
        """
        await self._run(lambda key: None)

    async def aclose(self) -> None:
        """Release this wrapper's share of the token session. Idempotent."""
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Synchronous :meth:`aclose`; blocks while another PKCS#11 call runs."""
        with _LOCK:
            if self._closed:
                return
            self._closed = True
            self._key = None
            shared, self._token = self._token, None
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            _TOKENS.pop((self._lib_path, self._token_label), None)
            session, shared.session = shared.session, None
            if session is not None:
                # Logs the token out for this process; a session that is gone
                # already (token removed, library reset) needs nothing more.
                with contextlib.suppress(self._p11.PKCS11Error):
                    session.close()

    # -- operations --------------------------------------------------------

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        """Encrypt ``plaintext`` with AES-GCM inside the token.

        Raises:
            InvalidParameterError: bad arguments or configuration (module, token, PIN, key).
            WrapperError: the token failed.
            ClosedError: the wrapper was closed.
        """
        _check_bytes("plaintext", plaintext)
        if aad is not None:
            _check_bytes("aad", aad)
        data = bytes(plaintext)
        bound = bytes(aad) if aad else None
        iv = os.urandom(NONCE_SIZE)
        p11 = self._p11

        def seal(key: Any) -> bytes:
            try:
                out: bytes = key.encrypt(
                    data,
                    mechanism=p11.Mechanism.AES_GCM,
                    mechanism_param=p11.mechanisms.GCMParams(iv, bound, TAG_SIZE * 8),
                )
            except (p11.exceptions.MechanismInvalid, p11.exceptions.MechanismParamInvalid):
                raise InvalidParameterError(
                    f"PKCS#11 token {self._token_label!r} cannot do CKM_AES_GCM with a 12-byte "
                    "IV and 128-bit tag; use a token that supports AES-GCM"
                ) from None
            return out

        ciphertext = await self._run(seal)
        return BlobInfo(iv + ciphertext, self._key_id, mechanism=CKM_AES_GCM)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        """Decrypt a blob made by :meth:`encrypt` with the same ``aad``.

        Raises:
            DecryptionError: wrong key, wrong AAD, or tampered ciphertext.
            InvalidParameterError: bad arguments or configuration.
            WrapperError: the token failed.
            ClosedError: the wrapper was closed.
        """
        if not isinstance(blob, BlobInfo):
            raise InvalidParameterError(f"blob must be a BlobInfo, not {type(blob).__name__}")
        if aad is not None:
            _check_bytes("aad", aad)
        if blob.mechanism not in (0, CKM_AES_GCM):
            raise DecryptionError(f"ciphertext names mechanism {blob.mechanism}, not CKM_AES_GCM")
        if blob.iv:
            iv, sealed = blob.iv, blob.ciphertext
        else:
            iv, sealed = blob.ciphertext[:NONCE_SIZE], blob.ciphertext[NONCE_SIZE:]
        if len(iv) != NONCE_SIZE or len(sealed) < TAG_SIZE:
            raise DecryptionError("ciphertext is too short to be AES-GCM output")
        bound = bytes(aad) if aad else None
        p11 = self._p11
        # SoftHSM2 reports a bad tag as CKR_GENERAL_ERROR, other tokens as
        # CKR_ENCRYPTED_DATA_INVALID and friends: all mean "not ours".
        rejected = (
            p11.exceptions.EncryptedDataInvalid,
            p11.exceptions.EncryptedDataLenRange,
            p11.exceptions.DataInvalid,
            p11.exceptions.DataLenRange,
            p11.exceptions.GeneralError,
            p11.exceptions.FunctionFailed,
        )

        def open_(key: Any) -> bytes:
            try:
                out: bytes = key.decrypt(
                    sealed,
                    mechanism=p11.Mechanism.AES_GCM,
                    mechanism_param=p11.mechanisms.GCMParams(iv, bound, TAG_SIZE * 8),
                )
            except rejected:
                raise DecryptionError(
                    "decryption failed: wrong key, wrong AAD or tampered ciphertext"
                ) from None
            return out

        return await self._run(open_)

    # -- internals ---------------------------------------------------------

    async def _run(self, operation: Callable[[Any], _T]) -> _T:
        if self._closed:
            raise ClosedError("this Pkcs11Wrapper was closed; make a new one")
        return await anyio.to_thread.run_sync(self._run_sync, operation)

    def _run_sync(self, operation: Callable[[Any], _T]) -> _T:
        """Run ``operation(key)`` under the lock; PKCS#11 errors are translated here."""
        exceptions = self._p11.exceptions
        # A session can go stale under us: other code in the process logged
        # the token out, or the HSM restarted. Reconnect once, then give up.
        stale = (
            exceptions.SessionHandleInvalid,
            exceptions.SessionClosed,
            exceptions.UserNotLoggedIn,
            exceptions.KeyHandleInvalid,
            exceptions.ObjectHandleInvalid,
            exceptions.DeviceRemoved,
            exceptions.TokenNotPresent,
        )
        with _LOCK:
            if self._closed:
                raise ClosedError("this Pkcs11Wrapper was closed; make a new one")
            for attempt in range(2):
                try:
                    fresh = self._attach()
                    key = self._find_key(fresh)
                    return operation(key)
                except KMSError:
                    raise
                except stale as exc:
                    if attempt == 0 and not fresh:
                        self._reset_session()
                        continue
                    raise self._translate(exc) from exc
                except exceptions.PKCS11Error as exc:
                    raise self._translate(exc) from exc
            raise AssertionError("unreachable")

    def _attach(self) -> bool:
        """Make sure this wrapper has the token's session; True if it was just opened."""
        shared = self._token
        if shared is not None and shared.session is not None:
            return False
        if shared is None:
            shared = _TOKENS.get((self._lib_path, self._token_label))
            if shared is not None and not hmac.compare_digest(shared.pin, self._pin):
                # The token already accepted another PIN from this process.
                raise InvalidParameterError(
                    f"wrong PIN for PKCS#11 token {self._token_label!r}; pass the token's user PIN"
                )
        if shared is not None and shared.session is not None:
            shared.users += 1
            self._token = shared
            return False
        session = self._open_session()
        if shared is None:
            shared = _TOKENS[(self._lib_path, self._token_label)] = _TokenSession(self._pin)
        shared.session = session
        shared.generation += 1
        if self._token is None:
            shared.users += 1
            self._token = shared
        return True

    def _open_session(self) -> Any:
        p11 = self._p11
        exceptions = p11.exceptions
        token_label = self._token_label
        try:
            lib = p11.lib(self._lib_path)
        except exceptions.PKCS11Error as exc:
            raise InvalidParameterError(
                f"cannot load the PKCS#11 module {self._lib_path} ({type(exc).__name__}); "
                "install the HSM's PKCS#11 library or fix lib_path"
            ) from exc
        try:
            token = lib.get_token(token_label=token_label)
        except exceptions.NoSuchToken as exc:
            raise InvalidParameterError(
                f"no PKCS#11 token labelled {token_label!r} in {self._lib_path}; list the tokens "
                "(softhsm2-util --show-slots, pkcs11-tool -L) and fix token_label"
            ) from exc
        except exceptions.MultipleTokensReturned as exc:
            raise InvalidParameterError(
                f"several PKCS#11 tokens are labelled {token_label!r}; relabel one of them"
            ) from exc
        try:
            return token.open(user_pin=self._pin.decode("utf-8"))
        except (exceptions.PinIncorrect, exceptions.PinInvalid, exceptions.PinLenRange) as exc:
            raise InvalidParameterError(
                f"wrong PIN for PKCS#11 token {token_label!r}; pass the token's user PIN"
            ) from exc
        except exceptions.PinLocked as exc:
            raise WrapperError(
                f"the user PIN of PKCS#11 token {token_label!r} is locked; have the security "
                "officer unlock or reset it"
            ) from exc
        except exceptions.UserPinNotInitialized as exc:
            raise InvalidParameterError(
                f"PKCS#11 token {token_label!r} has no user PIN yet; initialise it first"
            ) from exc
        except exceptions.UserAlreadyLoggedIn:
            # Other code in this process logged in to the token; the login is
            # shared, so a session without one sees the same objects.
            return token.open()

    def _reset_session(self) -> None:
        shared = self._token
        if shared is None:
            return
        session, shared.session = shared.session, None
        if session is not None:
            with contextlib.suppress(self._p11.PKCS11Error):  # it is stale: hence the reset
                session.close()

    def _find_key(self, fresh: bool) -> Any:
        shared = self._token
        assert shared is not None
        if self._key is not None and self._key_generation == shared.generation:
            return self._key
        p11 = self._p11
        try:
            key = shared.session.get_key(
                object_class=p11.ObjectClass.SECRET_KEY,
                key_type=p11.KeyType.AES,
                label=self._key_label,
            )
        except p11.exceptions.NoSuchKey as exc:
            if not fresh:
                # Possibly logged out behind our back: let the caller reconnect once.
                raise p11.exceptions.UserNotLoggedIn() from exc
            raise InvalidParameterError(
                f"no AES key labelled {self._key_label!r} in PKCS#11 token "
                f"{self._token_label!r}; create one or fix key_label"
            ) from exc
        except p11.exceptions.MultipleObjectsReturned as exc:
            raise InvalidParameterError(
                f"several AES keys are labelled {self._key_label!r} in PKCS#11 token "
                f"{self._token_label!r}; give the root key a unique label"
            ) from exc
        self._key = key
        self._key_generation = shared.generation
        return key

    def _translate(self, exc: Exception) -> KMSError:
        detail = str(exc)
        said = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        return WrapperError(
            f"PKCS#11 token {self._token_label!r} failed ({said}); check the HSM, its logs and "
            f"that the key labelled {self._key_label!r} may encrypt and decrypt"
        )


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidParameterError(f"{name} must be bytes, not {type(value).__name__}")
