"""PLAIN and CURVE against libzmq (pyzmq), both directions, good and bad
credentials; the failure is a monitor event and a closed connection."""

from __future__ import annotations

import pytest
import zmq

import evpl.zmtp as ez
from zmtp.zhelpers import POKE, tobytes, until, zrecv


def _events(sock: ez.Socket) -> list[tuple[ez.Event, object]]:
    ev: list[tuple[ez.Event, object]] = []
    sock.monitor(lambda e, ep, d: ev.append((e, d)))
    return ev


@pytest.mark.parametrize("good", [True, False], ids=["good", "bad-password"])
def test_plain_evpl_server(loop, zctx, good):
    seen = []

    def auth(mech, creds):
        seen.append((mech, creds))
        return creds == (b"admin", b"secret")
    got = []
    pull = ez.Socket(loop, "PULL", plain_server=True, authenticator=auth,
                     on_message=lambda m: got.append(tobytes(m)))
    ev = _events(pull)
    ep = pull.bind("tcp://127.0.0.1:0")
    z = zctx.socket(zmq.PUSH)
    z.plain_username = b"admin"
    z.plain_password = b"secret" if good else b"wrong"
    z.connect(ep)
    POKE.append(z)
    z.send_multipart([b"hello", b"plain"], zmq.NOBLOCK)
    if good:
        until(loop, lambda: got)
        assert got == [[b"hello", b"plain"]]
    else:
        until(loop, lambda: any(e is ez.Event.HANDSHAKE_FAILED_AUTH for e, _ in ev))
        assert not got
    assert seen[0][0] == "PLAIN"


@pytest.mark.parametrize("good", [True, False], ids=["good", "bad-password"])
def test_plain_evpl_client(loop, zctx, good):
    z = zctx.socket(zmq.PULL)
    z.plain_server = True
    zmon = z.get_monitor_socket()
    POKE.append(z)
    # libzmq asks a ZAP handler: without one it accepts any credentials, so
    # a refusal needs one; pyzmq's ThreadAuthenticator is that handler
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(zctx)
    auth.start()
    try:
        auth.configure_plain(domain="*", passwords={"admin": "secret"})
        port = z.bind_to_random_port("tcp://127.0.0.1")
        push = ez.Socket(loop, "PUSH", plain_username=b"admin",
                         plain_password=b"secret" if good else b"nope")
        ev = _events(push)
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart([b"to", b"libzmq"], ez.NOBLOCK)
        if good:
            assert zrecv(loop, z) == [b"to", b"libzmq"]
        else:
            until(loop, lambda: any(e is ez.Event.HANDSHAKE_FAILED_AUTH for e, _ in ev))
            reason = next(d for e, d in ev if e is ez.Event.HANDSHAKE_FAILED_AUTH)
            assert "refused" in str(reason)
            assert z.poll(0) == 0
            push.close(linger=0)
    finally:
        auth.stop()
        zmon.close()


@pytest.mark.parametrize("good", [True, False], ids=["good", "wrong-server-key"])
def test_curve_evpl_server(loop, zctx, good):
    spk, ssk = ez.curve_keypair()
    cpk, csk = zmq.curve_keypair()
    other, _ = ez.curve_keypair()
    clients = []
    got = []
    pull = ez.Socket(loop, "PULL", curve_server=True, curve_secretkey=ssk,
                     authenticator=lambda m, c: clients.append(c) or True,
                     on_message=lambda m: got.append(tobytes(m)))
    ev = _events(pull)
    ep = pull.bind("tcp://127.0.0.1:0")
    z = zctx.socket(zmq.PUSH)
    z.curve_serverkey = spk if good else other
    z.curve_publickey = cpk
    z.curve_secretkey = csk
    z.connect(ep)
    POKE.append(z)
    z.send_multipart([b"secret", b"x" * 5000], zmq.NOBLOCK)
    if good:
        until(loop, lambda: got)
        assert got == [[b"secret", b"x" * 5000]]
        assert clients == [(ez.z85_decode(cpk),)]
    else:
        until(loop, lambda: any(e is ez.Event.HANDSHAKE_FAILED_PROTOCOL for e, _ in ev))
        assert not got and not clients


@pytest.mark.parametrize("good", [True, False], ids=["good", "wrong-server-key"])
def test_curve_evpl_client(loop, zctx, good):
    spk, ssk = zmq.curve_keypair()
    cpk, csk = ez.curve_keypair()
    other, _ = ez.curve_keypair()
    z = zctx.socket(zmq.REP)
    z.curve_server = True
    z.curve_secretkey = ssk
    POKE.append(z)
    port = z.bind_to_random_port("tcp://127.0.0.1")
    got = []
    req = ez.Socket(loop, "REQ", curve_serverkey=spk if good else other, curve_publickey=cpk,
                    curve_secretkey=csk, on_message=lambda m: got.append(tobytes(m)))
    ev = _events(req)
    req.connect(f"tcp://127.0.0.1:{port}")
    req.send_multipart([b"ask", b"y" * 3000], ez.NOBLOCK)
    if good:
        assert zrecv(loop, z) == [b"ask", b"y" * 3000]
        z.send_multipart([b"answer"])
        until(loop, lambda: got)
        assert got == [[b"answer"]]
    else:
        # libzmq cannot open our HELLO: it drops the connection
        until(loop, lambda: any(e is ez.Event.DISCONNECTED for e, _ in ev))
        assert not any(e is ez.Event.HANDSHAKE_SUCCEEDED for e, _ in ev)
        req.close(linger=0)


def test_curve_evpl_to_evpl_with_authenticator_refusal(loop):
    spk, ssk = ez.curve_keypair()
    cpk, csk = ez.curve_keypair()
    srv = ez.Socket(loop, "PULL", curve_server=True, curve_secretkey=ssk,
                    authenticator=lambda m, c: False)
    sev = _events(srv)
    ep = srv.bind("tcp://127.0.0.1:0")
    cli = ez.Socket(loop, "PUSH", curve_serverkey=spk, curve_publickey=cpk, curve_secretkey=csk)
    cev = _events(cli)
    cli.connect(ep)
    until(loop, lambda: any(e is ez.Event.HANDSHAKE_FAILED_AUTH for e, _ in sev)
          and any(e is ez.Event.HANDSHAKE_FAILED_AUTH for e, _ in cev))
    cli.close(linger=0)
    srv.close()


def test_z85_spec_vector():
    raw = bytes([0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B])
    assert ez.z85_encode(raw) == b"HelloWorld"
    assert ez.z85_decode("HelloWorld") == raw
    pk, sk = ez.curve_keypair()
    assert ez.curve_public(sk) == pk
    assert zmq.curve_public(sk) == pk
    with pytest.raises(ValueError):
        ez.z85_decode("Hell~World")


def test_curve_evpl_rep_server_answers_through_the_envelope(loop, zctx):
    """A CURVE REP: requests are opened frame by frame, the envelope is
    rebuilt from them and the reply goes back boxed behind it."""
    spk, ssk = ez.curve_keypair()
    rep = ez.Socket(loop, "REP", curve_server=True, curve_secretkey=ssk)
    rep.on_message = lambda m: rep.send_multipart([b"re:" + bytes(m[0]), *m[1:]])
    ep = rep.bind("tcp://127.0.0.1:0")
    z = zctx.socket(zmq.REQ)
    z.curve_serverkey = spk
    z.curve_publickey, z.curve_secretkey = zmq.curve_keypair()
    POKE.append(z)
    z.connect(ep)
    for i in range(3):
        z.send_multipart([b"q%d" % i, b"x" * 300])
        assert zrecv(loop, z) == [b"re:q%d" % i, b"x" * 300]
    rep.close()
