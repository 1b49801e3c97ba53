"""evpl.http: HTTP/1.1 and HTTP/2 server and client (see docs/http.md).

- :mod:`evpl.http.wire`: the sans-I/O HTTP/1.1 core (parsing, encoding);
- :class:`Server`: serves a native, ASGI or WSGI app on an evpl Loop;
- :class:`Client`: a keep-alive client with a per-host connection pool.
"""


from evpl.http.client import Client, ClientResponse
from evpl.http.server import Exchange, Response, Server, StreamingResponse, Upgrade
from evpl.http.wire import HTTPError, Request

__all__ = ["Client", "ClientResponse", "Exchange", "HTTPError", "Request", "Response", "Server",
           "StreamingResponse", "Upgrade"]
