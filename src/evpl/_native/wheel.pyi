"""Type stubs for the pacing timing wheel."""

from collections.abc import Callable
from typing import Any

from evpl._native.loop import LoopCore

class TimingWheel:
    slot_ns: int
    nslots: int
    queued: int
    inserted: int
    sent: int
    clamped: int
    failed: int
    firings: int
    def __init__(self, loop: LoopCore, slot_ns: int = ..., nslots: int = ...) -> None: ...
    def insert(self, when_ns: int, send: Callable[[Any], Any], data: Any, tag: Any) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def clear(self) -> None: ...
