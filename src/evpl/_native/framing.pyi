"""Type stubs for the engine-side framers."""

from collections.abc import Callable

class Framer:
    kind: int
    size: int
    big: bool
    includes_header: bool
    max_message: int
    fn: Callable[[memoryview], int] | None
    def __init__(self, kind: int, size: int = ..., big: bool = ...,
                 includes_header: bool = ..., max_message: int = ...,
                 fn: Callable[[memoryview], int] | None = ...) -> None: ...
