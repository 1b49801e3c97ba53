"""Pattern 2, to a worker: a request that blocks (a file, a blocking client
library, a C routine that releases the GIL) goes to a WorkerPool thread;
the reply is sent from the loop when the result comes back.

``on_full="pause"`` stops reading from a connection while the worker queue
is full, so a fast client is held back by TCP instead of growing a queue.
Run it, then ``python examples/delegate_to_worker.py --client``.
"""

import hashlib
import socket
import struct
import sys

import evpl
from evpl.threads import WorkerPool

ADDRESS = ("127.0.0.1", 9311)
FRAMING = evpl.framing.length_prefix(4, "big")
workers = WorkerPool(workers=2, max_queued=64)


def digest(data: bytes) -> bytes:
    # hashlib releases the GIL on large inputs: real parallel work
    return hashlib.sha256(data * 10_000).hexdigest().encode()


class Hasher(evpl.Handler):
    def on_message(self, bind, msg):
        fut = bind_loop.offload(digest, bytes(msg), workers=workers, on_full="pause", bind=bind)
        # done callbacks run on the loop's thread: the Bind may be used here
        fut.add_done_callback(lambda f: bind.send(f.result()) if not bind.closed else None)


def client() -> None:
    with socket.create_connection(ADDRESS) as s:
        s.sendall(struct.pack("!I", 3) + b"abc")
        n = struct.unpack("!I", s.recv(4))[0]
        print(s.recv(n).decode())


if __name__ == "__main__":
    if "--client" in sys.argv:
        client()
    else:
        bind_loop = evpl.Loop()
        bind_loop.listen("tcp", ADDRESS, Hasher, framing=FRAMING)
        bind_loop.run()
