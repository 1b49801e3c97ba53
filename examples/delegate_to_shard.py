"""Pattern 3, to another shard: every shard accepts connections on the same
port; a request for a key owned by another shard is forwarded there with
``submit_to`` and answered when that shard's reply comes back. Each shard
owns its part of the data, so no lock is ever taken (Seastar's model).
Run it, then ``python examples/delegate_to_shard.py --client``.
"""

import socket
import struct
import sys
import zlib

import evpl
from evpl import shards

ADDRESS = ("127.0.0.1", 9312)
FRAMING = evpl.framing.length_prefix(4, "big")


def main(shard: shards.Shard) -> None:
    store = {}              # this shard's keys only

    def local(key: bytes) -> bytes:
        value = store.setdefault(key, b"%d" % len(store))
        return b"shard %d: %s=%s" % (shard.id, key, value)

    shard.on_request = lambda src, key: local(key)

    class Lookup(evpl.Handler):
        def on_message(self, bind, msg):
            key = bytes(msg)
            owner = zlib.crc32(key) % shard.count
            if owner == shard.id:
                bind.send(local(key))                       # in place
            else:
                fut = shard.submit_to(owner, key)           # to the owner
                fut.add_done_callback(lambda f: bind.send(f.result()) if not bind.closed
                                      else None)

    shard.listen("kv", Lookup, framing=FRAMING)


def client() -> None:
    with socket.create_connection(ADDRESS) as s:
        for key in (b"apple", b"pear", b"plum", b"fig"):
            s.sendall(struct.pack("!I", len(key)) + key)
            n = struct.unpack("!I", s.recv(4))[0]
            print(s.recv(n).decode())


if __name__ == "__main__":
    if "--client" in sys.argv:
        client()
    else:
        print("statuses", shards.run(main, listen={"kv": ("tcp", ADDRESS)}))
