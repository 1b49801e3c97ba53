"""Where the rpc2 exceptions live: one definition in evpl.rpc2.errors, the same
objects under the names users import (evpl.rpc2, and evpl.rpc2.client for older
code), and a server that does not depend on the client module for them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import evpl
import evpl.rpc2
import evpl.rpc2.client
import evpl.rpc2.errors
import evpl.rpc2.server

NAMES = ["AuthError", "ClientClosed", "GarbageArgs", "ProcUnavail", "ProgMismatch",
         "ProgUnavail", "RpcError", "RpcMismatch", "RpcTimeout", "SystemErr"]


@pytest.mark.parametrize("name", NAMES)
def test_one_class_under_every_documented_name(name: str) -> None:
    cls = getattr(evpl.rpc2.errors, name)
    assert cls.__module__ == "evpl.rpc2.errors"
    assert getattr(evpl.rpc2, name) is cls
    assert getattr(evpl.rpc2.client, name) is cls
    assert name in evpl.rpc2.__all__ and name in evpl.rpc2.errors.__all__
    assert issubclass(cls, evpl.EvplError)


def test_hierarchy() -> None:
    e = evpl.rpc2.errors
    for name in ("ProgUnavail", "ProgMismatch", "ProcUnavail", "GarbageArgs", "SystemErr",
                 "RpcMismatch", "AuthError"):
        assert issubclass(getattr(e, name), e.RpcError)
    assert issubclass(e.RpcError, evpl.ProtocolError)
    assert issubclass(e.RpcTimeout, evpl.TimeoutError)
    assert issubclass(e.RpcTimeout, TimeoutError)  # the builtin, for stdlib-style code
    assert e.RpcTimeout("no reply").errno == 110
    assert evpl.rpc2.client.reply_error is e.reply_error


def _rpc2_imports(module: object) -> set[str]:
    path = Path(module.__file__)  # type: ignore[attr-defined]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_server_does_not_import_the_client() -> None:
    imports = _rpc2_imports(evpl.rpc2.server)
    assert "evpl.rpc2.errors" in imports
    assert "evpl.rpc2.client" not in imports


def test_errors_module_depends_only_on_wire_and_core_errors() -> None:
    rpc2_deps = {m for m in _rpc2_imports(evpl.rpc2.errors) if m.startswith("evpl")}
    assert rpc2_deps == {"evpl.errors", "evpl.rpc2.wire"}
