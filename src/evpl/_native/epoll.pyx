# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The epoll backends: ``tcp``, ``unix`` (streams) and ``udp`` (datagrams)
over kernel sockets.

The loop's own epoll set is this backend's driver: every socket is
registered edge-triggered, and an event makes the Bind read until the socket
is drained (or a budget of reads, so one busy connection cannot starve the
others) and write what was blocked. Receives land in the loop's receive
chunk (a pool buffer shared by all epoll Binds of the loop): each read
becomes zero-copy Buffer slices of it, handed to the shared reassembler
(``Bind._take``). A message larger than a quarter of a buffer is read
straight into a chunk of its own. Sends are gathered from the queue with
writev (streams) or sendmmsg (datagrams; GSO trains for same-size datagrams
to one peer) once per iteration.
"""

cimport cython
from cpython.ref cimport PyObject
from libc.errno cimport errno, EAGAIN, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM
from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memmove, memset
from posix.unistd cimport close as c_close
from posix.uio cimport iovec

from evpl._native.bind cimport Bind, Listener, Limits, S_CONNECTING, S_OPEN, S_CLOSED
from evpl._native.buffers cimport Chunk
from evpl._native.framing cimport Framer, F_NONE
from evpl._native.loop cimport LoopCore, MAX_IOV, MAX_MMSG, READ_BUDGET, READ_MAX
from evpl._native.sys cimport *
from evpl._native.txqueue cimport *

from evpl.errors import transport_error

cdef enum:
    RX_MIN = 8          # the fewest messages a datagram read offers (EpollDatagram.rx_want)
    GRO_SLOT = 65536    # a receive slot that holds any UDP GRO train
    PACK_MAX = 2048     # _rx_deliver moves a datagram this short next to the one before


cdef class EpollBind(Bind):
    """What epoll stream and datagram Binds share: the event handler and
    the write-blocked state."""
    cdef bint tx_blocked
    # EPOLLOUT is in the epoll registration (``ep_base`` plus it) only while
    # a send is blocked or a connect is under way. A UDP socket reports
    # write space each time one of its datagrams has left; any socket whose
    # registration holds EPOLLOUT is reported writable by every wake-up, a
    # received message included: after the spin's direct read drained the
    # data, the next epoll_wait still reported the socket, an empty loop
    # iteration per message
    cdef bint out_armed
    cdef uint32_t ep_base

    cdef void _arm_out(self, bint on):
        cdef epoll_event ev
        ev.events = self.ep_base | (EPOLLOUT if on else 0)
        ev.data.ptr = <void*>self
        if epoll_ctl(self.loop.epfd, EPOLL_CTL_MOD, self.fd, &ev) == 0:
            self.out_armed = on

    cdef int _register(self, uint32_t base, bint out) except -1:
        """Add the socket to the loop's epoll set with ``base`` (EPOLLOUT
        too if ``out``)."""
        self.ep_base = base
        self.out_armed = out
        return self.loop._ep_add(self, self.fd, base | (EPOLLOUT if out else 0))

    cdef void _read_socket(self):
        pass

    cdef void _write(self):
        pass

    cdef void _opened(self):
        # data may already be waiting: the ET registration will not report it
        self.rx_ready = True
        self.loop._queue_read(self)

    cdef int _send_queued(self) except -1:
        if not txq_empty(&self.txq) and not self.tx_blocked:
            self._write()
        if self.tx_blocked != self.out_armed and self.state == S_OPEN:
            # watch write space exactly while a send is blocked (ET: arming
            # reports at once if the socket is writable already)
            self._arm_out(self.tx_blocked)
        return 1

    cdef void _read_more(self):
        """The spin's direct read filled what it offered, met the end or
        a signal: the ordinary read path takes it from here."""
        if self.state == S_OPEN:
            self.rx_ready = True
            self.loop._queue_read(self)

    cdef int _arm_reading(self) except -1:
        if self.rx_ready:
            self.loop._queue_read(self)
        return 0

    cdef void _release(self):
        txq_drop(&self.txq, None)
        self.queued_bytes = 0
        if self.loop.spin_src is self:
            self.loop.spin_src = None
        self.loop._ep_del(self, False)          # closing the fd removes it
        c_close(self.fd)

    cdef void _read(self):
        if self.state != S_OPEN or self.reading_paused:
            return
        if self.backlog or self.eof_pending:
            self._drain()
            if self.backlog or self.state != S_OPEN or self.reading_paused:
                return
        if self.rx_ready and not self.eof:
            self._read_socket()

    cdef void _event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.state == S_CLOSED:
            return
        if self.state == S_CONNECTING:
            if not events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                return
            getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._close(transport_error(err, f"connect to {self._peer!r}"))
                return
            self._connected()
            if self.state != S_OPEN:
                return
            if self.out_armed and not self.tx_blocked:
                self._arm_out(False)
            events |= EPOLLOUT
        if events & EPOLLOUT and self.tx_blocked:
            self.tx_blocked = False
            self._flush()
            if self.state != S_OPEN:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self.rx_ready = True
            if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                # the peer's FIN (or an error) may sit behind the data: a
                # short read no longer means "drained", read until EOF/EAGAIN
                self.hup = True
            self._read()

    cdef bint _rx_error(self, ssize_t n):
        """Handle a failed or zero read; True if reading must stop."""
        if n == 0:
            self.rx_ready = False
            self._on_eof()
            return True
        if errno == EAGAIN:
            self.rx_ready = False
            return True
        if errno == EINTR:
            return False
        self.rx_ready = False
        self._close(transport_error(errno, "receive"))
        return True


@cython.final
cdef class EpollStream(EpollBind):
    """A ``tcp`` or ``unix`` connection."""

    cdef void _read_socket(self):
        cdef LoopCore loop = self.loop
        cdef int budget = READ_BUDGET
        cdef ssize_t n
        cdef size_t space, want, cap, part0, m0
        cdef char* p
        cdef bint timed = self.idle_ns or self.msg_ns
        while budget > 0 and self.state == S_OPEN and not self.reading_paused and not self.eof:
            budget -= 1
            part0 = self.part_len
            m0 = loop.stat_messages_in
            if self.part_asm:
                # a large message read straight into its own chunk
                cap = self.part_chunk.size - <size_t>(self.part_ptr - self.part_chunk.data)
                want = (self.part_need - self.part_len) if self.part_need else cap - self.part_len
                n = recv(self.fd, self.part_ptr + self.part_len, want, MSG_DONTWAIT)
                if n <= 0:
                    if self._rx_error(n):
                        return
                    continue
                loop.stat_bytes_in += n
                self.part_len += n
                if timed:
                    self._timestamps(part0, m0)
                if self._after_asm_read() < 0:
                    return
                if <size_t>n < want and not self.hup:
                    self.rx_ready = False
                    return
                continue
            if self.part_len >= loop.asm_threshold and self.fr_kind != F_NONE:
                # a big partial left behind by an earlier pool shortage
                if self._to_assembly(max(self.part_need, min(self.part_len * 2,
                                                             self.max_message + 16))) < 0:
                    loop._starve(self)
                    return
                continue
            if loop._rx_reserve(loop.min_space + self.part_len) < 0:
                loop._starve(self)
                return
            p = loop.rx_chunk.data + loop.rx_used
            if self.part_len and not (self.part_chunk == loop.rx_chunk
                                      and self.part_ptr + self.part_len == p):
                # the partial (shorter than a quarter buffer) moves to the
                # cursor, so this read completes it in place
                memcpy(p, self.part_ptr, self.part_len)
                self._set_partial(loop.rx_chunk, p, self.part_len, self.part_need)
                loop.rx_used += self.part_len
                loop.stat_partial_copies += 1
                p += self.part_len
            space = loop.rx_chunk.size - loop.rx_used
            if space > READ_MAX:
                # a bounded read lands in bytes the last one warmed (the
                # cursor rewinds when its Buffers are gone): the kernel's
                # copy stays in cache instead of walking megabytes
                space = READ_MAX
            n = recv(self.fd, p, space, MSG_DONTWAIT)
            if n <= 0:
                if self._rx_error(n):
                    return
                continue
            if self._took(p, n, space, part0, m0):
                return
        if self.rx_ready and self.state == S_OPEN and not self.reading_paused and not self.eof:
            loop._queue_read(self)

    cdef bint _took(self, char* p, size_t n, size_t space, size_t part0, size_t m0):
        """Hand over the ``n`` bytes a read of ``space`` bytes put at ``p``
        (the cursor of the loop's receive chunk); ``part0``, ``m0``: the
        partial length and message count before it. True if that drained
        the socket."""
        cdef LoopCore loop = self.loop
        loop.spin_src = self
        loop.rx_used += n
        loop.stat_bytes_in += n
        self._arrived(loop.rx_chunk, p, n, loop.rx_chunk.size - loop.rx_used)
        if self.idle_ns or self.msg_ns:
            self._timestamps(part0, m0)
        if n < space and not self.hup:
            self.rx_ready = False
            return True
        return False

    cdef unsigned int _spin_prepare(self):
        # read directly only what _read_socket's plain case reads: an open,
        # unpaused stream with nothing held back, no partial message and no
        # large one being assembled, and not while a send waits for EPOLLOUT
        cdef LoopCore loop = self.loop
        cdef mmsghdr* mm = loop.mmsg
        if (self.state != S_OPEN or self.reading_paused or self.backlog
                or self.eof_pending or self.eof or self.rx_queued or self.tx_blocked
                or self.part_len or self.part_asm):
            return 0
        if loop._rx_reserve(loop.min_space) < 0:
            return 0
        loop.iov[0].iov_base = loop.rx_chunk.data + loop.rx_used
        loop.iov[0].iov_len = min(loop.rx_chunk.size - loop.rx_used, <size_t>READ_MAX)
        memset(&mm[0].msg_hdr, 0, sizeof(msghdr))
        mm[0].msg_hdr.msg_iov = loop.iov
        mm[0].msg_hdr.msg_iovlen = 1
        return 1

    cdef void _spin_deliver(self, int n, unsigned int vlen, int err):
        cdef LoopCore loop = self.loop
        if n == 1 and loop.mmsg[0].msg_len > 0:
            if self._took(<char*>loop.iov[0].iov_base, loop.mmsg[0].msg_len,
                          loop.iov[0].iov_len, 0, loop.stat_messages_in):
                return
        elif n < 0 and err != EINTR:
            # (a reset is reported once: read again, it would look like EOF)
            errno = err
            self._rx_error(-1)
            return
        self._read_more()

    cdef void _write(self):
        cdef iovec* iov = self.loop.tx_iov
        cdef msghdr mh
        cdef int cnt
        cdef ssize_t n
        memset(&mh, 0, sizeof(mh))
        while not txq_empty(&self.txq):
            cnt = txq_gather(&self.txq, iov, MAX_IOV, NULL, NULL)
            mh.msg_iov = iov
            mh.msg_iovlen = cnt
            n = sendmsg(self.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN:
                    self.tx_blocked = True
                    return
                if errno == EINTR:
                    continue
                self._close(transport_error(errno, "send"))
                return
            self.loop.stat_bytes_out += n
            self.queued_bytes -= txq_retire(&self.txq, n, None)


@cython.final
cdef class EpollDatagram(EpollBind):
    """A ``udp`` socket: recvmmsg/sendmmsg batches, GSO/GRO trains."""

    # messages the next recvmmsg offers: twice the last batch that drained
    # the socket (at least RX_MIN), all MAX_MMSG at first and after a full
    # one. Each message offered is a header to fill: a one-at-a-time
    # request/response load filled 64 of them per datagram
    cdef unsigned int rx_want
    # scatter receive: where the sink asked each datagram of the laid-out
    # receive to land (after place_head bytes), NULL where it did not
    cdef char* place_dst[MAX_MMSG]
    cdef Py_ssize_t place_len[MAX_MMSG]
    cdef Py_ssize_t place_head
    cdef bint placing

    cdef unsigned int _rx_fill(self):
        """Lay out the loop's recvmmsg array over its receive chunk for this
        socket; the number of messages offered (0: no pool memory). A sink
        that asks for it (``dg_place``) gets a datagram's payload straight
        where it wants it: the message's iovecs are the header's bytes in
        the chunk, the sink's memory, then the rest of the chunk slot."""
        cdef LoopCore loop = self.loop
        cdef mmsghdr* mm = loop.mmsg
        cdef iovec* iov = loop.iov
        cdef sockaddr_in6* names = loop.names
        cdef unsigned int vlen, i, want, nio = 0
        cdef size_t stride = self.stride
        cdef size_t room = stride if self.gro else self.max_datagram
        cdef char* base
        cdef char* slot
        cdef char* dst = NULL
        cdef Py_ssize_t dlen, head = 0
        cdef bint placing = self.sink is not None
        if loop._rx_reserve(stride) < 0:
            return 0
        base = loop.rx_chunk.data + loop.rx_used
        vlen = (loop.rx_chunk.size - loop.rx_used) // stride
        want = self.rx_want if self.rx_want else MAX_MMSG
        if vlen > want:
            vlen = want
        self.placing = False
        for i in range(vlen):
            slot = base + i * stride
            mm[i].msg_hdr.msg_iov = &iov[nio]
            dlen = 0
            if placing:
                dlen = self.sink.dg_place(self, i, &dst, &head)
                # (the slot keeps room for the whole datagram, put back
                # together, if it is not what the sink expected)
                if dlen <= 0 or head < 0 or <size_t>(head + dlen) > room:
                    placing = False
                    dlen = 0
            if dlen:
                self.placing = True
                self.place_head = head
                self.place_dst[i] = dst
                self.place_len[i] = dlen
                iov[nio].iov_base = slot
                iov[nio].iov_len = head
                iov[nio + 1].iov_base = dst
                iov[nio + 1].iov_len = dlen
                iov[nio + 2].iov_base = slot + head
                iov[nio + 2].iov_len = room - head - dlen
                mm[i].msg_hdr.msg_iovlen = 3
                nio += 3
            else:
                self.place_dst[i] = NULL
                iov[nio].iov_base = slot
                # with GRO a train may fill the whole slot
                iov[nio].iov_len = room
                mm[i].msg_hdr.msg_iovlen = 1
                nio += 1
            mm[i].msg_hdr.msg_name = &names[i]
            mm[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
            if self.gro:
                mm[i].msg_hdr.msg_control = &loop.dg_rctl[i * 3]
                mm[i].msg_hdr.msg_controllen = EVPL_GRO_CTL
            else:
                mm[i].msg_hdr.msg_control = NULL
                mm[i].msg_hdr.msg_controllen = 0
            mm[i].msg_hdr.msg_flags = 0
        return vlen

    cdef void _rx_deliver(self, int n, unsigned int vlen):
        """Hand over the ``n`` (> 0) datagrams a recvmmsg of the array
        ``_rx_fill`` laid out (``vlen`` messages) received."""
        cdef LoopCore loop = self.loop
        cdef mmsghdr* mm = loop.mmsg
        cdef sockaddr_in6* names = loop.names
        cdef unsigned int i
        cdef size_t seg, length = 0, k, over
        cdef char* p = NULL
        cdef char* end = loop.rx_chunk.data + loop.rx_used
        cdef object addr
        if self.placing:
            # slots as laid out (no packing: these datagrams are large)
            loop.rx_used += (n - 1) * self.stride + mm[n - 1].msg_len
        elif self.gro:
            # 64 KiB slots: a short datagram moves down next to the one
            # before it (a copy of at most PACK_MAX bytes), so a batch of
            # separate datagrams fills the chunk as densely as slots of
            # max_datagram would; a long one (a train) stays where it landed
            for i in range(<unsigned int>n):
                p = <char*>mm[i].msg_hdr.msg_iov[0].iov_base
                length = mm[i].msg_len
                if length <= PACK_MAX and p != end:
                    memmove(end, p, length)
                    p = end
                    mm[i].msg_hdr.msg_iov[0].iov_base = p
                end = p + ((length + 63) & ~(<size_t>63))
            loop.rx_used = p + length - loop.rx_chunk.data
        else:
            loop.rx_used += (n - 1) * self.stride + mm[n - 1].msg_len
        loop.spin_src = self
        # (a full batch: the next offers all; else twice this one)
        self.rx_want = (MAX_MMSG if <unsigned int>n >= vlen
                        else min(<unsigned int>MAX_MMSG,
                                 max(<unsigned int>RX_MIN, 2 * <unsigned int>n)))
        for i in range(<unsigned int>n):
            if mm[i].msg_hdr.msg_flags & MSG_TRUNC:
                loop.stat_datagrams_in += 1
                loop.stat_truncated += 1
                continue
            seg = 0
            if self.gro and mm[i].msg_hdr.msg_controllen:
                seg = evpl_gro_size(&loop.dg_rctl[i * 3], mm[i].msg_hdr.msg_controllen)
            addr = self._rx_address(<sockaddr*>&names[i], mm[i].msg_hdr.msg_namelen)
            p = <char*>mm[i].msg_hdr.msg_iov[0].iov_base
            length = mm[i].msg_len
            if self.placing and self.place_dst[i] != NULL and \
                    length > <size_t>self.place_head:
                k = length - self.place_head
                if k > <size_t>self.place_len[i]:
                    k = self.place_len[i]
                over = length - self.place_head - k
                if over == 0 and (seg == 0 or seg >= length) and \
                        self._dg_placed(p, length, self.place_dst[i], addr):
                    if self.state != S_OPEN:
                        return
                    continue
                # not what the sink expected: whole again in the slot
                memmove(p + self.place_head + k, p + self.place_head, over)
                memcpy(p + self.place_head, self.place_dst[i], k)
            self._datagrams(loop.rx_chunk, p, length, seg, addr)
            if self.state != S_OPEN:
                return

    cdef void _read_socket(self):
        cdef LoopCore loop = self.loop
        cdef unsigned int vlen
        cdef int n
        cdef int budget = READ_BUDGET
        while budget > 0 and self.state == S_OPEN and not self.reading_paused:
            budget -= 1
            vlen = self._rx_fill()
            if vlen == 0:
                loop._starve(self)
                return
            n = recvmmsg(self.fd, loop.mmsg, vlen, MSG_DONTWAIT, NULL)
            if n <= 0:
                if n < 0 and errno == EINTR:
                    continue
                if n < 0 and errno != EAGAIN:
                    # ICMP errors (port unreachable) surface here
                    self._dgram_error(errno)
                    continue
                self.rx_ready = False
                return
            self._rx_deliver(n, vlen)
            if self.state != S_OPEN:
                return
            if <unsigned int>n < vlen:
                self.rx_ready = False
                return
        if self.rx_ready and self.state == S_OPEN and not self.reading_paused:
            loop._queue_read(self)

    cdef unsigned int _spin_prepare(self):
        # read directly only what _read would read: an open, unpaused socket
        # with nothing held back, and not while a send waits for EPOLLOUT
        # (the spin then skips most epoll_waits)
        if (self.state != S_OPEN or self.reading_paused or self.backlog
                or self.eof_pending or self.rx_queued or self.tx_blocked):
            return 0
        return self._rx_fill()

    cdef void _spin_deliver(self, int n, unsigned int vlen, int err):
        if n > 0:
            self._rx_deliver(n, vlen)
            if <unsigned int>n < vlen:
                self.rx_ready = False
                return
        elif err != EINTR:
            # ICMP errors (port unreachable) surface here, as in _read_socket
            self._dgram_error(err)
        self._read_more()

    cdef void _write(self):
        """Send the queue with sendmmsg: one message per datagram, or per GSO
        train of datagrams to one peer (see txq_dg_group)."""
        cdef LoopCore loop = self.loop
        cdef mmsghdr* mm = loop.tx_mmsg
        cdef iovec* iov = loop.tx_iov
        cdef unsigned int cnt, k, nio, g, j
        cdef size_t i
        cdef int n, err
        cdef TxEntry* e
        cdef TxQueue* q = &self.txq
        while not txq_empty(q):
            cnt = 0
            nio = 0
            i = q.head
            while i != q.tail and cnt < MAX_MMSG and nio + 2 * GSO_SEGS <= MAX_IOV:
                g = txq_dg_group(q, i, self.gso_limit)
                e = &q.e[i]
                memset(&mm[cnt].msg_hdr, 0, sizeof(msghdr))
                mm[cnt].msg_hdr.msg_iov = &iov[nio]
                # the kernel reads the headers during sendmmsg: they may
                # stay in the entries
                for j in range(g):
                    if e[j].hdrlen:
                        iov[nio].iov_base = e[j].hdr
                        iov[nio].iov_len = e[j].hdrlen
                        nio += 1
                    iov[nio].iov_base = e[j].ptr
                    iov[nio].iov_len = e[j].len
                    nio += 1
                mm[cnt].msg_hdr.msg_iovlen = &iov[nio] - mm[cnt].msg_hdr.msg_iov
                if e.salen:
                    mm[cnt].msg_hdr.msg_name = &e.sa
                    mm[cnt].msg_hdr.msg_namelen = e.salen
                if g > 1:
                    evpl_set_gso(&mm[cnt].msg_hdr, &loop.dg_ctl[cnt * 3], txq_dg_size(e))
                loop.dg_group[cnt] = g
                i += g
                cnt += 1
            n = sendmmsg(self.fd, mm, cnt, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN or errno == ENOBUFS:
                    self.tx_blocked = True
                    return
                if errno == EINTR:
                    continue
                if loop.dg_group[0] > 1 and self._gso_refused(errno, txq_dg_size(&q.e[q.head])):
                    continue                # again, without that train
                # this datagram cannot be sent (unreachable, bad address...):
                # drop it, count it, go on with the rest
                err = errno
                loop.stat_dgram_errors += loop.dg_group[0] - 1
                self._retire(loop.dg_group[0])
                self._dgram_error(err)
                if self.state != S_OPEN:
                    return
                continue
            for k in range(<unsigned int>n):
                g = loop.dg_group[k]
                if g > 1:
                    loop.stat_gso_sends += 1
                loop.stat_datagrams_out += g
                self._retire(g)
        q.head = q.tail = 0

    cdef void _retire(self, unsigned int g):
        cdef size_t n = txq_dg_retire(&self.txq, g)
        self.queued_bytes -= n
        self.loop.stat_bytes_out += n


@cython.final
cdef class EpollListener(Listener):
    """A listening ``tcp`` or ``unix`` socket."""

    cdef Bind _new_conn(self, int fd, handler):
        cdef EpollStream b = EpollStream.__new__(EpollStream)
        b._setup(self.loop, fd, self.backend, True, handler, self.framer, self.limits)
        b._register(EPOLLIN | EPOLLRDHUP | EPOLLET, False)
        return b

    cdef void _release(self):
        self.loop._ep_del(self, False)
        c_close(self.fd)

    cdef void _event(self, uint32_t events):
        cdef int fd
        cdef int budget = 64
        while budget > 0 and self.active:
            budget -= 1
            fd = accept4(self.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EAGAIN or errno == EINTR:
                    return
                self.loop.stat_accept_errors += 1
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # out of descriptors: back off instead of spinning on the backlog
                    self._pause()
                return
            self._accepted(fd)

    cdef void _pause(self):
        cdef epoll_event ev
        ev.events = 0
        ev.data.ptr = <void*>self
        epoll_ctl(self.loop.epfd, EPOLL_CTL_MOD, self.fd, &ev)
        self.loop.call_later(0.1, self._resume)

    def _resume(self):
        cdef epoll_event ev
        if self.active:
            ev.events = EPOLLIN
            ev.data.ptr = <void*>self
            epoll_ctl(self.loop.epfd, EPOLL_CTL_MOD, self.fd, &ev)


# ---- adoption: evpl.Loop hands sockets it created to these ----------------

def stream(LoopCore loop, int fd, str backend, handler, Framer framer, Limits limits,
           bint connecting, peer, int connect_errno=0):
    """A Bind for a connected or connecting stream socket (nonblocking)."""
    cdef EpollStream b = EpollStream.__new__(EpollStream)
    b._setup(loop, fd, backend, True, handler, framer, limits)
    # (EPOLLOUT while connecting: it reports the connect's outcome)
    b._register(EPOLLIN | EPOLLRDHUP | EPOLLET, connecting)
    b._adopt_stream(peer, connecting, connect_errno)
    return b


def datagram(LoopCore loop, int fd, str backend, handler, Limits limits, bint gso=False,
             peer=None, bint gro=True):
    """A Bind for a bound datagram socket (nonblocking); ``gso``: send trains
    of datagrams to one peer with UDP GSO, accept them with UDP GRO (UDP
    sockets only; ``gro`` false: not until ``Bind.gro`` is set); ``peer``:
    the socket is connected to it."""
    cdef EpollDatagram b = EpollDatagram.__new__(EpollDatagram)
    b._setup(loop, fd, backend, False, handler, None, limits)
    b._register(EPOLLIN | EPOLLET, False)        # EPOLLOUT: see out_armed
    b._adopt_datagram(gso, peer, gso and loop.pool.buffer_size >= GRO_SLOT, gro)
    if b.gro:
        # a coalesced train fills up to 64 KiB whatever max_datagram says
        # (each datagram of it is still held to max_datagram)
        b.stride = GRO_SLOT
    return b


def listener(LoopCore loop, int fd, str backend, factory, shared, Framer framer, Limits limits,
             bint nodelay, address):
    """A Listener for a listening stream socket."""
    cdef EpollListener li = EpollListener.__new__(EpollListener)
    li._setup(loop, fd, backend, factory, shared, framer, limits, nodelay, address)
    loop._ep_add(li, fd, EPOLLIN)
    return li
