"""Pattern 1, in place: the thread that received the request answers it.

The cheapest answer for work that takes microseconds (parsing, a lookup, a
small computation): no hand-off, no copy, no wake-up. Run it, then
``python examples/delegate_in_place.py --client``.
"""

import socket
import struct
import sys

import evpl

ADDRESS = ("127.0.0.1", 9310)
FRAMING = evpl.framing.length_prefix(4, "big")


class Upper(evpl.Handler):
    def on_messages(self, bind, msgs):
        bind.send_messages([bytes(m).upper() for m in msgs])


def client() -> None:
    with socket.create_connection(ADDRESS) as s:
        s.sendall(struct.pack("!I", 5) + b"hello")
        n = struct.unpack("!I", s.recv(4))[0]
        print(s.recv(n).decode())


if __name__ == "__main__":
    if "--client" in sys.argv:
        client()
    else:
        loop = evpl.Loop()
        loop.listen("tcp", ADDRESS, Upper, framing=FRAMING)
        loop.run()
