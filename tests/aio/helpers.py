"""Helpers for the asyncio loop tests."""

from __future__ import annotations

import asyncio
from typing import Any


def run(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 30) -> Any:
    """Run ``coro`` on ``loop`` with a generous timeout (a hang fails)."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))
