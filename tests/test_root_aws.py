"""AWS KMS as the root of trust, against moto's real HTTP server on 127.0.0.1.

One moto server runs for the session in a background thread; every test
makes its own KMS key in it. The wrapper talks to it over HTTP exactly as it
would to AWS, so serialization, error responses and the worker threads are
all exercised.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_async import (
    KMS,
    BlobInfo,
    ClosedError,
    DecryptionError,
    InvalidParameterError,
    WrapperError,
)
from kms_async.aws import MECHANISM_ENVELOPE, AwsKmsWrapper

REGION = "us-east-1"
PURPOSES = ["database", "oidc"]
OpenKMS = Callable[..., Awaitable[KMS]]


# -- the moto server, shared with test_root_replace -------------------------


@functools.cache
def moto_endpoint() -> str:
    """Start moto's server once per process on a free loopback port; return its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # a daemon thread: it ends with the test process
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def set_aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, no region, and nothing that could reach beyond loopback."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)


def admin_client(endpoint: str) -> Any:
    return boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def create_kms_key(endpoint: str) -> dict[str, str]:
    """A new symmetric key; returns its KeyId and Arn."""
    metadata = admin_client(endpoint).create_key(
        KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT"
    )["KeyMetadata"]
    return {"KeyId": metadata["KeyId"], "Arn": metadata["Arn"]}


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> str:
    set_aws_test_env(monkeypatch)
    return moto_endpoint()


@pytest.fixture
def kms_key(endpoint: str) -> dict[str, str]:
    return create_kms_key(endpoint)


@pytest.fixture
async def make_wrapper(
    endpoint: str, kms_key: dict[str, str]
) -> AsyncIterator[Callable[..., AwsKmsWrapper]]:
    """Wrappers for ``kms_key`` on the moto server, closed after the test."""
    made: list[AwsKmsWrapper] = []

    def make(key_id: str | None = None, **kwargs: Any) -> AwsKmsWrapper:
        if "client" not in kwargs:
            kwargs.setdefault("region_name", REGION)
            kwargs.setdefault("endpoint_url", endpoint)
        wrapper = AwsKmsWrapper(key_id or kms_key["KeyId"], **kwargs)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        await wrapper.aclose()


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- the wrapper -------------------------------------------------------------


async def test_round_trip_reports_the_arn(
    make_wrapper: Callable[..., AwsKmsWrapper], kms_key: dict[str, str]
) -> None:
    wrapper = make_wrapper()
    assert wrapper.key_id == kms_key["KeyId"]  # before the first call: as configured
    key = secrets.token_bytes(32)
    blob = await wrapper.encrypt(key)
    assert wrapper.key_id == kms_key["Arn"]
    assert blob.key_id == kms_key["Arn"]
    assert blob.mechanism == 0 and not blob.iv and not blob.wrapped_key
    stored = BlobInfo.from_bytes(blob.to_bytes())
    assert await wrapper.decrypt(stored) == key
    # Another wrapper for the same key, which has not encrypted yet, decrypts too.
    assert await make_wrapper().decrypt(stored) == key
    assert key.hex() not in repr(wrapper) and repr(wrapper) == (
        f"AwsKmsWrapper(key_id={kms_key['Arn']!r})"
    )
    await wrapper.aclose()


async def test_alias_resolves_to_the_arn(
    endpoint: str, make_wrapper: Callable[..., AwsKmsWrapper], kms_key: dict[str, str]
) -> None:
    alias = f"alias/kms-root-{secrets.token_hex(4)}"
    admin_client(endpoint).create_alias(AliasName=alias, TargetKeyId=kms_key["KeyId"])
    wrapper = make_wrapper(alias)
    assert wrapper.key_id == alias
    assert await wrapper.resolve() == kms_key["Arn"]
    assert wrapper.key_id == kms_key["Arn"]
    blob = await make_wrapper(alias).encrypt(b"k" * 32)
    assert blob.key_id == kms_key["Arn"]
    assert await wrapper.decrypt(blob) == b"k" * 32


async def test_encryption_context_must_match(make_wrapper: Callable[..., AwsKmsWrapper]) -> None:
    context = {"service": "billing", "env": "test"}
    wrapper = make_wrapper(encryption_context=context)
    assert wrapper.encryption_context == context
    blob = await wrapper.encrypt(b"r" * 32)
    assert await make_wrapper(encryption_context=dict(context)).decrypt(blob) == b"r" * 32
    for other in ({"service": "billing", "env": "prod"}, None):
        with pytest.raises(DecryptionError) as info:
            await make_wrapper(encryption_context=other).decrypt(blob)
        assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)


@pytest.mark.parametrize("region", ["body", "tag", "last"])
async def test_tampered_ciphertext_blob(
    make_wrapper: Callable[..., AwsKmsWrapper], region: str
) -> None:
    # moto's blobs start with the key id in clear, where a change is a
    # different key (AccessDenied); these offsets hit its sealed part.
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"t" * 32)
    index = {"body": len(blob.ciphertext) // 2, "tag": -8, "last": -1}[region]
    tampered = BlobInfo(_flip(blob.ciphertext, index), blob.key_id)
    with pytest.raises(DecryptionError):
        await wrapper.decrypt(tampered)
    with pytest.raises(DecryptionError):
        await wrapper.decrypt(BlobInfo(b"", blob.key_id))


async def test_go_envelope_blobs_decrypt(
    endpoint: str, make_wrapper: Callable[..., AwsKmsWrapper], kms_key: dict[str, str]
) -> None:
    # What the Go awskms wrapper writes by default: AES-GCM under a data key wrapped by KMS.
    data_key, iv, root_key = secrets.token_bytes(32), secrets.token_bytes(12), b"g" * 32
    wrapped = admin_client(endpoint).encrypt(KeyId=kms_key["KeyId"], Plaintext=data_key)
    for aad in (None, b"bound"):
        blob = BlobInfo(
            AESGCM(data_key).encrypt(iv, root_key, aad),
            wrapped["KeyId"],
            iv=iv,
            wrapped_key=wrapped["CiphertextBlob"],
            mechanism=MECHANISM_ENVELOPE,
        )
        wrapper = make_wrapper()
        assert await wrapper.decrypt(BlobInfo.from_bytes(blob.to_bytes()), aad=aad) == root_key
        with pytest.raises(DecryptionError):
            await wrapper.decrypt(blob, aad=b"other")
        with pytest.raises(DecryptionError):
            await wrapper.decrypt(
                BlobInfo(
                    _flip(blob.ciphertext, 3),
                    blob.key_id,
                    iv=iv,
                    wrapped_key=blob.wrapped_key,
                    mechanism=MECHANISM_ENVELOPE,
                ),
                aad=aad,
            )
    with pytest.raises(DecryptionError, match="mechanism"):
        await make_wrapper().decrypt(BlobInfo(b"x" * 40, kms_key["Arn"], mechanism=7))


async def test_event_loop_runs_while_kms_answers(
    monkeypatch: pytest.MonkeyPatch, make_wrapper: Callable[..., AwsKmsWrapper]
) -> None:
    """The server holds every Encrypt until the event loop has ticked.

    If a wrapper call blocked the event loop, the ticker could not run while
    a request is held, and the server would give up waiting: then
    ``released`` records False.
    """
    from moto.kms.models import KmsBackend

    arrived = threading.Event()
    release = threading.Event()
    released: list[bool] = []
    original = KmsBackend.encrypt

    def held_encrypt(self: Any, *args: Any, **kwargs: Any) -> Any:
        arrived.set()
        released.append(release.wait(30))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KmsBackend, "encrypt", held_encrypt)
    wrapper = make_wrapper()
    ticks_while_held = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks_while_held
        while not done:
            if arrived.is_set():
                ticks_while_held += 1
                if ticks_while_held >= 20:
                    release.set()
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    try:
        blobs = await asyncio.gather(*(wrapper.encrypt(bytes([i]) * 32) for i in range(20)))
    finally:
        done = True
        await tick_task
    assert ticks_while_held >= 20
    assert len(released) == 20 and all(released)
    assert [await wrapper.decrypt(b) for b in blobs] == [bytes([i]) * 32 for i in range(20)]


# -- errors ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_endpoint_is_a_retryable_wrapper_error(
    endpoint: str, kms_key: dict[str, str]
) -> None:
    client = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=5),
    )
    wrapper = AwsKmsWrapper(kms_key["KeyId"], client=client)
    for call in (wrapper.encrypt(b"k" * 32), wrapper.decrypt(BlobInfo(b"c" * 64, kms_key["Arn"]))):
        with pytest.raises(WrapperError) as info:
            await call
        assert type(info.value) is WrapperError
        assert info.value.retryable
        assert isinstance(info.value.__cause__, botocore.exceptions.EndpointConnectionError)
        assert "endpoint_url" in str(info.value)
    # A caller's client is left open by aclose().
    await wrapper.aclose()
    with pytest.raises(ClosedError):
        await wrapper.encrypt(b"k" * 32)
    assert client.meta.endpoint_url.startswith("http://127.0.0.1:")


async def test_missing_credentials(
    monkeypatch: pytest.MonkeyPatch, make_wrapper: Callable[..., AwsKmsWrapper]
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(WrapperError, match="credentials") as info:
        await make_wrapper().encrypt(b"k" * 32)
    assert isinstance(info.value.__cause__, botocore.exceptions.NoCredentialsError)
    assert not info.value.retryable


async def test_missing_region(make_wrapper: Callable[..., AwsKmsWrapper]) -> None:
    with pytest.raises(InvalidParameterError, match="region_name"):
        await make_wrapper(region_name=None, endpoint_url=None).encrypt(b"k" * 32)


async def test_unknown_key(make_wrapper: Callable[..., AwsKmsWrapper]) -> None:
    wrapper = make_wrapper("alias/does-not-exist")
    with pytest.raises(WrapperError, match="NotFoundException") as info:
        await wrapper.encrypt(b"k" * 32)
    assert not info.value.retryable
    with pytest.raises(WrapperError, match="NotFoundException"):
        await wrapper.resolve()


@pytest.mark.parametrize(
    ("code", "status", "kind", "retryable"),
    [
        ("ThrottlingException", 400, WrapperError, True),
        ("KMSInternalException", 500, WrapperError, True),
        ("KeyUnavailableException", 500, WrapperError, True),
        ("SomethingNew", 503, WrapperError, True),
        ("DisabledException", 400, WrapperError, False),
        ("KMSInvalidStateException", 400, WrapperError, False),
        ("AccessDeniedException", 400, WrapperError, False),
        ("InvalidCiphertextException", 400, DecryptionError, False),
        ("IncorrectKeyException", 400, DecryptionError, False),
    ],
)
def test_client_error_mapping(
    kms_key: dict[str, str], code: str, status: int, kind: type[Exception], retryable: bool
) -> None:
    wrapper = AwsKmsWrapper(kms_key["Arn"], region_name=REGION)
    error = botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Decrypt",
    )
    mapped = wrapper._translate("decrypt", error)
    assert type(mapped) is kind
    assert getattr(mapped, "retryable", False) is retryable


def test_arguments_are_checked(kms_key: dict[str, str]) -> None:
    with pytest.raises(InvalidParameterError, match="key_id"):
        AwsKmsWrapper("")
    with pytest.raises(InvalidParameterError, match="not both"):
        AwsKmsWrapper("k", client=object(), region_name=REGION)
    with pytest.raises(InvalidParameterError, match="encryption_context"):
        AwsKmsWrapper("k", encryption_context={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidParameterError, match="encryption_context"):
        AwsKmsWrapper("k", encryption_context=[("a", "b")])  # type: ignore[arg-type]


async def test_aad_is_refused(make_wrapper: Callable[..., AwsKmsWrapper]) -> None:
    wrapper = make_wrapper()
    with pytest.raises(InvalidParameterError, match="encryption_context"):
        await wrapper.encrypt(b"k" * 32, aad=b"row")
    blob = await wrapper.encrypt(b"k" * 32, aad=b"")  # empty AAD is no AAD
    with pytest.raises(InvalidParameterError, match="encryption_context"):
        await wrapper.decrypt(blob, aad=b"row")
    with pytest.raises(InvalidParameterError):
        await wrapper.encrypt("text")  # type: ignore[arg-type]


async def test_closed_wrapper(make_wrapper: Callable[..., AwsKmsWrapper]) -> None:
    async with make_wrapper() as wrapper:
        blob = await wrapper.encrypt(b"k" * 32)
    with pytest.raises(ClosedError):
        await wrapper.decrypt(blob)
    await wrapper.aclose()  # idempotent


def test_missing_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(InvalidParameterError, match=r"pip install 'kms-async\[aws\]'") as info:
        AwsKmsWrapper("alias/kms-root")
    assert isinstance(info.value.__cause__, ImportError)


# -- as the root of a KMS ------------------------------------------------------


async def test_kms_lifecycle_with_aws_root(
    db: Any, open_kms: OpenKMS, make_wrapper: Callable[..., AwsKmsWrapper], kms_key: dict[str, str]
) -> None:
    kms = await open_kms(root_wrapper=make_wrapper())
    async with kms:
        await kms.create_keys("tenant-1")
        await kms.create_keys("tenant-2")
        first = await kms.encrypt("tenant-1", "database", b"before rotation", aad=b"row-1")
        await kms.rotate_keys("tenant-1", rewrap=True)
        second = await kms.encrypt("tenant-1", "database", b"after rotation", aad=b"row-2")
        other = await kms.encrypt("tenant-2", "oidc", b"tenant two")
        assert await kms.decrypt("tenant-1", "database", first, aad=b"row-1") == b"before rotation"

    # A fresh instance with a fresh wrapper unwraps every root key through KMS.
    kms = await open_kms(root_wrapper=make_wrapper())
    async with kms:
        assert await kms.decrypt("tenant-1", "database", first, aad=b"row-1") == b"before rotation"
        assert await kms.decrypt("tenant-1", "database", second, aad=b"row-2") == b"after rotation"
        assert await kms.decrypt("tenant-2", "oidc", other) == b"tenant two"
        await kms.rewrap_keys_many(["tenant-1", "tenant-2"])
        assert await kms.decrypt("tenant-2", "oidc", other) == b"tenant two"

    rows = await db.fetch("select key from kms_root_key_version")
    assert len(rows) == 3
    for (wrapped,) in rows:
        blob = BlobInfo.from_bytes(bytes(wrapped))
        assert blob.key_id == kms_key["Arn"]
        assert blob.mechanism == 0


@pytest.fixture
def enforce_key_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make moto refuse disabled keys as AWS does (moto 5 ignores the key state)."""
    from moto.core.exceptions import JsonRESTError
    from moto.kms.models import KmsBackend

    def refuse_unless_enabled(backend: Any, key_id: str) -> None:
        key = backend.describe_key(key_id)
        if key.key_state == "Disabled":
            raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
        if key.key_state != "Enabled":
            raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is {key.key_state}.")

    original_encrypt, original_decrypt = KmsBackend.encrypt, KmsBackend.decrypt

    def encrypt(self: Any, key_id: str, *args: Any, **kwargs: Any) -> Any:
        refuse_unless_enabled(self, key_id)
        return original_encrypt(self, key_id, *args, **kwargs)

    def decrypt(self: Any, *args: Any, **kwargs: Any) -> Any:
        plaintext, arn = original_decrypt(self, *args, **kwargs)
        refuse_unless_enabled(self, arn)
        return plaintext, arn

    monkeypatch.setattr(KmsBackend, "encrypt", encrypt)
    monkeypatch.setattr(KmsBackend, "decrypt", decrypt)


@pytest.mark.usefixtures("enforce_key_state")
async def test_disabled_key_fails_a_cold_load(
    endpoint: str,
    open_kms: OpenKMS,
    make_wrapper: Callable[..., AwsKmsWrapper],
    kms_key: dict[str, str],
) -> None:
    kms = await open_kms(root_wrapper=make_wrapper())
    async with kms:
        await kms.create_keys("tenant-1")
        ciphertext = await kms.encrypt("tenant-1", "database", b"data")

    admin_client(endpoint).disable_key(KeyId=kms_key["KeyId"])
    kms = await open_kms(root_wrapper=make_wrapper())
    async with kms:
        with pytest.raises(WrapperError) as info:
            await kms.decrypt("tenant-1", "database", ciphertext)
        cause = info.value.__cause__
        assert isinstance(cause, WrapperError) and "DisabledException" in str(cause)
        assert isinstance(cause.__cause__, botocore.exceptions.ClientError)
        with pytest.raises(WrapperError, match="Disabled"):
            await make_wrapper().resolve()

        admin_client(endpoint).enable_key(KeyId=kms_key["KeyId"])
        assert await kms.decrypt("tenant-1", "database", ciphertext) == b"data"


async def test_unreachable_endpoint_through_the_kms(
    db: Any, open_kms: OpenKMS, make_wrapper: Callable[..., AwsKmsWrapper]
) -> None:
    kms = await open_kms(root_wrapper=make_wrapper())
    async with kms:
        await kms.create_keys("tenant-1")
        ciphertext = await kms.encrypt("tenant-1", "database", b"data")
    client = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )
    kms = await open_kms(root_wrapper=AwsKmsWrapper(make_wrapper().key_id, client=client))
    async with kms:
        with pytest.raises(WrapperError) as info:
            await kms.decrypt("tenant-1", "database", ciphertext)
        assert isinstance(info.value.__cause__, WrapperError)
        assert isinstance(
            info.value.__cause__.__cause__, botocore.exceptions.EndpointConnectionError
        )
