"""The command line, the demo and the migration runner are clients of the library.

They reach the database only through library calls: no driver imports, no
SQL text, no branches on the dialect, and only methods ``KMS`` really has.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import kms_async
from kms_async import KMS

PACKAGE = pathlib.Path(kms_async.__file__).resolve().parent
CLIENTS = ["_cli.py", "_demo.py", "_migrations.py"]
DRIVERS = {"asyncpg", "aiosqlite", "sqlite3", "psycopg", "psycopg2"}
SQL = re.compile(
    r"\b(select\s.*\sfrom|insert\s+into|update\s+\w+\s+set|delete\s+from"
    r"|(create|drop|alter)\s+(table|schema|index|trigger)|pragma\s+\w+)\b",
    re.IGNORECASE | re.DOTALL,
)


def parse(name: str) -> ast.Module:
    return ast.parse((PACKAGE / name).read_text(encoding="utf-8"), name)


@pytest.mark.parametrize("name", CLIENTS)
def test_no_driver_is_imported(name: str) -> None:
    imported = set()
    for node in ast.walk(parse(name)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & DRIVERS


@pytest.mark.parametrize("name", CLIENTS)
def test_no_sql_text(name: str) -> None:
    strings = [
        node.value
        for node in ast.walk(parse(name))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    assert [s for s in strings if SQL.search(s)] == []


@pytest.mark.parametrize("name", CLIENTS)
def test_no_branch_on_the_dialect(name: str) -> None:
    source = (PACKAGE / name).read_text(encoding="utf-8")
    assert not re.search(r"\.dialect\s*(==|!=|\bin\b|\bnot\b)", source)
    assert 'startswith(("postgres' not in source


@pytest.mark.parametrize("name", ["_cli.py", "_demo.py"])
def test_every_kms_method_they_use_exists(name: str) -> None:
    # The command line once looked up a KMS.list_scopes that did not exist,
    # with getattr, and fell back to SQL of its own without anyone noticing.
    for node in ast.walk(parse(name)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "kms"
        ):
            assert not node.attr.startswith("_"), f"{name} uses the private kms.{node.attr}"
            assert hasattr(KMS, node.attr), f"{name} uses kms.{node.attr}, which KMS lacks"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
        ):
            target = node.args[0]
            assert not (isinstance(target, ast.Name) and target.id == "kms"), (
                f"{name} looks KMS methods up by name; call them"
            )


# -- every layer above the store -------------------------------------------------------

ABOVE_THE_STORE = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("name", ABOVE_THE_STORE)
def test_nothing_above_the_store_imports_a_driver(name: str) -> None:
    test_no_driver_is_imported(name)


@pytest.mark.parametrize("name", ABOVE_THE_STORE)
def test_nothing_above_the_store_holds_sql(name: str) -> None:
    test_no_sql_text(name)


@pytest.mark.parametrize("name", ABOVE_THE_STORE)
def test_nothing_above_the_store_branches_on_the_dialect(name: str) -> None:
    test_no_branch_on_the_dialect(name)


def test_the_store_is_the_only_package_with_drivers() -> None:
    store = PACKAGE / "_sql"
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            if any(n.split(".")[0] in DRIVERS for n in names):
                importers.add(path.parent == store)
    assert importers == {True}
