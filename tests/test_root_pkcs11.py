"""A PKCS#11 HSM as the root of trust, against a real SoftHSM2 token.

A private SoftHSM2 configuration (``SOFTHSM2_CONF``) in a temporary directory
holds one token with two AES-256 keys that are sensitive and never
extractable. SoftHSM2 reads that variable once, when the module is first
initialised, so the token is made once per process and shared with
test_root_replace. Without SoftHSM2 the tests skip locally; under CI (``CI``
set) they fail instead.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import kms_async.pkcs11 as kms_pkcs11
from kms_async import (
    KMS,
    BlobInfo,
    ClosedError,
    DecryptionError,
    InvalidParameterError,
    WrapperError,
)
from kms_async.pkcs11 import CKM_AES_GCM, Pkcs11Wrapper

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
PURPOSES = ["database", "oidc"]
OpenKMS = Callable[..., Awaitable[KMS]]


@dataclasses.dataclass(frozen=True)
class SoftHsm:
    lib_path: str
    token_label: str
    pin: str
    key_labels: tuple[str, str]

    def wrapper(self, **overrides: Any) -> Pkcs11Wrapper:
        kwargs: dict[str, Any] = {
            "token_label": self.token_label,
            "pin": self.pin,
            "key_label": self.key_labels[0],
        }
        kwargs.update(overrides)
        return Pkcs11Wrapper(kwargs.pop("lib_path", self.lib_path), **kwargs)


def softhsm_missing() -> str | None:
    if not os.path.exists(SOFTHSM_LIB):
        return f"SoftHSM2 is not installed ({SOFTHSM_LIB} is missing); apt-get install softhsm2"
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is not on PATH; apt-get install softhsm2"
    return None


@functools.cache
def softhsm() -> SoftHsm:
    """Make the token once per process: SoftHSM2 reads its config only at initialisation."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    home = tempfile.mkdtemp(prefix="kms-softhsm-")
    atexit.register(shutil.rmtree, home, True)
    os.mkdir(os.path.join(home, "tokens"))
    conf = os.path.join(home, "softhsm2.conf")
    with open(conf, "w") as file:
        file.write(
            f"directories.tokendir = {home}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
    os.environ["SOFTHSM2_CONF"] = conf
    hsm = SoftHsm(SOFTHSM_LIB, "kms-test", "5678", ("kms-root", "kms-root-2"))
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", hsm.token_label),
            *("--so-pin", "1234", "--pin", hsm.pin),
        ],
        check=True,
        capture_output=True,
    )
    token = pkcs11.lib(SOFTHSM_LIB).get_token(token_label=hsm.token_label)
    with token.open(rw=True, user_pin=hsm.pin) as session:
        for label in hsm.key_labels:
            session.generate_key(
                KeyType.AES,
                256,
                label=label,
                store=True,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
    return hsm


def require_softhsm() -> SoftHsm:
    missing = softhsm_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must run the PKCS#11 tests")
        pytest.skip(missing)
    return softhsm()


@pytest.fixture
def hsm() -> SoftHsm:
    return require_softhsm()


@pytest.fixture
async def make_wrapper(hsm: SoftHsm) -> AsyncIterator[Callable[..., Pkcs11Wrapper]]:
    """Wrappers on the test token, all closed after the test."""
    made: list[Pkcs11Wrapper] = []

    def make(**overrides: Any) -> Pkcs11Wrapper:
        wrapper = hsm.wrapper(**overrides)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        await wrapper.aclose()
    assert not kms_pkcs11._TOKENS, "a wrapper kept the token session open"


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- the wrapper -------------------------------------------------------------


async def test_round_trip(make_wrapper: Callable[..., Pkcs11Wrapper], hsm: SoftHsm) -> None:
    wrapper = make_wrapper()
    assert wrapper.key_id == "pkcs11:token=kms-test;object=kms-root"
    assert repr(wrapper) == "Pkcs11Wrapper(key_id='pkcs11:token=kms-test;object=kms-root')"
    assert hsm.pin not in repr(wrapper)
    key = secrets.token_bytes(32)
    blob = await wrapper.encrypt(key)
    assert blob.key_id == wrapper.key_id
    assert blob.mechanism == CKM_AES_GCM
    assert len(blob.ciphertext) == 12 + 32 + 16 and not blob.iv
    stored = BlobInfo.from_bytes(blob.to_bytes())
    assert stored == blob
    assert await wrapper.decrypt(stored) == key
    # Another wrapper for the same key shares the token's session and decrypts.
    assert await make_wrapper().decrypt(stored) == key
    # Each call draws a fresh IV.
    assert (await wrapper.encrypt(key)).ciphertext[:12] != blob.ciphertext[:12]


async def test_aad_is_bound(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"k" * 32, aad=b"row-7")
    assert await wrapper.decrypt(blob, aad=b"row-7") == b"k" * 32
    for wrong in (None, b"row-8"):
        with pytest.raises(DecryptionError):
            await wrapper.decrypt(blob, aad=wrong)
    # aad=None and aad=b"" are the same.
    plain = await wrapper.encrypt(b"k" * 32, aad=b"")
    assert await wrapper.decrypt(plain) == b"k" * 32


async def test_separate_iv_layout_decrypts(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    # The OpenBao pkcs11 wrapper keeps the IV in BlobInfo.iv and sets no key info.
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"o" * 32)
    split = BlobInfo(blob.ciphertext[12:], iv=blob.ciphertext[:12])
    assert await wrapper.decrypt(BlobInfo.from_bytes(split.to_bytes())) == b"o" * 32


@pytest.mark.parametrize("region", ["iv", "body", "tag"])
async def test_tampering_is_a_decryption_error(
    make_wrapper: Callable[..., Pkcs11Wrapper], region: str
) -> None:
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"t" * 32)
    index = {"iv": 3, "body": 20, "tag": -1}[region]
    with pytest.raises(DecryptionError):
        await wrapper.decrypt(BlobInfo(_flip(blob.ciphertext, index), blob.key_id))
    # The wrapper stays usable.
    assert await wrapper.decrypt(blob) == b"t" * 32


async def test_malformed_blobs(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"m" * 32)
    for bad in (
        BlobInfo(blob.ciphertext[:27], blob.key_id),
        BlobInfo(blob.ciphertext, blob.key_id, mechanism=0x1081),
        BlobInfo(blob.ciphertext[12:], iv=b"short"),
    ):
        with pytest.raises(DecryptionError):
            await wrapper.decrypt(bad)
    with pytest.raises(InvalidParameterError):
        await wrapper.decrypt(blob.ciphertext)  # type: ignore[arg-type]


async def test_other_key_cannot_decrypt(
    make_wrapper: Callable[..., Pkcs11Wrapper], hsm: SoftHsm
) -> None:
    first, second = make_wrapper(), make_wrapper(key_label=hsm.key_labels[1])
    assert first.key_id != second.key_id
    blob = await first.encrypt(b"s" * 32)
    with pytest.raises(DecryptionError):
        await second.decrypt(blob)


async def test_key_stays_in_the_token(
    make_wrapper: Callable[..., Pkcs11Wrapper], hsm: SoftHsm
) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    async with make_wrapper() as wrapper:
        blob = await wrapper.encrypt(b"x" * 32)
        assert await wrapper.decrypt(blob) == b"x" * 32
        # The wrapper's login is the process's: a session without a PIN sees the key.
        token = pkcs11.lib(hsm.lib_path).get_token(token_label=hsm.token_label)
        with token.open() as session:
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=hsm.key_labels[0])
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[Attribute.VALUE]


async def test_many_tasks_share_the_token(
    make_wrapper: Callable[..., Pkcs11Wrapper], hsm: SoftHsm
) -> None:
    wrappers = [make_wrapper(), make_wrapper(key_label=hsm.key_labels[1]), make_wrapper()]

    async def round_trip(i: int) -> bytes:
        wrapper = wrappers[i % len(wrappers)]
        plaintext = i.to_bytes(4, "big") * 8
        blob = await wrapper.encrypt(plaintext, aad=str(i).encode())
        return await wrapper.decrypt(blob, aad=str(i).encode())

    results = await asyncio.gather(*(round_trip(i) for i in range(60)))
    assert results == [i.to_bytes(4, "big") * 8 for i in range(60)]


async def test_reconnects_after_the_session_is_lost(
    make_wrapper: Callable[..., Pkcs11Wrapper], hsm: SoftHsm
) -> None:
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"r" * 32)
    # Simulate the HSM dropping the session (restart, network HSM failover).
    shared = kms_pkcs11._TOKENS[(hsm.lib_path, hsm.token_label)]
    shared.session.close()
    assert await wrapper.decrypt(blob) == b"r" * 32
    assert await make_wrapper().decrypt(await wrapper.encrypt(b"s" * 32)) == b"s" * 32


# -- configuration errors ------------------------------------------------------


async def test_wrong_pin(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    import pkcs11

    # Nobody logged in: the token itself rejects the PIN.
    with pytest.raises(InvalidParameterError, match="wrong PIN") as info:
        await make_wrapper(pin="0000").connect()
    assert isinstance(info.value.__cause__, pkcs11.exceptions.PinIncorrect)
    assert "0000" not in str(info.value)
    # While another wrapper is logged in, the PIN is still checked.
    async with make_wrapper():
        with pytest.raises(InvalidParameterError, match="wrong PIN"):
            await make_wrapper(pin="0000").encrypt(b"k" * 32)


async def test_missing_key_label(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    with pytest.raises(InvalidParameterError, match="no AES key labelled 'absent'"):
        await make_wrapper(key_label="absent").encrypt(b"k" * 32)
    # Also when another wrapper already holds the session.
    async with make_wrapper():
        with pytest.raises(InvalidParameterError, match="fix key_label"):
            await make_wrapper(key_label="absent").connect()


async def test_missing_token(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    with pytest.raises(InvalidParameterError, match="no PKCS#11 token labelled 'nope'"):
        async with make_wrapper(token_label="nope"):
            pass


async def test_bad_module_path(make_wrapper: Callable[..., Pkcs11Wrapper], tmp_path: Any) -> None:
    with pytest.raises(InvalidParameterError, match="fix lib_path"):
        await make_wrapper(lib_path=str(tmp_path / "missing.so")).connect()


async def test_closed_wrapper(make_wrapper: Callable[..., Pkcs11Wrapper]) -> None:
    wrapper = make_wrapper()
    blob = await wrapper.encrypt(b"c" * 32)
    await wrapper.aclose()
    await wrapper.aclose()
    wrapper.close()
    for call in (wrapper.encrypt(b"c" * 32), wrapper.decrypt(blob), wrapper.connect()):
        with pytest.raises(ClosedError):
            await call
    assert not kms_pkcs11._TOKENS


def test_arguments_are_checked() -> None:
    good: dict[str, Any] = {"token_label": "t", "pin": "1", "key_label": "k"}
    for name in good:
        with pytest.raises(InvalidParameterError, match="(?i)" + name.split("_")[0]):
            Pkcs11Wrapper(SOFTHSM_LIB, **{**good, name: ""})
    with pytest.raises(InvalidParameterError, match="lib_path"):
        Pkcs11Wrapper("", **good)
    with pytest.raises(InvalidParameterError, match="key_id"):
        Pkcs11Wrapper(SOFTHSM_LIB, **good, key_id="")
    assert Pkcs11Wrapper(SOFTHSM_LIB, **good, key_id="hsm-root-1").key_id == "hsm-root-1"
    assert (
        Pkcs11Wrapper(SOFTHSM_LIB, token_label="a;b", pin="1", key_label="k/1").key_id
        == "pkcs11:token=a%3Bb;object=k%2F1"
    )


def test_missing_python_pkcs11_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    with pytest.raises(InvalidParameterError, match=r"pip install 'kms-async\[pkcs11\]'"):
        Pkcs11Wrapper(SOFTHSM_LIB, token_label="t", pin="1", key_label="k")


async def test_token_errors_are_wrapper_errors(
    make_wrapper: Callable[..., Pkcs11Wrapper], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pkcs11

    wrapper = make_wrapper()
    await wrapper.connect()

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise pkcs11.exceptions.DeviceError()

    monkeypatch.setattr(type(wrapper._key), "encrypt", broken)
    with pytest.raises(WrapperError, match="DeviceError") as info:
        await wrapper.encrypt(b"k" * 32)
    assert isinstance(info.value.__cause__, pkcs11.exceptions.DeviceError)


# -- as the root of a KMS ------------------------------------------------------


async def test_kms_lifecycle_with_hsm_root(
    db: Any, open_kms: OpenKMS, make_wrapper: Callable[..., Pkcs11Wrapper]
) -> None:
    root = make_wrapper()
    kms = await open_kms(root_wrapper=root)
    async with kms:
        await kms.create_keys("tenant-1")
        await kms.create_keys("tenant-2")
        first = await kms.encrypt("tenant-1", "database", b"before rotation", aad=b"row-1")
        await kms.rotate_keys("tenant-1", rewrap=True)
        second = await kms.encrypt("tenant-1", "database", b"after rotation", aad=b"row-2")
        other = await kms.encrypt("tenant-2", "oidc", b"tenant two")
    await root.aclose()

    async with make_wrapper() as fresh:
        kms = await open_kms(root_wrapper=fresh)
        async with kms:
            assert await kms.decrypt("tenant-1", "database", first, aad=b"row-1") == (
                b"before rotation"
            )
            assert await kms.decrypt("tenant-1", "database", second, aad=b"row-2") == (
                b"after rotation"
            )
            assert await kms.decrypt("tenant-2", "oidc", other) == b"tenant two"
            await kms.rewrap_keys_many(["tenant-1", "tenant-2"])

    rows = await db.fetch("select key from kms_root_key_version")
    assert len(rows) == 3
    for (wrapped,) in rows:
        blob = BlobInfo.from_bytes(bytes(wrapped))
        assert blob.key_id == root.key_id and blob.mechanism == CKM_AES_GCM
