# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The Bind and Listener bases: what every backend shares.

A Bind is one connection or datagram socket. This module holds everything
about it that does not depend on how bytes reach the kernel: the user's
callbacks, the send API and the send queue's accounting (watermarks, pause
and writable events, ``finish``), the life cycle (connected, EOF, close,
errors, timeouts), the reassembler that turns received bytes into whole
messages with the Bind's framer, the backlog that keeps what was received
while reading is paused, and datagram delivery (GRO trains cut into
datagrams).

A backend subclasses Bind and fills the overloads declared first in
bind.pxd: ``_opened`` (start receiving once open), ``_send_queued`` (write
the queue or put it in flight), ``_send_busy`` (sends still in flight),
``_arm_reading``/``_disarm_reading`` (resume/pause), ``_release`` (cancel
in-flight work and close the fd), plus the loop's ``_event`` and ``_read``
for sources it registers. docs/engine.md ("How to add a backend") walks
through it.

Receiving: a backend hands bytes that landed in pool memory to ``_take``:
whole messages are delivered as Buffers that slice that memory (no copy); a
message cut by the end of a receive stays where it is and is completed by
the next receive in place when it lands right after it, otherwise by copying
just the missing bytes after it (in a chunk of the Bind's own). Messages
larger than a quarter of a pool buffer are assembled in a chunk of their
own, which a backend may read straight into (``part_asm``).
"""

cimport cython
from cpython.ref cimport PyObject, Py_DECREF
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.errno cimport ECONNREFUSED, EINVAL, EIO, EMSGSIZE
from libc.string cimport memcpy, memcmp, memset, strerror, strlen
from posix.unistd cimport close as c_close

from evpl._native.buffers cimport Pool, Buffer, Chunk, make_buffer, chunk_unref
from evpl._native.framing cimport (Framer, scan_length, scan_record, F_NONE, F_LENGTH,
                                   F_RECORD, F_CALLABLE, F_FIXED, E_OVERSIZE, E_FRAGMENTS,
                                   MAX_FRAGMENTS, F_ZMTP, scan_zmtp, ZMTP_MAX_FRAMES)
from evpl._native.loop cimport _Source, LoopCore, Timer
from evpl._native.sys cimport *
from evpl._native.txqueue cimport *

from evpl.errors import (EvplError, FramingError, SendQueueFull, ConnectionRefused,
                         TimeoutError as _Timeout, transport_error)


cdef object sa_to_py(sockaddr* sa, socklen_t salen):
    """A Python address (like the socket module's) from a sockaddr."""
    cdef char text[64]
    cdef sockaddr_in* s4
    cdef sockaddr_in6* s6
    cdef sockaddr_un* su
    cdef Py_ssize_t n
    if sa.sa_family == AF_INET:
        s4 = <sockaddr_in*>sa
        inet_ntop(AF_INET, &s4.sin_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(s4.sin_port))
    if sa.sa_family == AF_INET6:
        s6 = <sockaddr_in6*>sa
        inet_ntop(AF_INET6, &s6.sin6_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(s6.sin6_port), ntohl(s6.sin6_flowinfo),
                s6.sin6_scope_id)
    if sa.sa_family == AF_UNIX:
        su = <sockaddr_un*>sa
        n = <Py_ssize_t>salen - <Py_ssize_t>sizeof(sa_family_t)
        if n <= 0:
            return ""
        if su.sun_path[0] == 0:
            return su.sun_path[:n].decode("utf-8", "surrogateescape")
        return su.sun_path[:strlen(su.sun_path)].decode("utf-8", "surrogateescape")
    return None


cdef int py_to_sa(object addr, sockaddr_in6* out, socklen_t* outlen) except -1:
    """Fill an IPv4 or IPv6 sockaddr from a (host, port[, flow, scope]) tuple."""
    cdef sockaddr_in* s4 = <sockaddr_in*>out
    cdef bytes host
    cdef int port
    if not isinstance(addr, tuple) or len(addr) < 2:
        raise TypeError(f"address must be a (host, port) tuple, got {addr!r}")
    host = str(addr[0]).encode("ascii")
    port = addr[1]
    if port < 0 or port > 65535:
        raise ValueError(f"port out of range: {port}")
    memset(out, 0, sizeof(sockaddr_in6))
    if inet_pton(AF_INET, host, &s4.sin_addr) == 1:
        s4.sin_family = AF_INET
        s4.sin_port = htons(port)
        outlen[0] = sizeof(sockaddr_in)
        return 0
    if inet_pton(AF_INET6, host, &out.sin6_addr) == 1:
        out.sin6_family = AF_INET6
        out.sin6_port = htons(port)
        if len(addr) > 2:
            out.sin6_flowinfo = htonl(addr[2])
        if len(addr) > 3:
            out.sin6_scope_id = addr[3]
        outlen[0] = sizeof(sockaddr_in6)
        return 0
    raise ValueError(f"not a numeric IP address: {addr[0]!r} (resolve names before sendto)")


@cython.final
cdef class Limits:
    """Per-Bind limits, checked once by ``evpl.Loop`` (see docs/api.md):
    send queue watermarks, the largest datagram, and timeouts in seconds (0:
    none) for an idle connection and for a message that has started to
    arrive but not completed."""

    def __init__(self, size_t high_water=1 << 20, size_t low_water=1 << 18,
                 size_t hard_limit=16 << 20, size_t max_datagram=65507,
                 double idle_timeout=0, double message_timeout=0):
        self.high_water = high_water
        self.low_water = low_water
        self.hard_limit = hard_limit
        self.max_datagram = max_datagram
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout

    def __repr__(self):
        return (f"Limits(high_water={self.high_water}, low_water={self.low_water}, "
                f"hard_limit={self.hard_limit}, max_datagram={self.max_datagram}, "
                f"idle_timeout={self.idle_timeout}, message_timeout={self.message_timeout})")


# datagrams a sink may queue during a read batch before they are sent
DEF SINK_FLUSH = 16


cdef class DatagramSink:
    """Base of handlers whose datagrams are taken in C (see bind.pxd); a
    subclass overrides ``dg_take``, and ``dg_end`` if it acts once per
    read batch."""

    cdef int dg_take(self, object bind, Buffer buf, object addr) except -1:
        raise NotImplementedError

    cdef int dg_end(self, object bind) except -1:
        return 0

    cdef Py_ssize_t dg_place(self, object bind, unsigned int i, char** dst,
                             Py_ssize_t* head) noexcept:
        return 0

    cdef int dg_placed(self, object bind, const char* hdr, Py_ssize_t length, char* dst,
                       object addr) except -1:
        return 0


@cython.no_gc_clear
cdef class Bind(_Source):
    """One connection or datagram socket, whatever the backend.

    Created by ``Loop.listen`` (accepted), ``Loop.connect`` and ``Loop.bind``.
    """

    def __dealloc__(self):
        txq_free(&self.txq)
        if self.part_chunk != NULL and self.pool is not None:
            chunk_unref(self.pool, self.part_chunk)
            self.part_chunk = NULL

    # ---- overloads (a backend fills these) ----------------------------------

    cdef void _opened(self):
        """The Bind is open: start receiving."""
        pass

    cdef int _send_queued(self) except -1:
        """Write what is queued, or put it in flight. Returns 1 if the send
        finished now (the base then runs the drain/backpressure events), 0
        if a completion will."""
        return 1

    cdef bint _send_busy(self):
        """Sends are still in flight (the kernel reads queued memory)."""
        return False

    cdef int _arm_reading(self) except -1:
        """Reading resumed: receive again (the backlog was drained)."""
        return 0

    cdef void _disarm_reading(self):
        """Reading paused or ended: stop receiving now."""
        pass

    cdef void _release(self):
        """Closing: cancel in-flight work, drop or hand over the send queue,
        close the fd."""
        pass

    # ---- configuration --------------------------------------------------

    cdef void _setup(self, LoopCore loop, int fd, str backend, bint stream, handler,
                     Framer framer, Limits limits):
        self.loop = loop
        self.pool = loop.pool
        self.fd = fd
        self.backend = backend
        self.stream = stream
        self.state = S_CONNECTING
        self.handler = handler
        self.cb_connected = handler.on_connected
        self.cb_data = handler.on_data
        self.cb_message = handler.on_message
        self.cb_datagram = handler.on_datagram
        self.cb_paused = handler.on_paused
        self.cb_writable = handler.on_writable
        self.cb_eof = handler.on_eof
        self.cb_closed = handler.on_closed
        self.cb_sent = handler.on_sent if type(handler).on_sent is not loop.base_on_sent else None
        # batch delivery when the handler's class overrides the batch callbacks
        base = loop.base_handler
        cls = type(handler)
        if base is not None and getattr(cls, "on_messages", None) is not base.on_messages:
            self.cb_messages = handler.on_messages
        if base is not None and getattr(cls, "on_datagrams", None) is not base.on_datagrams:
            self.cb_datagrams = handler.on_datagrams
        if isinstance(handler, DatagramSink):
            self.sink = <DatagramSink>handler
        self.framer = framer
        self.fr_kind = framer.kind if framer is not None else F_NONE
        self.max_message = framer.max_message if framer is not None else 0
        self.high_water = limits.high_water
        self.low_water = limits.low_water
        self.hard_limit = limits.hard_limit
        self.max_datagram = limits.max_datagram
        self.stride = (limits.max_datagram + 63) & ~(<size_t>63)
        self.idle_ns = <int64_t>(limits.idle_timeout * 1e9)
        self.msg_ns = <int64_t>(limits.message_timeout * 1e9) if framer is not None else 0
        loop.sources.add(self)

    cdef void _adopt_stream(self, peer, bint connecting, int connect_errno):
        """A backend's adoption of a stream socket, after ``_setup``."""
        self._peer = peer
        if connect_errno:
            self._close(transport_error(connect_errno, f"connect to {peer!r}"))
        elif not connecting:
            self._connected()

    cdef void _adopt_datagram(self, bint gso, peer, bint gro_fits, bint gro=True):
        """A backend's adoption of a datagram socket, after ``_setup``:
        ``gso`` sends trains to one peer with UDP GSO and accepts them with
        UDP GRO when ``gro_fits`` (every receive slot holds a whole train);
        ``gro`` false lays the receives out for trains but leaves the
        kernel's UDP_GRO off until ``_set_gro`` (the ``gro`` property);
        ``peer``: the socket is connected to it."""
        self.gso_limit = 65536 if gso else 0
        if peer is not None:
            self._peer = peer
            self.dgram_connected = True
        if gso and gro_fits:
            self.gro = True
            if gro and not self._set_gro(True):
                self.gro = False        # (refused: datagrams arrive one by one)
        self._connected()

    cdef bint _set_gro(self, bint on) noexcept:
        """Set or clear the kernel's UDP_GRO on a Bind laid out for trains;
        whether it is now set. Clearing it saves the kernel ~0.1 µs per
        datagram received (measured over loopback), which matters to
        request-response traffic that never sees a train."""
        cdef int v = on
        if self.gro and on != self.gro_on and self.state != S_CLOSED and \
                setsockopt(self.fd, IPPROTO_UDP, UDP_GRO, &v, sizeof(v)) == 0:
            self.gro_on = on
        return self.gro_on

    # ---- public API ------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.state == S_CLOSED

    @property
    def connected(self) -> bool:
        return self.state == S_OPEN

    @property
    def gro(self) -> bool:
        """Whether the kernel hands this datagram Bind trains of datagrams
        whole (UDP GRO; each is still delivered datagram by datagram).
        Settable: a Bind made with ``gro=False`` may turn it on once it
        expects trains; False on a Bind whose receive slots cannot hold a
        train (see ``gso`` in docs/api.md)."""
        return self.gro_on

    @gro.setter
    def gro(self, bint on) -> None:
        if on and not self.gro:
            raise EvplError("this Bind cannot take UDP GRO trains (a backend or receive "
                            "slots without room for one, or gso=False)")
        if self._set_gro(on) != on and self.state != S_CLOSED:
            raise EvplError(f"setting UDP_GRO to {int(on)} failed")

    @property
    def framed(self) -> bool:
        return self.fr_kind != F_NONE

    @property
    def local_address(self):
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        if self.state == S_CLOSED or getsockname(self.fd, <sockaddr*>&ss, &n) < 0:
            return None
        return sa_to_py(<sockaddr*>&ss, n)

    @property
    def peer_address(self):
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        if self._peer is None and self.state != S_CLOSED:
            if getpeername(self.fd, <sockaddr*>&ss, &n) == 0:
                self._peer = sa_to_py(<sockaddr*>&ss, n)
        return self._peer

    @property
    def high_water(self) -> int:
        return self.high_water

    def send(self, data, header=None) -> None:
        """Queue ``data`` (a message on a framed Bind; a datagram to the peer
        on a connected datagram Bind) for sending at the end of this loop
        iteration. Raises SendQueueFull past the hard limit.

        ``header`` (datagram Binds only; at most 32 bytes, copied) goes in
        front of ``data`` in the same datagram, so a protocol can put its
        header on a payload it holds without building ``header + data``:
        a Buffer or bytes payload is sent from where it lies."""
        if header is None:
            self._send_data(data)
        else:
            self._send_with_header(header, data, None, False)

    cdef int _send_data(self, data) except -1:
        """``send`` for compiled callers (evpl.aio's transport write): no
        Python method call."""
        cdef TxMark m
        cdef Py_ssize_t n
        self._can_send()
        m = txq_mark(&self.txq)
        n = self._push_message(data)
        self._queued(n, m)
        return 0

    def sendv(self, pieces) -> None:
        """Queue several pieces as one message (one header on a framed Bind)."""
        cdef TxMark m
        cdef Py_ssize_t total
        self._can_send()
        m = txq_mark(&self.txq)
        try:
            total = self._push_pieces(pieces)
        except BaseException:
            txq_undo(&self.txq, m)          # all or nothing: drop the pieces queued
            raise
        if txq_changed(&self.txq, m):
            self._queued(total, m)

    def send_messages(self, msgs) -> None:
        """Queue each item of ``msgs`` as one message (its own header on a
        framed Bind; one datagram each on a connected datagram Bind): the
        reply batch to an ``on_messages`` batch, in one call. On a stream
        Bind an item may be a tuple of pieces, sent as one message (as
        ``sendv`` would), so a reply can carry a large payload by reference
        next to its header. All or nothing: if one item is refused, none is
        queued."""
        cdef TxMark m
        cdef size_t total = 0
        cdef Py_ssize_t n
        cdef Framer f = self.framer if self._frames_sends() else None
        self._can_send()
        m = txq_mark(&self.txq)
        try:
            for msg in msgs:
                if type(msg) is Buffer and self.stream:
                    n = txq_merge(&self.txq, <Buffer>msg, f)
                    total += n if n >= 0 else self._push_entry(msg)
                elif type(msg) is tuple:
                    total += self._push_pieces(msg)
                else:
                    total += self._push_message(msg)
        except BaseException:
            txq_undo(&self.txq, m)
            raise
        if txq_changed(&self.txq, m):
            self._queued(total, m)

    cdef Py_ssize_t _push_pieces(self, pieces) except -1:
        """Queue ``pieces`` as one stream message (its header in the first
        entry on a framed Bind); the bytes queued, header included. The
        caller drops the entries if this raises."""
        cdef TxMark m = txq_mark(&self.txq)
        cdef size_t total = 0
        cdef TxEntry* e
        if not self.stream:
            raise EvplError("datagram Bind: send one datagram at a time")
        for p in pieces:
            e = txq_push(&self.txq, p)
            total += e.len
        if self._frames_sends():
            if txq_since(&self.txq, m) == &self.txq.e[self.txq.tail]:
                txq_push(&self.txq, b"")    # an empty message still has its header
            e = txq_since(&self.txq, m)
            txq_frame(&self.txq, e, self.framer, total)
            total += e.hdrlen
        return total

    cdef bint _frames_sends(self):
        """Sends go through the framer: a header added (length prefix, record
        mark) or the size checked (fixed); a callable framer sends as is."""
        return self.fr_kind != F_NONE and self.fr_kind != F_CALLABLE and self.fr_kind != F_ZMTP

    cdef Py_ssize_t _push_message(self, data) except -1:
        """Queue one message: with its framing, or on a connected datagram
        Bind as one datagram to the peer; the bytes queued, header included.
        A received Buffer that follows the last queued one in memory extends
        its entry (``txq_merge``)."""
        cdef Py_ssize_t n
        if self.stream and type(data) is Buffer:
            n = txq_merge(&self.txq, <Buffer>data,
                          self.framer if self._frames_sends() else None)
            if n >= 0:
                return n
        return self._push_entry(data)

    cdef Py_ssize_t _push_entry(self, data) except -1:
        """``_push_message`` with a new entry (no merge tried)."""
        cdef TxEntry* e = txq_push(&self.txq, data)
        if self._frames_sends():
            txq_frame(&self.txq, e, self.framer, e.len)
        elif not self.stream:
            self._check_datagram(e)
            e.salen = 0                     # to the connected peer
        return e.len + e.hdrlen

    cdef int _check_datagram(self, TxEntry* e) except -1:
        """Refuse (and drop) a queued datagram larger than UDP allows."""
        cdef size_t n = txq_dg_size(e)
        if n > 65507:
            txq_unpush_from(&self.txq, e)
            raise ValueError(f"datagram of {n} bytes exceeds the UDP maximum (65507)")
        return 0

    cdef int _can_send(self) except -1:
        if self.state == S_CLOSED or self.finishing or self.shut_wr:
            raise EvplError("send on a closed Bind")
        if not self.stream and not self.dgram_connected:
            raise EvplError("datagram Bind: use sendto(data, addr)")
        return 0

    def sendto(self, data, addr, header=None) -> None:
        """Queue one datagram to ``addr``; sent with the iteration's batch.
        ``header``: as for ``send``."""
        if header is None:
            self._sendto_data(data, addr)
        else:
            self._send_with_header(header, data, addr, True)

    cdef int _send_with_header(self, header, data, addr, bint to) except -1:
        """``send``/``sendto`` (``to``) with a header piece."""
        cdef Py_buffer hv
        cdef const char* p
        cdef size_t n
        if self.stream:
            raise EvplError("header= is for datagram Binds (a stream's framing adds its own)")
        data = txq_memory(data, &p, &n)     # referenced, or copied, as send does
        PyObject_GetBuffer(header, &hv, PyBUF_SIMPLE)
        try:
            if hv.len > TX_HDR:
                raise ValueError(f"header of {hv.len} bytes: at most {TX_HDR}")
            if to:
                self._sendto_parts(<const unsigned char*>hv.buf, <uint8_t>hv.len, data, p, n,
                                   addr)
            else:
                self._send_parts(<const unsigned char*>hv.buf, <uint8_t>hv.len, data, p, n)
        finally:
            PyBuffer_Release(&hv)
        return 0

    cdef int _sendto_data(self, data, addr) except -1:
        """``sendto`` for compiled callers (drpc's server core): no Python
        method call."""
        cdef TxMark m
        cdef TxEntry* e
        self._sendto_check(addr)
        m = txq_mark(&self.txq)
        e = txq_push(&self.txq, data)
        return self._sendto_queued(e, m)

    cdef int _sendto_parts(self, const unsigned char* hdr, uint8_t hdrlen, object owner,
                           const char* ptr, size_t n, addr) except -1:
        """``_send_parts`` to ``addr`` on an unconnected datagram Bind."""
        cdef TxMark m
        self._sendto_check(addr)
        m = txq_mark(&self.txq)
        return self._sendto_queued(self._push_parts(hdr, hdrlen, owner, ptr, n), m)

    cdef int _send_parts(self, const unsigned char* hdr, uint8_t hdrlen, object owner,
                         const char* ptr, size_t n) except -1:
        """Queue one datagram to the connected peer made of two pieces:
        ``hdrlen`` (at most TX_HDR) bytes of ``hdr``, copied into the queue,
        then ``n`` bytes at ``ptr``, sent from where they lie: ``owner``
        keeps them valid and unchanged until sent (None if ``n`` is 0). So
        a protocol that puts its own header on a payload it already holds
        (drpc's packets: a request's body, a slice of a large response)
        sends it with no packet object built and no copy in user space."""
        cdef TxMark m
        cdef TxEntry* e
        self._can_send()
        if self.stream:
            raise EvplError("stream Bind: datagram pieces need a datagram Bind")
        m = txq_mark(&self.txq)
        e = self._push_parts(hdr, hdrlen, owner, ptr, n)
        self._check_datagram(e)
        e.salen = 0                         # to the connected peer
        self._queued(txq_dg_size(e), m)
        return 0

    cdef TxEntry* _push_parts(self, const unsigned char* hdr, uint8_t hdrlen, object owner,
                              const char* ptr, size_t n) except NULL:
        cdef TxEntry* e
        if hdrlen > TX_HDR:
            raise ValueError(f"header of {hdrlen} bytes: at most {TX_HDR}")
        e = txq_push_ref(&self.txq, owner, ptr, n)
        memcpy(e.hdr, hdr, hdrlen)
        e.hdrlen = hdrlen
        return e

    cdef int _sendto_check(self, addr) except -1:
        """Refuse a sendto this Bind cannot take; make ``addr`` the one the
        next entries are stamped with."""
        cdef sockaddr_in6 sa
        cdef socklen_t salen
        if self.state == S_CLOSED:
            raise EvplError("sendto on a closed Bind")
        if self.stream:
            raise EvplError("stream Bind: use send(data)")
        if self.dgram_connected:
            raise EvplError("connected datagram Bind: use send(data)")
        if addr is not self.tx_addr:
            if self.tx_addr is None or addr != self.tx_addr:
                py_to_sa(addr, &sa, &salen)
                memcpy(&self.tx_sa, &sa, salen)
                self.tx_salen = salen
            self.tx_addr = addr
        return 0

    cdef int _sendto_queued(self, TxEntry* e, TxMark m) except -1:
        """Check and address the datagram just pushed, and count it."""
        self._check_datagram(e)
        memcpy(&e.sa, &self.tx_sa, self.tx_salen)
        e.salen = self.tx_salen
        self._queued(txq_dg_size(e), m)
        return 0

    def close(self) -> None:
        """Close now; queued sends are dropped. ``on_closed(bind, None)``
        follows at the end of the iteration."""
        self._close(None)

    def finish(self) -> None:
        """Close once everything queued has been sent."""
        if self.state == S_CLOSED:
            return
        if txq_empty(&self.txq) and not self._send_busy():
            self._close(None)
        else:
            self.finishing = True
            self._mark_dirty()

    def set_write_limits(self, size_t high_water, size_t low_water, size_t hard_limit) -> None:
        """Change the send queue's watermarks and hard limit while the Bind
        is open (asyncio's ``set_write_buffer_limits``); needs
        ``low_water <= high_water <= hard_limit``. Takes effect at the next
        send or flush; a queue already above the new high-water mark
        pauses at once (``on_paused``)."""
        if not low_water <= high_water <= hard_limit:
            raise ValueError(f"need low_water ({low_water}) <= high_water ({high_water}) "
                             f"<= hard_limit ({hard_limit})")
        self.high_water = high_water
        self.low_water = low_water
        self.hard_limit = hard_limit
        if self.state == S_OPEN:
            self._check_high_water()

    def shutdown_write(self) -> None:
        """Half-close a stream Bind: shut down its sending side (the peer
        sees EOF) once everything queued has been sent, and keep receiving.
        Sends after it raise."""
        if self.state == S_CLOSED or not self.stream or self.shut_wr:
            return
        self.shut_wr = 1
        if self.state == S_OPEN and txq_empty(&self.txq) and not self._send_busy():
            self.shut_wr = 2
            shutdown(self.fd, SHUT_WR)
        else:
            self._mark_dirty()

    def pause_reading(self) -> None:
        """Stop delivering received data at once: no further message of the
        current read batch is delivered; what was read is kept and delivered
        after ``resume_reading``."""
        if self.reading_paused:
            return
        self.reading_paused = True
        if self.state == S_OPEN:
            self._disarm_reading()

    def resume_reading(self) -> None:
        """Deliver what was kept, then receive again."""
        if not self.reading_paused:
            return
        self.reading_paused = False
        if self.state != S_OPEN:
            return
        self._drain()
        if self.state == S_OPEN and not self.reading_paused:
            self._arm_reading()

    @property
    def reading(self) -> bool:
        return not self.reading_paused

    def __repr__(self):
        state = {S_CONNECTING: "connecting", S_OPEN: "open", S_CLOSED: "closed"}[self.state]
        return f"<evpl.Bind {self.backend} fd={self.fd} {state} queued={self.queued_bytes}>"

    # ---- send queue accounting ----------------------------------------------

    cdef int _queued(self, size_t n, TxMark m) except -1:
        """Account ``n`` bytes just queued since ``m``."""
        if self.queued_bytes + n > self.hard_limit:
            # undo what was just queued: the caller ignored on_paused
            txq_undo(&self.txq, m)
            raise SendQueueFull(
                f"send queue would exceed hard_limit ({self.hard_limit} bytes); "
                f"wait for on_writable")
        self.queued_bytes += n
        if not self.dirty:                  # (tested here: one call less per send)
            self._mark_dirty()
        if self.queued_bytes > self.high_water and not self.paused:
            self._check_high_water()
        return 0

    cdef void _check_high_water(self):
        """Past high_water and not paused yet: pause, and tell the handler."""
        if not self.paused and self.queued_bytes > self.high_water:
            self.paused = True
            self.loop.stat_paused += 1
            try:
                self.cb_paused(self)
            except Exception as exc:
                self.loop._callback_error(exc, self)

    cdef void _mark_dirty(self):
        if not self.dirty:
            self.dirty = True
            self.loop.dirty.append(self)

    cdef int _flush(self) except -1:
        """End of iteration: send what is queued."""
        self.dirty = False
        if self.state != S_OPEN:
            return 0
        if self._send_queued():
            self._after_flush()
        return 0

    cdef int _after_flush(self) except -1:
        """Backpressure and drain events once the queue has shrunk."""
        if self.state != S_OPEN:
            return 0
        if self.paused and self.queued_bytes <= self.low_water:
            self.paused = False
            try:
                self.cb_writable(self)
            except Exception as exc:
                self.loop._callback_error(exc, self)
        if txq_empty(&self.txq) and self.state == S_OPEN and not self._send_busy():
            if self.finishing:
                if self.stream:
                    shutdown(self.fd, SHUT_WR)
                self._close(self.finish_error)
            elif self.shut_wr == 1 and self.stream:
                self.shut_wr = 2
                shutdown(self.fd, SHUT_WR)
                if self.cb_sent is not None:
                    try:
                        self.cb_sent(self)
                    except Exception as exc:
                        self.loop._callback_error(exc, self)
            elif self.cb_sent is not None:
                try:
                    self.cb_sent(self)
                except Exception as exc:
                    self.loop._callback_error(exc, self)
        return 0

    # ---- life cycle -------------------------------------------------------

    cdef void _fail(self, error):
        self._close(error)

    cdef void _shutdown(self):
        self._close(None)

    cdef void _close(self, error):
        """Close the socket now; on_closed is delivered at iteration end."""
        if self.state == S_CLOSED:
            return
        self.state = S_CLOSED
        if self._peer is None and self.stream:
            self.peer_address  # remember it for on_closed handlers
        self.backlog = None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self._release()
        if self.part_chunk != NULL:
            chunk_unref(self.pool, self.part_chunk)
            self.part_chunk = NULL
        self.part_len = 0
        self.paused = False
        self.close_error = error
        self.loop.closing.append(self)

    cdef void _report_closed(self):
        try:
            self.cb_closed(self, self.close_error)
        except Exception as exc:
            self.loop._callback_error(exc, None)

    cdef void _connected(self):
        cdef int64_t first
        self.state = S_OPEN
        if self.stream:
            try:
                self.cb_connected(self)
            except Exception as exc:
                self.loop._callback_error(exc, self)
        if self.state != S_OPEN:
            return
        if not txq_empty(&self.txq):
            self._mark_dirty()          # sends queued while connecting
        if self.idle_ns or self.msg_ns:
            self.last_rx = evpl_now_ns()
            first = self.idle_ns if self.idle_ns else self.msg_ns
            if self.msg_ns and self.msg_ns < first:
                first = self.msg_ns
            self.watchdog = self.loop._timer(first, 0, self._watch, ())
        self._opened()

    def _watch(self):
        """The timeout watchdog: close a Bind that was idle for
        ``idle_timeout`` or took longer than ``message_timeout`` to complete
        a message it had started to receive; else look again when the
        earliest of the two can expire."""
        cdef int64_t now = evpl_now_ns(), due = -1, t
        self.watchdog = None
        if self.state != S_OPEN:
            return
        if self.msg_ns and self.part_len:
            t = self.msg_start + self.msg_ns
            if now >= t:
                self.loop.stat_timeouts += 1
                self._close(_Timeout(110, f"message not complete within {self.msg_ns / 1e9:g} s "
                                          f"({self.part_len} bytes received)"))
                return
            due = t
        if self.idle_ns:
            t = self.last_rx + self.idle_ns
            if now >= t:
                self.loop.stat_timeouts += 1
                self._close(_Timeout(110, f"nothing received for {self.idle_ns / 1e9:g} s"))
                return
            if due < 0 or t < due:
                due = t
        if due < 0:
            due = now + self.msg_ns
        self.watchdog = self.loop._timer(due - now, 0, self._watch, ())

    cdef void _timestamps(self, size_t part0, size_t m0):
        """Receive activity for the timeouts: ``part0`` is the partial length
        and ``m0`` the loop's message count before the bytes arrived."""
        cdef int64_t now = evpl_now_ns()
        self.last_rx = now
        if self.part_len and (part0 == 0 or self.loop.stat_messages_in != m0):
            self.msg_start = now          # a new message started in these bytes

    cdef void _on_eof(self):
        self.eof = True
        self._disarm_reading()
        if self.backlog:
            self.eof_pending = True         # after what is still kept
            return
        if self.part_len:
            self._close(FramingError(
                f"connection closed in the middle of a message ({self.part_len} bytes buffered)"))
            return
        try:
            self.cb_eof(self)
        except Exception as exc:
            self.loop._callback_error(exc, self)

    # ---- reassembly ---------------------------------------------------------

    cdef void _set_partial(self, Chunk* c, char* p, size_t n, size_t need):
        c.refs += 1
        if self.part_chunk != NULL:
            chunk_unref(self.pool, self.part_chunk)
        self.part_chunk = c
        self.part_ptr = p
        self.part_len = n
        self.part_need = need
        self.part_asm = False
        self.part_own = False

    cdef void _clear_partial(self):
        if self.part_chunk != NULL:
            chunk_unref(self.pool, self.part_chunk)
            self.part_chunk = NULL
        self.part_len = 0
        self.part_need = 0
        self.part_asm = False
        self.part_own = False

    cdef void _keep_rest(self, Chunk* c, char* p, size_t n, int need, bint own, size_t room):
        """Keep the incomplete tail of a receive as the partial message. One
        that is large (or known not to fit in ``room``, the bytes the next
        receive can land in after it) moves to a chunk of its own; if the
        pool has none, it stays where it is and is joined later."""
        self._set_partial(c, p, n, need)
        self.part_own = own
        if need > 0 and (<size_t>need >= self.loop.asm_threshold or <size_t>need > room):
            self._to_assembly(need)
        elif need == 0 and n >= self.loop.asm_threshold:
            self._to_assembly(min(n * 2, self.max_message + 16))

    cdef int _to_assembly(self, size_t cap):
        """Move the partial message into a chunk of its own of ``cap`` bytes."""
        cdef Chunk* c = self.pool.get_size(cap)
        if c == NULL:
            return -1
        memcpy(c.data, self.part_ptr, self.part_len)
        if self.part_chunk != NULL:
            chunk_unref(self.pool, self.part_chunk)
        self.part_chunk = c
        self.part_ptr = c.data
        self.part_asm = True
        self.part_own = True
        return 0

    cdef Py_ssize_t _scan(self, Chunk* c, char* p, size_t avail, size_t* hint, size_t* payload,
                          int* nfrag) except? -100:
        cdef Framer f = self.framer
        cdef Py_ssize_t r
        hint[0] = 0
        nfrag[0] = 1
        if self.fr_kind == F_LENGTH:
            r = scan_length(f, <unsigned char*>p, avail, hint)
            if r > 0:
                payload[0] = r - f.size
            return r
        if self.fr_kind == F_RECORD:
            return scan_record(f, <unsigned char*>p, avail, hint, payload, nfrag)
        if self.fr_kind == F_ZMTP:
            r = scan_zmtp(f, <unsigned char*>p, avail, hint, nfrag)
            payload[0] = r
            return r
        if self.fr_kind == F_FIXED:
            payload[0] = f.size
            if avail < <size_t>f.size:
                hint[0] = f.size
                return 0
            return f.size
        # callable framer: it sees the buffered bytes, returns a length
        peek = make_buffer(self.pool, c, p, avail)
        self.loop.stat_py_calls += 1
        r = f.fn(memoryview(peek))
        if r > 0 and <size_t>r > f.max_message:
            return E_OVERSIZE
        if r == 0 and avail >= f.max_message:
            return E_OVERSIZE
        if r > 0 and <size_t>r > avail:
            hint[0] = r
            return 0
        if r < -99:
            r = -99                     # bad stream; below is R_CLOSED's range
        payload[0] = r
        return r

    cdef Buffer _message(self, Chunk* c, char* p, Py_ssize_t r, size_t payload, int nfrag):
        """The Buffer for one complete message of ``r`` wire bytes at ``p``."""
        cdef Chunk* dst
        cdef size_t off = 0, got = 0, flen
        cdef Buffer b
        if self.fr_kind == F_LENGTH:
            return make_buffer(self.pool, c, p + self.framer.size, payload)
        if self.fr_kind == F_CALLABLE or self.fr_kind == F_FIXED or self.fr_kind == F_ZMTP:
            return make_buffer(self.pool, c, p, r)
        if nfrag == 1:
            return make_buffer(self.pool, c, p + 4, payload)
        dst = self.pool.get_size(payload if payload else 1)
        if dst == NULL:
            return None
        while got < payload:
            flen = <size_t>evpl_load_uint(<unsigned char*>p + off, 4, 1) & 0x7fffffff
            memcpy(dst.data + got, p + off + 4, flen)
            got += flen
            off += 4 + flen
        b = make_buffer(self.pool, dst, dst.data, payload)
        chunk_unref(self.pool, dst)
        return b

    @cython.final
    cdef inline Buffer _next_native(self, Chunk* c, char* p, size_t avail, size_t* hint,
                                    Py_ssize_t* r):
        """``_next_message`` for the framers that never call Python (fixed
        size, length prefix): a small function with no exception frame, as
        it runs once per message."""
        if self.fr_kind == F_FIXED:
            r[0] = self.framer.size
            if avail < <size_t>r[0]:
                hint[0] = <size_t>r[0]
                r[0] = 0
                return None
            return make_buffer(self.pool, c, p, r[0])
        r[0] = scan_length(self.framer, <unsigned char*>p, avail, hint)
        if r[0] <= 0:
            return None
        return make_buffer(self.pool, c, p + self.framer.size, r[0] - self.framer.size)

    cdef Buffer _next_message(self, Chunk* c, char* p, size_t avail, size_t* hint,
                              Py_ssize_t* r):
        """The next whole message at ``p`` (``r[0]``: its wire length), or
        None: ``r[0]`` is then 0 (need more; ``hint`` as in _scan), negative
        for a bad frame, or R_CLOSED if the Bind was closed (the framing
        callable raised, the pool could not join a record's fragments)."""
        cdef size_t payload = 0
        cdef int nfrag = 1
        cdef Buffer msg
        if self.fr_kind == F_FIXED or self.fr_kind == F_LENGTH:
            return self._next_native(c, p, avail, hint, r)
        try:
            r[0] = self._scan(c, p, avail, hint, &payload, &nfrag)
        except Exception as exc:
            self.loop._callback_error(exc, self)
            r[0] = R_CLOSED
            return None
        if r[0] <= 0:
            return None
        msg = self._message(c, p, r[0], payload, nfrag)
        if msg is None:
            self._close(FramingError("buffer pool exhausted while reassembling a record"))
            r[0] = R_CLOSED
        return msg

    cdef int _deliver(self, Chunk* c, char* base, size_t total, size_t* consumed) except -2:
        """Deliver every whole message in ``base[0:total]``; returns the
        number of bytes needed for the next one (0 if unknown), -1 if the Bind
        was closed, D_PAUSED if a callback paused reading (``consumed`` says
        how far it got)."""
        cdef size_t off = 0, hint = 0
        cdef Py_ssize_t r
        cdef Buffer msg
        if self.cb_messages is not None:
            return self._deliver_batch(c, base, total, consumed)
        while off < total:
            msg = self._next_message(c, base + off, total - off, &hint, &r)
            if msg is None:
                if r == 0:
                    break
                if r != R_CLOSED:
                    self._framing_failed(r)
                return -1
            off += r
            self.loop.stat_messages_in += 1
            try:
                self.loop.stat_py_calls += 1
                self.cb_message(self, msg)
            except Exception as exc:
                self.loop._callback_error(exc, self)
            msg = None
            if self.state != S_OPEN:
                return -1
            hint = 0
            if self.reading_paused and off < total:
                consumed[0] = off
                return D_PAUSED
        consumed[0] = off
        return <int>min(hint, <size_t>0x7fffffff)

    cdef int _deliver_batch(self, Chunk* c, char* base, size_t total,
                            size_t* consumed) except -2:
        """``_deliver`` for a handler with ``on_messages``: every whole
        message of the bytes goes to one call. A bad frame after good ones
        fails the stream after the good ones were delivered."""
        cdef size_t off = 0, hint = 0
        cdef Py_ssize_t r = 0
        cdef Buffer msg
        cdef list batch = []
        cdef bint native = self.fr_kind == F_FIXED or self.fr_kind == F_LENGTH
        while off < total:
            if native:
                msg = self._next_native(c, base + off, total - off, &hint, &r)
            else:
                msg = self._next_message(c, base + off, total - off, &hint, &r)
            if msg is None:
                if r == R_CLOSED:
                    return -1
                break
            batch.append(msg)
            off += r
            hint = 0
        if batch:
            self.loop.stat_messages_in += len(batch)
            msg = None
            try:
                self.loop.stat_py_calls += 1
                self.cb_messages(self, batch)
            except Exception as exc:
                self.loop._callback_error(exc, self)
            batch = None
            if self.state != S_OPEN:
                return -1
        if r < 0:
            self._framing_failed(r)
            return -1
        consumed[0] = off
        return <int>min(hint, <size_t>0x7fffffff)

    cdef void _framing_failed(self, Py_ssize_t r):
        if r == E_OVERSIZE:
            msg = f"message exceeds max_message ({self.max_message} bytes)"
        elif r == E_FRAGMENTS and self.fr_kind == F_ZMTP:
            msg = f"ZMTP message has more than {ZMTP_MAX_FRAMES} frames"
        elif r == E_FRAGMENTS:
            msg = f"record has more than {MAX_FRAGMENTS} fragments"
        elif self.fr_kind == F_ZMTP:
            msg = "malformed ZMTP frame (reserved flag bits, or a command with MORE)"
        elif self.fr_kind == F_CALLABLE:
            msg = f"framing callable reported a bad stream ({r})"
        else:
            msg = "length prefix smaller than its own header"
        # answers to the good messages before the bad one may be queued:
        # read nothing more, send them, then close with the error
        self._clear_partial()
        self.reading_paused = True
        self.eof = True
        self.backlog = None
        self._disarm_reading()
        self.finish_error = FramingError(msg)
        if txq_empty(&self.txq) and not self._send_busy():
            self._close(self.finish_error)
        else:
            self.finishing = True
            self._mark_dirty()

    cdef int _after_asm_read(self) except -2:
        """Deliver the assembled message once it is complete; -1 if closed."""
        cdef size_t consumed = 0, left, cap, want
        cdef int need
        cdef Chunk* c = self.part_chunk
        cdef char* p = self.part_ptr
        cdef size_t total = self.part_len
        if self.part_need and total < self.part_need:
            return 0
        self.part_chunk = NULL           # its reference is now ours
        self.part_len = 0
        self.part_asm = False
        self.part_own = False
        need = self._deliver(c, p, total, &consumed)
        if need == -1:
            chunk_unref(self.pool, c)
            return -1
        left = total - consumed
        if need == D_PAUSED:
            self._keep(c, p + consumed, left)
            chunk_unref(self.pool, c)
            return 0
        if left:
            # still incomplete (unknown length, or a longer record): keep it
            self.part_chunk = c
            self.part_ptr = p + consumed
            self.part_len = left
            self.part_need = need
            self.part_asm = True
            self.part_own = True
            cap = c.size - (<size_t>(self.part_ptr - c.data))
            if (need and <size_t>need > cap) or (not need and left == cap):
                want = max(<size_t>need, min(cap * 2, self.max_message + 16))
                if self._to_assembly(want) < 0:
                    self._close(FramingError("buffer pool exhausted while assembling a message"))
                    return -1
            return 0
        chunk_unref(self.pool, c)
        return 0

    cdef void _arrived(self, Chunk* c, char* p, size_t n, size_t room):
        """Bytes that landed at ``p`` in chunk ``c``: deliver whole messages,
        keep the partial. What cannot be taken now (reading paused, pool
        exhausted) goes to the backlog. ``room``: how many bytes the next
        receive can land in right after these (see _keep_rest).

        A message split across two receives is completed in place when the
        second lands right after the first part, else by copying just the
        missing bytes after its first part (in a chunk of the Bind's own);
        everything after it is delivered in place again."""
        cdef LoopCore loop = self.loop
        cdef Buffer buf
        cdef size_t total, consumed = 0, k, cap, want
        cdef char* base
        cdef Chunk* bc
        cdef int need
        cdef bint own
        if self.fr_kind == F_NONE:
            buf = make_buffer(loop.pool, c, p, n)
            try:
                self.loop.stat_py_calls += 1
                self.cb_data(self, buf)
            except Exception as exc:
                loop._callback_error(exc, self)
            return
        while n > 0 and self.state == S_OPEN:
            if self.reading_paused:
                self._keep(c, p, n)
                return
            if self.part_asm:
                cap = self.part_chunk.size - <size_t>(self.part_ptr - self.part_chunk.data)
                k = (self.part_need - self.part_len) if self.part_need else cap - self.part_len
                if k > n:
                    k = n
                memcpy(self.part_ptr + self.part_len, p, k)
                self.part_len += k
                p += k
                n -= k
                if self._after_asm_read() < 0:
                    return
                continue
            if self.part_len and not (self.part_chunk == c and self.part_ptr + self.part_len == p):
                # complete the partial: copy only what it still needs
                k = n
                if self.part_need > self.part_len and self.part_need - self.part_len < n:
                    k = self.part_need - self.part_len
                cap = self.part_chunk.size - <size_t>(self.part_ptr - self.part_chunk.data)
                if not (self.part_own and cap - self.part_len >= k):
                    # room for the whole message when its length is known
                    want = max(self.part_len + k, self.part_need)
                    bc = loop.pool.get_size(want)
                    if bc == NULL:
                        # the pool is exhausted, largely by buffers a ring
                        # filled: one message may go past the limit to progress
                        bc = loop.pool.get_heap_forced(
                            want, self.part_chunk.size
                            if self.part_own and self.part_chunk.heap == 2 else 0)
                        if bc == NULL:
                            self._keep(c, p, n)       # retried when buffers come back
                            return
                    memcpy(bc.data, self.part_ptr, self.part_len)
                    self._set_partial(bc, bc.data, self.part_len, self.part_need)
                    chunk_unref(loop.pool, bc)        # the partial holds it now
                    self.part_own = True
                memcpy(self.part_ptr + self.part_len, p, k)
                self.part_len += k
                loop.stat_partial_copies += 1
                p += k
                n -= k
                bc = self.part_chunk
                base = self.part_ptr
                total = self.part_len
            elif self.part_len:
                bc = c                         # still contiguous in the same buffer
                base = self.part_ptr
                total = self.part_len + n
                n = 0
            else:
                bc = c
                base = p
                total = n
                n = 0
            bc.refs += 1
            own = self.part_own and bc == self.part_chunk
            self._clear_partial()
            need = self._deliver(bc, base, total, &consumed)
            if need == D_PAUSED:
                self._keep(bc, base + consumed, total - consumed)
            elif need >= 0 and consumed < total:
                self._keep_rest(bc, base + consumed, total - consumed, need, own,
                                room if n == 0 else <size_t>-1)
            chunk_unref(loop.pool, bc)

    cdef void _take(self, Chunk* c, char* p, size_t n):
        """A backend received ``n`` bytes at ``p`` (where the kernel chose):
        deliver them in order after anything kept."""
        if self.backlog or self.reading_paused:
            self._keep(c, p, n)
        else:
            self._arrived(c, p, n, <size_t>-1)

    cdef void _keep(self, Chunk* c, char* p, size_t n):
        """Keep received bytes for later (a Buffer holds their memory). Not
        paused means the pool ran dry: read again when buffers return."""
        buf = make_buffer(self.pool, c, p, n)
        if self.backlog is None:
            self.backlog = [buf]
        else:
            self.backlog.append(buf)
        if not self.reading_paused:
            self.loop._starve(self)

    cdef void _drain(self):
        """Deliver what the backlog kept, in order, while the Bind takes it."""
        cdef list pending
        cdef Py_ssize_t i = 0, cnt
        cdef Buffer buf
        if self.draining:
            return                    # resumed from a callback of this drain
        if self.backlog:
            self.draining = True
            pending = self.backlog
            self.backlog = None        # what is kept again lands in a new list
            cnt = len(pending)
            try:
                if not self.stream and self.cb_datagrams is not None:
                    i = cnt                     # one batch
                    self._call_datagrams(pending)
                while i < cnt and self.state == S_OPEN and not self.reading_paused:
                    item = pending[i]
                    i += 1
                    if self.stream:
                        buf = <Buffer>item
                        self._arrived(buf.chunk, buf.ptr, buf.length, <size_t>-1)
                        buf = None
                    else:
                        try:
                            self.loop.stat_py_calls += 1
                            self.cb_datagram(self, item[0], item[1])
                        except Exception as exc:
                            self.loop._callback_error(exc, self)
                    item = None
            finally:
                self.draining = False
            if i < cnt and self.state == S_OPEN:
                if self.backlog is None:
                    self.backlog = pending[i:]
                else:
                    self.backlog.extend(pending[i:])
        if self.eof_pending and not self.backlog and self.state == S_OPEN:
            self.eof_pending = False
            self._on_eof()

    # ---- datagrams ------------------------------------------------------------

    cdef object _rx_address(self, sockaddr* name, socklen_t namelen):
        """The Python address of a sender (the last one is cached)."""
        if (self.rx_addr is not None and namelen == self.rx_salen
                and memcmp(name, &self.rx_sa, namelen) == 0):
            return self.rx_addr
        addr = sa_to_py(name, namelen)
        self.rx_addr = addr
        self.rx_salen = namelen
        memcpy(&self.rx_sa, name, namelen)
        return addr

    cdef void _datagrams(self, Chunk* c, char* p, size_t n, size_t seg, addr):
        """Deliver a received datagram, or a train of them that the kernel
        coalesced (UDP GRO: ``seg`` bytes each, the last may be shorter), each
        as its own Buffer. A paused Bind keeps them for later."""
        cdef LoopCore loop = self.loop
        cdef size_t off = 0, k
        cdef Buffer buf
        if seg == 0 or seg > n:
            seg = n
        elif seg < n:
            loop.stat_gro_receives += 1
        if self.idle_ns:
            self.last_rx = evpl_now_ns()
        while True:
            k = min(seg, n - off)
            loop.stat_datagrams_in += 1
            if k > self.max_datagram:
                loop.stat_truncated += 1
            else:
                loop.stat_bytes_in += k
                buf = make_buffer(loop.pool, c, p + off, k)
                self._dg_hand(buf, addr)
                if self.state != S_OPEN:
                    return
            off += k
            if off >= n:
                return

    cdef void _dg_hand(self, Buffer buf, addr):
        """Hand a received datagram on: kept while reading is paused (or
        behind kept ones), to the sink (C), into the read batch for
        ``on_datagrams``, or to ``on_datagram``."""
        cdef LoopCore loop = self.loop
        if self.reading_paused or self.backlog:
            if self.backlog is None:
                self.backlog = []
            self.backlog.append((buf, addr))
        elif self.sink is not None:
            self._sink_batch()
            try:
                self.sink.dg_take(self, buf, addr)
            except Exception as exc:
                loop._callback_error(exc, self)
            self._sink_took()
        elif self.cb_datagrams is not None:
            # delivered with the rest of the read batch (_flush_batch)
            if self.dg_batch is None:
                self.dg_batch = []
                loop._add_batch(self)
            self.dg_batch.append((buf, addr))
        else:
            try:
                loop.stat_py_calls += 1
                self.cb_datagram(self, buf, addr)
            except Exception as exc:
                loop._callback_error(exc, self)

    cdef void _sink_batch(self):
        """A datagram for the sink: the read batch it belongs to ends with
        the sink's dg_end."""
        if not self.sink_batch:
            self.sink_batch = True
            self.loop._add_batch(self)

    cdef void _sink_took(self):
        """After the sink took a datagram: what it answered so far leaves
        now once SINK_FLUSH datagrams wait, not at the end of the batch: the
        peer works on them while this side takes the rest (a large drpc
        transfer otherwise alternates, each side idle while the other
        handles a whole window)."""
        if self.txq.tail - self.txq.head >= SINK_FLUSH and self.state == S_OPEN:
            self._flush()

    cdef bint _dg_placed(self, char* hdr, size_t n, char* dst, addr):
        """A datagram of ``n`` bytes that a scatter receive put where the
        sink asked (its header at ``hdr``, the rest at ``dst``): True if the
        sink took it as it lies; False (reading paused, or not what the
        sink expected) to have it put back together and handed on as usual."""
        cdef LoopCore loop = self.loop
        cdef int took = 0
        if self.reading_paused or self.backlog or self.sink is None:
            return False
        self._sink_batch()
        try:
            took = self.sink.dg_placed(self, hdr, n, dst, addr)
        except Exception as exc:
            loop._callback_error(exc, self)
            took = 1                        # (as dg_take's errors: the datagram is gone)
        if not took:
            return False
        loop.stat_datagrams_in += 1
        loop.stat_bytes_in += n
        loop.stat_placed += 1
        if self.idle_ns:
            self.last_rx = evpl_now_ns()
        self._sink_took()
        return True

    cdef void _flush_batch(self):
        """End of a read batch: hand the datagrams collected for
        ``on_datagrams`` over in one call (a sink: end its batch, and send
        what it answered now, not after the loop's timers and deferred
        callbacks: a round trip's reply leaves a few hundred nanoseconds
        sooner, and it is still one send for the whole batch)."""
        if self.sink_batch:
            self.sink_batch = False
            if self.state == S_OPEN:
                try:
                    self.sink.dg_end(self)
                except Exception as exc:
                    self.loop._callback_error(exc, self)
                if self.dirty and self.state == S_OPEN:
                    self._flush()
        batch = self.dg_batch
        self.dg_batch = None
        if batch and self.state == S_OPEN:
            self._call_datagrams(batch)

    cdef void _call_datagrams(self, list batch):
        try:
            self.loop.stat_py_calls += 1
            self.cb_datagrams(self, batch)
        except Exception as exc:
            self.loop._callback_error(exc, self)

    cdef bint _gso_refused(self, int err, size_t seg) noexcept:
        """Whether a failed send of a GSO train failed because of GSO; if so,
        lower this Bind's limit so such trains are not built again (EINVAL,
        EMSGSIZE: the segment exceeds the path MTU; EIO: the device cannot
        checksum, so GSO is off)."""
        if err == EIO:
            self.gso_limit = 0
        elif err == EINVAL or err == EMSGSIZE:
            self.gso_limit = min(self.gso_limit, seg)
        else:
            return False
        self.loop.stat_gso_refused += 1
        return True

    cdef void _dgram_error(self, int err):
        """An error a datagram socket reported (ICMP): counted; a handler
        that overrides ``on_datagram_error`` gets it as an OSError and the
        Bind stays open (asyncio's ``error_received``); otherwise a
        connected datagram Bind whose peer refuses (port unreachable) is
        closed with ConnectionRefused, so its user learns at once."""
        self.loop.stat_dgram_errors += 1
        base = self.loop.base_handler
        cb = getattr(type(self.handler), "on_datagram_error", None)
        if (cb is not None and base is not None and self.state == S_OPEN
                and cb is not getattr(base, "on_datagram_error", None)):
            try:
                self.handler.on_datagram_error(self, OSError(err, strerror(err).decode()))
            except Exception as exc:
                self.loop._callback_error(exc, self)
            return
        if self.dgram_connected and err == ECONNREFUSED and self.state == S_OPEN:
            self._close(ConnectionRefused(err, f"{self._peer!r} refused the datagram "
                                               f"(port unreachable)"))


cdef class Listener(_Source):
    """A listening stream socket that accepts connections into Binds."""

    cdef void _setup(self, LoopCore loop, int fd, str backend, factory, shared, Framer framer,
                     Limits limits, bint nodelay, address):
        self.loop = loop
        self.fd = fd
        self.backend = backend
        self.factory = factory
        self.shared = shared
        self.framer = framer
        self.limits = limits
        self.nodelay = nodelay
        self.address = address
        self.active = True
        loop.sources.add(self)

    cdef Bind _new_conn(self, int fd, handler):
        """Overload: a Bind of this backend for an accepted socket."""
        raise NotImplementedError

    cdef void _release(self):
        """Overload: stop accepting and close the socket."""
        pass

    def close(self) -> None:
        """Stop accepting; connections already accepted stay open."""
        if self.active:
            self.active = False
            self._release()
            self.loop.sources.discard(self)

    cdef void _shutdown(self):
        self.close()

    @property
    def closed(self) -> bool:
        return not self.active

    def fileno(self) -> int:
        return self.fd

    def __repr__(self):
        return f"<evpl.Listener {self.backend} {self.address!r}>"

    cdef void _accepted(self, int fd):
        cdef int one = 1
        cdef Bind b
        self.accepted += 1
        if self.nodelay:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        try:
            handler = self.shared if self.shared is not None else self.factory()
            b = self._new_conn(fd, handler)
        except Exception as exc:
            c_close(fd)
            self.loop._callback_error(exc, None)
            return
        b._connected()
