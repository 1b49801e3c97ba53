"""Run by test_shards.py: two shards that report their pid and wait; the test
sends SIGTERM to this process, which must stop both and print the statuses
(or kills it: the shards must notice). argv[1]: the shards' poll_mode."""

import os
import sys

from evpl import shards


def main(shard):
    os.write(1, f"ready {os.getpid()}\n".encode())     # one write: lines never interleave


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "hybrid"
    print("statuses", shards.run(main, 2, poll_mode=mode), flush=True)
    sys.exit(0)
