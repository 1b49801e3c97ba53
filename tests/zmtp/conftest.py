"""Fixtures for the evpl.zmtp tests: a pyzmq (libzmq) context as the peer."""

from __future__ import annotations

import pytest

zmq = pytest.importorskip("zmq", reason="pyzmq (the libzmq peer) is in the test extra")


@pytest.fixture
def zctx():
    """A pyzmq context; its sockets are dropped at teardown without lingering."""
    from zmtp.zhelpers import POKE
    ctx = zmq.Context()
    ctx.linger = 0              # a socket closed by the garbage collector must not wait
    yield ctx
    POKE.clear()
    ctx.destroy(linger=0)


@pytest.fixture
def ipc_dir(tmp_path):
    import tempfile
    path = str(tmp_path)
    if len(path) > 80:
        path = tempfile.mkdtemp(prefix="evpl-zmtp-", dir="/tmp")
    return path
