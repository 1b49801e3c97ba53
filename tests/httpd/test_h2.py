"""evpl's own HTTP/2 core (evpl.http.h2wire): HPACK against RFC 7541's
examples, the server against the h2 library as a client over a real
socket, and hostile input as raw frames on a real socket (each must end in
a stream error or a GOAWAY and a close, never a crash, hang or growth)."""

from __future__ import annotations

import json
import socket
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from core.helpers import TIMEOUT
from evpl.http.h2wire import Decoder, Encoder, H2Server, HPACKError
from hypothesis import given, settings
from hypothesis import strategies as st

from evpl.errors import ConfigError
from evpl.http import Response, Server, StreamingResponse, h2wire
from httpd.support import run, tool

# ---- HPACK: RFC 7541 Appendix C ----------------------------------------------

D1 = b"Mon, 21 Oct 2013 20:13:21 GMT"
D2 = b"Mon, 21 Oct 2013 20:13:22 GMT"
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
LOC = b"https://www.example.com"
REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]
RESPONSES = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", D1), (b"location", LOC)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", D1), (b"location", LOC)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", D2), (b"location", LOC),
     (b"content-encoding", b"gzip"), (b"set-cookie", COOKIE)],
]
# (section, huffman, table size, blocks, table sizes after each block)
VECTORS = [
    ("C.3", False, 4096, REQUESTS, [57, 110, 164], [
        "828684410f7777772e6578616d706c652e636f6d",
        "828684be58086e6f2d6361636865",
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"]),
    ("C.4", True, 4096, REQUESTS, [57, 110, 164], [
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        "828684be5886a8eb10649cbf",
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]),
    ("C.5", False, 256, RESPONSES, [222, 222, 215], [
        "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a3231"
        "20474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
        "4803333037c1c0bf",
        "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a6970"
        "7738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d61"
        "67653d333630303b2076657273696f6e3d31"]),
    ("C.6", True, 256, RESPONSES, [222, 222, 215], [
        "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad"
        "171863c78f0b97c8e9ae82ae43d3",
        "4883640effc1c0bf",
        "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2"
        "e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]),
]


@pytest.mark.parametrize("section,huffman,size,fields,sizes,blocks", VECTORS,
                         ids=[v[0] for v in VECTORS])
def test_hpack_rfc7541_examples_decode_and_encode(section, huffman, size, fields, sizes, blocks):
    dec = Decoder(size)
    enc = Encoder(size, huffman=huffman)
    for want, table_size, hexblock in zip(fields, sizes, blocks, strict=True):
        block = bytes.fromhex(hexblock)
        assert dec.decode(block) == want
        assert dec.size == table_size
        assert enc.encode(want) == block            # byte for byte as in the RFC
        assert enc.size == table_size
    assert dec.dynamic_table() == enc.dynamic_table()


def test_hpack_rfc7541_c2_field_representations():
    dec = Decoder()
    assert dec.decode(bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")) \
        == [(b"custom-key", b"custom-header")]
    assert dec.size == 55
    assert dec.decode(bytes.fromhex("040c2f73616d706c652f70617468")) \
        == [(b":path", b"/sample/path")]
    assert dec.decode(bytes.fromhex("100870617373776f726406736563726574")) \
        == [(b"password", b"secret")]
    assert dec.decode(b"\x82") == [(b":method", b"GET")]
    assert dec.size == 55                           # only C.2.1 was indexed


def test_huffman_round_trips_every_octet_and_matches_the_hpack_library():
    data = bytes(range(256)) * 3
    coded = h2wire.huffman_encode(data)
    ref = hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                       hpack.huffman_constants.REQUEST_CODES_LENGTH)
    assert coded == ref.encode(data)
    assert h2wire.huffman_decode(coded) == data
    assert h2wire.huffman_decode(b"") == b""


@pytest.mark.parametrize("coded,why", [
    (b"\xff\xff\xff\xff", "EOS decoded"),
    (h2wire.huffman_encode(b"a")[:-1] + b"\x00", "padding with zeros"),
    (h2wire.huffman_encode(b"0") + b"\xff", "padding longer than 7 bits"),
])
def test_huffman_refuses_eos_and_bad_padding(coded, why):
    with pytest.raises(HPACKError):
        h2wire.huffman_decode(coded)


@pytest.mark.parametrize("block", [
    b"\x80",                                        # index 0
    b"\xff\x80\x01",                                # index past both tables
    b"\xbe",                                        # dynamic index into an empty table
    b"\x3f\xe2\x1f",                                # table size update to 4097
    b"\x82\x20",                                    # table size update after a field
    b"\xff",                                        # truncated integer
    b"\xff\xff\xff\xff\xff\xff\x7f",                # integer too large
    b"\x40\x05ab",                                  # string longer than the block
    b"\x00\x81\x00\x00",                            # bad Huffman in a name
])
def test_hpack_decoder_refuses_bad_blocks(block):
    with pytest.raises(HPACKError):
        Decoder().decode(block)


def test_hpack_bomb_is_decoded_but_not_kept():
    # one 4000-byte value indexed, then referenced 2000 times: 8 MB of fields
    # from 6 KB of block; the decoder keeps the table in step and stops keeping
    # fields past the limit
    block = b"\x40\x01x\x7f\xa1\x1e" + b"v" * 4000 + b"\xbe" * 2000
    dec = Decoder()
    fields = dec.decode(block, 65536)
    assert dec.oversize and len(fields) == 16
    assert dec.decode(b"\xbe") == [(b"x", b"v" * 4000)]     # the table is intact


def test_encoder_indexes_repeated_fields_and_honours_a_smaller_table():
    enc = Encoder()
    hs = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-app", b"demo")]
    first = enc.encode(hs)
    assert enc.encode(hs) == b"\x88\xbf\xbe"        # one byte a field
    enc.set_table_size(0)
    again = enc.encode(hs)
    assert again[:1] == b"\x20" and len(again) > 3  # size update, then literals
    dec = Decoder()
    assert dec.decode(first) == hs
    assert dec.decode(again) == hs and dec.size == 0


# ---- the server over a real socket ---------------------------------------------

def app(req):
    if req.path == "/big":
        return Response(b"b" * 200_000, content_type="application/octet-stream")
    if req.path == "/stream":
        return StreamingResponse(iter([b"one,", b"two,", b"three"]), content_type="text/plain")
    if req.path == "/echo":
        return Response(json.dumps({"len": len(req.body), "method": req.method,
                                    "host": req.header(b"host").decode(),
                                    "cookie": (req.header(b"cookie") or b"").decode(),
                                    "query": req.query,
                                    "trailers": [[k.decode(), v.decode()]
                                                 for k, v in req.trailers]}),
                        content_type="application/json")
    if req.path == "/bighead":
        return Response(str(len(req.header(b"x-big") or b"")),
                        headers=[("x-reply", "r" * 20_000)])
    if req.path == "/bad":
        return Response(b"x", headers=[("x-bad", "a\r\nb")])
    return Response(b"Hello, world!", content_type="text/plain", headers=[("x-served", "evpl")])


class Client:
    """The h2 library as the client, over a blocking socket."""

    def __init__(self, port: int, settings: dict | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.c = h2.connection.H2Connection(cfg)
        self.c.initiate_connection()
        if settings:
            self.c.update_settings(settings)
        self.sock.sendall(self.c.data_to_send())
        self.responses: dict[int, dict] = {}
        self.bodies: dict[int, bytes] = {}
        self.header_frames: list[int] = []

    def request(self, path: str, body: bytes = b"", method: str = "GET",
                extra: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.c.get_next_available_stream_id()
        hs = [(b":method", method.encode()), (b":scheme", b"http"), (b":path", path.encode()),
              (b":authority", b"test.local"), *(extra or [])]
        self.c.send_headers(sid, hs, end_stream=not body)
        self.responses[sid] = {"headers": None, "body": b"", "done": False}
        if body:
            self.bodies[sid] = body
            self._push()
        self.sock.sendall(self.c.data_to_send())
        return sid

    def _push(self) -> None:
        # request bodies go as the server's windows allow
        for sid, body in list(self.bodies.items()):
            while body:
                n = min(len(body), self.c.local_flow_control_window(sid),
                        self.c.max_outbound_frame_size)
                if n <= 0:
                    break
                self.c.send_data(sid, body[:n], end_stream=n == len(body))
                body = body[n:]
            if body:
                self.bodies[sid] = body
            else:
                del self.bodies[sid]

    def wait(self, *sids: int, ack: bool = True) -> None:
        while not all(self.responses[s]["done"] for s in sids):
            data = self.sock.recv(1 << 20)
            assert data, "the server closed the connection"
            self._frames(data)
            for ev in self.c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.responses[ev.stream_id]["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    self.responses[ev.stream_id]["body"] += ev.data
                    if ack:
                        self.c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.responses[ev.stream_id]["done"] = True
                elif isinstance(ev, h2.events.StreamReset):
                    self.responses[ev.stream_id]["done"] = True
                    self.responses[ev.stream_id]["reset"] = ev.error_code
            self._push()
            out = self.c.data_to_send()
            if out:
                self.sock.sendall(out)

    def _frames(self, data: bytes) -> None:
        # HEADERS frame sizes, for the "repeated fields cost a byte" check
        # (reads normally hold whole frames here; a partial one is skipped)
        pos = 0
        while pos + 9 <= len(data):
            length = int.from_bytes(data[pos:pos + 3], "big")
            if data[pos + 3] == 1:
                self.header_frames.append(length)
            pos += 9 + length

    def close(self) -> None:
        self.sock.close()


def test_h2_library_client_multiplexes_requests_with_bodies(serve):
    s = serve(app)

    def peer():
        c = Client(s.port)
        sids = [c.request("/"), c.request("/echo?x=1", b"p" * 70_000, "POST"),
                c.request("/big"), c.request("/stream"), c.request("/", method="HEAD"),
                c.request("/echo", extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])]
        c.wait(*sids)
        more = [c.request("/") for _ in range(20)]
        c.wait(*more)
        c.close()
        return c, sids, more

    c, sids, more = s.run(peer)
    r = c.responses
    assert r[sids[0]]["body"] == b"Hello, world!"
    h = r[sids[0]]["headers"]
    assert h[b":status"] == b"200" and h[b"content-length"] == b"13"
    assert h[b"x-served"] == b"evpl" and b"date" in h
    assert json.loads(r[sids[1]]["body"]) == {"len": 70_000, "method": "POST",
                                             "host": "test.local", "cookie": "", "query": "x=1",
                                             "trailers": []}
    assert r[sids[2]]["body"] == b"b" * 200_000      # past the 65,535-byte default windows
    assert r[sids[3]]["body"] == b"one,two,three"
    assert r[sids[4]]["body"] == b"" and r[sids[4]]["headers"][b"content-length"] == b"13"
    assert json.loads(r[sids[5]]["body"])["cookie"] == "a=1; b=2"
    assert all(r[sid]["body"] == b"Hello, world!" for sid in more)
    # repeated response fields are indexed: the last HEADERS frames are a few bytes
    assert max(c.header_frames[-10:]) <= 8, c.header_frames


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def wsgi_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, world!"]


@pytest.mark.parametrize("interface,the_app", [("evpl", app), ("asgi", asgi_app),
                                               ("wsgi", wsgi_app)])
def test_h2load_64_connections_16_streams_each(serve, interface, the_app):
    h2load = tool("h2load")
    s = serve(the_app, interface=interface)
    r = s.run(lambda: run([h2load, "-c", "64", "-m", "16", "-n", "6400", s.url + "/"]))
    out = r.stdout.decode()
    assert "6400 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 6400 2xx" in out, out


def test_header_blocks_larger_than_a_frame_use_continuation_both_ways(serve):
    s = serve(app)

    def peer():
        c = Client(s.port)
        sid = c.request("/bighead", extra=[(b"x-big", b"q" * 40_000)])
        c.wait(sid)
        c.close()
        return c.responses[sid]

    r = s.run(peer)
    assert r["body"] == b"40000"
    assert r["headers"][b"x-reply"] == b"r" * 20_000


def test_request_trailers_reach_the_app(serve):
    s = serve(app)

    def peer():
        c = Client(s.port)
        sid = c.c.get_next_available_stream_id()
        c.c.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                               (b":path", b"/echo"), (b":authority", b"t")])
        c.c.send_data(sid, b"body")
        c.c.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
        c.responses[sid] = {"headers": None, "body": b"", "done": False}
        c.sock.sendall(c.c.data_to_send())
        c.wait(sid)
        c.close()
        return json.loads(c.responses[sid]["body"])

    got = s.run(peer)
    assert got["len"] == 4 and got["trailers"] == [["x-checksum", "abc"]]


def test_bad_h2c_upgrade_settings_get_400_and_a_close(serve):
    s = serve(app)

    def peer():
        c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAA\r\n\r\n"    # 7 bytes
                  + PREFACE + SETTINGS)
        buf = b""
        while d := c.recv(65536):
            buf += d
        c.close()
        return buf

    assert s.run(peer) == (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                           b"connection: close\r\n\r\n")


def test_flow_control_follows_the_clients_window_and_settings_changes(serve):
    s = serve(app)

    def peer():
        S = h2.settings.SettingCodes
        c = Client(s.port, {S.INITIAL_WINDOW_SIZE: 1000})
        sid = c.request("/big")
        # read without giving window back: the server stops at 1000 bytes of the stream
        got = b""
        while len(c.responses[sid]["body"]) < 1000:
            data = c.sock.recv(65536)
            got += data
            for ev in c.c.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    c.responses[sid]["body"] += ev.data
        first = len(c.responses[sid]["body"])
        # a larger SETTINGS_INITIAL_WINDOW_SIZE opens the stream that is waiting
        c.c.update_settings({S.INITIAL_WINDOW_SIZE: 1 << 20})
        c.c.increment_flow_control_window(1 << 20)
        c.sock.sendall(c.c.data_to_send())
        c.wait(sid)
        c.close()
        return first, c.responses[sid]["body"]

    first, body = s.run(peer)
    assert first == 1000
    assert body == b"b" * 200_000


def test_bad_response_field_from_the_app_is_a_500(serve):
    s = serve(app)

    def peer():
        c = Client(s.port)
        a, b = c.request("/bad"), c.request("/")
        c.wait(a, b)
        c.close()
        return c.responses[a], c.responses[b]

    bad, good = s.run(peer)
    assert bad["headers"][b":status"] == b"500"
    assert good["body"] == b"Hello, world!"


# ---- hostile input: raw frames on a real socket -----------------------------------

PREFACE = h2wire.PREFACE


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + \
        struct.pack(">I", sid) + payload


SETTINGS = frame(4, 0, 0)
GET = b"\x82\x86\x84\x41\x09localhost"                   # GET http / localhost


def headers(sid: int, block: bytes = GET, end_stream: bool = True,
            end_headers: bool = True) -> bytes:
    return frame(1, (1 if end_stream else 0) | (4 if end_headers else 0), sid, block)


def frames(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos + 9 <= len(buf):
        length = int.from_bytes(buf[pos:pos + 3], "big")
        out.append((buf[pos + 3], buf[pos + 4],
                    int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7fffffff,
                    buf[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


def exchange(port: int, payload: bytes, until_close: bool = True,
             until=None) -> tuple[list, bool]:
    """Send ``payload`` after the preface and SETTINGS; read frames until the
    server closes (or ``until(frames)`` holds). Returns (frames, closed)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        try:
            c.sendall(PREFACE + SETTINGS + payload)
        except (BrokenPipeError, ConnectionResetError):
            pass                    # the server closed while we were still sending
        buf = b""
        closed = False
        while True:
            try:
                d = c.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not d:
                closed = True
                break
            buf += d
            if until is not None and until(frames(buf)):
                break
        return frames(buf), closed
    finally:
        c.close()


def goaway_code(fs: list) -> int | None:
    for t, _, _, p in fs:
        if t == 7:
            return int.from_bytes(p[4:8], "big")
    return None


def rst(fs: list, sid: int) -> int | None:
    for t, _, s, p in fs:
        if t == 3 and s == sid:
            return int.from_bytes(p, "big")
    return None


def answered(fs: list, sid: int) -> bool:
    return any(t in (0, 1) and s == sid and f & 1 for t, f, s, _ in fs)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing, new name, raw strings (short ones)."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


CONNECTION_ERRORS = [
    ("invalid HPACK index", headers(1, b"\xff\x80\x10"), 9),
    ("Huffman EOS", headers(1, b"\x82\x86\x84\x41\x84\xff\xff\xff\xff"), 9),
    ("Huffman zero padding", headers(1, b"\x82\x86\x84\x41\x81\x00"), 9),
    ("table size update past the limit", headers(1, b"\x3f\xe1\x3f" + GET), 9),
    ("CONTINUATION flood", headers(1, GET, end_headers=False)
     + frame(9, 0, 1, b"\x00" * 16384) * 8, 11),
    ("empty CONTINUATION flood", headers(1, GET, end_headers=False) + frame(9, 0, 1) * 200, 11),
    ("CONTINUATION on another stream", headers(1, GET, end_headers=False) + frame(9, 4, 3), 1),
    ("CONTINUATION without HEADERS", frame(9, 4, 1, GET), 1),
    ("rapid reset", b"".join(headers(2 * i + 1, end_stream=False)
                             + frame(3, 0, 2 * i + 1, b"\x00\x00\x00\x08")
                             for i in range(400)), 11),
    ("SETTINGS flood", frame(4, 0, 0) * 3000, 11),
    ("PING flood", frame(6, 0, 0, b"12345678") * 3000, 11),
    ("PRIORITY flood", frame(2, 0, 1, b"\x00\x00\x00\x00\x10") * 3000, 11),
    ("connection window past 2**31-1", frame(8, 0, 0, b"\x7f\xff\xff\xff"), 3),
    ("initial window past 2**31-1", frame(4, 0, 0, b"\x00\x04\x80\x00\x00\x00"), 3),
    ("stream windows past 2**31-1 after SETTINGS", headers(1, end_stream=False)
     + frame(8, 0, 1, b"\x7f\xff\x00\x00") + frame(4, 0, 0, b"\x00\x04\x7f\xff\xff\xff"), 3),
    ("DATA on an idle stream", frame(0, 1, 5, b"x"), 1),
    ("WINDOW_UPDATE on an idle stream", frame(8, 0, 7, b"\x00\x00\x00\x01"), 1),
    ("RST_STREAM on an idle stream", frame(3, 0, 9, b"\x00\x00\x00\x08"), 1),
    ("HEADERS on a closed stream", headers(1) + frame(6, 0, 0, b"pingpong")
     + headers(1), 5),
    ("HEADERS on an even stream", headers(2), 1),
    ("HEADERS with a lower stream id", headers(5) + headers(3), 1),
    ("PING of 7 bytes", frame(6, 0, 0, b"1234567"), 6),
    ("frame over SETTINGS_MAX_FRAME_SIZE", frame(0, 0, 1, b"x" * 16385), 6),
    ("SETTINGS of 5 bytes", frame(4, 0, 0, b"\x00\x01\x00\x00\x00"), 6),
    ("WINDOW_UPDATE of 3 bytes", frame(8, 0, 0, b"\x00\x00\x01"), 6),
    ("RST_STREAM on stream 0", frame(3, 0, 0, b"\x00\x00\x00\x00"), 1),
    ("PUSH_PROMISE from a client", frame(5, 4, 1, b"\x00\x00\x00\x02" + GET), 1),
    ("bad SETTINGS_MAX_FRAME_SIZE", frame(4, 0, 0, b"\x00\x05\x00\x00\x10\x00"), 1),
    ("bad SETTINGS_ENABLE_PUSH", frame(4, 0, 0, b"\x00\x02\x00\x00\x00\x02"), 1),
    ("WINDOW_UPDATE of 0 on the connection", frame(8, 0, 0, b"\x00\x00\x00\x00"), 1),
    ("DATA padding past the frame", headers(1, end_stream=False)
     + frame(0, 8, 1, b"\x05abc"), 1),
]


@pytest.mark.parametrize("payload,code", [c[1:] for c in CONNECTION_ERRORS],
                         ids=[c[0] for c in CONNECTION_ERRORS])
def test_hostile_frames_get_goaway_and_a_close(serve, payload, code):
    s = serve(app)

    def peer():
        fs, closed = exchange(s.port, payload)
        c = Client(s.port)                           # other clients are unaffected
        sid = c.request("/")
        c.wait(sid)
        c.close()
        return fs, closed, c.responses[sid]["body"]

    fs, closed, other = s.run(peer)
    assert goaway_code(fs) == code, fs[-3:]
    assert closed
    assert other == b"Hello, world!"
    assert s.server.protocol_errors >= 1


STREAM_ERRORS = [
    ("upper-case field name", GET + literal(b"X-Up", b"1"), 1),
    ("connection-specific field", GET + literal(b"connection", b"close"), 1),
    ("te other than trailers", GET + literal(b"te", b"gzip"), 1),
    ("CR in a value", GET + literal(b"x-a", b"a\rb"), 1),
    ("missing :path", b"\x82\x86\x41\x09localhost", 1),
    ("pseudo field after a regular one", b"\x82\x86" + literal(b"x-a", b"1") + b"\x84", 1),
    ("unknown pseudo field", GET + literal(b":nope", b"1"), 1),
    ("duplicate :method", GET + b"\x83", 1),
    ("content-length with END_STREAM", GET + literal(b"content-length", b"5"), 1),
]


@pytest.mark.parametrize("block,code", [c[1:] for c in STREAM_ERRORS],
                         ids=[c[0] for c in STREAM_ERRORS])
def test_malformed_requests_get_a_stream_error_and_the_connection_lives(serve, block, code):
    s = serve(app)

    def peer():
        return exchange(s.port, headers(1, block) + headers(3),
                        until=lambda fs: answered(fs, 3))

    fs, closed = s.run(peer)
    assert rst(fs, 1) == code
    assert answered(fs, 3) and not closed and goaway_code(fs) is None


def test_oversized_header_list_gets_431_and_the_connection_lives(serve):
    s = serve(app, max_head=8192)
    # an HPACK bomb: one 4000-byte field indexed, then referenced 100 times
    bomb = GET + b"\x40\x01x\x7f\xa1\x1e" + b"v" * 4000 + b"\xbe" * 100

    def peer():
        return exchange(s.port, headers(1, bomb) + headers(3),
                        until=lambda fs: answered(fs, 3))

    fs, closed = s.run(peer)
    statuses = [p for t, _, sid, p in fs if t == 1 and sid == 1]
    assert statuses and hpack.Decoder().decode(statuses[0])[0] == (":status", "431")
    assert answered(fs, 3) and not closed


def test_too_many_streams_are_refused(serve):
    s = serve(app)
    opened = b"".join(headers(2 * i + 1, end_stream=False) for i in range(129))

    def peer():
        return exchange(s.port, opened, until=lambda fs: rst(fs, 257) is not None)

    fs, _ = s.run(peer)
    assert rst(fs, 257) == 7                          # REFUSED_STREAM
    assert all(rst(fs, 2 * i + 1) is None for i in range(128))


def test_http2_options_set_the_announced_limits_and_the_caps(serve):
    """Server(http2_options=...): the SETTINGS a client gets carry the
    configured stream count and window, the connection window is opened to
    the configured size, the stream count is enforced, and a lower rapid-
    reset cap sends the client away sooner (10 resets: GOAWAY
    ENHANCE_YOUR_CALM)."""
    s = serve(app, http2_options={"max_concurrent_streams": 5, "initial_window": 100_000,
                                  "connection_window": 3 << 20, "max_resets": 10})
    opened = b"".join(headers(2 * i + 1, end_stream=False) for i in range(6))

    def peer():
        return exchange(s.port, opened, until=lambda fs: rst(fs, 11) is not None)

    fs, _ = s.run(peer)
    sent = [p for t, f, sid, p in fs if t == 4 and not f & 1]
    values = {int.from_bytes(p[i:i + 2], "big"): int.from_bytes(p[i + 2:i + 6], "big")
              for p in sent for i in range(0, len(p), 6)}
    assert values[3] == 5 and values[4] == 100_000      # MAX_CONCURRENT_STREAMS, INITIAL_WINDOW
    updates = [int.from_bytes(p, "big") for t, _, sid, p in fs if t == 8 and sid == 0]
    assert updates[:1] == [(3 << 20) - 65535]
    assert rst(fs, 11) == 7                               # REFUSED_STREAM
    assert all(rst(fs, 2 * i + 1) is None for i in range(5))
    resets = b"".join(headers(2 * i + 1, end_stream=False)
                      + frame(3, 0, 2 * i + 1, b"\x00\x00\x00\x08") for i in range(20))
    fs, closed = s.run(lambda: exchange(s.port, resets))
    assert goaway_code(fs) == 11 and closed


@pytest.mark.parametrize("options,why", [
    ({"max_concurrent_streams": 0}, "max_concurrent_streams must be in 1..65536"),
    ({"connection_window": 1000}, "connection_window must be in 65535.."),
    ({"initial_window": 1 << 31}, "initial_window must be in 1..2147483647"),
    ({"max_streams": 10}, "unknown http2_options ['max_streams']"),
    ({"max_resets": 1.5}, "must be an int"),
])
def test_bad_http2_options_are_refused_at_construction(loop, options, why):
    with pytest.raises(ConfigError) as err:
        Server(loop, app, http2_options=options)
    assert why in str(err.value)


def test_data_on_a_closed_stream_is_a_stream_error(serve):
    s = serve(app)

    def peer():
        return exchange(s.port, headers(1) + frame(0, 0, 1, b"late") + headers(3),
                        until=lambda fs: answered(fs, 3) and rst(fs, 1) is not None)

    fs, closed = s.run(peer)
    assert rst(fs, 1) == 5 and answered(fs, 3) and not closed      # STREAM_CLOSED


def test_stream_window_overflow_resets_the_stream(serve):
    s = serve(app)

    def peer():
        return exchange(s.port, headers(1, end_stream=False)
                        + frame(8, 0, 1, b"\x7f\xff\xff\xff") + headers(3),
                        until=lambda fs: answered(fs, 3) and rst(fs, 1) is not None)

    fs, closed = s.run(peer)
    assert rst(fs, 1) == 3 and not closed                         # FLOW_CONTROL_ERROR


def test_data_beyond_the_window_is_a_flow_control_error():
    # the server gives window back as it reads, so a client cannot outrun it on
    # a socket; the core's own check, fed the bytes directly
    core = H2Server(initial_window=16384, connection_window=65535)
    core.receive(PREFACE + SETTINGS + headers(1, end_stream=False))
    events = core.receive(frame(0, 0, 1, b"x" * 16384) + frame(0, 0, 1, b"y"))
    assert events[0][0] == h2wire.EV_DATA and len(events[0][2]) == 16384
    assert events[-1][0] == h2wire.EV_ERROR and events[-1][1] == 3
    assert goaway_code(frames(core.data_to_send())) == 3
    assert core.receive(headers(3)) == []                        # nothing after an error


def test_graceful_goaway_refuses_new_streams_and_finishes_open_ones():
    core = H2Server()
    core.receive(PREFACE + SETTINGS + headers(1, end_stream=False))
    core.data_to_send()
    core.goaway()
    fs = frames(core.data_to_send())
    assert fs[0][0] == 7 and fs[0][3][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x00"
    core.receive(headers(3))                                     # after the GOAWAY
    assert rst(frames(core.data_to_send()), 3) == 7              # REFUSED_STREAM
    assert core.respond(1, 200, [], b"done") == 4                # stream 1 still answers
    fs = frames(core.data_to_send())
    assert answered(fs, 1) and fs[-2][0] == 0 and fs[-2][3] == b"done"


# ---- the core against random frames ----------------------------------------------

_frames = st.lists(st.one_of(
    st.builds(frame, st.integers(0, 10), st.integers(0, 255),
              st.sampled_from([0, 1, 2, 3, 5, 7, 0x7fffffff]), st.binary(max_size=40)),
    st.builds(headers, st.sampled_from([1, 3, 5, 7]),
              st.sampled_from([GET, GET + literal(b"content-length", b"3"), b"\xbe", b""]),
              st.booleans(), st.booleans()),
    st.builds(lambda sid, n: frame(0, 1, sid, b"d" * n), st.sampled_from([1, 3, 5]),
              st.integers(0, 300)),
), max_size=25)


@settings(max_examples=400, deadline=None)
@given(seq=_frames, cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_random_frames_give_events_never_exceptions_and_cuts_do_not_matter(seq, cuts):
    data = PREFACE + SETTINGS + b"".join(seq)

    def run(pieces):
        core = H2Server()
        events, out = [], b""
        for p in pieces:
            events += [e for e in core.receive(p) if e[0] != h2wire.EV_WINDOW]
            out += core.data_to_send()
        for e in events:                        # then answer as a server would
            if e[0] == h2wire.EV_REQUEST and core.is_open(e[1]):
                core.respond(e[1], 200, [(b"content-type", b"text/plain")], b"ok")
        return events, out + core.data_to_send(), core

    whole, out, core = run([data])
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    cut, _, _ = run(pieces)
    assert [e[:2] for e in cut] == [e[:2] for e in whole]
    assert all(isinstance(e, tuple) for e in whole)
    assert len(out) < 200_000                      # answers stay proportional to input
    parsed = frames(out)
    assert sum(9 + len(p) for *_, p in parsed) == len(out)   # whole frames only
    if any(e[0] == h2wire.EV_ERROR for e in whole):
        assert core.dead and goaway_code(parsed) is not None
