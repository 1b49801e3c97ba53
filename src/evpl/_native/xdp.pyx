# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The AF_XDP backend: ``xdp_udp`` (UDP over IPv4 and IPv6, Ethernet frames
written and read by evpl; see docs/xdp.md).

``XdpDriver`` is one loop's AF_XDP state for one interface: a UMEM that is
the single slab of a pinned Pool of its own, one AF_XDP socket per receive
queue (zero-copy if the driver can, else copy), and evpl's XDP program
attached through a bpf_link, which redirects to those sockets only the UDP
datagrams of bound (address, port)s. Frames are 2 KiB pieces of pool
buffers: a received datagram is a Buffer slicing its frame (no copy), and a
Buffer that is such a payload is sent from its own frame, with the headers
written in front of it (no copy); anything else is copied into a frame of
the driver's send frames. The loop polls the rings while it spins
(``evpl_xdp_ready``) and sleeps on an epoll fd holding the sockets.

A pool buffer carved into receive frames goes back to the pool once all its
frames were received and the Buffers slicing them dropped (as io_uring's
slot ring does), so Buffers kept by Python pin UMEM, and a UMEM that runs
dry leaves the fill ring empty: the kernel drops (and counts) what it can
not place, what was received is never lost.
"""

cimport cython
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint16_t, uint8_t
from libc.errno cimport errno
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport close as c_close

from evpl._native.bind cimport Bind, Limits, S_OPEN, S_CLOSED
from evpl._native.buffers cimport Pool, Buffer, Chunk, chunk_unref, make_buffer
from evpl._native.loop cimport LoopCore, Driver
from evpl._native.sys cimport *
from evpl._native.txqueue cimport *

import os
import socket

from evpl.errors import BackendUnavailable, ConfigError

cdef extern from "evpl_xdp.h" nogil:
    ctypedef struct evpl_xdp:
        int ifindex
        int nq
        int zerocopy
        int attach_mode
        int epfd
        int stale_detached
        uint32_t tx_out
        uint32_t tx_budget
        uint64_t tx_wakeups
    ctypedef struct evpl_pkt:
        int family
        uint32_t saddr, daddr
        uint8_t saddr6[16]
        uint8_t daddr6[16]
        uint16_t sport, dport
        uint32_t off, len
    const char* evpl_xdp_probe()
    const unsigned char* evpl_xdp_object(size_t* n)
    evpl_xdp* evpl_xdp_open(const char* ifname, int nq, void* area, uint64_t size,
                            uint32_t frame, uint32_t ring, int busy_poll, char* err,
                            size_t errlen)
    void evpl_xdp_close(evpl_xdp* x)
    void evpl_xdp_set_tx_budget(evpl_xdp* x, uint32_t budget)
    int evpl_xdp_ready(void* ctx)
    int evpl_xdp_rx(evpl_xdp* x, int q, uint64_t* addr, uint32_t* len, int max)
    uint32_t evpl_xdp_fill_free(evpl_xdp* x, int q)
    int evpl_xdp_fill(evpl_xdp* x, int q, uint64_t first, uint32_t stride, uint32_t n)
    void evpl_xdp_kick_rx(evpl_xdp* x, int q)
    int evpl_xdp_tx(evpl_xdp* x, int q, uint64_t addr, uint32_t len)
    int evpl_xdp_tx_flush(evpl_xdp* x, int q)
    int evpl_xdp_comp(evpl_xdp* x, int q, uint64_t* addr, int max)
    int evpl_xdp_port(evpl_xdp* x, int family, const uint8_t* addr, uint16_t port, int add)
    int evpl_xdp_kstats(evpl_xdp* x, int q, uint64_t* out)
    int evpl_xdp_parse(const uint8_t* f, uint32_t flen, evpl_pkt* out)
    void evpl_xdp_build(uint8_t* h, const uint8_t* dmac, const uint8_t* smac, uint32_t saddr,
                        uint32_t daddr, uint16_t sport, uint16_t dport, uint32_t plen,
                        uint16_t ip_id)
    void evpl_xdp_build6(uint8_t* h, const uint8_t* dmac, const uint8_t* smac,
                         const uint8_t* saddr, const uint8_t* daddr, uint16_t sport,
                         uint16_t dport, uint32_t plen)
    int evpl_xdp_drop_all(int fd)
    int EVPL_PKT_PARTIAL, EVPL_PKT_NOCSUM, EVPL_PKT_SHORT, EVPL_PKT_NOTUDP, EVPL_PKT_BADCSUM
    int EVPL_PKT_EXTHDR
    int EVPL_XDP_HDR, EVPL_XDP_HDR6
    int XDP_ATTACHED_DRV, XDP_ATTACHED_SKB

cdef enum:
    FRAME = 2048            # UMEM frame (chunk) size
    CHUNK_BYTES = 256 << 10  # pool buffer: 128 frames
    UMEM_BYTES = 32 << 20   # the UMEM: one slab, 128 pool buffers
    RING = 2048             # descriptors per ring
    TX_CHUNKS = 4           # pool buffers of send frames (512 copies in flight)
    BATCH = 64
    MAX_BINDS = 64          # Binds per interface and loop
    NEIGH = 256             # next-hop MAC cache entries (direct mapped)

cdef int64_t NEIGH_TTL_NS = 5_000_000_000   # a cached MAC is looked up again after this
cdef int64_t ARP_TIMEOUT_NS = 3_000_000_000  # datagrams to an unresolved neighbour: dropped
cdef int64_t SOLICIT_NS = 200_000_000       # ask the kernel to resolve at most this often
cdef int64_t UNROUTABLE_TTL_NS = 1_000_000_000  # "no route through the interface" is kept
cdef int SO_MEMINFO = 55, SK_MEMINFO_DROPS = 8, SK_MEMINFO_VARS = 9


def _tx_budget() -> int:
    """Frames one copy-mode sendto may send: the TX ring's size, unless
    ``EVPL_XDP_TX_BUDGET`` says otherwise (32, the kernel's default, turns
    the batching off; for comparisons)."""
    try:
        return max(32, min(RING, int(os.environ.get("EVPL_XDP_TX_BUDGET", RING))))
    except ValueError:
        return RING


def xdp_unavailable_reason():
    """None if evpl was built with AF_XDP support and the process has the
    capabilities it needs (CAP_NET_ADMIN, CAP_BPF or CAP_SYS_ADMIN), else why
    not."""
    cdef const char* why = evpl_xdp_probe()
    if why != NULL:
        return why.decode()
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return "cannot read this process's capabilities"
    if not caps & (1 << 12):
        return "AF_XDP needs CAP_NET_ADMIN (run as root or grant the capability)"
    if not caps & ((1 << 39) | (1 << 21)):
        return "loading evpl's XDP program needs CAP_BPF (or CAP_SYS_ADMIN)"
    return None


def program_object() -> bytes:
    """evpl's XDP program as an ELF object (what the backend loads), e.g.
    to inspect it with ``llvm-objdump`` or attach it by hand."""
    cdef size_t n = 0
    cdef const unsigned char* p = evpl_xdp_object(&n)
    return b"" if p == NULL else p[:n]


cdef class XdpDatagram

cdef uint8_t ZERO16[16]
memset(ZERO16, 0, 16)


cdef inline bint _link_local(const uint8_t* a6) noexcept nogil:
    """fe80::/10"""
    return a6[0] == 0xfe and (a6[1] & 0xc0) == 0x80


cdef struct XdpSlot:
    evpl_xdp* x             # NULL while the driver is dormant (no Bind open)


cdef int _ready(void* ctx) noexcept nogil:
    cdef XdpSlot* s = <XdpSlot*>ctx
    return s.x != NULL and evpl_xdp_ready(s.x)


# (netns inode, ifindex) -> the driver using it in this process
_IN_USE = {}


@cython.final
@cython.no_gc_clear
cdef class XdpDriver(Driver):
    """One loop's AF_XDP sockets, UMEM and XDP program on one interface."""
    cdef XdpSlot* slot
    cdef evpl_xdp* x
    cdef Pool upool
    cdef char* base
    cdef object link            # evpl.core.netlink.Link
    cdef object nl              # evpl.core.netlink.Netlink of the interface's namespace
    cdef object key
    cdef bytes ifname
    cdef uint8_t mac[6]
    cdef uint32_t src_ip        # network order: the interface's first IPv4 address
    cdef uint8_t src6[16]       # its first global IPv6 address (else its link-local one)
    cdef uint8_t src6_ll[16]    # its link-local IPv6 address (else src6)
    cdef bint has6
    cdef readonly int mtu
    cdef int nframes, nchunks, per_chunk
    cdef Chunk** rx_chunk       # pool buffer carved into receive frames, per index
    cdef int* rx_left           # its frames still in the kernel's hands
    cdef int rx_held
    cdef int rx_limit           # receive pool buffers per queue at most
    cdef int* q_held
    cdef uint16_t* rx_off       # per frame: offset of the payload delivered from it
    cdef PyObject** tx_owner    # per frame: the Buffer sent from it without a copy
    cdef uint8_t* tx_busy       # per frame: a send from it is in flight
    cdef uint32_t* tx_free      # send (copy) frames not in flight
    cdef int ntx_free
    cdef Chunk* tx_chunks[TX_CHUNKS]
    cdef bint tx_dirty
    cdef size_t pool_mark
    cdef uint16_t ip_id
    # Binds: demultiplexed by (family, address, port), network order
    cdef int nbinds
    cdef uint8_t b_fam[MAX_BINDS]
    cdef uint32_t b_addr[MAX_BINDS]
    cdef uint8_t b_addr6[MAX_BINDS][16]     # all zero: any IPv6 address
    cdef uint16_t b_port[MAX_BINDS]
    cdef PyObject* b_obj[MAX_BINDS]
    cdef list blocked           # Binds waiting for send frames, ring room or ARP
    # next-hop MAC cache (IPv4 addresses in the first 4 bytes of the key)
    cdef uint8_t n_fam[NEIGH]
    cdef uint8_t n_ip[NEIGH][16]
    cdef uint8_t n_mac[NEIGH][6]
    cdef int64_t n_exp[NEIGH]
    cdef uint8_t n_bad[NEIGH]   # the entry says "not reachable through this interface"
    cdef dict arp_pending       # packed address -> [first try, last solicit] (ns)
    cdef uint64_t scratch_a[BATCH]
    cdef uint32_t scratch_l[BATCH]
    cdef int busy_poll
    # counters
    cdef size_t st_rx, st_tx, st_tx_zc, st_tx_copy, st_ring_full, st_fill_starved
    cdef size_t st_bad_csum, st_short, st_not_udp, st_no_bind, st_partial, st_nocsum
    cdef size_t st_wakeups         # sendto calls of sockets closed since
    cdef size_t st_arp_drops, st_unroutable, st_opens, st_ext_hdr, st_not_peer, st_rx6, st_tx6
    cdef str xsk_mode, attach_mode
    cdef bint stale_detached

    def __cinit__(self):
        self.slot = <XdpSlot*>PyMem_Malloc(sizeof(XdpSlot))
        if self.slot != NULL:
            self.slot.x = NULL
        self.fd = -1

    def __dealloc__(self):
        self._teardown()
        PyMem_Free(self.rx_chunk)
        PyMem_Free(self.rx_left)
        PyMem_Free(self.rx_off)
        PyMem_Free(self.tx_owner)
        PyMem_Free(self.tx_busy)
        PyMem_Free(self.tx_free)
        PyMem_Free(self.q_held)
        PyMem_Free(self.slot)

    cdef int _setup(self, LoopCore loop, link, nl, key) except -1:
        cdef Chunk* c
        if self.slot == NULL:
            raise MemoryError()
        self.loop = loop
        self.link = link
        self.nl = nl
        self.key = key
        self.ifname = link.name.encode()
        self.name = f"xdp:{link.name}@{key[0]}"
        memcpy(self.mac, <char*>link.mac, 6)
        self.mtu = link.mtu
        self.src_ip = 0
        if link.ipv4:
            self.src_ip = int.from_bytes(socket.inet_aton(link.ipv4[0]), "little")
        self.has6 = bool(link.ipv6)
        if link.ipv6:       # global addresses first (netlink.Link.ipv6)
            first = socket.inet_pton(socket.AF_INET6, link.ipv6[0])
            ll = next((a for a in link.ipv6 if a.lower().startswith("fe80:")), link.ipv6[0])
            memcpy(self.src6, <char*>first, 16)
            ll_b = socket.inet_pton(socket.AF_INET6, ll)
            memcpy(self.src6_ll, <char*>ll_b, 16)
        if self.mtu + 14 > FRAME - 256:
            raise ConfigError(f"{link.name}: MTU {self.mtu} does not fit evpl's "
                              f"{FRAME}-byte AF_XDP frames (at most {FRAME - 256 - 14})")
        self.blocked = []
        self.arp_pending = {}
        self.upool = Pool(slab_size=UMEM_BYTES, buffer_size=CHUNK_BYTES, max_bytes=UMEM_BYTES,
                          keep_bytes=0, trim_above=None)
        self.upool.pinned = True        # registered with the kernel: never trimmed
        c = self.upool.get()            # maps the one slab
        if c == NULL:
            raise MemoryError("cannot map the AF_XDP UMEM")
        chunk_unref(self.upool, c)
        self.base = self.upool.slabs[0].base
        self.nframes = UMEM_BYTES // FRAME
        self.nchunks = UMEM_BYTES // CHUNK_BYTES
        self.per_chunk = CHUNK_BYTES // FRAME
        self.rx_chunk = <Chunk**>PyMem_Malloc(self.nchunks * sizeof(Chunk*))
        self.rx_left = <int*>PyMem_Malloc(self.nchunks * sizeof(int))
        self.rx_off = <uint16_t*>PyMem_Malloc(self.nframes * sizeof(uint16_t))
        self.tx_owner = <PyObject**>PyMem_Malloc(self.nframes * sizeof(PyObject*))
        self.tx_busy = <uint8_t*>PyMem_Malloc(self.nframes)
        self.tx_free = <uint32_t*>PyMem_Malloc(TX_CHUNKS * self.per_chunk * sizeof(uint32_t))
        self.q_held = <int*>PyMem_Malloc(64 * sizeof(int))
        if (not self.rx_chunk or not self.rx_left or not self.rx_off or not self.tx_owner
                or not self.tx_busy or not self.tx_free or not self.q_held):
            raise MemoryError()
        memset(self.rx_chunk, 0, self.nchunks * sizeof(Chunk*))
        memset(self.rx_off, 0, self.nframes * sizeof(uint16_t))
        memset(self.tx_owner, 0, self.nframes * sizeof(PyObject*))
        memset(self.tx_busy, 0, self.nframes)
        memset(self.n_exp, 0, sizeof(self.n_exp))
        self.busy_poll = 1 if loop.poll_always else 0
        loop.add_driver(self, _ready, <void*>self.slot)
        return 0

    cdef int _open(self) except -1:
        """Sockets, rings and the program: done when the first Bind opens."""
        cdef char err[512]
        cdef Chunk* c
        cdef int i, k, nq = min(<int>self.link.rx_queues, 64)
        cdef epoll_event ev
        err[0] = 0
        self.x = evpl_xdp_open(self.ifname, nq, self.base, UMEM_BYTES, FRAME, RING,
                               self.busy_poll, err, sizeof(err))
        if self.x == NULL:
            raise BackendUnavailable(f"xdp_udp on {self.link.name}: {err.decode()}")
        self.slot.x = self.x
        _IN_USE[self.key] = self
        evpl_xdp_set_tx_budget(self.x, _tx_budget())
        self.st_opens += 1
        self.xsk_mode = "zerocopy" if self.x.zerocopy else "copy"
        self.attach_mode = ("native" if self.x.attach_mode == XDP_ATTACHED_DRV else
                            "generic" if self.x.attach_mode == XDP_ATTACHED_SKB else "other")
        self.stale_detached = self.stale_detached or self.x.stale_detached
        self.ntx_free = 0
        for i in range(TX_CHUNKS):
            c = self.upool.get()
            if c == NULL:
                self._teardown()
                raise MemoryError("AF_XDP UMEM exhausted")
            self.tx_chunks[i] = c
            for k in range(self.per_chunk):
                self.tx_free[self.ntx_free] = <uint32_t>((c.data - self.base) // FRAME + k)
                self.rx_off[self.tx_free[self.ntx_free]] = 0
                self.ntx_free += 1
        self.rx_held = 0
        for i in range(nq):
            self.q_held[i] = 0
        self.rx_limit = max(1, min(RING // self.per_chunk,
                                   (self.nchunks - TX_CHUNKS) // (2 * nq)))
        self.fd = self.x.epfd
        ev.events = EPOLLIN
        ev.data.ptr = <void*>self
        if epoll_ctl(self.loop.epfd, EPOLL_CTL_ADD, self.fd, &ev) < 0:
            self._teardown()
            raise OSError(errno, "epoll_ctl(AF_XDP sockets)")
        self._refill()
        return 0

    cdef void _teardown(self):
        """Close the sockets (the kernel lets go of every frame), release the
        frames' pool buffers and Buffers, detach the program."""
        cdef int i
        cdef Chunk* c
        if self.x == NULL:
            return
        if self.fd >= 0 and self.loop is not None and self.loop.epfd >= 0:
            epoll_ctl(self.loop.epfd, EPOLL_CTL_DEL, self.fd, NULL)
        self.fd = -1
        self.slot.x = NULL
        if _IN_USE.get(self.key) is self:
            del _IN_USE[self.key]
        self.st_wakeups += self.x.tx_wakeups
        evpl_xdp_close(self.x)
        self.x = NULL
        for i in range(self.nframes):
            if self.tx_owner[i] != NULL:
                Py_DECREF(<object>self.tx_owner[i])
                self.tx_owner[i] = NULL
            self.tx_busy[i] = 0
        for i in range(self.nchunks):
            c = self.rx_chunk[i]
            if c != NULL:
                self.rx_chunk[i] = NULL
                chunk_unref(self.upool, c)
        for i in range(TX_CHUNKS):
            if self.tx_chunks[i] != NULL:
                chunk_unref(self.upool, self.tx_chunks[i])
                self.tx_chunks[i] = NULL
        self.ntx_free = 0
        self.rx_held = 0
        self.blocked = []

    # ---- receive ------------------------------------------------------------

    cdef void _refill(self):
        """Carve free pool buffers into receive frames for every fill ring
        that has room for a whole buffer's worth."""
        cdef int q, ci, k
        cdef Chunk* c
        cdef uint64_t first
        for q in range(self.x.nq):
            while (self.q_held[q] < self.rx_limit
                   and evpl_xdp_fill_free(self.x, q) >= <uint32_t>self.per_chunk):
                c = self.upool.get()
                if c == NULL:
                    self.st_fill_starved += 1
                    return
                first = <uint64_t>(c.data - self.base)
                ci = <int>(first // CHUNK_BYTES)
                self.rx_chunk[ci] = c
                self.rx_left[ci] = self.per_chunk
                for k in range(self.per_chunk):
                    self.rx_off[first // FRAME + k] = 0
                evpl_xdp_fill(self.x, q, first, FRAME, self.per_chunk)
                self.q_held[q] += 1
                self.rx_held += 1
            evpl_xdp_kick_rx(self.x, q)
        self.pool_mark = self.upool.releases

    cdef int _receive(self, int q) except -1:
        cdef int n, i, r, ci, j
        cdef uint64_t a
        cdef uint32_t flen
        cdef evpl_pkt pkt
        cdef Chunk* c
        cdef XdpDatagram b
        cdef sockaddr_in sin
        cdef sockaddr_in6 sin6
        cdef int total = 0
        memset(&sin, 0, sizeof(sin))
        sin.sin_family = AF_INET
        memset(&sin6, 0, sizeof(sin6))
        sin6.sin6_family = AF_INET6
        while self.x != NULL:
            n = evpl_xdp_rx(self.x, q, self.scratch_a, self.scratch_l, BATCH)
            for i in range(n):
                a = self.scratch_a[i]
                flen = self.scratch_l[i]
                ci = <int>(a // CHUNK_BYTES)
                c = self.rx_chunk[ci]
                self.st_rx += 1
                r = evpl_xdp_parse(<uint8_t*>(self.base + a), flen, &pkt)
                if r == EVPL_PKT_BADCSUM:
                    self.st_bad_csum += 1
                elif r == EVPL_PKT_SHORT:
                    self.st_short += 1
                elif r == EVPL_PKT_EXTHDR:
                    self.st_ext_hdr += 1
                elif r < 0:
                    self.st_not_udp += 1
                else:
                    if r == EVPL_PKT_PARTIAL:
                        self.st_partial += 1
                    elif r == EVPL_PKT_NOCSUM:
                        self.st_nocsum += 1
                    b = self._bind_for(&pkt)
                    if b is None or b.state != S_OPEN:
                        self.st_no_bind += 1
                    elif b.dgram_connected and not b._from_peer(&pkt):
                        self.st_not_peer += 1       # a connected socket's filter
                    else:
                        self.rx_off[a // FRAME] = <uint16_t>(a % FRAME + pkt.off)
                        if pkt.family == 4:
                            sin.sin_addr.s_addr = pkt.saddr
                            sin.sin_port = pkt.sport
                            addr = b._rx_address(<sockaddr*>&sin, sizeof(sockaddr_in))
                        else:
                            self.st_rx6 += 1
                            memcpy(sin6.sin6_addr.s6_addr, pkt.saddr6, 16)
                            sin6.sin6_port = pkt.sport
                            # as the kernel reports it: a link-local sender
                            # with the interface as its scope
                            sin6.sin6_scope_id = (<uint32_t>self.link.index
                                                  if _link_local(pkt.saddr6) else 0)
                            addr = b._rx_address(<sockaddr*>&sin6, sizeof(sockaddr_in6))
                        b._deliver_one(c, self.base + a + pkt.off, pkt.len, addr)
                    b = None
                if self.x == NULL:          # a callback closed the last Bind
                    return total
                self.rx_left[ci] -= 1
                if self.rx_left[ci] == 0:   # the kernel used every frame of it
                    self.rx_chunk[ci] = NULL
                    self.q_held[q] -= 1
                    self.rx_held -= 1
                    chunk_unref(self.upool, c)
            total += n
            if n < BATCH:
                break
        return total

    cdef XdpDatagram _bind_for(self, evpl_pkt* pkt):
        """The Bind a datagram is for (None if none)."""
        cdef int j
        for j in range(self.nbinds):
            if self.b_port[j] != pkt.dport or self.b_fam[j] != pkt.family:
                continue
            if pkt.family == 4:
                if self.b_addr[j] == pkt.daddr or self.b_addr[j] == 0:
                    return <XdpDatagram>self.b_obj[j]
            elif (memcmp(self.b_addr6[j], pkt.daddr6, 16) == 0
                    or memcmp(self.b_addr6[j], ZERO16, 16) == 0):
                return <XdpDatagram>self.b_obj[j]
        return None

    # ---- send ---------------------------------------------------------------

    cdef void _complete(self):
        """Reap send completions: send frames come back, Buffers sent in
        place are released."""
        cdef int q, n, i
        cdef uint32_t fi
        if self.x == NULL or self.x.tx_out == 0:
            return
        for q in range(self.x.nq):
            while True:
                n = evpl_xdp_comp(self.x, q, self.scratch_a, BATCH)
                for i in range(n):
                    fi = <uint32_t>(self.scratch_a[i] // FRAME)
                    self.tx_busy[fi] = 0
                    if self.tx_owner[fi] != NULL:
                        Py_DECREF(<object>self.tx_owner[fi])
                        self.tx_owner[fi] = NULL
                    else:
                        self.tx_free[self.ntx_free] = fi
                        self.ntx_free += 1
                if n < BATCH:
                    break

    cdef int _mac(self, int fam, const uint8_t* ip, uint8_t* out) except -2:
        """The next hop's MAC for destination ``ip`` (network order, 4 or 16
        bytes by ``fam``): 1 found, 0 being resolved (retry later), -1
        unreachable through this interface or unresolved for too long."""
        cdef int n = 16 if fam == 6 else 4
        cdef uint32_t k
        cdef int h
        cdef int64_t now = evpl_now_ns()
        memcpy(&k, ip + n - 4, 4)
        h = <int>((k ^ (k >> 16)) & (NEIGH - 1))
        if self.n_fam[h] == fam and memcmp(self.n_ip[h], ip, n) == 0 and self.n_exp[h] > now:
            if self.n_bad[h]:
                self.st_unroutable += 1
                return -1
            memcpy(out, self.n_mac[h], 6)
            return 1
        raw = (<char*>ip)[:n]
        dst = socket.inet_ntop(socket.AF_INET6 if fam == 6 else socket.AF_INET, raw)
        try:
            hop, oif = self.nl.next_hop(dst, self.link.index if _link_local(ip) and fam == 6
                                        else 0)
        except OSError:
            oif = -1
        self.n_fam[h] = fam
        memcpy(self.n_ip[h], ip, n)
        if oif != self.link.index:          # remembered for a second
            self.n_exp[h] = now + UNROUTABLE_TTL_NS
            self.n_bad[h] = 1
            self.st_unroutable += 1
            return -1
        mac = self.nl.neighbour(hop, self.link.index)
        if mac is not None:
            self.arp_pending.pop(raw, None)
            self.n_exp[h] = now + NEIGH_TTL_NS
            self.n_bad[h] = 0
            memcpy(self.n_mac[h], <char*>mac, 6)
            memcpy(out, self.n_mac[h], 6)
            return 1
        self.n_exp[h] = 0                   # not cached
        p = self.arp_pending.get(raw)
        if p is None:
            p = self.arp_pending[raw] = [now, 0]
        if now - p[0] > ARP_TIMEOUT_NS:
            del self.arp_pending[raw]
            self.st_arp_drops += 1
            return -1
        if now - p[1] > SOLICIT_NS:
            p[1] = now
            self.nl.solicit(hop, self.link.index)
        return 0

    cdef int _frame_for(self, TxEntry* e, uint32_t hdr, uint32_t* fi_out) noexcept:
        """The frame to send ``e`` from: its own (1) when it is the payload of
        a received frame not already being sent (and has no header piece), with ``hdr`` bytes of room
        for the headers before it, else a send frame (0) it must be copied
        into; -1 if none is free."""
        cdef size_t off
        cdef uint32_t fi, fo
        if e.hdrlen == 0 and e.ptr >= self.base and e.ptr < self.base + UMEM_BYTES:
            off = <size_t>(e.ptr - self.base)
            fi = <uint32_t>(off // FRAME)
            fo = <uint32_t>(off % FRAME)
            if (self.rx_off[fi] == fo and fo >= hdr
                    and fo + e.len <= FRAME and not self.tx_busy[fi]):
                fi_out[0] = fi
                return 1
        if self.ntx_free == 0:
            return -1
        self.ntx_free -= 1
        fi_out[0] = self.tx_free[self.ntx_free]
        return 0

    cdef void _block(self, XdpDatagram b):
        if not b.blocked:
            b.blocked = True
            self.blocked.append(b)

    cdef void _unblock(self):
        """Frames, ring room or a neighbour came back: blocked Binds send."""
        cdef XdpDatagram b
        if not self.blocked:
            return
        batch = self.blocked
        self.blocked = []
        for b in batch:
            b.blocked = False
            if b.state == S_OPEN and b._send_queued():
                b._after_flush()

    # ---- Binds --------------------------------------------------------------

    cdef int _add_bind(self, XdpDatagram b) except -1:
        cdef int r
        if self.nbinds == MAX_BINDS:
            raise ConfigError(f"at most {MAX_BINDS} xdp_udp Binds per interface and loop")
        if b.family == 6 and not self.has6:
            raise ConfigError(f"{self.link.name} has no usable IPv6 address to send from")
        if self.x == NULL:
            self._open()
        r = evpl_xdp_port(self.x, b.family, b._laddr_bytes(), b.lport, 1)
        if r < 0:
            if self.nbinds == 0:
                self._teardown()
            raise OSError(-r, "adding the port to evpl's XDP program")
        self.b_fam[self.nbinds] = <uint8_t>b.family
        memcpy(self.b_addr6[self.nbinds], b.laddr6, 16)
        self.b_addr[self.nbinds] = b.laddr
        self.b_port[self.nbinds] = b.lport
        self.b_obj[self.nbinds] = <PyObject*>b     # the Bind removes itself on close
        self.nbinds += 1
        return 0

    cdef void _remove_bind(self, XdpDatagram b):
        cdef int j
        for j in range(self.nbinds):
            if self.b_obj[j] == <PyObject*>b:
                if self.x != NULL:
                    evpl_xdp_port(self.x, b.family, b._laddr_bytes(), b.lport, 0)
                self.nbinds -= 1
                self.b_fam[j] = self.b_fam[self.nbinds]
                memcpy(self.b_addr6[j], self.b_addr6[self.nbinds], 16)
                self.b_addr[j] = self.b_addr[self.nbinds]
                self.b_port[j] = self.b_port[self.nbinds]
                self.b_obj[j] = self.b_obj[self.nbinds]
                break
        if self.nbinds == 0:
            self._teardown()            # the last Bind: the program is detached now

    # ---- the Driver overloads -----------------------------------------------

    cdef int _process(self) except -1:
        cdef int q, n = 0
        if self.x == NULL:
            return 0
        self._complete()
        for q in range(self.x.nq):
            if self.x == NULL:
                break
            n += self._receive(q)
        if self.x != NULL:
            self._refill()
            self._unblock()
        return n

    cdef void _event(self, uint32_t events):
        self._process()

    cdef int _before_sleep(self) except -1:
        if self.x != NULL and evpl_xdp_ready(self.x):
            self._process()
            return 1
        return 0

    cdef int _submit(self) except -1:
        """Hand this iteration's frames to the kernel, reap what it sent, and
        let Binds that waited for frames send (a few rounds)."""
        cdef int q, rounds = 0
        while self.x != NULL and (self.tx_dirty or self.x.tx_out) and rounds < 4:
            rounds += 1
            self.tx_dirty = False
            for q in range(self.x.nq):
                evpl_xdp_tx_flush(self.x, q)
            self._complete()
            if not self.blocked:
                break
            self._unblock()
        return 0

    cdef bint _waiting(self):
        return bool(self.blocked) or (self.x != NULL and self.rx_held == 0)

    cdef int _after_events(self) except -1:
        if self.x == NULL:
            return 0
        self._complete()
        if self.upool.releases != self.pool_mark:
            self._refill()
        self._unblock()
        return 0

    cdef void _close(self):
        self._teardown()
        if self.nl is not None:
            self.nl.close()
            self.nl = None

    cdef void _stats(self, dict d):
        cdef uint64_t k[6]
        cdef uint64_t tot[6]
        cdef uint32_t mem[9]
        cdef socklen_t mlen
        cdef size_t sock_drops = 0
        cdef int q, i
        cdef XdpDatagram b
        p = "xdp_" if "xdp_mode" not in d else f"xdp_{self.link.name}_"
        memset(tot, 0, sizeof(tot))
        if self.x != NULL:
            for q in range(self.x.nq):
                if evpl_xdp_kstats(self.x, q, k) == 0:
                    for i in range(6):
                        tot[i] += k[i]
        for i in range(self.nbinds):
            b = <XdpDatagram>self.b_obj[i]
            mlen = sizeof(mem)
            if b.fd >= 0 and getsockopt(b.fd, SOL_SOCKET, SO_MEMINFO, mem, &mlen) == 0 \
                    and mlen >= SK_MEMINFO_VARS * sizeof(uint32_t):
                sock_drops += mem[SK_MEMINFO_DROPS]
        d[p + "mode"] = self.xsk_mode
        d[p + "attach"] = self.attach_mode
        d[p + "queues"] = self.x.nq if self.x != NULL else 0
        d[p + "busy_poll"] = bool(self.busy_poll)
        d[p + "rx_frames"] = self.st_rx
        d[p + "tx_frames"] = self.st_tx
        d[p + "tx_zerocopy"] = self.st_tx_zc
        d[p + "tx_copied"] = self.st_tx_copy
        d[p + "tx_ring_full"] = self.st_ring_full
        d[p + "tx_wakeups"] = self.st_wakeups + (self.x.tx_wakeups if self.x != NULL else 0)
        d[p + "tx_budget"] = self.x.tx_budget if self.x != NULL else 0
        d[p + "fill_starved"] = self.st_fill_starved
        d[p + "rx_bad_checksum"] = self.st_bad_csum
        d[p + "rx_truncated"] = self.st_short
        d[p + "rx_ipv6_ext_headers"] = self.st_ext_hdr
        d[p + "rx_not_peer"] = self.st_not_peer
        d[p + "rx_ipv6"] = self.st_rx6
        d[p + "tx_ipv6"] = self.st_tx6
        # datagrams for a Bind's port the program left to the kernel (IPv4
        # fragments, IPv6 extension headers): its port-reserving socket drops them
        d[p + "kernel_socket_drops"] = sock_drops
        d[p + "rx_not_udp"] = self.st_not_udp
        d[p + "rx_no_bind"] = self.st_no_bind
        d[p + "rx_partial_checksum"] = self.st_partial
        d[p + "rx_no_checksum"] = self.st_nocsum
        d[p + "arp_drops"] = self.st_arp_drops
        d[p + "unroutable"] = self.st_unroutable
        d[p + "stale_detached"] = self.stale_detached
        d[p + "kernel_rx_dropped"] = tot[0]
        d[p + "kernel_rx_invalid"] = tot[1]
        d[p + "kernel_tx_invalid"] = tot[2]
        d[p + "kernel_rx_ring_full"] = tot[3]
        d[p + "kernel_fill_ring_empty"] = tot[4]
        d[p + "kernel_tx_ring_empty"] = tot[5]
        d[p + "umem_buffers_in_use"] = self.upool.in_use if self.upool is not None else 0


@cython.final
cdef class XdpDatagram(Bind):
    """An ``xdp_udp`` Bind. Its fd is a kernel UDP socket bound to the same
    address (connected to the peer for a connected Bind): it reserves the
    port (so port 0 works and no other program takes it) and answers
    ``local_address`` and ``peer_address``; a socket filter makes it drop
    whatever the kernel itself would deliver to it. A connected Bind also
    listens for the errors its socket reports (ICMP port unreachable for the
    datagrams sent through AF_XDP reaches it: the kernel matches the ICMP's
    quoted headers to the connected socket)."""
    cdef XdpDriver drv
    cdef int family             # 4 or 6
    cdef uint32_t laddr         # IPv4, network order (0: any address of the interface)
    cdef uint8_t laddr6[16]     # IPv6 (all zero: any)
    cdef uint16_t lport
    cdef bint blocked
    cdef bint added

    cdef const uint8_t* _laddr_bytes(self):
        return <const uint8_t*>&self.laddr if self.family == 4 else self.laddr6

    cdef bint _from_peer(self, evpl_pkt* pkt):
        """A connected Bind takes only its peer's datagrams (as a connected
        kernel socket does)."""
        cdef sockaddr_in* s4 = <sockaddr_in*>&self.tx_sa
        if pkt.family == 4:
            return s4.sin_port == pkt.sport and s4.sin_addr.s_addr == pkt.saddr
        return (self.tx_sa.sin6_port == pkt.sport
                and memcmp(self.tx_sa.sin6_addr.s6_addr, pkt.saddr6, 16) == 0)

    cdef int _check_datagram(self, TxEntry* e) except -1:
        cdef size_t most = <size_t>(self.drv.mtu - (48 if self.family == 6 else 28))
        cdef size_t n = txq_dg_size(e)
        if n > most:
            txq_unpush_from(&self.txq, e)
            raise ValueError(f"datagram of {n} bytes exceeds what one frame on "
                             f"{self.drv.link.name} carries ({most} bytes: MTU "
                             f"{self.drv.mtu} less the IPv{self.family} and UDP headers); "
                             f"xdp_udp does not fragment")
        return 0

    cdef void _event(self, uint32_t events):
        """The connected socket reported an error (ICMP): as a kernel
        connected datagram Bind, refusal closes it (Bind._dgram_error)."""
        cdef int err = 0
        cdef socklen_t n = sizeof(err)
        if getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &n) == 0 and err:
            self._dgram_error(err)

    cdef bint _send_busy(self):
        return False

    cdef void _deliver_one(self, Chunk* c, char* p, size_t n, addr):
        """Deliver one received datagram (``Bind._datagrams`` without GRO
        trains, its Buffer on the UMEM's pool)."""
        cdef LoopCore loop = self.loop
        if self.idle_ns:
            self.last_rx = evpl_now_ns()
        loop.stat_datagrams_in += 1
        if n > self.max_datagram:
            loop.stat_truncated += 1
            return
        loop.stat_bytes_in += n
        self._dg_hand(make_buffer(self.drv.upool, c, p, n), addr)

    cdef int _send_queued(self) except -1:
        """Write each queued datagram into a frame (its own when it can) and
        put it on the TX ring; stop (returning 0) when frames, ring room or
        the next hop's address are missing: the driver resumes the Bind."""
        cdef XdpDriver d = self.drv
        cdef TxQueue* q = &self.txq
        cdef TxEntry* e
        cdef sockaddr_in* sa
        cdef sockaddr_in6* sa6
        cdef uint8_t dmac[6]
        cdef uint32_t fi, daddr, saddr
        cdef uint32_t hdr = <uint32_t>(EVPL_XDP_HDR6 if self.family == 6 else EVPL_XDP_HDR)
        cdef const uint8_t* src6
        cdef uint64_t faddr
        cdef uint8_t* h
        cdef size_t size
        cdef int r, zc
        if d.x == NULL:
            return 1
        while not txq_empty(q):
            e = &q.e[q.head]
            sa = <sockaddr_in*>(&e.sa if e.salen else &self.tx_sa)
            sa6 = <sockaddr_in6*>sa
            if self.family == 4:
                if sa.sin_family != AF_INET or sa.sin_port == 0:
                    self._drop_head(q)      # IPv6 or port 0: the kernel refuses these too
                    continue
                daddr = sa.sin_addr.s_addr
                r = d._mac(4, <uint8_t*>&daddr, dmac)
            else:
                if (sa6.sin6_family != AF_INET6 or sa6.sin6_port == 0
                        or (sa6.sin6_scope_id != 0
                            and sa6.sin6_scope_id != <uint32_t>d.link.index)):
                    self._drop_head(q)      # IPv4, port 0, or another interface's scope
                    continue
                r = d._mac(6, sa6.sin6_addr.s6_addr, dmac)
            if r == 0:
                d._block(self)
                break
            if r < 0:
                self._drop_head(q)
                continue
            zc = d._frame_for(e, hdr, &fi)
            if zc < 0:
                d._block(self)
                break
            if zc:
                h = <uint8_t*>(e.ptr - hdr)
            else:
                h = <uint8_t*>(d.base + <size_t>fi * FRAME)
                if e.hdrlen:
                    memcpy(h + hdr, e.hdr, e.hdrlen)
                memcpy(h + hdr + e.hdrlen, e.ptr, e.len)
            size = txq_dg_size(e)
            faddr = <uint64_t>(<char*>h - d.base)
            if self.family == 4:
                saddr = self.laddr if self.laddr else d.src_ip
                d.ip_id += 1
                evpl_xdp_build(h, dmac, d.mac, saddr, daddr, self.lport, sa.sin_port,
                               <uint32_t>size, d.ip_id)
            else:
                if memcmp(self.laddr6, ZERO16, 16) != 0:
                    src6 = self.laddr6
                elif _link_local(sa6.sin6_addr.s6_addr):
                    src6 = d.src6_ll
                else:
                    src6 = d.src6
                evpl_xdp_build6(h, dmac, d.mac, src6, sa6.sin6_addr.s6_addr, self.lport,
                                sa6.sin6_port, <uint32_t>size)
                d.st_tx6 += 1
            if not evpl_xdp_tx(d.x, 0, faddr, <uint32_t>(size + hdr)):
                d.st_ring_full += 1
                if self.family == 6:
                    d.st_tx6 -= 1
                if not zc:
                    d.tx_free[d.ntx_free] = fi
                    d.ntx_free += 1
                d._block(self)
                break
            d.tx_busy[fi] = 1
            if zc:
                d.tx_owner[fi] = e.owner        # the queue's reference moves here
                d.st_tx_zc += 1
            else:
                Py_DECREF(<object>e.owner)
                d.st_tx_copy += 1
            d.st_tx += 1
            d.tx_dirty = True
            self.loop.stat_datagrams_out += 1
            self.loop.stat_bytes_out += size
            self.queued_bytes -= size
            q.head += 1
        if txq_empty(q):
            q.head = q.tail = 0
            return 1
        return 0

    cdef void _drop_head(self, TxQueue* q):
        """Drop the first queued datagram as undeliverable (counted)."""
        self.loop.stat_dgram_errors += 1
        self.queued_bytes -= txq_dg_retire(q, 1)

    cdef void _release(self):
        txq_drop(&self.txq, None)
        self.queued_bytes = 0
        if self.added:
            self.added = False
            self.drv._remove_bind(self)
        if self.in_epoll:
            self.loop._ep_del(self, False)      # closing the fd removes it
        if self.fd >= 0:
            c_close(self.fd)


cdef XdpDriver driver_for(LoopCore loop, link, nl, key):
    """The loop's driver for this interface, made on first use; one loop per
    interface and process."""
    cdef XdpDriver d = loop.drivers.get(f"xdp:{link.name}@{key[0]}")
    other = _IN_USE.get(key)
    if other is not None and other is not d:
        nl.close()
        raise ConfigError(f"interface {link.name} is already used by xdp_udp on another "
                          f"evpl Loop of this process (one Loop per interface)")
    if d is None:
        d = XdpDriver.__new__(XdpDriver)
        d._setup(loop, link, nl, key)
    else:
        nl.close()
    return d


def datagram(LoopCore loop, int fd, str backend, handler, Limits limits, bint gso=False,
             peer=None):
    """Not the way to an xdp_udp Bind (it needs an interface): see
    ``evpl.core.xdp``, which ``Loop.bind`` and ``Loop.connect`` use."""
    c_close(fd)
    raise ConfigError("xdp_udp Binds are made with loop.bind(\"xdp_udp\", (ip, port), handler, "
                      "interface=...) or loop.connect(\"xdp_udp\", (ip, port), handler, "
                      "interface=...)")


def xdp_datagram(LoopCore loop, int fd, str backend, handler, Limits limits, link, nl,
                 key, bytes laddr, uint16_t lport, peer=None):
    """A Bind receiving the UDP datagrams to (laddr, lport) (network order;
    4 bytes for IPv4, 16 for IPv6) on ``link`` through AF_XDP; ``fd`` is
    the kernel socket that reserves the port. ``peer``: the (host, port)
    the socket is connected to (a connected Bind: ``send``, and only the
    peer's datagrams)."""
    cdef XdpDriver d
    cdef XdpDatagram b
    cdef socklen_t salen
    try:
        d = driver_for(loop, link, nl, key)
    except BaseException:
        c_close(fd)
        raise
    if evpl_xdp_drop_all(fd) < 0:
        c_close(fd)
        raise OSError(errno, "SO_ATTACH_FILTER on the port's kernel socket")
    b = XdpDatagram.__new__(XdpDatagram)
    b.drv = d
    b.lport = lport
    if len(laddr) == 16:
        b.family = 6
        memcpy(b.laddr6, <char*>laddr, 16)
    else:
        b.family = 4
        b.laddr = int.from_bytes(laddr, "little")
    b._setup(loop, fd, backend, False, handler, None, limits)
    try:
        if peer is not None:
            _sockaddr(peer, b.family, &b.tx_sa, &salen)
            b.tx_salen = salen
            loop._ep_add(b, fd, 0)              # errors (EPOLLERR) only
        d._add_bind(b)
    except BaseException:
        b._close(None)
        raise
    b.added = True
    b._adopt_datagram(False, peer, False)
    return b


cdef int _sockaddr(addr, int family, sockaddr_in6* out, socklen_t* outlen) except -1:
    """A connected Bind's peer as the sockaddr its sends go to."""
    cdef sockaddr_in* s4 = <sockaddr_in*>out
    memset(out, 0, sizeof(sockaddr_in6))
    if family == 4:
        raw = socket.inet_pton(socket.AF_INET, addr[0])
        s4.sin_family = AF_INET
        s4.sin_port = htons(addr[1])
        memcpy(&s4.sin_addr, <char*>raw, 4)
        outlen[0] = sizeof(sockaddr_in)
    else:
        raw = socket.inet_pton(socket.AF_INET6, addr[0])
        out.sin6_family = AF_INET6
        out.sin6_port = htons(addr[1])
        memcpy(out.sin6_addr.s6_addr, <char*>raw, 16)
        out.sin6_scope_id = addr[3] if len(addr) > 3 else 0
        outlen[0] = sizeof(sockaddr_in6)
    return 0
