"""The callbacks a Bind delivers, with do-nothing defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evpl._native.bind import Bind
    from evpl._native.buffers import Buffer
    from evpl.errors import EvplError

__all__ = ["Handler"]


class Handler:
    """Subclass and override what you need.

    A handler instance may serve one Bind or many: every callback receives
    the Bind it is about. Callbacks run on the loop's thread and must not
    block. An exception escaping a callback is reported (``Loop.exception_handler``
    or the ``evpl`` logger) and closes that Bind.
    """

    def on_connected(self, bind: Bind) -> None:
        """The connection is established (accepted or connected)."""

    def on_data(self, bind: Bind, data: Buffer) -> None:
        """Stream bytes arrived on a Bind without framing."""

    def on_message(self, bind: Bind, msg: Buffer) -> None:
        """One whole message arrived on a framed Bind (header stripped)."""

    def on_datagram(self, bind: Bind, data: Buffer, addr: Any) -> None:
        """One datagram arrived from ``addr``."""

    def on_messages(self, bind: Bind, msgs: list[Buffer]) -> None:
        """Every whole message of one read, in order, in one call: override
        it instead of ``on_message`` to save a Python call per message (reply
        with one ``bind.send_messages(replies)``). Called only if overridden;
        this default hands each message to ``on_message``."""
        for msg in msgs:
            self.on_message(bind, msg)

    def on_datagrams(self, bind: Bind, datagrams: list[tuple[Buffer, Any]]) -> None:
        """Every datagram of one read batch as ``(data, addr)`` pairs, in one
        call. Called only if overridden; this default hands each to
        ``on_datagram``."""
        for data, addr in datagrams:
            self.on_datagram(bind, data, addr)

    def on_datagram_error(self, bind: Bind, error: OSError) -> None:
        """A datagram socket reported an error (an ICMP message such as port
        unreachable, which is ``ConnectionRefusedError`` on a connected
        Bind, or a send the kernel refused): the datagram concerned is
        dropped and the Bind stays open. Called only if overridden; by
        default the error is counted and a connected datagram Bind whose
        peer refuses is closed with ``ConnectionRefused``."""

    def on_paused(self, bind: Bind) -> None:
        """The send queue went above its high-water mark: stop sending."""

    def on_writable(self, bind: Bind) -> None:
        """After a pause, the send queue drained below its low-water mark."""

    def on_sent(self, bind: Bind) -> None:
        """The send queue became empty (called only if overridden)."""

    def on_eof(self, bind: Bind) -> None:
        """The peer shut down its sending side. By default: finish and close."""
        bind.finish()

    def on_closed(self, bind: Bind, error: EvplError | None) -> None:
        """The Bind is closed; ``error`` says why, ``None`` for a clean close."""
