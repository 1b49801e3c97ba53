# cython: language_level=3
cimport cython
"""The Bind and Listener bases every backend fills (see bind.pyx)."""

from libc.stdint cimport int64_t, uint8_t
from evpl._native.buffers cimport Pool, Buffer, Chunk
from evpl._native.framing cimport Framer
from evpl._native.loop cimport _Source, LoopCore, Timer
from evpl._native.sys cimport sockaddr, sockaddr_in6, socklen_t
from evpl._native.txqueue cimport TxQueue, TxEntry, TxMark

# bind states
cdef enum:
    S_CONNECTING = 1
    S_OPEN = 2
    S_CLOSED = 3

cdef enum:
    D_PAUSED = -3           # _deliver: stopped because reading was paused
    R_CLOSED = -100         # _next_message: the Bind was closed


cdef object sa_to_py(sockaddr* sa, socklen_t salen)
cdef int py_to_sa(object addr, sockaddr_in6* out, socklen_t* outlen) except -1


cdef class Limits:
    cdef readonly size_t high_water
    cdef readonly size_t low_water
    cdef readonly size_t hard_limit
    cdef readonly size_t max_datagram
    cdef readonly double idle_timeout
    cdef readonly double message_timeout


cdef class DatagramSink:
    # A handler base for protocols written in C (drpc): a datagram Bind
    # whose handler is one hands each received datagram to dg_take and ends
    # each read batch with dg_end, instead of a Python call per batch
    # (on_datagrams) with a list of (Buffer, address) tuples
    cdef int dg_take(self, object bind, Buffer buf, object addr) except -1
    cdef int dg_end(self, object bind) except -1
    # scatter receive (epoll udp): before a receive, dg_place says where the
    # payload of its i-th datagram should land (after ``head`` bytes of
    # header, which stay in the receive buffer), 0 bytes: in the receive
    # buffer as usual (and for every later datagram of that receive); a
    # datagram that landed there whole goes to dg_placed, which returns 1
    # if it took it, 0 to have it put back together and given to dg_take
    cdef Py_ssize_t dg_place(self, object bind, unsigned int i, char** dst,
                             Py_ssize_t* head) noexcept
    cdef int dg_placed(self, object bind, const char* hdr, Py_ssize_t length, char* dst,
                       object addr) except -1


cdef class Bind(_Source):
    # the pool the partial message's chunk goes back to, held by the Bind
    # itself: its __dealloc__ must not depend on the loop's attributes (when
    # a loop, its Binds and Buffers are garbage together)
    cdef Pool pool
    cdef readonly str backend
    cdef bint stream
    cdef bint dgram_connected  # a datagram Bind with a fixed peer (send() works)
    cdef int state
    cdef readonly object handler
    cdef object cb_connected, cb_data, cb_message, cb_datagram
    cdef object cb_paused, cb_writable, cb_sent, cb_eof, cb_closed
    cdef object cb_messages, cb_datagrams     # batch delivery, when the handler has them
    cdef list dg_batch          # datagrams of the current read batch (on_datagrams)
    cdef DatagramSink sink      # the handler, when it takes datagrams in C
    cdef bint sink_batch        # the sink has had datagrams of this read batch
    # framing and reassembly (stream Binds)
    cdef Framer framer
    cdef int fr_kind
    cdef size_t max_message
    cdef Chunk* part_chunk      # the partial message: where it lies
    cdef char* part_ptr
    cdef size_t part_len
    cdef size_t part_need       # its whole wire length, 0 if not known yet
    cdef bint part_asm          # it is being assembled in a chunk of its own
    cdef bint part_own          # part_chunk is this Bind's own (may be written to)
    # receive state
    cdef bint rx_ready          # the socket may have more to read
    cdef bint reading_paused
    cdef bint eof
    cdef bint hup               # the peer hung up (or an error): read until EOF/EAGAIN
    cdef bint eof_pending       # EOF came after bytes still in the backlog
    cdef bint draining
    cdef list backlog           # received, not yet delivered (paused, pool exhausted)
    cdef size_t max_datagram
    cdef size_t stride
    # send state
    cdef TxQueue txq
    cdef readonly size_t queued_bytes
    cdef size_t high_water
    cdef size_t low_water
    cdef size_t hard_limit
    cdef readonly bint paused
    cdef bint dirty
    cdef bint finishing
    cdef object finish_error
    cdef int shut_wr            # shutdown_write(): 1 = SHUT_WR once the queue drains, 2 = done
    # datagram addresses (the last one used is cached)
    cdef object tx_addr
    cdef sockaddr_in6 tx_sa
    cdef socklen_t tx_salen
    cdef object rx_addr
    cdef sockaddr_in6 rx_sa
    cdef socklen_t rx_salen
    cdef size_t gso_limit
    cdef bint gro               # receives are laid out for UDP GRO trains (slots hold one)
    cdef bint gro_on            # the kernel's UDP_GRO is set: a receive may be a train
    cdef object close_error
    cdef object _peer
    # timeouts
    cdef int64_t idle_ns
    cdef int64_t msg_ns
    cdef int64_t last_rx
    cdef int64_t msg_start
    cdef Timer watchdog

    # ---- overloads: what a backend fills ----
    cdef void _opened(self)
    cdef int _send_queued(self) except -1
    cdef bint _send_busy(self)
    cdef int _arm_reading(self) except -1
    cdef void _disarm_reading(self)
    cdef void _release(self)

    # ---- shared machinery ----
    cdef void _setup(self, LoopCore loop, int fd, str backend, bint stream, handler,
                     Framer framer, Limits limits)
    cdef void _adopt_stream(self, peer, bint connecting, int connect_errno)
    cdef void _adopt_datagram(self, bint gso, peer, bint gro_fits, bint gro=*)
    cdef bint _set_gro(self, bint on) noexcept
    cdef int _can_send(self) except -1
    cdef int _queued(self, size_t n, TxMark m) except -1
    cdef bint _frames_sends(self)
    cdef Py_ssize_t _push_message(self, data) except -1
    cdef Py_ssize_t _push_entry(self, data) except -1
    cdef Py_ssize_t _push_pieces(self, pieces) except -1
    cdef int _check_datagram(self, TxEntry* e) except -1
    cdef void _mark_dirty(self)
    cdef void _check_high_water(self)
    cdef int _after_flush(self) except -1
    cdef void _close(self, error)
    cdef void _connected(self)
    cdef void _on_eof(self)
    cdef void _timestamps(self, size_t part0, size_t m0)
    cdef void _set_partial(self, Chunk* c, char* p, size_t n, size_t need)
    cdef void _clear_partial(self)
    cdef void _keep_rest(self, Chunk* c, char* p, size_t n, int need, bint own, size_t room)
    cdef int _to_assembly(self, size_t cap)
    cdef Py_ssize_t _scan(self, Chunk* c, char* p, size_t avail, size_t* hint, size_t* payload,
                          int* nfrag) except? -100
    cdef Buffer _message(self, Chunk* c, char* p, Py_ssize_t r, size_t payload, int nfrag)
    @cython.final
    cdef inline Buffer _next_native(self, Chunk* c, char* p, size_t avail, size_t* hint,
                                    Py_ssize_t* r)
    cdef Buffer _next_message(self, Chunk* c, char* p, size_t avail, size_t* hint,
                              Py_ssize_t* r)
    cdef int _deliver(self, Chunk* c, char* base, size_t total, size_t* consumed) except -2
    cdef int _deliver_batch(self, Chunk* c, char* base, size_t total, size_t* consumed) except -2
    cdef void _framing_failed(self, Py_ssize_t r)
    cdef int _after_asm_read(self) except -2
    cdef void _arrived(self, Chunk* c, char* p, size_t n, size_t room)
    cdef void _take(self, Chunk* c, char* p, size_t n)
    cdef void _keep(self, Chunk* c, char* p, size_t n)
    cdef void _drain(self)
    cdef object _rx_address(self, sockaddr* name, socklen_t namelen)
    cdef void _datagrams(self, Chunk* c, char* p, size_t n, size_t seg, addr)
    cdef void _dg_hand(self, Buffer buf, addr)
    cdef bint _dg_placed(self, char* hdr, size_t n, char* dst, addr)
    cdef void _sink_batch(self)
    cdef void _sink_took(self)
    cdef void _call_datagrams(self, list batch)
    cdef bint _gso_refused(self, int err, size_t seg) noexcept
    cdef void _dgram_error(self, int err)
    cdef int _send_data(self, data) except -1
    cdef int _sendto_data(self, data, addr) except -1
    cdef int _sendto_parts(self, const unsigned char* hdr, uint8_t hdrlen, object owner,
                           const char* ptr, size_t n, addr) except -1
    cdef int _send_parts(self, const unsigned char* hdr, uint8_t hdrlen, object owner,
                         const char* ptr, size_t n) except -1
    cdef TxEntry* _push_parts(self, const unsigned char* hdr, uint8_t hdrlen, object owner,
                              const char* ptr, size_t n) except NULL
    cdef int _sendto_check(self, addr) except -1
    cdef int _send_with_header(self, header, data, addr, bint to) except -1
    cdef int _sendto_queued(self, TxEntry* e, TxMark m) except -1


cdef class Listener(_Source):
    cdef readonly str backend
    cdef object factory
    cdef object shared
    cdef Framer framer
    cdef Limits limits
    cdef bint nodelay
    cdef bint active
    cdef readonly object address
    cdef size_t accepted
    cdef void _setup(self, LoopCore loop, int fd, str backend, factory, shared, Framer framer,
                     Limits limits, bint nodelay, address)
    cdef Bind _new_conn(self, int fd, handler)
    cdef void _release(self)
    cdef void _accepted(self, int fd)
