"""examples/fastapi_app.py driven over HTTP (ASGI, lifespan included) on both databases."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import pathlib
import secrets
import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import httpx
import pytest
from conftest import TestDB

import kms_async


def _load_example(name: str) -> ModuleType:
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


example = _load_example("fastapi_app")


@contextlib.asynccontextmanager
async def serve(db: TestDB) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan running, and a client that calls it in-process."""
    app = example.create_app(db.dsn, secrets.token_bytes(32))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client,
    ):
        yield app, client


class FailingWrapper:
    """A root key service that is down."""

    key_id = "root-1"

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> kms_async.BlobInfo:
        raise kms_async.WrapperError("the root key service is unavailable")

    async def decrypt(self, blob: kms_async.BlobInfo, *, aad: bytes | None = None) -> bytes:
        raise kms_async.WrapperError("the root key service is unavailable")


async def _counts(db: TestDB) -> tuple[int, int, int]:
    return (
        await db.fetchval("select count(*) from tenant"),
        await db.fetchval("select count(*) from kms_root_key"),
        await db.fetchval("select count(*) from kms_data_key_version"),
    )


async def test_create_tenant_creates_its_keys(db: TestDB) -> None:
    async with serve(db) as (_, client):
        response = await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        assert response.status_code == 201, response.text
        assert response.json() == {"id": "acme", "name": "Acme"}

        keys = (await client.get("/tenants/acme/keys")).json()
        assert [(k["type"], k["purpose"], len(k["versions"])) for k in keys] == [
            ("kek", "rootKey", 1),
            ("dek", "database", 1),
        ]
        # ids and versions only
        assert set(keys[0]) == {"id", "type", "purpose", "versions"}
        assert set(keys[0]["versions"][0]) == {"id", "version", "create_time"}
    assert await db.fetchval("select scope_id from kms_root_key") == "acme"


async def test_duplicate_tenant_is_409_and_writes_nothing(db: TestDB) -> None:
    async with serve(db) as (_, client):
        assert (
            await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        ).status_code == 201
        before = await _counts(db)
        response = await client.post("/tenants", json={"id": "acme", "name": "Other"})
        assert response.status_code == 409
        assert await _counts(db) == before == (1, 1, 1)
        assert await db.fetchval("select name from tenant") == "Acme"


async def test_tenant_row_rolls_back_when_its_keys_cannot_be_made(db: TestDB) -> None:
    async with serve(db) as (app, client):
        # Passes the HTTP model, then create_keys refuses a blank scope id.
        response = await client.post("/tenants", json={"id": " ", "name": "blank"})
        assert response.status_code == 400
        assert "scope id" in response.json()["detail"]
        assert await _counts(db) == (0, 0, 0)

        kms: kms_async.KMS = app.state.kms
        working = kms.get_external_root_wrapper()
        kms.add_external_wrapper("rootKey", FailingWrapper())
        response = await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        assert response.status_code == 502
        assert response.json() == {"detail": "key service error"}
        assert await _counts(db) == (0, 0, 0)

        kms.add_external_wrapper("rootKey", working)
        assert (
            await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        ).status_code == 201
        assert await _counts(db) == (1, 1, 1)


async def test_secrets_are_stored_encrypted_and_read_back(db: TestDB) -> None:
    async with serve(db) as (_, client):
        await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        put = await client.put("/tenants/acme/secrets/api-token", json={"value": "s3cr3t"})
        assert put.status_code == 200, put.text
        version_id = put.json()["key_version_id"]
        assert version_id.startswith("kdkv_")

        got = await client.get("/tenants/acme/secrets/api-token")
        assert got.json() == {
            "tenant": "acme",
            "name": "api-token",
            "value": "s3cr3t",
            "key_version_id": version_id,
        }
        stored = await db.fetchval("select ciphertext from secret")
        assert b"s3cr3t" not in bytes(stored)
        assert kms_async.BlobInfo.from_bytes(bytes(stored)).key_id == version_id

        await client.put("/tenants/acme/secrets/api-token", json={"value": "rotated"})
        assert (await client.get("/tenants/acme/secrets/api-token")).json()["value"] == "rotated"
        assert await db.fetchval("select count(*) from secret") == 1


async def test_unknown_tenant_or_secret_is_404(db: TestDB) -> None:
    async with serve(db) as (_, client):
        await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        assert (await client.get("/tenants/acme/secrets/nope")).status_code == 404
        assert (await client.get("/tenants/ghost/secrets/x")).status_code == 404
        assert (
            await client.put("/tenants/ghost/secrets/x", json={"value": "v"})
        ).status_code == 404
        assert (await client.post("/tenants/ghost/rotate", json={})).status_code == 404
        assert (await client.get("/tenants/ghost/keys")).status_code == 404
        assert (await client.delete("/tenants/ghost")).status_code == 404
    assert await db.fetchval("select count(*) from secret") == 0


@pytest.mark.parametrize("rewrap", [False, True])
async def test_rotation_keeps_old_secrets_readable(db: TestDB, rewrap: bool) -> None:
    async with serve(db) as (_, client):
        await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        old = (await client.put("/tenants/acme/secrets/old", json={"value": "v1"})).json()

        response = await client.post("/tenants/acme/rotate", json={"rewrap": rewrap})
        assert response.status_code == 200, response.text
        assert [len(k["versions"]) for k in response.json()] == [2, 2]

        new = (await client.put("/tenants/acme/secrets/new", json={"value": "v2"})).json()
        assert new["key_version_id"] != old["key_version_id"]
        assert new["key_version_id"] == response.json()[1]["versions"][-1]["id"]
        assert (await client.get("/tenants/acme/secrets/old")).json()["value"] == "v1"
        assert (await client.get("/tenants/acme/secrets/new")).json()["value"] == "v2"

        # A rotation without a body defaults to rewrap=False.
        assert (await client.post("/tenants/acme/rotate")).status_code == 200
        keys = (await client.get("/tenants/acme/keys")).json()
        assert [len(k["versions"]) for k in keys] == [3, 3]
        assert (await client.get("/tenants/acme/secrets/old")).json()["value"] == "v1"


async def test_a_tenant_cannot_read_another_tenants_secret(db: TestDB) -> None:
    async with serve(db) as (app, client):
        for tenant in ("a", "b"):
            await client.post("/tenants", json={"id": tenant, "name": tenant})
        await client.put("/tenants/a/secrets/shared-name", json={"value": "only for a"})
        # The API scopes every lookup by tenant.
        assert (await client.get("/tenants/b/secrets/shared-name")).status_code == 404

        # And the keys refuse too: a's ciphertext decrypted as b fails, with either AAD.
        stored = bytes(await db.fetchval("select ciphertext from secret where tenant_id = 'a'"))
        kms: kms_async.KMS = app.state.kms
        for aad in (b"b:shared-name", b"a:shared-name"):
            with pytest.raises(kms_async.DecryptionError):
                await kms.decrypt("b", "database", stored, aad=aad)
        # Copied into b's row, the ciphertext makes the API fail rather than leak.
        await db.execute(
            "insert into secret (id, tenant_id, name, key_version_id, ciphertext)"
            " select 'copy', 'b', name, key_version_id, ciphertext from secret"
            " where tenant_id = 'a'"
        )
        response = await client.get("/tenants/b/secrets/shared-name")
        assert response.status_code == 500
        assert "only for a" not in response.text


async def test_fifty_concurrent_writes(db: TestDB) -> None:
    async with serve(db) as (_, client):
        await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        responses = await asyncio.gather(
            *(
                client.put(f"/tenants/acme/secrets/s{i}", json={"value": f"value {i}"})
                for i in range(50)
            )
        )
        assert [r.status_code for r in responses] == [200] * 50
        reads = await asyncio.gather(
            *(client.get(f"/tenants/acme/secrets/s{i}") for i in range(50))
        )
        assert [r.json()["value"] for r in reads] == [f"value {i}" for i in range(50)]
    assert await db.fetchval("select count(*) from secret") == 50


async def test_concurrent_tenant_creation_and_rotation(db: TestDB) -> None:
    async with serve(db) as (_, client):
        await client.post("/tenants", json={"id": "acme", "name": "Acme"})
        await client.put("/tenants/acme/secrets/x", json={"value": "x"})
        responses = await asyncio.gather(
            *(client.post("/tenants", json={"id": f"t{i}", "name": ""}) for i in range(20)),
            *(client.post("/tenants/acme/rotate", json={}) for _ in range(5)),
            client.post("/tenants", json={"id": "acme", "name": "again"}),
        )
        assert [r.status_code for r in responses] == [201] * 20 + [200] * 5 + [409]
        keys = (await client.get("/tenants/acme/keys")).json()
        assert [len(k["versions"]) for k in keys] == [6, 6]
        assert (await client.get("/tenants/acme/secrets/x")).json()["value"] == "x"
    assert await _counts(db) == (21, 21, 26)


async def test_deleting_a_tenant_deletes_its_keys_and_secrets(db: TestDB) -> None:
    async with serve(db) as (app, client):
        for tenant in ("a", "b"):
            await client.post("/tenants", json={"id": tenant, "name": tenant})
            await client.put(f"/tenants/{tenant}/secrets/s", json={"value": tenant})
        await client.post("/tenants/a/rotate", json={})

        assert (await client.delete("/tenants/a")).status_code == 204
        assert await db.fetch("select scope_id from kms_root_key") == [("b",)]
        assert await db.fetch("select tenant_id from secret") == [("b",)]
        assert (await client.get("/tenants/a/secrets/s")).status_code == 404
        with pytest.raises(kms_async.KeyNotFoundError):
            await app.state.kms.encrypt("a", "database", b"x")
        assert (await client.get("/tenants/b/secrets/s")).json()["value"] == "b"
