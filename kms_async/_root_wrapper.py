"""The root wrapper a deployment configures, from arguments or ``KMS_*`` environment variables.

One call for applications and the command line::

    async with kms_async.open_root_wrapper() as root:
        kms = await kms_async.KMS.open(dsn, purposes=["database"], root_wrapper=root)

The root key is one of: a local AES key (base64 in an environment variable,
or a file), an AWS KMS key, or an AES key in a PKCS#11 token. Arguments
choose first; with none, the environment does; with neither, the local key in
``KMS_ROOT_KEY``. While a local root key is being replaced, the previous one
joins in a :class:`~kms_async.PooledWrapper` so that both unwrap and the new
one wraps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from ._errors import InvalidParameterError
from ._wrappers import DEFAULT_KEY_ENV, AeadWrapper, PooledWrapper, Wrapper

if TYPE_CHECKING:
    from .pkcs11 import Pkcs11Wrapper

__all__ = [
    "AWS_KEY_ENV",
    "PKCS11_KEY_LABEL_ENV",
    "PKCS11_LIB_ENV",
    "PKCS11_PIN_ENV",
    "PKCS11_TOKEN_ENV",
    "PREVIOUS_KEY_ENV",
    "PREVIOUS_KEY_FILE_ENV",
    "PREVIOUS_KEY_ID_ENV",
    "ROOT_KEY_ENV",
    "ROOT_KEY_FILE_ENV",
    "ROOT_KEY_ID_ENV",
    "open_root_wrapper",
]

ROOT_KEY_ENV = DEFAULT_KEY_ENV
ROOT_KEY_FILE_ENV = "KMS_ROOT_KEY_FILE"
ROOT_KEY_ID_ENV = "KMS_ROOT_KEY_ID"
PREVIOUS_KEY_ENV = "KMS_PREVIOUS_ROOT_KEY"
PREVIOUS_KEY_FILE_ENV = "KMS_PREVIOUS_ROOT_KEY_FILE"
PREVIOUS_KEY_ID_ENV = "KMS_PREVIOUS_ROOT_KEY_ID"
AWS_KEY_ENV = "KMS_AWS_KMS_KEY_ID"
PKCS11_LIB_ENV = "KMS_PKCS11_LIB"
PKCS11_TOKEN_ENV = "KMS_PKCS11_TOKEN"
PKCS11_KEY_LABEL_ENV = "KMS_PKCS11_KEY_LABEL"
PKCS11_PIN_ENV = "KMS_PKCS11_PIN"


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _only_one(sources: Mapping[str, object]) -> str | None:
    """The one source given a value, or None; two or more are an error."""
    chosen = [name for name, value in sources.items() if value]
    if len(chosen) > 1:
        raise InvalidParameterError(f"{' and '.join(chosen)} both name a root key; keep only one")
    return chosen[0] if chosen else None


@contextlib.asynccontextmanager
async def open_root_wrapper(
    *,
    key_env: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    key_id: str | None = None,
    aws_kms_key_id: str | None = None,
    aws_region: str | None = None,
    aws_endpoint_url: str | None = None,
    pkcs11_lib: str | os.PathLike[str] | None = None,
    pkcs11_token: str | None = None,
    pkcs11_key_label: str | None = None,
    pkcs11_pin: str | None = None,
    previous_key_env: str | None = None,
    previous_key_file: str | os.PathLike[str] | None = None,
    previous_key_id: str | None = None,
) -> AsyncIterator[Wrapper]:
    """Open the root wrapper the arguments (else the environment) configure; close it on exit.

    An async context manager yielding the wrapper to pass to
    :meth:`KMS.open` as ``root_wrapper``; on exit it closes what it opened
    (an AWS client, an HSM session). Keep it open as long as the KMS.

    Give at most one root key source: ``key_env`` (the name of a variable
    holding the base64 of 32 bytes), ``key_file`` (a file holding the key,
    raw or base64), ``aws_kms_key_id`` (with ``aws_region`` and
    ``aws_endpoint_url``; credentials as boto3 finds them) or ``pkcs11_lib``.
    With none, the environment names one: ``KMS_ROOT_KEY_FILE``,
    ``KMS_AWS_KMS_KEY_ID`` or ``KMS_PKCS11_LIB``, else the key in
    ``KMS_ROOT_KEY``. ``key_id``, ``pkcs11_token``, ``pkcs11_key_label`` and
    ``pkcs11_pin`` default to ``KMS_ROOT_KEY_ID``, ``KMS_PKCS11_TOKEN``,
    ``KMS_PKCS11_KEY_LABEL`` and ``KMS_PKCS11_PIN``. A local key's id
    defaults to its fingerprint, as in :meth:`AeadWrapper.from_env`. A
    PKCS#11 token is logged in before the wrapper is yielded, so a wrong PIN
    or label fails here rather than at the first key operation.

    While a local root key is being replaced, give the previous one too:
    ``previous_key_env`` or ``previous_key_file`` (else the base64 key in
    ``KMS_PREVIOUS_ROOT_KEY``, or ``KMS_PREVIOUS_ROOT_KEY_FILE``), with
    ``previous_key_id`` (else ``KMS_PREVIOUS_ROOT_KEY_ID``) if it was made
    with an explicit id. The wrapper is then ``PooledWrapper(new, previous)``:
    both unwrap and the new one wraps, which is what ``rewrap_keys`` needs.

    Raises:
        InvalidParameterError: two sources are given, none is, or the one
            chosen is incomplete or unusable (an unset variable, an
            unreadable file, not a 32-byte key, a wrong PIN or label).
        WrapperError: the HSM failed.
    """
    previous = _previous_key(previous_key_env, previous_key_file, previous_key_id)
    sources = {
        "pkcs11_lib": pkcs11_lib,
        "aws_kms_key_id": aws_kms_key_id,
        "key_file": key_file,
        "key_env": key_env,
    }
    if _only_one(sources) is None:
        # No argument names a root key: the environment decides.
        pkcs11_lib, aws_kms_key_id = _env(PKCS11_LIB_ENV), _env(AWS_KEY_ENV)
        key_file = _env(ROOT_KEY_FILE_ENV)
        _only_one(
            {PKCS11_LIB_ENV: pkcs11_lib, AWS_KEY_ENV: aws_kms_key_id, ROOT_KEY_FILE_ENV: key_file}
        )
    key_id = key_id or _env(ROOT_KEY_ID_ENV)
    async with contextlib.AsyncExitStack() as stack:
        wrapper: Wrapper
        if pkcs11_lib:
            hsm = _pkcs11(pkcs11_lib, pkcs11_token, pkcs11_key_label, pkcs11_pin, key_id)
            stack.push_async_callback(hsm.aclose)
            await hsm.connect()
            wrapper = hsm
        elif aws_kms_key_id:
            from .aws import AwsKmsWrapper

            aws = AwsKmsWrapper(
                aws_kms_key_id,
                region_name=aws_region or None,
                endpoint_url=aws_endpoint_url or None,
            )
            stack.push_async_callback(aws.aclose)
            wrapper = aws
        elif key_file:
            wrapper = AeadWrapper.from_file(key_file, key_id=key_id)
        elif key_env or _env(ROOT_KEY_ENV):
            wrapper = AeadWrapper.from_env(key_env or ROOT_KEY_ENV, key_id=key_id)
        else:
            raise InvalidParameterError(
                f"no root key: set {ROOT_KEY_ENV} to the base64 of 32 random bytes, or name "
                f"another root key in {ROOT_KEY_FILE_ENV}, {AWS_KEY_ENV} or {PKCS11_LIB_ENV}"
            )
        yield wrapper if previous is None else PooledWrapper(wrapper, previous)


def _previous_key(
    name: str | None, path: str | os.PathLike[str] | None, key_id: str | None
) -> AeadWrapper | None:
    if not name and not path:
        name = PREVIOUS_KEY_ENV if _env(PREVIOUS_KEY_ENV) else None
        path = _env(PREVIOUS_KEY_FILE_ENV)
    if name and path:
        raise InvalidParameterError(
            "give the previous root key once: in an environment variable or in a file"
        )
    key_id = key_id or _env(PREVIOUS_KEY_ID_ENV)
    if path:
        return AeadWrapper.from_file(path, key_id=key_id)
    if name:
        return AeadWrapper.from_env(name, key_id=key_id)
    return None


def _pkcs11(
    lib: str | os.PathLike[str],
    token: str | None,
    label: str | None,
    pin: str | None,
    key_id: str | None,
) -> Pkcs11Wrapper:
    from .pkcs11 import Pkcs11Wrapper

    token = token or _env(PKCS11_TOKEN_ENV)
    label = label or _env(PKCS11_KEY_LABEL_ENV)
    pin = pin or os.environ.get(PKCS11_PIN_ENV, "")
    missing = [
        what
        for what, value in (
            (f"the token label (or {PKCS11_TOKEN_ENV})", token),
            (f"the key label (or {PKCS11_KEY_LABEL_ENV})", label),
            (f"the user PIN (or {PKCS11_PIN_ENV})", pin),
        )
        if not value
    ]
    if missing:
        raise InvalidParameterError(f"a PKCS#11 root key also needs {', '.join(missing)}")
    assert token and label
    return Pkcs11Wrapper(lib, token_label=token, pin=pin, key_label=label, key_id=key_id)
