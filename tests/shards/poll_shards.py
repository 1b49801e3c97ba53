"""Run by test_shards.py: two shards in poll mode. Prints "pids P0 P1", then
shard 0 waits for a line on stdin ("go"), makes N round trips to shard 1,
prints "done N" and waits for another line ("stop") before it stops the
group."""

import os
import sys

from evpl import shards

N = int(sys.argv[1])


def main(shard):
    if shard.id == 1:
        shard.on_request = lambda src, payload: payload
        return
    loop = shard.loop
    count = [0]

    def again(_f=None):
        count[0] += 1
        if count[0] <= N:
            shard.submit_to(1, bytes(64)).add_done_callback(again)
        else:
            os.write(1, f"done {count[0] - 1}\n".encode())
            watch.modify(on_readable=stop)

    def go():
        os.read(0, 3)                   # the tracer is attached to shard 1
        watch.modify()                  # (no more interest until the round trips end)
        again()

    def stop():
        os.read(0, 5)                   # the tracer has detached
        watch.cancel()
        shard.stop_group()

    watch = loop.watch_fd(0, on_readable=go)


if __name__ == "__main__":
    group = shards.start(main, 2, poll_mode="always")
    print("pids", *group.pids, flush=True)
    print("statuses", group.wait(), flush=True)
