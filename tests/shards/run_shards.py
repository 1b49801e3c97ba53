"""Run by test_shards.py: two shards that report their pid and wait; the test
sends SIGTERM to this process, which must stop both and print the statuses
(or kills it: the shards must notice). argv[1]: the shards' poll_mode;
argv[2] "stubborn": the shards block SIGTERM, so only the grace period's
SIGKILL (0.5 s) stops them."""

import os
import signal
import sys

from evpl import shards

STUBBORN = len(sys.argv) > 2 and sys.argv[2] == "stubborn"


def main(shard):
    if STUBBORN:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.write(1, f"ready {os.getpid()}\n".encode())     # one write: lines never interleave


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "hybrid"
    grace = 0.5 if STUBBORN else 10.0
    print("statuses", shards.run(main, 2, poll_mode=mode, grace=grace), flush=True)
    sys.exit(0)
