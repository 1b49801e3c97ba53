# cython: language_level=3, binding=True
"""``StreamTransport``'s per-read and per-write methods, compiled.

They run once per read and once per ``transport.write``: as Python
methods they were two interpreter frames around the one frame that matters
(the protocol's ``data_received``), which is what uvloop saves by being
Cython. They are plain functions bound as methods of the Python class
(``binding=True``), so the transport keeps its asyncio base classes and
its attributes; only the frames go. Behaviour is the Python version's,
line for line.
"""

from asyncio import constants
from asyncio.log import logger

from cpython.bytes cimport PyBytes_FromStringAndSize

from evpl._native.buffers cimport Buffer

from evpl.errors import EvplError


def on_data(self, bind, data):
    """A read: ``data_received(bytes)`` (a copy, as asyncio promises), or
    the BufferedProtocol's buffers filled."""
    if self._closing:
        return
    try:
        if self._buffered:
            self._feed_buffered(data)
        elif type(data) is Buffer:
            self._protocol.data_received(
                PyBytes_FromStringAndSize((<Buffer>data).ptr, (<Buffer>data).length))
        else:
            self._protocol.data_received(bytes(data))
    except (SystemExit, KeyboardInterrupt) as exc:
        self._loop._stash(exc)
    except BaseException as exc:
        self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")


def write(self, data):
    """Queue ``data`` on the Bind (bytes are sent from where they lie,
    mutable buffers copied once); dropped, with asyncio's warning after a
    few, once the connection is lost."""
    if type(data) is not bytes and not isinstance(data, (bytearray, memoryview)):
        raise TypeError(f"data argument must be a bytes-like object, "
                        f"not {type(data).__name__!r}")
    if self._eof:
        raise RuntimeError("Cannot call write() after write_eof()")
    if not data:
        return
    bind = self._bind
    if not self._conn_lost and bind is not None:
        try:
            bind.send(data)
            return
        except EvplError:
            if not bind.closed and not self._closing:
                raise
    # the connection is gone (or going): asyncio drops the data, and warns
    # once a program keeps writing
    if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
        logger.warning("socket.send() raised exception.")
    self._conn_lost += 1
