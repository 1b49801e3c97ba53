"""Shards: one process per core, sharing nothing, talking through
shared-memory rings (the Seastar model, in processes; see docs/cores.md).

``run(main, n)`` starts ``n`` processes, pins each to a CPU and calls
``main(shard)``; ``shard.submit_to(k, payload)`` and ``shard.send_to(k,
payload)`` reach shard ``k``'s ``on_request`` / ``on_message`` through a
lock-free ring per ordered pair of shards, polled by each shard's loop.
Processes have no shared GIL: this is how evpl runs Python on every core.
"""

from evpl.shards.group import ShardGroup, run, start
from evpl.shards.shard import Shard, ShardFuture

__all__ = ["Shard", "ShardFuture", "ShardGroup", "run", "start"]
