"""The sans-I/O HTTP/1.1 core: valid messages however they are cut, and the
refusals that keep request smuggling out (vectors in the spirit of llhttp's
and h11's test suites, written here)."""

from __future__ import annotations

import pytest
from evpl._native.httphead import parse_head
from hypothesis import given, settings
from hypothesis import strategies as st

from evpl.http import wire
from evpl.http.wire import Data, EndOfMessage, HTTPError, Request, RequestParser, ResponseParser


# every request test runs with the pure-Python head parser and the engine's
# C one (what the server uses): both must give the same answers
@pytest.fixture(params=["python", "native"], autouse=True)
def head_parser(request, monkeypatch):
    if request.param == "native":
        orig = RequestParser.__init__

        def init(self, **kw):
            kw.setdefault("head_parser", parse_head)
            orig(self, **kw)

        monkeypatch.setattr(RequestParser, "__init__", init)
    return request.param


def parse(data: bytes, **kw) -> list[object]:
    return RequestParser(**kw).feed(data)


def summary(events: list[object]) -> list[tuple]:
    """Events as comparable tuples, one per message: a body delivered with
    the head and one delivered as Data pieces compare equal."""
    out: list[list] = []
    for ev in events:
        if isinstance(ev, Request):
            out.append(["req", ev.method, ev.target, ev.version, tuple(ev.headers),
                        ev.keep_alive, ev.body, ()])
        elif isinstance(ev, Data):
            out[-1][6] += ev.data
        elif isinstance(ev, EndOfMessage):
            out[-1][7] = tuple(ev.trailers)
    return [tuple(m) for m in out]


def refused(data: bytes, status: int, **kw) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        RequestParser(**kw).feed(data)
    assert info.value.status == status, info.value
    return info.value


def test_simple_get():
    (req,) = parse(b"GET /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")
    assert req.method == "GET" and req.target == "/a/b?x=1" and req.version == "1.1"
    assert req.path == "/a/b" and req.query == "x=1"
    assert req.headers == [(b"host", b"example.com"), (b"accept", b"*/*")]
    assert req.complete and req.body == b"" and req.keep_alive


def test_header_whitespace_is_trimmed_and_case_of_names_folded():
    (req,) = parse(b"GET / HTTP/1.1\r\nHOST:   h  \r\nX-A:\t a b \t\r\nX-Empty:\r\n\r\n")
    assert req.headers == [(b"host", b"h"), (b"x-a", b"a b"), (b"x-empty", b"")]


def test_content_length_body_in_the_same_read():
    (req,) = parse(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
    assert req.complete and req.body == b"hello" and req.content_length == 5


def test_pipelined_requests_in_one_read_come_out_in_order():
    data = b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(16))
    events = parse(data)
    assert [e.target for e in events] == [f"/{i}" for i in range(16)]


def test_chunked_body_with_extensions_and_trailers():
    data = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\nX-Other: y\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    events = parse(data)
    assert not events[0].complete and events[0].chunked
    s = summary(events)
    assert s[0][6] == b"hello world"
    assert s[0][7] == ((b"x-sum", b"42"), (b"x-other", b"y"))
    assert events[0].trailers == list(s[0][7])
    assert s[1][2] == "/next"


def test_http10_closes_by_default_and_keeps_alive_on_request():
    (req,) = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert req.version == "1.0" and not req.keep_alive
    (req,) = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert req.keep_alive


def test_connection_close_stops_the_parser():
    p = RequestParser()
    events = p.feed(b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                    b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [e.target for e in events] == ["/1"] and not events[0].keep_alive
    assert p.stopped and p.take_rest().startswith(b"GET /2")


def test_expect_100_continue_and_upgrade_are_reported():
    p = RequestParser()
    (req,) = p.feed(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                    b"Expect: 100-continue\r\n\r\n")
    assert req.expect_continue and not req.complete
    (req,) = parse(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                   b"raw bytes")
    assert req.upgrade == b"websocket"


def test_leading_empty_lines_are_ignored():
    (req,) = parse(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert req.target == "/"


# ---- refusals: smuggling and hostile heads ----

SMUGGLING = [
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\n Transfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", 400),             # obs-fold
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n\tb\r\n\r\n", 400),            # obs-fold
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400),                # bare CR
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\nX-B: b\r\n\r\n", 400),           # bare LF
    (b"GET / HTTP/1.1\nHost: h\n\n", 400),                                    # LF-only head
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400),              # NUL
    (b"GET / HTTP/1.1\r\nHost: h\r\nX A: b\r\n\r\n", 400),                   # space in name
    (b"GET / HTTP/1.1\r\nHost: h\r\nX(A): b\r\n\r\n", 400),                  # separator in name
    (b"GET / HTTP/1.1\r\nHost: h\r\n: b\r\n\r\n", 400),                      # empty name
    (b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                         # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),                  # two Hosts
    (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),                           # space in target
    (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
    (b"GET / http/1.1\r\nHost: h\r\n\r\n", 400),
    (b" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\n\r\n", 417),
]


@pytest.mark.parametrize("data,status", SMUGGLING, ids=range(len(SMUGGLING)))
def test_smuggling_and_malformed_heads_are_refused(data, status):
    refused(data, status)


@pytest.mark.parametrize("body", [
    b"5\r\nhello\r\n0\r\n\r",                       # cut: not an error yet
])
def test_incomplete_chunked_is_not_an_error(body):
    p = RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert not p.idle


@pytest.mark.parametrize("body", [
    b"5\r\nhelloXX0\r\n\r\n",                        # data not followed by CRLF
    b"g\r\n",                                        # not hex
    b"5 x\r\nhello\r\n",
    b"-5\r\nhello\r\n",
    b"11111111111111111\r\n",                        # 17 hex digits
    b"5\nhello\r\n",                                 # bare LF after the size
    b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n",           # bare CR in a trailer
    b"5\r\nhello\r\n0\r\nX : a\r\n\r\n",             # space before the colon in a trailer
    b"5;\x00\r\nhello\r\n",                          # NUL in an extension
])
def test_malformed_chunked_bodies_are_refused(body):
    refused(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body, 400)


def test_limits_give_414_431_413():
    refused(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, max_line=100)
    refused(b"GET /" + b"a" * 200, 414, max_line=100)                 # before the head ends
    refused(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 500 + b"\r\n\r\n", 431, max_head=256)
    refused(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 500, 431, max_head=256)
    many = b"".join(b"X-%d: a\r\n" % i for i in range(20))
    refused(b"GET / HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n", 431, max_headers=10)
    refused(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n", 413, max_body=100)
    refused(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"40\r\n" + b"a" * 64 + b"\r\n40\r\n" + b"a" * 64 + b"\r\n", 413, max_body=100)
    refused(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;" + b"e" * 2000, 400)


def test_good_requests_before_a_bad_one_are_kept_in_pending():
    p = RequestParser()
    with pytest.raises(HTTPError):
        p.feed(b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\nGET /bad HTTP/1.1\r\n\r\n")
    assert [e.target for e in p.pending] == ["/ok"]


VALID = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world",
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: 1\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: h\r\nX-Long: " + b"v" * 3000 + b"\r\n\r\n",
    b"PUT /p HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
]


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
       order=st.permutations(range(len(VALID))))
def test_any_cut_of_a_pipelined_stream_gives_the_same_events(cuts, order):
    stream = b"".join(VALID[i] for i in order)
    whole = summary(RequestParser().feed(stream))
    p = RequestParser()
    events: list[object] = []
    prev = 0
    for c in sorted(set(min(c, len(stream)) for c in cuts)):
        events += p.feed(stream[prev:c])
        prev = c
    events += p.feed(stream[prev:])
    assert summary(events) == whole
    assert [e[2] for e in whole if e[0] == "req"] == [
        VALID[i].split(b" ")[1].decode() for i in order]
    assert p.idle


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_random_bytes_give_events_or_an_http_error(data):
    p = RequestParser(max_head=512, max_line=256, max_body=1024)
    try:
        events = p.feed(data)
    except HTTPError as exc:
        assert exc.status in (400, 413, 414, 417, 431, 501, 505)
        return
    assert all(isinstance(e, Request | Data | EndOfMessage) for e in events)
    assert p.buffered <= len(data)


@settings(max_examples=300)
@given(st.lists(st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"Host: h\r\n", b"\r\n", b"Content-Length: 3\r\n", b"abc",
    b"Transfer-Encoding: chunked\r\n", b"3\r\n", b"0\r\n", b" folded\r\n", b"X:\ra\r\n",
    b"POST /x HTTP/1.1\r\n", b"\n", b"\r", b":", b"HTTP/1.0\r\n",
]), max_size=25))
def test_structured_garbage_never_crashes(parts):
    p = RequestParser(max_head=1024)
    try:
        for part in parts:
            p.feed(part)
    except HTTPError as exc:
        assert 400 <= exc.status < 600


# ---- responses (client side) ----

def test_response_parser_bodies_by_length_chunked_and_close():
    p = ResponseParser()
    for m in ("GET", "HEAD", "GET", "GET"):
        p.expect(m)
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"          # HEAD: no body
                    b"HTTP/1.1 100 Continue\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
                    b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    heads = [e for e in events if isinstance(e, wire.Response)]
    assert [h.status for h in heads] == [200, 200, 100, 200, 200]
    assert heads[0].body == b"hi" and heads[1].complete and heads[1].body == b""
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"abuntil close"
    rest = p.feed_eof()
    assert isinstance(rest[0], EndOfMessage)


def test_response_parser_refuses_ambiguous_framing_and_truncation():
    p = ResponseParser()
    with pytest.raises(HTTPError):
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HTTPError):
        p.feed_eof()


def test_encoders_refuse_header_injection():
    with pytest.raises(ValueError):
        wire.encode_head(b"HTTP/1.1 200 OK", [("x", "a\r\nSet-Cookie: evil=1")])
    with pytest.raises(ValueError):
        wire.encode_head(b"HTTP/1.1 200 OK", [("bad name", "v")])
    with pytest.raises(ValueError):
        wire.last_chunk([("x", "a\nb")])
    assert wire.encode_head(b"HTTP/1.1 200 OK", [("X-A", "1")]) == \
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"
    assert b"".join(wire.chunk(b"hello")) == b"5\r\nhello\r\n" and wire.chunk(b"") == []
    assert len(wire.format_date(0)) == 29


def outcome(data: bytes, head_parser) -> object:
    p = RequestParser(max_head=2048, max_line=512, head_parser=head_parser)
    try:
        return summary(p.feed(data)), p.buffered
    except HTTPError as exc:
        return exc.status


HEAD_PIECES = [b"GET", b"POST", b" ", b"/", b"/a?b=c", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0",
               b"\r\n", b"\n", b"\r", b"Host: h", b"host:h", b"X-A: v", b"X-A:\tv \t",
               b"X A: v", b":", b"\x00", b"\x7f", b"\xff", b"\t", b"Content-Length: 2",
               b"Transfer-Encoding: chunked", b"Connection: close", b"ab", b"\r\n\r\n"]


@settings(max_examples=800)
@given(st.lists(st.sampled_from(HEAD_PIECES), max_size=30))
def test_native_and_python_head_parsers_agree(pieces):
    """Differential test: the C scanner accepts, splits and refuses exactly
    what the regular expressions do (same status)."""
    data = b"".join(pieces)
    assert outcome(data, parse_head) == outcome(data, None)
