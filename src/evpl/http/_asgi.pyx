# cython: language_level=3, binding=True
"""One ASGI ``http`` call, compiled: its scope and task (``start``), and
the app's ``receive`` and ``send`` (``AsgiCall``).

An ASGI app awaits ``send`` twice per response and usually ``receive``
not at all or once, and each returns at once unless the client is slow or
the body has not arrived. As ``async def`` methods each await was a
coroutine object, its frame and a dict look-up per key in Python. Here
``send``/``receive`` are methods of a C type that do their work when
called and return a Future that is already done (``send``: one shared
Future whose result is None; awaiting a done asyncio Future returns its
result through the Future's C iterator, with no exception raised or
caught); only a call that must wait returns a coroutine (waiting for the
body, or for a slow client to drain). So ``await send(msg)`` works as
ASGI says, and so do ``asyncio.ensure_future(send(msg))`` and
``asyncio.wait_for``; what an app cannot do is hand ``send(msg)`` to
``asyncio.create_task``, which takes coroutines only (granian's ``send``
is not a coroutine either).

The behaviour is the one asgi.py documents: backpressure on ``send`` with
a body while the connection is paused; ``Expect: 100-continue`` answered
on the first ``receive`` that has to wait; ``http.disconnect`` once the
client is gone or the response ended and the body was read.
"""

import asyncio
from asyncio import Task
from urllib.parse import unquote

__all__ = ["ASGI_VERSION", "AsgiCall", "asgi_addr", "start"]

#: the scope's ``asgi`` entry
ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}


cpdef object asgi_addr(peer):
    """ASGI's ``(host, port)`` of a socket address (None for unix sockets)."""
    if type(peer) is tuple:
        return peer if len(<tuple>peer) == 2 else peer[:2]
    return None


def start(ex, app, aloop, done, root_path, server_addr, dict state, run):
    """Start the app on one exchange: the ``http`` scope, the AsgiCall,
    and the request's Task running ``run(call, app, scope)`` on ``aloop``
    (``done``: the AsgiCall's done Future; ``server_addr``: the scope's
    ``server``; ``state``: the lifespan state, copied per request)."""
    req = ex.request
    target = req.target
    path, _, query = target.partition("?")
    client = asgi_addr(ex.peer)
    scope = {
        "type": "http", "asgi": ASGI_VERSION, "http_version": req.version,
        "method": req.method, "scheme": ex.scheme,
        "path": unquote(path) if "%" in path else path, "raw_path": path.encode("ascii"),
        "query_string": query.encode("ascii"), "root_path": root_path,
        "headers": req.headers, "client": client,
        "server": server_addr, "state": state.copy() if state else {},
    }
    call = AsgiCall(ex, aloop, done)
    if not req.complete:
        ex.on_body = call.body_more
        ex.on_body_end = call.body_end
    ex.on_disconnect = call.disconnect
    ex.on_writable = call.resume
    # (create_task minus its checks; a constant name: no "Task-N" formatted per request)
    Task(run(call, app, scope), loop=aloop, name="asgi")


cdef dict _seen_headers = {}


cdef list _headers(raw):
    """An app's response headers as lower-case ``bytes`` pairs (what the
    server's framing checks expect); header lists an app sends again and
    again (a constant ``http.response.start``) come from a small cache."""
    try:
        key = tuple(raw)
        got = _seen_headers.get(key)
    except TypeError:               # unhashable (lists as pairs): no cache
        return [(bytes(k).lower(), bytes(v)) for k, v in raw]
    if got is None:
        got = [(bytes(k).lower(), bytes(v)) for k, v in raw]
        if len(_seen_headers) >= 256:
            _seen_headers.clear()
        _seen_headers[key] = got
    return <list>got


cdef object _EMPTY_HEADERS = ()


cdef class AsgiCall:
    """One ASGI ``http`` call: the app's ``receive``/``send`` over one
    Exchange (evpl.http.server)."""

    cdef public object ex
    cdef public list chunks
    cdef public bint more, disconnected, started, ended, wanted, body_done
    cdef public object waiter, writable
    cdef object loop, done

    def __cinit__(self, ex, loop, done):
        """``loop``: the asyncio loop the app runs on; ``done``: a Future
        of that loop whose result is None (``send``'s answer)."""
        self.ex = ex
        self.loop = loop
        self.done = done
        self.chunks = []
        req = ex.request
        complete = req.complete
        self.more = not complete
        if complete:
            body = req.body
            if body:
                self.chunks.append(body)

    # from the connection
    def body(self, data, more):
        if data:
            self.chunks.append(data)
        self.more = more
        self._wake()

    def body_more(self, data):
        """A piece of the request body, more to come (the Exchange's
        ``on_body``)."""
        self.body(data, True)

    def body_end(self):
        self.body(b"", False)

    def disconnect(self):
        self.disconnected = True
        self._wake()
        self.resume()

    def resume(self):
        if self.writable is not None:
            self.writable.set()

    cdef _wake(self):
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # the app's callables
    cdef object _message(self):
        """The message ``receive`` returns now, or None if it must wait."""
        cdef list chunks = self.chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self.body_done = not self.more
            return {"type": "http.request", "body": data, "more_body": self.more}
        if not self.more and not self.body_done:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.disconnected or (self.ended and self.body_done):
            return {"type": "http.disconnect"}
        return None

    def receive(self):
        msg = self._message()
        if msg is not None:
            fut = self.loop.create_future()
            fut.set_result(msg)
            return fut
        return self._receive_later()

    async def _receive_later(self):
        while True:
            msg = self._message()
            if msg is not None:
                return msg
            if self.more and not self.wanted:
                self.wanted = True
                self.ex.want_body()
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def send(self, dict msg):
        kind = msg["type"]
        if self.disconnected:
            return self.done
        ex = self.ex
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            ex.start(int(msg["status"]), _headers(msg.get("headers", _EMPTY_HEADERS)))
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.ended:
                raise RuntimeError("http.response.body after the body ended")
            body = msg.get("body", b"")
            if body:
                ex.write(body if type(body) is bytes else bytes(body))
            if not msg.get("more_body", False):
                self.ended = True
                self._wake()
                ex.end()
            elif ex.paused and not self.disconnected:
                return self._drained()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        return self.done

    async def _drained(self):
        """The client is slow: wait until the connection drained."""
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()
        await self.writable.wait()
