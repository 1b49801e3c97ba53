"""A call's completion, the part every protocol client shares (rpc2's
``RpcCall``, drpc's ``Call``): completes once with a value or an exception;
``done``, ``result()``, ``exception()``, ``add_done_callback(fn)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evpl.errors import EvplError

_PENDING: Any = object()


class Completion:
    """Completes once with a value or an exception; callbacks run then (at
    once if added after)."""

    __slots__ = ("_callbacks", "_exc", "_value")

    def __init__(self) -> None:
        self._value: Any = _PENDING
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Any], Any]] | None = None

    def _what(self) -> str:
        """How errors name this call ("call 0x1f", "the drpc call")."""
        return "the call"

    def _complete(self, value: Any, exc: BaseException | None) -> None:
        if exc is not None:
            self._exc = exc
        else:
            self._value = value
        cbs, self._callbacks = self._callbacks, None
        if cbs:
            for fn in cbs:
                fn(self)

    @property
    def done(self) -> bool:
        """True once a result or an exception is set."""
        return self._value is not _PENDING or self._exc is not None

    def result(self) -> Any:
        """The result; raises the call's exception if it failed."""
        if self._exc is not None:
            raise self._exc
        if self._value is _PENDING:
            raise EvplError(f"{self._what()} has not completed yet")
        return self._value

    def exception(self) -> BaseException | None:
        """The exception the call failed with, ``None`` if it succeeded."""
        if not self.done:
            raise EvplError(f"{self._what()} has not completed yet")
        return self._exc

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(self)`` when the call completes (now, if it already has)."""
        if self.done:
            fn(self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)
