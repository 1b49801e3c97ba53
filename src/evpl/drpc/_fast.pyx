# cython: language_level=3, boundscheck=False, wraparound=False
"""drpc's per-packet common case, in C (sans-I/O, as ``session.py``).

A small call costs each end a few packets, and per packet the Python
version spent more on bytecode than on anything else: the header unpacked
into nine ints, a dozen attribute loads and stores on the slot, the header
packed again, a Request built by a Python ``__init__`` (callgrind, two ends
in one process: ~43,500 instructions a call, 90% of it the interpreter).

Here are the state objects the protocol cores share (slots, server
sessions, ``Request``) as C structs with Python attributes, and the base
classes of ``session.ClientSession`` and ``session.ServerEndpoint`` with the
paths nearly every packet takes:

* the client starts a one-packet request with a credit free and no pacing
  (``ClientCore.submit``), and takes the one-packet response that answers
  it, or the next packet of a multi-packet response and asks for more
  (``ClientCore.receive``: one ranged RFR per read batch, see docs/drpc.md);
* the server runs a new one-packet request through its dispatch handler
  and answers it in one packet, and answers a request-for-response from the
  response it keeps (``ServerCore.receive``).

Every other packet, and every condition these paths do not check for, goes
to the Python methods of ``session.py`` (``_submit``, ``_receive``), which
have the whole state machine: this module only takes the packets for which
those rules come down to the few lines here. docs/drpc.md has the protocol.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject_RichCompareBool, Py_EQ
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from evpl._native.bind cimport Bind, DatagramSink
from evpl._native.buffers cimport Buffer, make_buffer
from evpl._native.loop cimport loop_poll_until

from evpl.errors import SendQueueFull

DEF HEADER_SIZE = 28
DEF MAGIC = 0xD7
DEF REQ = 1
DEF RESP = 2
DEF RFR = 3
DEF CR = 4
DEF FLAG_ERROR = 0x01
DEF FLAG_NO_RTT = 0x02
DEF MAX_REQ_TYPE = 255
# how long a hybrid loop keeps polling after this end sent packets of a
# transfer whose next ones the peer sends as it takes these (RFRs, credit
# returns, the response packets they ask for): the gap is the peer's work
# on a window of packets, often longer than the loop's spin_ns, and
# sleeping through it costs a wake-up per window (on a VM, tens to hundreds
# of microseconds each)
DEF TRANSFER_POLL_NS = 1_000_000
# scatter receive: response packets land straight in the message when the
# session's packets carry more than this (two of them never share one
# receive, which UDP GRO could otherwise coalesce)
DEF PLACE_MIN = 32767

# server slot states (session.py names them)
DEF FREE = 0
DEF RECEIVING = 1
DEF RUNNING = 2
DEF DONE = 3

cdef int64_t INT64_MAX = 0x7FFFFFFFFFFFFFFF


# -- the header ------------------------------------------------------------------

cdef struct Header:
    int ptype
    int req_type
    int flags
    uint32_t session
    uint64_t req_num
    uint32_t msg_size
    uint32_t pkt_num
    uint32_t ts


cdef inline uint32_t be32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put32(unsigned char* p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline bint parse(const unsigned char* p, Py_ssize_t n, Header* h) noexcept:
    """Read a header; False if the packet is too short or has the wrong magic
    (the Python path counts those)."""
    if n < HEADER_SIZE or p[0] != MAGIC:
        return False
    h.ptype = p[1]
    h.req_type = p[2]
    h.flags = p[3]
    h.session = be32(p + 4)
    h.req_num = (<uint64_t>be32(p + 8) << 32) | be32(p + 12)
    h.msg_size = be32(p + 16)
    h.pkt_num = be32(p + 20)
    h.ts = be32(p + 24)
    return True


cdef inline void put_header(unsigned char* p, int ptype, int req_type, int flags,
                            uint32_t session, uint64_t req_num, uint32_t msg_size,
                            uint32_t pkt_num, uint32_t ts) noexcept:
    p[0] = MAGIC
    p[1] = <unsigned char>ptype
    p[2] = <unsigned char>req_type
    p[3] = <unsigned char>flags
    put32(p + 4, session)
    put32(p + 8, <uint32_t>(req_num >> 32))
    put32(p + 12, <uint32_t>req_num)
    put32(p + 16, msg_size)
    put32(p + 20, pkt_num)
    put32(p + 24, ts)


cdef object packet(int ptype, int req_type, int flags, uint32_t session, uint64_t req_num,
                   uint32_t msg_size, uint32_t pkt_num, uint32_t ts, const char* data,
                   Py_ssize_t n):
    """A packet as a new ``bytes``: the header, then ``n`` bytes of ``data``."""
    cdef object pkt = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(pkt)
    put_header(p, ptype, req_type, flags, session, req_num, msg_size, pkt_num, ts)
    if n:
        memcpy(p + HEADER_SIZE, data, n)
    return pkt


cdef inline bint plain_bytes(object obj, const char** data, Py_ssize_t* n) noexcept:
    """The memory of a ``bytes``, ``bytearray`` or evpl ``Buffer`` (False for
    anything else: the caller takes the general path)."""
    if type(obj) is bytes:
        data[0] = PyBytes_AS_STRING(obj)
        n[0] = PyBytes_GET_SIZE(obj)
        return True
    if type(obj) is Buffer:
        data[0] = (<Buffer>obj).ptr
        n[0] = (<Buffer>obj).length
        return True
    if type(obj) is bytearray:
        data[0] = PyByteArray_AS_STRING(obj)
        n[0] = PyByteArray_GET_SIZE(obj)
        return True
    return False


cdef object body_of(object buf, const char* data, Py_ssize_t n):
    """The payload of a received packet, ``buf[HEADER_SIZE:]``: for an evpl
    Buffer a Buffer on the same memory (no copy), as its slicing gives."""
    cdef Buffer b
    if type(buf) is Buffer:
        b = <Buffer>buf
        body = make_buffer(b.pool, b.chunk, b.ptr + HEADER_SIZE, n - HEADER_SIZE)
        (<Buffer>body).writable = b.writable
        return body
    return buf[HEADER_SIZE:]


cdef inline int64_t monotonic_ns() noexcept:
    """The loop's clock (``Loop.now_ns``: CLOCK_MONOTONIC)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t packet_len(int64_t payload, int64_t off, int64_t size) noexcept:
    """The payload bytes of the packet at ``off`` of a ``size``-byte
    message cut into ``payload``-byte packets (the last may be shorter)."""
    return payload if off + payload <= size else size - off


cdef inline void transfer_goes_on(Bind bind, int64_t now_ns) noexcept:
    """This end just sent packets of a transfer that the peer answers as it
    takes them (RFRs, credit returns, response packets asked for): keep
    ``bind``'s loop polling for the answers (``Loop.keep_polling``)."""
    if bind is not None:
        loop_poll_until(bind.loop, now_ns + TRANSFER_POLL_NS)


cdef class Port(DatagramSink):
    """The read-batch callback of a drpc Bind, in C (the base of the
    client's and the server's Handler). The engine hands it each datagram
    (``dg_take``) and the end of each read batch (``dg_end``) without a
    Python call; it passes them to ``core`` (a ``ClientCore`` or
    ``ServerCore``) with the time of the batch's first datagram, then calls
    ``after()`` if it is set (the client, while it connects).
    ``on_datagrams`` does the same for a batch the Bind kept while reading
    was paused.

    drpc makes its Binds with the kernel's UDP GRO off (it costs every
    received packet ~0.1 µs, which one call at a time never wins back) and
    the Port turns it on at the first read batch of two datagrams or more:
    calls in parallel and multi-packet messages, whose packets the peer
    sends as GSO trains (taken whole, a train is one receive instead of one
    per packet: 8 calls in flight go 2x faster). On a Bind made with
    ``gro=True``, or one that cannot take trains, that does nothing."""

    cdef public object core
    cdef public object after
    cdef bint gro_later         # GRO not yet turned on (see above)
    cdef int64_t now            # the clock when the batch's first datagram came
    cdef bint in_batch

    def __cinit__(self):
        self.gro_later = True

    cdef void _begin(self):
        """The batch's first datagram: its time, and no RTT sample yet."""
        if not self.in_batch:
            self.in_batch = True
            self.now = monotonic_ns()
            if isinstance(self.core, ClientCore):
                (<ClientCore>self.core).batch_rtt = -1

    cdef int dg_take(self, object bind, Buffer buf, object addr) except -1:
        if self.in_batch and self.gro_later:
            self.gro_later = False
            (<Bind>bind)._set_gro(True)
        self._begin()
        return item(self.core, buf, addr, buf.ptr, buf.length, self.now)

    cdef Py_ssize_t dg_place(self, object bind, unsigned int i, char** dst,
                             Py_ssize_t* head) noexcept:
        if isinstance(self.core, ClientCore):
            return (<ClientCore>self.core)._place(i, dst, head)
        return 0

    cdef int dg_placed(self, object bind, const char* hdr, Py_ssize_t length, char* dst,
                       object addr) except -1:
        self._begin()
        if isinstance(self.core, ClientCore):
            return (<ClientCore>self.core)._take_placed(hdr, length, dst, self.now)
        return 0

    cdef int dg_end(self, object bind) except -1:
        core = self.core
        if isinstance(core, ClientCore):
            (<ClientCore>core).place_hold = None
        if self.in_batch:
            self.in_batch = False
            if isinstance(core, ClientCore):
                (<ClientCore>core)._end(self.now)
            elif isinstance(core, ServerCore):
                (<ServerCore>core)._send_crs()
        if self.after is not None:
            self.after()
        return 0

    def on_datagrams(self, bind, list datagrams):
        self._begin()
        feed(self.core, datagrams, self.now)
        self.dg_end(bind)


cdef inline int item(object core, object buf, object addr, const char* data,
                     Py_ssize_t length, int64_t now_ns) except -1:
    """One received datagram to ``core`` (a ClientCore or ServerCore)."""
    if isinstance(core, ServerCore):
        return (<ServerCore>core)._item(buf, addr, data, length, now_ns)
    if core is not None:
        return (<ClientCore>core)._item(buf, addr, data, length, now_ns)
    return 0


cdef int feed(object core, list batch, int64_t now_ns) except -1:
    """Each (datagram, address) of ``batch`` to ``core``."""
    cdef Py_buffer view
    cdef const char* data
    cdef Py_ssize_t length
    for buf, addr in batch:
        if plain_bytes(buf, &data, &length):
            item(core, buf, addr, data, length, now_ns)
        else:
            PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
            try:
                item(core, buf, addr, <const char*>view.buf, view.len, now_ns)
            finally:
                PyBuffer_Release(&view)
    return 0


# -- state objects ---------------------------------------------------------------

cdef class ClientSlot:
    """One request slot of a client session: the request in it and how far
    its exchange got."""

    cdef public bint busy
    cdef public object done
    cdef public Py_ssize_t index
    cdef public int64_t n_req, n_resp, num_rx, num_tx, progress, queued
    cdef public object req
    cdef public int64_t req_num, req_size
    cdef public int req_type
    cdef public object resp
    cdef public int resp_flags
    cdef public int64_t resp_size
    cdef public int64_t retransmits
    cdef public int64_t backoff         # timeouts since the slot's last progress
    # after a timeout the slot resends only its first unanswered packet and
    # waits for that packet's answer: one echoing probe_ts or later answers
    # a resend (the original was lost: go back N), an earlier ts the
    # original (it was only late: nothing more is resent)
    cdef public bint probing
    cdef public uint32_t probe_ts
    cdef object _resp_view
    cdef Py_buffer _view            # of resp_view, held while it is set
    cdef bint _held

    def __init__(self, Py_ssize_t index, Py_ssize_t window):
        self.index = index
        self.req_num = index - window       # the first request gets ``index``
        self.req = b""
        self.n_req = 1                      # n_resp: 0 until the first response packet

    @property
    def resp_view(self):
        """A writable view of a multi-packet ``resp`` being assembled (None
        otherwise); the C path copies packets into its memory."""
        return self._resp_view

    @resp_view.setter
    def resp_view(self, view):
        self._drop_view()
        if view is not None:
            PyObject_GetBuffer(view, &self._view, PyBUF_SIMPLE | PyBUF_WRITABLE)
            self._held = True
            self._resp_view = view

    cdef inline void _drop_view(self):
        """``resp_view = None`` without the attribute machinery."""
        if self._held:
            PyBuffer_Release(&self._view)
            self._held = False
        self._resp_view = None

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._view)


cdef class ServerSlot:
    """One request slot of a server session: the request being received or
    run, or the last response (kept to answer a retransmission)."""

    cdef public Py_ssize_t index
    cdef public int64_t req_num
    cdef public int state
    cdef public int req_type
    cdef public int64_t req_size, n_req, num_rx, resp_size, n_resp
    cdef public object asm
    cdef public object resp
    cdef public int flags
    cdef public uint32_t ts
    # request packets taken whose credit return waits for the batch's end
    # (a ranged CR), and the ts of the last of them
    cdef public int64_t cr_count
    cdef public uint32_t cr_ts

    def __init__(self, Py_ssize_t index):
        self.index = index
        self.req_num = -1
        self.state = FREE


cdef class ServerSession:
    """The server end of one session."""

    cdef public uint32_t number, client_session
    cdef public object peer
    cdef public object nonce
    cdef public Py_ssize_t window
    cdef public int64_t credits, max_message, max_datagram, payload
    cdef public list slots
    cdef public int64_t last_rx, requests
    cdef public bint closed
    cdef public bint cr_range     # the client's CONNECT had FLAG_CR_RANGE

    def __init__(self, uint32_t number, peer, nonce, uint32_t client_session,
                 Py_ssize_t window, int64_t credits, int64_t max_message,
                 int64_t max_datagram, int64_t now_ns):
        self.number = number
        self.peer = peer
        self.nonce = nonce
        self.client_session = client_session
        self.window = window
        self.credits = credits
        self.max_message = max_message
        self.max_datagram = max_datagram
        self.payload = max_datagram - HEADER_SIZE
        self.slots = [ServerSlot(i) for i in range(window)]
        self.last_rx = now_ns
        self.requests = 0
        self.closed = False


@cython.freelist(16)
cdef class Request:
    """One request being served: ``req_type``, ``body`` (an ``evpl.Buffer``
    slicing the packet for a one-packet request, the assembled message
    otherwise), ``peer`` (the client's address); ``respond(data)`` answers
    it once."""

    cdef public object _endpoint
    cdef public ServerSession _sess
    cdef public ServerSlot _slot
    cdef public int req_type
    cdef public uint64_t req_num
    cdef public object body

    def __init__(self, endpoint, ServerSession sess, ServerSlot slot, int req_type,
                 uint64_t req_num, body):
        self._endpoint = endpoint
        self._sess = sess
        self._slot = slot
        self.req_type = req_type
        self.req_num = req_num
        self.body = body

    @property
    def peer(self):
        """The client's address."""
        return self._sess.peer

    def respond(self, data) -> bool:
        """Send the response (bytes-like). Returns False if the session is
        gone (the client disconnected or was expired) or it was answered
        already; the response is then dropped."""
        return self._endpoint.respond(self._sess, self._slot, self.req_num, data)

    def __repr__(self):
        return f"<drpc.Request type={self.req_type} num={self.req_num} {len(self.body)} B>"


# -- client ----------------------------------------------------------------------

cdef class ClientCore:
    """The state of a client session that the C paths use, and those paths;
    ``session.ClientSession`` is the rest (Python)."""

    cdef public object send_now
    cdef public Bind send_bind      # if set, send_now is its send: called in C
    cdef public object peer
    cdef public object state
    cdef public list slots
    cdef public list free
    cdef public object backlog
    cdef public int64_t client_session, server_session, window, credits, credits_total
    cdef public int64_t payload, max_message, busy, max_busy, max_inflight
    cdef public int64_t requests, completed, stale, duplicates, out_of_order, malformed
    cdef public int64_t spurious_timeouts   # timeouts whose packets were only late
    cdef public int64_t bad_session, last_rx, next_tx, session_timeout_ns
    cdef public int64_t rtt_ns, rtt_sum, rtt_samples, min_rtt_ns
    cdef public int64_t srtt_ns, rttvar_ns  # smoothed RTT and its mean deviation (the RTO's)
    cdef public bint starved
    cdef public bint rfr_range          # the server answers ranged RFRs (CONNECT_OK)
    cdef public int64_t rfr_batch       # credits a ranged RFR waits for mid-batch
    cdef ClientSlot pull_slot           # asks for its next packets at the batch's end
    cdef ClientSlot place_slot          # the slot a scatter receive is laid out for
    cdef object place_hold              # its response Buffer, alive until delivered
    cdef object _cc
    cdef double cc_t_low_ns
    cdef bint cc_uncongested            # at the link rate: no pacing, samples skipped
    cdef int64_t cc_skipped             # skipped samples not yet added to cc.skipped
    cdef double cc_last_rtt             # the last of them (Timely's prev_rtt), seconds
    cdef int64_t batch_rtt              # the read batch's last RTT sample (ns), -1: none

    @property
    def cc(self):
        """The session's Timely (``None``: no congestion control)."""
        return self._cc

    @cc.setter
    def cc(self, cc):
        self._cc = cc
        if cc is not None:
            self.cc_t_low_ns = cc.t_low * 1e9
            self.cc_uncongested = cc.rate >= cc.link_rate

    @property
    def uncongested(self) -> bool:
        """No congestion control, or Timely at the link rate: packets leave
        unpaced."""
        return self._cc is None or self.cc_uncongested

    def sample_rtt(self, int64_t rtt, int64_t now_ns):
        """An RTT sample (ns), taken while ``receive`` runs: the session's
        RTT counters, and the sample Timely gets at the end of the batch if
        it is the batch's last."""
        self._sample(rtt, now_ns)

    def cc_flush(self):
        """Hand the skipped samples to Timely (its counters, its previous RTT)."""
        self._cc_flush()

    def complete(self, ClientSlot slot, int64_t now_ns):
        """The slot's response is complete: free the slot (or start the next
        queued call in it), then tell the caller."""
        self._done(slot, now_ns)

    cdef int _sample(self, int64_t rtt, int64_t now_ns) except -1:
        cdef int64_t dev
        self.rtt_ns = rtt
        self.rtt_sum += rtt
        self.rtt_samples += 1
        if rtt < self.min_rtt_ns or not self.min_rtt_ns:
            self.min_rtt_ns = rtt
        # the smoothed RTT and its mean deviation, with TCP's gains (1/8,
        # 1/4; RFC 6298): the retransmission timeout is never below
        # srtt + 4 rttvar, so a host whose RTT swings by milliseconds does
        # not take every swing for a loss
        if self.srtt_ns:
            dev = rtt - self.srtt_ns
            self.srtt_ns += dev // 8
            self.rttvar_ns += ((dev if dev >= 0 else -dev) - self.rttvar_ns) // 4
        else:
            self.srtt_ns = rtt
            self.rttvar_ns = rtt // 2
        self.batch_rtt = rtt
        return 0

    cdef int _timely(self, int64_t rtt, int64_t now_ns) except -1:
        """Timely's sample of one read batch: its last RTT (the answers of a
        batch are one burst, as Timely's per-segment completions are; an
        update per packet cost a Python call each and moved the rate no
        more, since the packets of a batch share one clock reading and
        Timely scales its steps by the time since the last update). Skipped
        while uncongested, eRPC's common case: the skipped samples are
        counted, and the last one handed to Timely as its previous RTT when
        it next updates."""
        cc = self._cc
        if cc is None:
            return 0
        if rtt < self.cc_t_low_ns and self.cc_uncongested:
            self.cc_skipped += 1
            self.cc_last_rtt = rtt * 1e-9
            return 0
        self._cc_flush()
        cc.update(rtt * 1e-9, now_ns * 1e-9)
        self.cc_uncongested = cc.rate >= cc.link_rate
        return 0

    cdef int _cc_flush(self) except -1:
        if self.cc_skipped:
            self._cc.skipped += self.cc_skipped
            self._cc.prev_rtt = self.cc_last_rtt
            self.cc_skipped = 0
        return 0

    def submit(self, req_type, payload, done, int64_t now_ns):
        """Start a request (or queue it behind the window); ``done(response,
        None)`` or ``done(None, error)`` is called once. Here: a one-packet
        request with a free slot, a credit and no pacing; the rest is
        ``_submit``."""
        self._start_call(req_type, payload, done, now_ns)

    cdef int _occupy(self, ClientSlot slot, int req_type, object payload, Py_ssize_t size,
                     int64_t n_req, object done, int64_t now_ns) except -1:
        """A free slot takes a new call of ``n_req`` request packets (the C
        path here and session.py's ``_start``); nothing is sent yet."""
        if self.busy == 0 and now_ns - self.last_rx > 0:
            self.last_rx = now_ns           # silence while idle does not count
        self.busy += 1
        if self.busy > self.max_busy:
            self.max_busy = self.busy
        slot.busy = True
        slot.req_num += self.window
        slot.req_type = req_type
        slot.req = payload
        slot.req_size = size
        slot.n_req = n_req
        slot.n_resp = 0
        slot.resp = None                    # (a free slot has no resp_view)
        slot.num_tx = slot.num_rx = 0
        slot.progress = now_ns
        slot.backoff = 0
        slot.probing = False
        slot.done = done
        return 0

    def _occupy_slot(self, ClientSlot slot, int req_type, payload, int64_t n_req, done,
                     int64_t now_ns):
        """``_occupy`` for session.py (which also drops a response view the
        slot might still hold)."""
        slot.resp_view = None
        self._occupy(slot, req_type, payload, len(payload), n_req, done, now_ns)

    cdef int _start_call(self, object req_type, object payload, object done,
                         int64_t now_ns) except -1:
        cdef const char* data
        cdef Py_ssize_t size
        cdef ClientSlot slot
        cdef int rt
        if not (self.free and self.credits and (self._cc is None or self.cc_uncongested)
                and self.state == "connected" and type(req_type) is int
                and 0 <= req_type <= MAX_REQ_TYPE and plain_bytes(payload, &data, &size)
                and size <= self.payload and size <= self.max_message):
            self._submit(req_type, payload, done, now_ns)
            return 0
        rt = req_type
        self.requests += 1
        slot = <ClientSlot>self.free.pop()
        self._occupy(slot, rt, payload, size, 1, done, now_ns)
        slot.num_tx = 1
        self.credits -= 1
        self._sent_upto(slot, 1)
        self._send_packet(REQ, rt, <uint64_t>slot.req_num, <uint32_t>size, 0,
                          <uint32_t>(now_ns // 1000), payload, data, size)
        return 0

    def receive(self, list batch, int64_t now_ns):
        """Every datagram of one read batch (``(data, addr)`` pairs)."""
        self.batch_rtt = -1
        feed(self, batch, now_ns)
        self._end(now_ns)

    cdef int _item(self, object buf, object addr, const char* data, Py_ssize_t length,
                   int64_t now_ns) except -1:
        """One received datagram: the C path when it is a response packet
        from the server, else the session's Python path."""
        if (self.peer is None or addr is self.peer
                or PyObject_RichCompareBool(addr, self.peer, Py_EQ)):
            if self._take(buf, data, length, now_ns, <uint32_t>(now_ns // 1000)):
                return 0
        self._receive([(buf, addr)], now_ns)
        return 0

    cdef int _end(self, int64_t now_ns) except -1:
        """The end of a read batch: one Timely update from the batch's
        smallest RTT sample; the deferred ranged RFR; queued requests may go
        out on returned credits."""
        if self.batch_rtt >= 0 and self._cc is not None:
            self._timely(self.batch_rtt, now_ns)
        if self.pull_slot is not None:
            if self.pull_slot.busy and self.credits:
                self._pull(self.pull_slot, now_ns)
            self.pull_slot = None
        if self.starved and self.credits:
            self.pump(now_ns)
        return 0

    cdef bint _take(self, object buf, const char* data, Py_ssize_t length, int64_t now_ns,
                    uint32_t now_us) except -1:
        """A RESP that completes a one-packet exchange, the next packet of a
        multi-packet response, or the credit return for a packet of a
        multi-packet request; False for any other packet."""
        cdef Header h
        cdef ClientSlot slot
        cdef int64_t off, j
        cdef Py_ssize_t nbody = length - HEADER_SIZE
        if not parse(<const unsigned char*>data, length, &h) or \
                (h.ptype != RESP and h.ptype != CR) or \
                h.session != self.client_session or h.req_num > <uint64_t>INT64_MAX or \
                h.flags & FLAG_ERROR or not self.slots or self.window <= 0:
            return False
        slot = <ClientSlot>PyList_GET_ITEM(self.slots, <Py_ssize_t>(h.req_num % <uint64_t>self.window))
        if not slot.busy or slot.req_num != <int64_t>h.req_num:
            return False
        if slot.probing:
            return False                    # after a timeout: session.py's
        if h.ptype == CR:
            # request packets up to pkt_num arrived (a ranged CR covers
            # several): their credits come back, and the next request
            # packets may go
            if <int64_t>h.pkt_num + 1 >= slot.n_req or <int64_t>h.pkt_num < slot.num_rx or \
                    nbody != 0:
                return False
            if slot.num_rx < <int64_t>h.pkt_num:
                if <int64_t>h.pkt_num >= slot.num_tx:
                    return False            # never one that was not sent: session.py's
                while slot.num_rx < <int64_t>h.pkt_num:
                    self._answered(slot, slot.num_rx, now_ns)
            self._answer(slot, h.pkt_num, h.flags, h.ts, now_ns, now_us)
            if self.credits and slot.num_tx < slot.n_req:
                self._send_request(slot, now_ns)
            return True
        j = slot.n_req - 1 + h.pkt_num
        if j != slot.num_rx:
            return False
        if h.pkt_num == 0:
            if slot.n_req != 1 or h.msg_size > self.payload or nbody != h.msg_size:
                return False
            slot.n_resp = 1                 # one packet: the whole response
            slot.resp_size = h.msg_size
            slot.resp_flags = h.flags
            slot.resp = body_of(buf, data, length)
        else:
            # the next packet of a multi-packet response, into its buffer
            if slot.n_resp <= 1 or not slot._held or h.msg_size != slot.resp_size or \
                    h.pkt_num >= slot.n_resp or slot.resp_flags & FLAG_ERROR:
                return False
            off = <int64_t>h.pkt_num * self.payload
            if nbody != packet_len(self.payload, off, h.msg_size) or off + nbody > slot._view.len:
                return False
            memcpy(<char*>slot._view.buf + off, data + HEADER_SIZE, nbody)
        self._next(slot, j, h.flags, h.ts, now_ns, now_us)
        return True

    cdef int _next(self, ClientSlot slot, int64_t j, int flags, uint32_t ts, int64_t now_ns,
                   uint32_t now_us) except -1:
        """Answer ``j`` of the slot came in order and is in its place: the
        credit back, the RTT sample, then the call done or its next packets
        asked for."""
        self._answer(slot, j, flags, ts, now_ns, now_us)
        if slot.num_rx == slot.n_req + slot.n_resp - 1:
            self._done(slot, now_ns)
        elif self.credits:
            if self.rfr_range and self.credits < self.rfr_batch:
                # one ranged RFR for the credits this batch returns, at its
                # end (or once rfr_batch of them are back)
                if self.pull_slot is not None and self.pull_slot is not slot:
                    self._pull(self.pull_slot, now_ns)
                self.pull_slot = slot
            else:
                self._pull(slot, now_ns)
        return 0

    cdef inline int _answer(self, ClientSlot slot, int64_t j, int flags, uint32_t ts,
                            int64_t now_ns, uint32_t now_us) except -1:
        """Answer ``j`` came in order: its credit back, and its RTT sample
        unless the server flagged it late."""
        self._answered(slot, j, now_ns)
        if not flags & FLAG_NO_RTT:
            self._sample(<int64_t>(<uint32_t>(now_us - ts)) * 1000, now_ns)
        return 0

    cdef Py_ssize_t _place(self, unsigned int i, char** dst, Py_ssize_t* head) noexcept:
        """Scatter receive (``Port.dg_place``): where the payload of the
        ``i``-th datagram of the next receive should land, when one slot is
        pulling a response of large packets into a pool Buffer: the place
        of its ``i``-th packet still to come (0: nowhere)."""
        cdef ClientSlot slot, s
        cdef Py_ssize_t k
        cdef int64_t j, pkt, off
        if i == 0:
            self.place_slot = None
            self.place_hold = None
            if self.payload <= PLACE_MIN or self.send_bind is None or self.slots is None:
                return 0
            for k in range(len(self.slots)):
                s = <ClientSlot>PyList_GET_ITEM(self.slots, k)
                if s.busy and s.n_resp > 1 and s._held and not s.probing and \
                        s.num_rx >= s.n_req and s.num_tx > s.num_rx and \
                        type(s.resp) is Buffer and s._view.len >= s.resp_size:
                    if self.place_slot is not None:
                        self.place_slot = None      # two pulling: their packets mix
                        return 0
                    self.place_slot = s
            if self.place_slot is None:
                return 0
            self.place_hold = self.place_slot.resp
        slot = self.place_slot
        if slot is None:
            return 0
        j = slot.num_rx + i
        pkt = j - slot.n_req + 1
        off = pkt * self.payload
        if j >= slot.num_tx or pkt < 1 or pkt >= slot.n_resp or off >= slot.resp_size:
            return 0
        dst[0] = <char*>slot._view.buf + off
        head[0] = HEADER_SIZE
        return packet_len(self.payload, off, slot.resp_size)

    cdef int _take_placed(self, const char* hdr, Py_ssize_t length, char* dst,
                          int64_t now_ns) except -1:
        """A datagram a scatter receive laid out as ``_place`` asked (header
        at ``hdr``, payload at ``dst``): 1 if it is that packet, in order,
        and so already where it belongs; 0 for the usual path."""
        cdef Header h
        cdef ClientSlot slot = self.place_slot
        cdef int64_t j, off
        cdef Py_ssize_t nbody = length - HEADER_SIZE
        if slot is None or not parse(<const unsigned char*>hdr, length, &h) or \
                h.ptype != RESP or h.session != self.client_session or \
                h.flags & FLAG_ERROR or not slot.busy or slot.probing or not slot._held or \
                <int64_t>h.req_num != slot.req_num:
            return 0
        j = slot.n_req - 1 + h.pkt_num
        off = <int64_t>h.pkt_num * self.payload
        if j != slot.num_rx or h.pkt_num == 0 or h.pkt_num >= slot.n_resp or \
                h.msg_size != slot.resp_size or dst != <char*>slot._view.buf + off or \
                nbody != packet_len(self.payload, off, h.msg_size):
            return 0
        self._next(slot, j, h.flags, h.ts, now_ns, <uint32_t>(now_ns // 1000))
        return 1

    cdef int _answered(self, ClientSlot slot, int64_t j, int64_t now_ns) except -1:
        """Packet ``j`` of the slot's call was answered, in order (the C path
        here and session.py's): its credit comes back."""
        self.last_rx = now_ns
        if j < slot.num_tx:
            self.credits += 1
        else:
            slot.num_tx = j + 1             # answer to a packet sent before a rollback
        slot.num_rx = j + 1
        slot.progress = now_ns
        slot.backoff = 0                    # the path works: the next RTO is the base one
        return 0

    def _answer_slot(self, ClientSlot slot, int64_t j, int64_t now_ns):
        """``_answered`` for session.py."""
        self._answered(slot, j, now_ns)

    cdef int _send_packet(self, int ptype, int req_type, uint64_t req_num, uint32_t msg_size,
                          uint32_t pkt_num, uint32_t ts, object owner, const char* data,
                          Py_ssize_t n) except -1:
        """Send a packet to the server now: on ``send_bind`` as a header and
        ``n`` bytes of ``data`` (which ``owner`` holds) in two pieces, no
        packet object; else as ``bytes`` through ``send_now``."""
        cdef unsigned char hdr[HEADER_SIZE]
        if self.send_bind is None:
            self.send_now(packet(ptype, req_type, 0, <uint32_t>self.server_session, req_num,
                                 msg_size, pkt_num, ts, data, n))
            return 0
        put_header(hdr, ptype, req_type, 0, <uint32_t>self.server_session, req_num,
                   msg_size, pkt_num, ts)
        self.send_bind._send_parts(hdr, HEADER_SIZE, owner, data, n)
        return 0

    def send_one(self, ClientSlot slot, int64_t i, int64_t now_ns):
        """Send the slot's packet ``i`` now, stamped ``now_ns``: request
        packet ``i``, or past the request an RFR for response packet
        ``i - n_req + 1`` (session.py's sends: its unpaced packets and a
        timeout's probe)."""
        self._send_one(slot, i, now_ns)

    def send_paced(self, tuple item, int64_t now_ns=-1):
        """Send a packet the pacer held (``out(item, slot, when_ns)``:
        ``item`` is ``(slot, req_num, i)``) once its time has come, stamped
        ``now_ns`` (-1: the loop's clock), so that the RTT does not count
        its wait. Built only now: a request's payload goes out from where
        it lies. Nothing is sent if the slot has moved on to another call
        meanwhile (the session failed, or a go-back-N resent the packet and
        the call completed)."""
        cdef ClientSlot slot = <ClientSlot>item[0]
        if not slot.busy or slot.req_num != <int64_t>item[1]:
            return
        if now_ns < 0:
            now_ns = monotonic_ns()
        self._send_one(slot, <int64_t>item[2], now_ns)
        transfer_goes_on(self.send_bind, now_ns)   # its answer follows

    cdef int _send_one(self, ClientSlot slot, int64_t i, int64_t now_ns) except -1:
        cdef const char* data
        cdef Py_ssize_t size, off
        cdef uint32_t ts = <uint32_t>(now_ns // 1000)
        if i >= slot.n_req:
            self._send_packet(RFR, slot.req_type, <uint64_t>slot.req_num, 0,
                              <uint32_t>(i - slot.n_req + 1), ts, None, NULL, 0)
        elif plain_bytes(slot.req, &data, &size) and size == slot.req_size:
            off = i * self.payload
            self._send_packet(REQ, slot.req_type, <uint64_t>slot.req_num, <uint32_t>size,
                              <uint32_t>i, ts, slot.req, data + off,
                              packet_len(self.payload, off, size))
        else:
            self.send_now(self._packet(slot, i, ts))    # other memory: copied
        return 0

    cdef int _send_request(self, ClientSlot slot, int64_t now_ns) except -1:
        """Send the next packets of the slot's multi-packet request that the
        credits allow, unpaced, each a header and a slice of the request
        (``_send_one``); paced ones go through ``_push``."""
        if not (self._cc is None or self.cc_uncongested) or slot.queued:
            self._push(slot, now_ns)
            return 0
        return self._send_upto(slot, slot.n_req, now_ns)     # credit returns follow

    cdef int _pull(self, ClientSlot slot, int64_t now_ns) except -1:
        """Ask for the response packets the credits allow (RFRs), unpaced;
        paced ones go through ``_push``."""
        cdef int64_t total = slot.n_req + slot.n_resp - 1
        cdef int64_t n
        cdef uint32_t ts = <uint32_t>(now_ns // 1000)
        if slot is self.pull_slot:
            self.pull_slot = None
        if not (self._cc is None or self.cc_uncongested) or slot.queued:
            self._push(slot, now_ns)        # paced (or behind its packets in the wheel)
            return 0
        if self.rfr_range and self.credits > 1 and slot.num_tx + 1 < total:
            # one RFR for as many packets as the credits allow; sent now,
            # so the server starts on them while this side takes the rest
            # of its read batch (the engine flushes a sink's 16 datagrams,
            # which ranged RFRs no longer add up to)
            n = min(self.credits, total - slot.num_tx)
            self.credits -= n
            self._send_packet(RFR, slot.req_type, <uint64_t>slot.req_num, <uint32_t>n,
                              <uint32_t>(slot.num_tx - slot.n_req + 1), ts, None, NULL, 0)
            slot.num_tx += n
            if self.send_bind is not None and n >= self.rfr_batch:
                self.send_bind._flush()
        return self._send_upto(slot, total, now_ns)     # the packets asked for follow

    cdef int _send_upto(self, ClientSlot slot, int64_t total, int64_t now_ns) except -1:
        """Send the slot's packets towards ``total`` (``_send_one`` each) while
        credits last; the peer answers them as it takes them, so the loop
        keeps polling for the answers."""
        while self.credits and slot.num_tx < total:
            self.credits -= 1
            self._send_one(slot, slot.num_tx, now_ns)
            slot.num_tx += 1
        self._sent_upto(slot, total)
        transfer_goes_on(self.send_bind, now_ns)
        return 0

    cdef inline void _sent_upto(self, ClientSlot slot, int64_t total) noexcept:
        """After sending the slot's packets towards ``total``: out of credits
        short of it, the session is starved (``pump()`` when they return);
        and the most packets in flight so far."""
        cdef int64_t inflight = self.credits_total - self.credits
        if slot.num_tx < total:
            self.starved = True
        if inflight > self.max_inflight:
            self.max_inflight = inflight

    cdef int _done(self, ClientSlot slot, int64_t now_ns) except -1:
        cdef int flags = slot.resp_flags
        done = slot.done
        resp = slot.resp
        slot.busy = False
        slot.done = None
        slot.req = b""
        slot.resp = None
        slot._drop_view()
        self.busy -= 1
        self.completed += 1
        if self.backlog:
            req_type, payload, nxt = self.backlog.popleft()
            self._start(slot, req_type, payload, nxt, now_ns)
        else:
            self.free.append(slot)
        if flags & FLAG_ERROR:
            done(None, self._remote_error(resp))
        else:
            done(resp, None)
        return 0


cdef class Caller:
    """``Client.call`` in C for its common case (the Client puts ``call``,
    a bound method, in its instance's ``call``: Python calls it without
    an argument tuple): a callback given, a ``bytes`` or ``Buffer``
    payload, the RTO ticker running (``ticking``, kept by the Client) and
    the session not idle past half the server's timeout; the request then
    goes to ``ClientCore._start_call``. Anything else goes to ``slow`` (the
    Client's Python ``call``, which has it all)."""

    cdef public ClientCore core
    cdef public object slow
    cdef public bint ticking

    def call(self, req_type, payload=b"", callback=None):
        cdef ClientCore core = self.core
        cdef int64_t now
        if callback is None or not self.ticking or core is None or \
                (type(payload) is not bytes and type(payload) is not Buffer):
            return self.slow(req_type, payload, callback)
        now = monotonic_ns()
        if core.busy == 0 and core.session_timeout_ns > 0 and \
                now - core.last_rx >= core.session_timeout_ns // 2:
            return self.slow(req_type, payload, callback)
        core._start_call(req_type, payload, callback, now)
        return None


# -- server ----------------------------------------------------------------------

cdef class ServerCore:
    """The state of a server endpoint that the C path uses, and that path;
    ``session.ServerEndpoint`` is the rest (Python).

    ``send_bind``, if set, is the datagram Bind the C path sends on: each
    packet as two pieces, its header and the payload where it lies (the
    request's Buffer, the response), so no packet object is built and no
    payload copied; a send refused with ``SendQueueFull`` is counted in
    ``send_queue_full`` and the packet dropped, as the network would drop
    it. Unset, packets go to ``out`` as ``bytes``."""

    cdef public object out
    cdef public Bind send_bind
    cdef ServerSession last_sess    # the session of the last packet taken
    cdef public dict sessions
    cdef public dict handlers
    cdef public int64_t packets, requests, responses, rfr, credit_returns, send_queue_full
    cdef list cr_pending            # (session, slot) with a ranged CR to send

    def __cinit__(self):
        self.cr_pending = []

    cdef int _send_packet(self, int ptype, int req_type, int flags, uint32_t session,
                          uint64_t req_num, uint32_t msg_size, uint32_t pkt_num, uint32_t ts,
                          object owner, const char* data, Py_ssize_t n, object addr) except -1:
        """Send a packet to ``addr``: on ``send_bind`` as a header and ``n``
        bytes of ``data`` (which ``owner`` holds: the response) in two
        pieces, with no packet built and no copy; else as ``bytes`` to
        ``out``."""
        cdef unsigned char hdr[HEADER_SIZE]
        if self.send_bind is None:
            self.out(packet(ptype, req_type, flags, session, req_num, msg_size, pkt_num, ts,
                            data, n), addr)
            return 0
        put_header(hdr, ptype, req_type, flags, session, req_num, msg_size, pkt_num, ts)
        try:
            self.send_bind._sendto_parts(hdr, HEADER_SIZE, owner, data, n, addr)
        except SendQueueFull:
            self.send_queue_full += 1
        return 0

    def send_slice(self, int ptype, int req_type, int flags, uint32_t session, uint64_t req_num,
                   uint32_t msg_size, uint32_t pkt_num, uint32_t ts, object data,
                   Py_ssize_t off, Py_ssize_t n, object addr):
        """Send a packet whose payload is ``data[off:off + n]`` to ``addr``,
        without copying it on ``send_bind`` (the Python path's packets of a
        multi-packet response). ``data`` must keep its memory unchanged
        until sent: bytes, a Buffer, or a memoryview (which pins a
        bytearray's)."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if off < 0 or n < 0 or off + n > view.len:
                raise ValueError(f"slice [{off}:{off + n}] of {view.len} bytes")
            self._send_packet(ptype, req_type, flags, session, req_num, msg_size, pkt_num, ts,
                              data, <const char*>view.buf + off, n, addr)
            if off + n < view.len:
                transfer_goes_on(self.send_bind, monotonic_ns())    # RFRs for the rest follow
        finally:
            PyBuffer_Release(&view)

    def receive(self, list batch, int64_t now_ns):
        """Every datagram of one read batch."""
        feed(self, batch, now_ns)
        self._send_crs()

    cdef int _item(self, object buf, object addr, const char* data, Py_ssize_t length,
                   int64_t now_ns) except -1:
        """One received datagram: the C path for a one-packet request or an
        RFR, else the endpoint's Python path."""
        self.packets += 1
        if self._take(buf, addr, data, length, now_ns) == 0:
            self._send_crs()                # (they go before anything it answers)
            self._receive([(buf, addr)], now_ns)
        return 0

    cdef int _send_crs(self) except -1:
        """Send every pending ranged credit return (at the end of a read
        batch, and before the Python path answers anything)."""
        cdef list pending = self.cr_pending
        if not pending:
            return 0
        self.cr_pending = []
        for sess, slot in pending:
            self._send_cr(<ServerSession>sess, <ServerSlot>slot)
        return 0

    cdef int _send_cr(self, ServerSession sess, ServerSlot slot) except -1:
        """One CR for the slot's request packets taken since its last: up
        to ``num_rx - 1``, ``msg_size`` of them, echoing the last one's ts."""
        cdef int64_t k = slot.cr_count
        if k == 0:
            return 0
        slot.cr_count = 0
        if sess.closed or slot.state != RECEIVING:
            return 0
        self.credit_returns += 1
        self._send_packet(CR, slot.req_type, 0, sess.client_session, <uint64_t>slot.req_num,
                          <uint32_t>k, <uint32_t>(slot.num_rx - 1), slot.cr_ts, None, NULL, 0,
                          sess.peer)
        return 0

    cdef int _take(self, object buf, object addr, const char* data, Py_ssize_t length,
                   int64_t now_ns) except -1:
        """A new one-packet request for a dispatch handler, the next (not
        last) packet of a multi-packet request, or an RFR of a kept
        response: 1 if taken, 0 for the Python path."""
        cdef Header h
        cdef ServerSession sess
        cdef ServerSlot slot
        cdef PyObject* found
        cdef int64_t expected, off, k, last
        cdef Py_ssize_t size, nbody = length - HEADER_SIZE
        cdef const char* rdata
        cdef Py_buffer rview
        cdef Request req
        if not parse(<const unsigned char*>data, length, &h) or \
                (h.ptype != REQ and h.ptype != RFR) or h.req_num > <uint64_t>INT64_MAX:
            return 0
        # packets come in runs from one session: the last one's, unless it
        # closed (only ``_drop`` removes a session, and it marks it closed)
        sess = self.last_sess
        if sess is None or sess.closed or sess.number != h.session:
            found = PyDict_GetItem(self.sessions, h.session)
            if found is NULL:
                return 0
            sess = <ServerSession>found
            self.last_sess = sess
        if sess.peer is not addr and not PyObject_RichCompareBool(sess.peer, addr, Py_EQ):
            return 0
        if sess.window <= 0:
            return 0
        slot = <ServerSlot>PyList_GET_ITEM(sess.slots, <Py_ssize_t>(h.req_num % <uint64_t>sess.window))
        if h.ptype == RFR:
            if slot.req_num != <int64_t>h.req_num or slot.state != DONE or \
                    not 0 < h.pkt_num < slot.n_resp or slot.n_resp <= 1:
                return 0
            # the response is a memoryview (session.respond): its memory
            PyObject_GetBuffer(slot.resp, &rview, PyBUF_SIMPLE)
            try:
                if slot.resp_size > rview.len:
                    return 0
                sess.last_rx = now_ns
                self.rfr += 1
                # packets pkt_num.. of a ranged RFR (msg_size of them, at
                # most the session's credits); each slice leaves from the
                # response itself (held by the send queue until sent)
                last = h.pkt_num + (h.msg_size if h.msg_size > 1 else 1)
                if last > <int64_t>h.pkt_num + sess.credits:
                    last = h.pkt_num + sess.credits
                if last > slot.n_resp:
                    last = slot.n_resp
                for k in range(h.pkt_num, last):
                    off = k * sess.payload
                    size = packet_len(sess.payload, off, slot.resp_size)
                    self._send_packet(RESP, slot.req_type, slot.flags, sess.client_session,
                                      h.req_num, <uint32_t>slot.resp_size, <uint32_t>k, h.ts,
                                      slot.resp, <const char*>rview.buf + off, size, addr)
            finally:
                PyBuffer_Release(&rview)
            if last < slot.n_resp:
                transfer_goes_on(self.send_bind, now_ns)    # RFRs for the rest follow
            return 1
        if <int64_t>h.req_num == slot.req_num and slot.state == RECEIVING:
            # the next packet of a multi-packet request, not its last: into
            # the assembly buffer, and a credit return (header only)
            if h.pkt_num != slot.num_rx or h.pkt_num + 1 >= slot.n_req or \
                    h.msg_size != slot.req_size or nbody != sess.payload or slot.asm is None:
                return 0
            PyObject_GetBuffer(slot.asm, &rview, PyBUF_WRITABLE)
            try:
                off = <int64_t>h.pkt_num * sess.payload
                if off + nbody > rview.len:
                    return 0
                memcpy(<char*>rview.buf + off, data + HEADER_SIZE, nbody)
            finally:
                PyBuffer_Release(&rview)
            sess.last_rx = now_ns
            slot.num_rx = h.pkt_num + 1
            if sess.cr_range:
                # one CR for this batch's packets (at its end, or once
                # half the session's credits wait for it: sent now, so the
                # client sends more while this side takes the rest)
                slot.cr_count += 1
                slot.cr_ts = h.ts
                if slot.cr_count == 1:
                    self.cr_pending.append((sess, slot))
                if slot.cr_count >= sess.credits // 2:
                    self._send_cr(sess, slot)
                    if self.send_bind is not None:
                        self.send_bind._flush()
            else:
                self.credit_returns += 1
                self._send_packet(CR, slot.req_type, 0, sess.client_session, h.req_num, 0,
                                  h.pkt_num, h.ts, None, NULL, 0, addr)
            transfer_goes_on(self.send_bind, now_ns)    # the request's next packets follow
            return 1
        if <int64_t>h.req_num == slot.req_num or h.pkt_num != 0 or \
                h.msg_size > sess.payload or nbody != h.msg_size or \
                slot.state == RECEIVING or slot.state == RUNNING:
            return 0
        expected = slot.req_num + sess.window if slot.req_num >= 0 else slot.index
        if <int64_t>h.req_num != expected:
            return 0
        found = PyDict_GetItem(self.handlers, h.req_type)
        if found is NULL:
            return 0
        handler = <object>found
        # a new one-packet request: the body is a slice of the packet
        sess.last_rx = now_ns
        slot.req_num = <int64_t>h.req_num
        slot.req_type = h.req_type
        slot.req_size = h.msg_size
        slot.n_req = 1
        slot.resp = None
        slot.state = RUNNING
        slot.ts = h.ts
        sess.requests += 1
        self.requests += 1
        req = Request.__new__(Request)
        req._endpoint = self
        req._sess = sess
        req._slot = slot
        req.req_type = h.req_type
        req.req_num = h.req_num
        req.body = body_of(buf, data, length)
        try:
            resp = handler(req)
        except Exception as exc:
            self.failed(req, exc)
            return 1
        if resp is None:
            return 1                        # answered later (or already, with an error)
        if slot.state == RUNNING and plain_bytes(resp, &rdata, &size) and size <= sess.payload:
            # answered at once, in one packet: the common case
            slot.resp = resp
            slot.resp_size = size
            slot.flags = 0
            slot.n_resp = 1
            slot.state = DONE
            self.responses += 1
            self._send_packet(RESP, h.req_type, 0, sess.client_session, h.req_num,
                              <uint32_t>size, 0, h.ts, resp, rdata, size, addr)
        else:
            self.respond(sess, slot, h.req_num, resp, 0, True)
        return 1
