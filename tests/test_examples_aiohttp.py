"""examples/aiohttp_app.py driven over HTTP (a real server on localhost) on both databases."""

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

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import TestDB

import kms_async


def _load_example(name: str) -> ModuleType:
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example("aiohttp_app")


@contextlib.asynccontextmanager
async def serve(db: TestDB) -> AsyncIterator[tuple[web.Application, TestClient[Any, Any]]]:
    """The app on a local port (cleanup contexts run on start and close), with a client."""
    app = example.create_app(db.dsn, secrets.token_bytes(32))
    async with TestClient(TestServer(app)) as client:
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


async def _call(client: TestClient[Any, Any], method: str, path: str, **kwargs: Any) -> Any:
    """(status, JSON body) of one request."""
    async with client.request(method, path, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def test_cleanup_context_opens_and_closes_the_kms(db: TestDB) -> None:
    async with serve(db) as (app, client):
        kms = app[example.KMS_KEY]
        assert kms.purposes == ("database",)
        assert (await _call(client, "POST", "/tenants", json={"id": "acme"}))[0] == 201
    with pytest.raises(kms_async.ClosedError):
        await kms.encrypt("acme", "database", b"x")


async def test_create_tenant_duplicate_and_rollback(db: TestDB) -> None:
    async with serve(db) as (app, client):
        status, body = await _call(client, "POST", "/tenants", json={"id": "acme", "name": "Acme"})
        assert (status, body) == (201, {"id": "acme", "name": "Acme"})
        status, keys = await _call(client, "GET", "/tenants/acme/keys")
        assert [(k["purpose"], len(k["versions"])) for k in keys] == [
            ("rootKey", 1),
            ("database", 1),
        ]

        status, body = await _call(client, "POST", "/tenants", json={"id": "acme", "name": "X"})
        assert status == 409
        assert await _counts(db) == (1, 1, 1)

        # Key creation refused (blank scope id), then failing (root key service down):
        # the tenant row rolls back with the keys.
        status, body = await _call(client, "POST", "/tenants", json={"id": " "})
        assert status == 400
        assert "scope id" in body["detail"]
        kms = app[example.KMS_KEY]
        working = kms.get_external_root_wrapper()
        kms.add_external_wrapper("rootKey", FailingWrapper())
        status, body = await _call(client, "POST", "/tenants", json={"id": "beta"})
        assert (status, body) == (502, {"detail": "key service error"})
        assert await _counts(db) == (1, 1, 1)
        kms.add_external_wrapper("rootKey", working)
        assert (await _call(client, "POST", "/tenants", json={"id": "beta"}))[0] == 201
        assert await _counts(db) == (2, 2, 2)

        assert (await _call(client, "POST", "/tenants", json={"name": "no id"}))[0] == 422
        assert (await _call(client, "POST", "/tenants", data=b"not json"))[0] == 400


async def test_secrets_rotation_and_404s(db: TestDB) -> None:
    async with serve(db) as (_, client):
        await _call(client, "POST", "/tenants", json={"id": "acme"})
        status, old = await _call(client, "PUT", "/tenants/acme/secrets/old", json={"value": "v1"})
        assert status == 200
        stored = bytes(await db.fetchval("select ciphertext from secret"))
        assert b"v1" not in stored
        assert kms_async.BlobInfo.from_bytes(stored).key_id == old["key_version_id"]

        status, keys = await _call(client, "POST", "/tenants/acme/rotate", json={"rewrap": True})
        assert status == 200
        assert [len(k["versions"]) for k in keys] == [2, 2]
        _, new = await _call(client, "PUT", "/tenants/acme/secrets/new", json={"value": "v2"})
        assert new["key_version_id"] == keys[1]["versions"][-1]["id"] != old["key_version_id"]
        assert (await _call(client, "GET", "/tenants/acme/secrets/old"))[1]["value"] == "v1"
        assert (await _call(client, "GET", "/tenants/acme/secrets/new"))[1]["value"] == "v2"
        assert (await _call(client, "POST", "/tenants/acme/rotate"))[0] == 200  # no body

        assert (await _call(client, "GET", "/tenants/acme/secrets/nope"))[0] == 404
        assert (await _call(client, "GET", "/tenants/ghost/secrets/old"))[0] == 404
        assert (await _call(client, "PUT", "/tenants/ghost/secrets/x", json={"value": "v"}))[
            0
        ] == 404
        assert (await _call(client, "POST", "/tenants/ghost/rotate"))[0] == 404
        assert (await _call(client, "GET", "/tenants/ghost/keys"))[0] == 404
        assert (await _call(client, "PUT", "/tenants/acme/secrets/x", json={"value": 1}))[0] == 422


async def test_a_tenant_cannot_read_another_tenants_secret(db: TestDB) -> None:
    async with serve(db) as (app, client):
        for tenant in ("a", "b"):
            await _call(client, "POST", "/tenants", json={"id": tenant})
        await _call(client, "PUT", "/tenants/a/secrets/n", json={"value": "only for a"})
        assert (await _call(client, "GET", "/tenants/b/secrets/n"))[0] == 404

        stored = bytes(await db.fetchval("select ciphertext from secret where tenant_id = 'a'"))
        for aad in (b"b:n", b"a:n"):
            with pytest.raises(kms_async.DecryptionError):
                await app[example.KMS_KEY].decrypt("b", "database", stored, aad=aad)
        await db.execute(
            "insert into secret (id, tenant_id, name, key_version_id, ciphertext)"
            " select 'copy', 'b', name, key_version_id, ciphertext from secret"
            " where tenant_id = 'a'"
        )
        assert await _call(client, "GET", "/tenants/b/secrets/n") == (
            500,
            {"detail": "key service error"},
        )


async def test_fifty_concurrent_writes_and_rotations(db: TestDB) -> None:
    async with serve(db) as (_, client):
        await _call(client, "POST", "/tenants", json={"id": "acme"})
        results = await asyncio.gather(
            *(
                _call(client, "PUT", f"/tenants/acme/secrets/s{i}", json={"value": f"value {i}"})
                for i in range(50)
            ),
            *(_call(client, "POST", "/tenants/acme/rotate") for _ in range(3)),
            *(_call(client, "POST", "/tenants", json={"id": f"t{i}"}) for i in range(10)),
        )
        assert [status for status, _ in results] == [200] * 53 + [201] * 10
        reads = await asyncio.gather(
            *(_call(client, "GET", f"/tenants/acme/secrets/s{i}") for i in range(50))
        )
        assert [body["value"] for _, body in reads] == [f"value {i}" for i in range(50)]
    assert await db.fetchval("select count(*) from secret") == 50
    assert await _counts(db) == (11, 11, 14)


async def test_deleting_a_tenant_deletes_its_keys_and_secrets(db: TestDB) -> None:
    async with serve(db) as (_, client):
        for tenant in ("a", "b"):
            await _call(client, "POST", "/tenants", json={"id": tenant})
            await _call(client, "PUT", f"/tenants/{tenant}/secrets/s", json={"value": tenant})
        assert (await _call(client, "DELETE", "/tenants/a"))[0] == 204
        assert (await _call(client, "DELETE", "/tenants/a"))[0] == 404
        assert await db.fetch("select scope_id from kms_root_key") == [("b",)]
        assert await db.fetch("select tenant_id from secret") == [("b",)]
        assert (await _call(client, "GET", "/tenants/b/secrets/s"))[1]["value"] == "b"
