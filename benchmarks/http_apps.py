"""The apps benchmarks/http_bench.py serves, one per interface, each in its
fastest idiomatic form: GET / returns 13 bytes of text, GET /big 64 KiB."""

from __future__ import annotations

from evpl.http import Response

HELLO = b"Hello, world!"
BIG = b"x" * 65536


# evpl native: app(request) -> Response, called in the loop
def native(request):
    return Response(BIG if request.target == "/big" else HELLO, content_type=b"text/plain")


# a bare ASGI 3.0 app (served by evpl, uvicorn and granian alike)
_HEAD = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]}
_HEAD_BIG = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/plain"), (b"content-length", b"65536")]}
_BODY = {"type": "http.response.body", "body": HELLO}
_BODY_BIG = {"type": "http.response.body", "body": BIG}


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                await send({"type": m["type"] + ".complete"})
                if m["type"] == "lifespan.shutdown":
                    return
        return
    big = scope["path"] == "/big"
    await send(_HEAD_BIG if big else _HEAD)
    await send(_BODY_BIG if big else _BODY)


def _starlette():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("Hello, world!")

    async def big(request):
        return PlainTextResponse(BIG.decode())

    return Starlette(routes=[Route("/", hello), Route("/big", big)])


try:
    starlette = _starlette()
except ImportError:      # starlette not installed: that row is skipped
    starlette = None


# a bare WSGI app
def wsgi(environ, start_response):
    body = BIG if environ["PATH_INFO"] == "/big" else HELLO
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# granian's own interface (RSGI)
async def rsgi(scope, proto):
    if scope.path == "/big":
        proto.response_bytes(200, [("content-type", "text/plain")], BIG)
    else:
        proto.response_bytes(200, [("content-type", "text/plain")], HELLO)
