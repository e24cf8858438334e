"""No key material in logs, reprs, error messages or the database.

One test drives the whole lifecycle on each database with every logger at
DEBUG, keeps every string the library (and the drivers below it) produced,
reads the actual key material back through ``get_wrapper(...).key_bytes()``
and the cache, and searches every string for every key in every common
encoding. Failures name the key and the encoding, never the key itself.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest

import kms_async
from kms_async import (
    KMS,
    ROOT_PURPOSE,
    AeadWrapper,
    BlobInfo,
    ClosedError,
    DecryptionError,
    InvalidParameterError,
    KeyExistsError,
    KeyInUseError,
    KeyNotFoundError,
    KMSError,
    PooledWrapper,
    SchemaVersionError,
    UnknownKeyVersionError,
    WrapperError,
)

OpenKMS = Callable[..., Awaitable[KMS]]

PURPOSES = ("database", "oidc")
PLAINTEXT = b"the application's plaintext: card 4111-1111-1111-1111"


def encodings(secret: bytes) -> dict[str, str]:
    """The text forms in which bytes usually leak, by name."""
    b64 = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    forms = {
        "raw (latin-1)": secret.decode("latin-1"),
        "hex": secret.hex(),
        "HEX": secret.hex().upper(),
        "base64": b64,
        "base64 unpadded": b64.rstrip("="),
        "urlsafe base64": url,
        "urlsafe base64 unpadded": url.rstrip("="),
        "bytes repr": repr(secret)[2:-1],
    }
    if len(secret) >= 32:
        # Half a key is a leak too.
        for name, half in (("first half", secret[:16]), ("second half", secret[16:])):
            forms[f"{name} hex"] = half.hex()
            forms[f"{name} HEX"] = half.hex().upper()
            forms[f"{name} bytes repr"] = repr(half)[2:-1]
            forms[f"{name} raw"] = half.decode("latin-1")
    return forms


class Secrets:
    """Key material by label. Never printed."""

    def __init__(self) -> None:
        self._by_label: dict[str, bytes] = {}

    def add(self, label: str, key: bytes) -> None:
        assert isinstance(key, bytes) and len(key) == 32, label
        self._by_label.setdefault(label, key)

    def __len__(self) -> int:
        return len(set(self._by_label.values()))

    def findings(self, texts: Iterable[tuple[str, str]]) -> list[str]:
        """(where, text) pairs in which some key appears: described without the key."""
        found = []
        texts = list(texts)
        for label, key in self._by_label.items():
            for form_name, form in encodings(key).items():
                for where, text in texts:
                    if form in text:
                        found.append(f"{label} as {form_name} in {where}")
        return found

    def in_bytes(self, blobs: Iterable[tuple[str, bytes]]) -> list[str]:
        found = []
        blobs = list(blobs)
        for label, key in self._by_label.items():
            for where, blob in blobs:
                if key in blob or key[:16] in blob or key[16:] in blob:
                    found.append(f"{label} (raw bytes) in {where}")
        return found


class Seen:
    """Every string the library produced: str and repr of results and of errors."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, obj: object) -> None:
        self.texts.append((f"str({where})", str(obj)))
        self.texts.append((f"repr({where})", repr(obj)))

    def error(self, where: str, exc: BaseException) -> None:
        self.texts.append((f"traceback({where})", "".join(traceback.format_exception(exc))))
        depth = 0
        current: BaseException | None = exc
        while current is not None and depth < 10:
            self.add(f"{where} error #{depth} {type(current).__name__}", current)
            self.add(f"{where} error #{depth} args", current.args)
            current = current.__cause__ or current.__context__
            depth += 1

    async def expect(
        self, where: str, error: type[BaseException], call: Awaitable[Any] | Callable[[], Any]
    ) -> BaseException:
        try:
            if callable(call):
                result = call()
                if asyncio.iscoroutine(result):
                    await result
            else:
                await call
        except error as exc:
            self.error(where, exc)
            return exc
        pytest.fail(f"{where}: expected {error.__name__}")


async def harvest(kms: KMS, scopes: Iterable[str], keys: Secrets, seen: Seen) -> None:
    """Read every unwrapped key version through get_wrapper, recording the wrappers' reprs."""
    for scope in scopes:
        for purpose in (*PURPOSES, ROOT_PURPOSE):
            pooled = await kms.get_wrapper(scope, purpose)
            assert isinstance(pooled, PooledWrapper)
            seen.add(f"get_wrapper({scope}, {purpose})", pooled)
            for key_id in pooled.key_ids():
                member = pooled.wrapper_for(key_id)
                assert isinstance(member, AeadWrapper)
                seen.add(f"member {key_id}", member)
                keys.add(f"{purpose} version {key_id} of {scope}", member.key_bytes())
                single = await kms.get_wrapper(scope, purpose, key_version_id=key_id)
                seen.add(f"get_wrapper(key_version_id={key_id})", single)
            blob = await pooled.encrypt(PLAINTEXT, aad=b"aad")
            seen.add(f"blob of {purpose} wrapper", blob)
            assert await pooled.decrypt(blob, aad=b"aad") == PLAINTEXT


def harvest_cache(kms: KMS, keys: Secrets, seen: Seen) -> None:
    """Every unwrapped key the cache holds; and the cache's own reprs."""
    cache = kms._cache
    seen.add("cache.entries", cache.entries)
    seen.add("cache.roots", cache.roots)
    seen.add("cache", cache)
    seen.add("vars(kms)", vars(kms))
    for (scope, purpose), entry in cache.entries.items():
        seen.add(f"PurposeKeys {scope}/{purpose}", entry)
        seen.add(f"newest of {scope}/{purpose}", entry.newest)
        for version in entry.versions:
            seen.add(f"VersionKey {version.id}", version)
            assert "key=" not in repr(version)
            if version.refused is None:
                keys.add(f"cached {purpose} version {version.id}", version.key)
    for version_id, version in cache.roots.items():
        seen.add(f"root VersionKey {version_id}", version)
        assert "key=" not in repr(version)
        keys.add(f"cached root version {version_id}", version.key)


async def database_dump(db: Any) -> tuple[list[tuple[str, str]], list[tuple[str, bytes]]]:
    texts: list[tuple[str, str]] = []
    blobs: list[tuple[str, bytes]] = []
    for table in (
        "kms_schema_version",
        "kms_collection_version",
        "kms_root_key",
        "kms_root_key_version",
        "kms_data_key",
        "kms_data_key_version",
        "app_secret",
    ):
        for n, row in enumerate(await db.fetch(f"select * from {table}")):
            for m, cell in enumerate(row):
                where = f"{table} row {n} column {m}"
                if isinstance(cell, (bytes, bytearray, memoryview)):
                    blobs.append((where, bytes(cell)))
                else:
                    texts.append((where, str(cell)))
    return texts, blobs


async def test_no_key_material_in_logs_reprs_errors_or_the_database(
    db: Any,
    open_kms: OpenKMS,
    root_wrapper: AeadWrapper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kms_async")
    keys = Secrets()
    seen = Seen()
    keys.add("root wrapper key", root_wrapper.key_bytes())
    seen.add("root wrapper", root_wrapper)

    seen.add("migrate again", await kms_async.migrate(db.dsn))
    seen.add("migrate other prefix", await kms_async.migrate(db.dsn, table_prefix="leak"))
    seen.add("migrations", kms_async.migrations(db.dialect))
    await db.add_app_table()

    kms = await open_kms()
    other = await open_kms()
    seen.add("kms", kms)
    seen.add("external root wrapper", kms.get_external_root_wrapper())

    # -- keys for several scopes, every way they can be made ----------------------
    await kms.create_keys("s1")
    await kms.create_keys_many(["s2", "s3"])
    seen.add("reconcile", await kms.reconcile_keys(["s3", "s4"]))
    seen.add("reconcile again", await kms.reconcile_keys(["s4"]))
    scopes = ["s1", "s2", "s3", "s4"]
    stored: dict[str, bytes] = {}
    for scope in scopes:
        stored[scope] = await kms.encrypt(scope, "database", PLAINTEXT, aad=scope.encode())
        seen.add(f"envelope of {scope}", BlobInfo.from_bytes(stored[scope]))
        assert await kms.decrypt(scope, "database", stored[scope], aad=scope.encode()) == PLAINTEXT
    await harvest(kms, scopes, keys, seen)

    # -- rotation, rewrap, another instance's changes -----------------------------
    first_s1 = BlobInfo.from_bytes(stored["s1"]).key_id
    await db.execute(
        "insert into app_secret (id, scope_id, key_version_id, ciphertext) values ($1, $2, $3, $4)",
        "row-1",
        "s1",
        first_s1,
        stored["s1"],
    )
    await kms.rotate_keys("s1")
    await kms.rotate_keys("s2", rewrap=True)
    await kms.rewrap_keys("s3")
    await kms.rewrap_keys_many(["s1", "s2"])
    await kms.rotate_keys_many(["s3", "s4"], rewrap=True)
    await other.rotate_keys("s4")
    await kms.refresh()
    for scope in scopes:
        await kms.encrypt(scope, "oidc", PLAINTEXT)
    await harvest(kms, scopes, keys, seen)
    for scope in scopes:
        for key in await kms.list_keys(scope):
            seen.add(f"Key {key.id}", key)
            for version in key.versions:
                seen.add(f"KeyVersion {version.id}", version)
    seen.add("referencers", await kms.list_data_key_version_referencers())
    harvest_cache(kms, keys, seen)

    # -- revocation, allowed and refused ------------------------------------------
    s2_keys = {k.purpose: k for k in await kms.list_keys("s2")}
    old_s2 = s2_keys["database"].versions[0].id
    await kms.revoke_key_version(old_s2, scope_id="s2")
    await seen.expect(
        "decrypt under a revoked version",
        UnknownKeyVersionError,
        kms.decrypt("s2", "database", stored["s2"], aad=b"s2"),
    )
    await seen.expect(
        "revoke the newest version",
        KeyInUseError,
        kms.revoke_key_version(s2_keys["database"].versions[-1].id),
    )
    await seen.expect(
        "revoke a version application rows use", KeyInUseError, kms.revoke_key_version(first_s1)
    )
    await kms.rotate_keys("s3")  # s3's data keys now span two root key versions
    s3_root = {k.purpose: k for k in await kms.list_keys("s3")}[ROOT_PURPOSE]
    await seen.expect(
        "revoke a root version that still wraps data keys",
        KeyInUseError,
        kms.revoke_key_version(s3_root.versions[-2].id),
    )
    await seen.expect(
        "revoke in another scope",
        KeyNotFoundError,
        kms.revoke_key_version(s3_root.versions[0].id, scope_id="s1"),
    )

    # -- decryption failures -------------------------------------------------------
    await seen.expect(
        "wrong aad", DecryptionError, kms.decrypt("s1", "database", stored["s1"], aad=b"wrong")
    )
    await seen.expect("no aad", DecryptionError, kms.decrypt("s1", "database", stored["s1"]))
    for position in (5, len(stored["s1"]) // 2, len(stored["s1"]) - 25, len(stored["s1"]) - 1):
        tampered = bytearray(stored["s1"])
        tampered[position] ^= 0x01
        await seen.expect(
            f"tampered at {position}",
            DecryptionError,
            kms.decrypt("s1", "database", bytes(tampered), aad=b"s1"),
        )
    await seen.expect(
        "truncated", DecryptionError, kms.decrypt("s1", "database", stored["s1"][:30])
    )
    await seen.expect(
        "another scope's ciphertext",
        UnknownKeyVersionError,
        kms.decrypt("s3", "database", stored["s1"], aad=b"s1"),
    )
    await seen.expect("not bytes", KMSError, kms.decrypt("s1", "database", "text"))  # type: ignore[arg-type]
    tampered = bytearray(stored["s1"])
    tampered[len(tampered) // 2] ^= 0x01
    await seen.expect(
        "tampered batch item",
        DecryptionError,
        kms.decrypt_many("s1", "database", [stored["s1"], bytes(tampered)], aad=[b"s1", b"s1"]),
    )
    await seen.expect(
        "wrong batch aad",
        DecryptionError,
        kms.decrypt_many("s1", "database", [stored["s1"]], aad=[b"s2"]),
    )
    await seen.expect(
        "bad batch plaintext",
        InvalidParameterError,
        kms.encrypt_many("s1", "database", [b"x", "y"]),  # type: ignore[list-item]
    )

    # -- argument and state errors -------------------------------------------------
    await seen.expect("create twice", KeyExistsError, kms.create_keys("s1"))
    await seen.expect("unknown scope", KeyNotFoundError, kms.list_keys("nobody"))
    await seen.expect(
        "unknown scope encrypt", KeyNotFoundError, kms.encrypt("nobody", "database", b"")
    )
    await seen.expect("unknown purpose", InvalidParameterError, kms.encrypt("s1", "nope", b""))
    await seen.expect(
        "unknown version",
        KeyNotFoundError,
        kms.get_wrapper("s1", "database", key_version_id="kdkv_AAAAAAAAAA"),
    )
    await seen.expect("bad plaintext", InvalidParameterError, kms.encrypt("s1", "database", "x"))  # type: ignore[arg-type]
    await seen.expect(
        "bad wrapper",
        InvalidParameterError,
        lambda: kms.add_external_wrapper("rootKey", "x"),  # type: ignore[arg-type]
    )
    await seen.expect(
        "short AeadWrapper key", InvalidParameterError, lambda: AeadWrapper(b"k" * 16, key_id="k")
    )

    # -- the wrong or a missing root of trust --------------------------------------
    impostor = AeadWrapper(secrets.token_bytes(32), key_id=root_wrapper.key_id)
    keys.add("impostor root wrapper key", impostor.key_bytes())
    async with await open_kms(root_wrapper=impostor) as wrong:
        await seen.expect(
            "wrong root wrapper", WrapperError, wrong.decrypt("s1", "database", stored["s1"])
        )
        await seen.expect("wrong root wrapper rewrap", WrapperError, wrong.rewrap_keys("s1"))
    async with await open_kms(root_wrapper=None) as rootless:
        await seen.expect("no root wrapper", KeyNotFoundError, rootless.create_keys("s9"))
    await seen.expect(
        "no such tables",
        SchemaVersionError,
        open_kms(table_prefix="nothere"),
    )

    # -- tampered key tables, seen by a KMS with a background check ----------------
    watcher = await open_kms(max_staleness=0.1)
    try:
        await watcher.encrypt("s4", "database", b"cache s4")
        harvest_cache(watcher, keys, seen)
        s4 = {k.purpose: k for k in await kms.list_keys("s4")}
        s1_rows = await db.fetch(
            "select key from kms_data_key_version where private_id = $1", first_s1
        )
        await db.execute(
            "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
            " values ($1, $2, $3, $4)",
            "kdkv_Tampered01",
            s4["database"].id,
            s4[ROOT_PURPOSE].versions[-1].id,
            bytes(s1_rows[0][0]),
        )
        await db.execute("update kms_collection_version set version = version + 1")
        for _ in range(200):  # until the background check has reported the broken row
            if any("cannot be unwrapped" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.025)
        assert any("cannot be unwrapped" in r.getMessage() for r in caplog.records)
        # The reload keeps the pair's other versions and refuses the broken one.
        kms._cache.clear()
        assert await kms.decrypt("s4", "database", stored["s4"], aad=b"s4") == PLAINTEXT
        await seen.expect("tampered load", DecryptionError, kms.encrypt("s4", "database", b"x"))
        await seen.expect("tampered rewrap", DecryptionError, kms.rewrap_keys("s4"))
    finally:
        await watcher.aclose()

    # -- closing -------------------------------------------------------------------
    harvest_cache(kms, keys, seen)
    await other.aclose()
    await kms.aclose()
    seen.add("closed kms", kms)
    seen.add("cache after close", kms._cache.entries)
    assert not kms._cache.entries and not kms._cache.roots
    await seen.expect("closed encrypt", ClosedError, kms.encrypt("s1", "database", b""))
    await seen.expect("closed decrypt", ClosedError, kms.decrypt("s1", "database", stored["s1"]))
    await seen.expect(
        "closed decrypt_many", ClosedError, kms.decrypt_many("s1", "database", [stored["s1"]])
    )
    await seen.expect("closed get_wrapper", ClosedError, kms.get_wrapper("s1", "database"))
    await seen.expect("closed rotate", ClosedError, kms.rotate_keys("s1"))

    # -- the search ------------------------------------------------------------------
    # 4 scopes x (root + 2 purposes), rotated at least once each, plus the two root wrappers.
    assert len(keys) >= 4 * 3 * 2 + 2
    logged: list[tuple[str, str]] = [("caplog.text", caplog.text)]
    for n, record in enumerate(caplog.records):
        logged.append((f"log record {n} ({record.name})", record.getMessage()))
        logged.append((f"log record {n} args", repr(record.args)))
        if record.exc_info and record.exc_info[1] is not None:
            seen.error(f"log record {n} exception", record.exc_info[1])
    assert any(r.name == "kms_async" for r in caplog.records)
    texts = seen.texts + logged
    # The search itself works: a key placed in a text is found.
    planted = Secrets()
    planted.add("planted", secrets.token_bytes(32))
    planted_key = planted._by_label["planted"]
    for form in encodings(planted_key).values():
        assert planted.findings([("planted", f"x{form}y")]) != []
    assert keys.findings(texts) == []
    assert [("plaintext", where) for where, text in texts if PLAINTEXT.decode() in text] == []

    db_texts, db_blobs = await database_dump(db)
    assert db_blobs  # the wrapped keys and the application's ciphertexts
    assert keys.findings(db_texts) == []
    assert keys.in_bytes(db_blobs) == []
    assert [where for where, blob in db_blobs if PLAINTEXT in blob] == []


async def test_wrapper_and_cache_reprs_show_ids_only(kms: KMS) -> None:
    await kms.create_keys("s")
    await kms.encrypt("s", "database", b"x")
    entry = kms._cache.entries[("s", "database")]
    version = entry.newest
    assert repr(version).startswith("VersionKey(id=") and "key=" not in repr(version)
    assert repr(entry) == f"PurposeKeys(versions={[version.id]!r})"
    pooled = await kms.get_wrapper("s", "database")
    assert repr(pooled) == f"PooledWrapper(primary={version.id!r}, key_ids={[version.id]!r})"
    member = pooled.wrapper_for(version.id)  # type: ignore[attr-defined]
    assert repr(member) == f"AeadWrapper(key_id={version.id!r})"
    assert not hasattr(member, "__dict__")  # slotted: no attribute dict to dump
