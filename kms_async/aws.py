"""AWS KMS as the root of trust: :class:`AwsKmsWrapper`.

Root keys are wrapped by the KMS ``Encrypt`` API and unwrapped by
``Decrypt``; the key never leaves AWS. boto3 is synchronous, so every call
runs in a worker thread and the event loop keeps serving other tasks while
AWS answers. Install the dependency with ``pip install 'kms-async[aws]'``.

The blobs are those of the Go ``awskms`` wrapper's direct mode (mechanism
0): ``ciphertext`` is the KMS ``CiphertextBlob`` and ``key_id`` the key ARN
KMS reported. Blobs of the Go wrapper's default envelope mode (mechanism 1:
an AES-GCM data key wrapped by KMS), which a database written by the Go
package holds, are decrypted too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import anyio.to_thread
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blob import NONCE_SIZE, BlobInfo
from ._errors import ClosedError, DecryptionError, InvalidParameterError, WrapperError
from ._resource import AsyncResource

__all__ = ["MECHANISM_ENCRYPT", "MECHANISM_ENVELOPE", "AwsKmsWrapper"]

MECHANISM_ENCRYPT = 0
"""``KeyInfo.mechanism`` of a blob whose ciphertext is a KMS ``CiphertextBlob``."""

MECHANISM_ENVELOPE = 1
"""``KeyInfo.mechanism`` of the Go wrapper's envelope blobs (read only)."""

# Error codes KMS gives for a ciphertext it cannot decrypt with this key and
# context: the caller's input is wrong, so they are one opaque DecryptionError.
_DECRYPTION_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
# Codes (and 5xx answers) that a later identical call may not get.
_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "RequestLimitExceeded",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "InternalFailure",
        "ServiceUnavailable",
    }
)
_STATE_CODES = frozenset({"DisabledException", "KMSInvalidStateException", "NotFoundException"})
_ACCESS_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)


def _import_boto3() -> tuple[Any, Any]:
    try:
        # boto3 ships no type information; everything from it is Any here.
        import boto3  # type: ignore[import-untyped]
        import botocore.exceptions  # type: ignore[import-untyped]
    except ImportError as exc:
        raise InvalidParameterError(
            "AwsKmsWrapper needs boto3; install it with: pip install 'kms-async[aws]'"
        ) from exc
    return boto3, botocore.exceptions


def _wrapper_error(message: str, *, retryable: bool = False) -> WrapperError:
    error = WrapperError(message)
    error.retryable = retryable
    return error


class AwsKmsWrapper(AsyncResource):
    """Wraps root keys with a symmetric AWS KMS key.

    ``key_id`` may be a key id, key ARN, alias name (``alias/...``) or alias
    ARN. The wrapper's :attr:`key_id` is the key ARN as KMS reports it once
    the first ``encrypt`` (or :meth:`resolve`) has run, and ``key_id`` as
    given until then. Pass a key ARN, or ``await resolve()`` first, when the
    wrapper goes into a :class:`~kms_async.PooledWrapper`, which routes blobs
    by the id it sees at construction.

    Without ``client``, a client is made on first use from a new boto3
    session (credentials and region from the usual AWS environment, files
    and instance roles), with ``region_name`` and ``endpoint_url`` if given.
    A caller's ``client`` is used as it is and never closed here.

    ``encryption_context`` is sent with every call and must be the same for
    decryption; AWS logs it with each request. Blobs written with a context
    cannot be decrypted by the Go wrapper, which sends none.
    """

    __slots__ = (
        "_botocore_errors",
        "_client",
        "_client_lock",
        "_closed",
        "_configured_id",
        "_context",
        "_current_id",
        "_endpoint_url",
        "_make_session",
        "_owns_client",
        "_region_name",
    )

    def __init__(
        self,
        key_id: str,
        *,
        client: Any = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(key_id, str) or not key_id.strip():
            raise InvalidParameterError(
                "AwsKmsWrapper needs key_id: a KMS key id, key ARN or alias ('alias/kms-root')"
            )
        if client is not None and (region_name is not None or endpoint_url is not None):
            raise InvalidParameterError(
                "pass either client= or region_name=/endpoint_url=, not both; configure the "
                "region and endpoint on your client"
            )
        for name, value in (("region_name", region_name), ("endpoint_url", endpoint_url)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameterError(f"{name} must be a non-empty string or None")
        context: dict[str, str] = {}
        if encryption_context is not None:
            if not isinstance(encryption_context, Mapping):
                raise InvalidParameterError("encryption_context must be a dict of str to str")
            for k, v in encryption_context.items():
                if not isinstance(k, str) or not isinstance(v, str) or not k:
                    raise InvalidParameterError(
                        "encryption_context must map non-empty strings to strings"
                    )
                context[k] = v
        boto3, errors = _import_boto3()
        self._make_session = boto3.session.Session
        self._botocore_errors = errors
        self._configured_id = key_id
        self._current_id = key_id
        self._client = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._region_name = region_name
        self._endpoint_url = endpoint_url
        self._context = context
        self._closed = False

    def __repr__(self) -> str:
        return f"AwsKmsWrapper(key_id={self._current_id!r})"

    @property
    def key_id(self) -> str:
        """The key ARN KMS last reported, or the configured id before any call."""
        return self._current_id

    @property
    def encryption_context(self) -> dict[str, str]:
        """A copy of the encryption context sent with every call."""
        return dict(self._context)

    # -- lifecycle ---------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client this wrapper made (a caller's stays open). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            close = getattr(client, "close", None)
            if close is not None:
                await anyio.to_thread.run_sync(close)

    # -- operations --------------------------------------------------------

    async def resolve(self) -> str:
        """Look the key up (``DescribeKey``), adopt its ARN as :attr:`key_id` and return it.

        A startup check that the key exists, is reachable and is enabled.

        Raises:
            WrapperError: KMS cannot be reached, refuses, or the key is not enabled.
        """
        response = await self._call("describe_key", KeyId=self._configured_id)
        metadata = response["KeyMetadata"]
        arn: str = metadata["Arn"]
        self._current_id = arn
        state = metadata.get("KeyState", "Enabled")
        if state != "Enabled":
            raise _wrapper_error(
                f"AWS KMS key {arn} is {state}; enable it (or cancel its deletion) before use"
            )
        return arn

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        """Encrypt ``plaintext`` (at most 4096 bytes) with the KMS ``Encrypt`` API.

        Raises:
            InvalidParameterError: ``aad`` was given (use ``encryption_context``).
            WrapperError: KMS cannot be reached or refused the call.
            ClosedError: the wrapper was closed.
        """
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise InvalidParameterError(f"plaintext must be bytes, not {type(plaintext).__name__}")
        self._refuse_aad(aad)
        response = await self._call(
            "encrypt", KeyId=self._configured_id, Plaintext=bytes(plaintext), **self._context_arg()
        )
        arn: str = response["KeyId"]
        self._current_id = arn
        return BlobInfo(bytes(response["CiphertextBlob"]), arn)

    async def decrypt(self, blob: BlobInfo, *, aad: bytes | None = None) -> bytes:
        """Decrypt a blob made by :meth:`encrypt` (or by the Go ``awskms`` wrapper).

        Raises:
            DecryptionError: KMS rejects the ciphertext (tampered, another
                key, another encryption context).
            InvalidParameterError: ``aad`` was given for a KMS ciphertext.
            WrapperError: KMS cannot be reached or refused the call.
            ClosedError: the wrapper was closed.
        """
        if not isinstance(blob, BlobInfo):
            raise InvalidParameterError(f"blob must be a BlobInfo, not {type(blob).__name__}")
        if aad is not None and not isinstance(aad, (bytes, bytearray, memoryview)):
            raise InvalidParameterError(f"aad must be bytes, not {type(aad).__name__}")
        if blob.mechanism == MECHANISM_ENCRYPT:
            self._refuse_aad(aad)
            return await self._kms_decrypt(blob.ciphertext, blob.key_id)
        if blob.mechanism == MECHANISM_ENVELOPE:
            # The Go wrapper's default: AES-256-GCM under a data key that KMS wraps.
            if len(blob.iv) != NONCE_SIZE or not blob.ciphertext:
                raise DecryptionError("ciphertext is not a valid AWS KMS envelope")
            data_key = await self._kms_decrypt(blob.wrapped_key, blob.key_id)
            if len(data_key) != 32:
                raise DecryptionError("ciphertext is not a valid AWS KMS envelope")
            try:
                return AESGCM(data_key).decrypt(blob.iv, blob.ciphertext, bytes(aad or b"") or None)
            except InvalidTag:
                raise DecryptionError(
                    "decryption failed: wrong key, wrong AAD or tampered ciphertext"
                ) from None
        raise DecryptionError(
            f"ciphertext names mechanism {blob.mechanism}, which is not an AWS KMS mechanism"
        )

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _refuse_aad(aad: bytes | None) -> None:
        if aad is not None and not isinstance(aad, (bytes, bytearray, memoryview)):
            raise InvalidParameterError(f"aad must be bytes, not {type(aad).__name__}")
        if aad:
            raise InvalidParameterError(
                "AwsKmsWrapper takes no aad; bind context with encryption_context= instead"
            )

    def _context_arg(self) -> dict[str, Any]:
        return {"EncryptionContext": dict(self._context)} if self._context else {}

    async def _kms_decrypt(self, ciphertext: bytes, blob_key_id: str) -> bytes:
        if not ciphertext:
            raise DecryptionError("ciphertext is empty")
        response = await self._call(
            "decrypt",
            CiphertextBlob=bytes(ciphertext),
            KeyId=blob_key_id or self._configured_id,
            **self._context_arg(),
        )
        return bytes(response["Plaintext"])

    async def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        if self._closed:
            raise ClosedError("this AwsKmsWrapper was closed; make a new one")
        return await anyio.to_thread.run_sync(self._call_sync, operation, kwargs)

    def _call_sync(self, operation: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """One KMS call, in a worker thread; boto3's exceptions are translated here."""
        client = self._get_client()
        try:
            result: dict[str, Any] = getattr(client, operation)(**kwargs)
        except Exception as exc:
            raise self._translate(operation, exc) from exc
        return result

    def _get_client(self) -> Any:
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._closed:
                raise ClosedError("this AwsKmsWrapper was closed; make a new one")
            if self._client is None:
                # A session per wrapper: boto3's default session is not thread-safe.
                session = self._make_session()
                try:
                    self._client = session.client(
                        "kms", region_name=self._region_name, endpoint_url=self._endpoint_url
                    )
                except self._botocore_errors.NoRegionError:
                    raise InvalidParameterError(
                        "AwsKmsWrapper has no AWS region; pass region_name= or set AWS_REGION"
                    ) from None
                except Exception as exc:
                    raise InvalidParameterError(
                        f"cannot make an AWS KMS client ({type(exc).__name__}: {exc}); check "
                        "region_name, endpoint_url and the AWS configuration files"
                    ) from exc
            return self._client

    def _translate(self, operation: str, exc: Exception) -> Exception:
        errors = self._botocore_errors
        action = {"encrypt": "wrap", "decrypt": "unwrap", "describe_key": "look up"}[operation]
        key = self._current_id
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            detail = str(error.get("Message", "")).rstrip(".")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            said = f"{code}: {detail}" if detail else code
            if code in _DECRYPTION_CODES and operation == "decrypt":
                return DecryptionError(
                    "AWS KMS could not decrypt: wrong key, wrong encryption context or tampered "
                    "ciphertext"
                )
            if code in _RETRYABLE_CODES or (isinstance(status, int) and status >= 500):
                return _wrapper_error(
                    f"AWS KMS is unavailable or throttling ({said}); retry later", retryable=True
                )
            if code in _STATE_CODES:
                return _wrapper_error(
                    f"AWS KMS key {key} cannot be used ({said}); enable the key or fix key_id"
                )
            if code in _ACCESS_CODES:
                return _wrapper_error(
                    f"AWS KMS refused to {action} with key {key} ({said}); check the credentials "
                    "and that the key policy allows this principal kms:Encrypt and kms:Decrypt"
                )
            return _wrapper_error(f"AWS KMS failed to {action} with key {key} ({said})")
        if isinstance(exc, (errors.ConnectionError, errors.HTTPClientError)) and not isinstance(
            exc, errors.SSLError
        ):
            return _wrapper_error(
                f"cannot reach AWS KMS ({type(exc).__name__}); check the network and "
                "endpoint_url, then retry",
                retryable=True,
            )
        credential_errors = (
            errors.NoCredentialsError,
            errors.PartialCredentialsError,
            errors.CredentialRetrievalError,
            errors.NoAuthTokenError,
            errors.TokenRetrievalError,
            errors.SSOError,
        )
        if isinstance(exc, credential_errors):
            return _wrapper_error(
                f"no usable AWS credentials ({type(exc).__name__}); configure them through the "
                "environment, ~/.aws or an instance role, or pass client="
            )
        if isinstance(exc, errors.BotoCoreError):
            return _wrapper_error(f"AWS KMS call failed ({type(exc).__name__}: {exc})")
        return _wrapper_error(
            f"AWS KMS call failed unexpectedly ({type(exc).__name__}); see the cause"
        )
