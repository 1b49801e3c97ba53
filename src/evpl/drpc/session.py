"""drpc sessions: the protocol state machines of both ends (sans-I/O).

No sockets and no clock here: methods take the packets that arrived and the
time (``now_ns``), and emit packets through the ``out`` function they were
given. ``evpl.drpc.client`` and ``evpl.drpc.server`` bind them to evpl Binds,
timers and the pacing wheel. docs/drpc.md describes the protocol.

Client side (:class:`ClientSession`), per eRPC:

* a request *window* of ``window`` slots: request number ``r`` lives in slot
  ``r % window``, and a slot's next request number is the previous one plus
  ``window``; calls beyond the window wait in a backlog;
* session *credits*: at most ``credits`` packets in flight (request packets
  and requests-for-response), each returned by the packet that answers it, so
  the server never receives more than it has reserved buffers for;
* a request of N packets is acknowledged by N-1 credit returns (CR) and the
  first response packet; response packets 2..M are pulled one by one with
  requests-for-response (RFR). The client's packets and the server's answers
  are numbered alike (``num_tx``, ``num_rx``), which makes loss recovery
  go-back-N: after the retransmission timeout without progress the client
  resends the first unanswered packet (unless packets of that request
  still wait in the pacing wheel); if the answer is to that resend (its
  echoed ``ts``), the original was lost and the client rolls ``num_tx``
  back to ``num_rx`` and sends again; if it is to the original, the
  timeout was spurious and nothing more is resent. The timeout is ``rto``
  or srtt + 4 rttvar if longer, doubled per timeout of the slot without
  progress (a stalled peer gets a few resends, not one per ``rto``);
* answers out of order, duplicated or for an older request are dropped and
  counted; no packet from the server for ``peer_timeout`` while requests are
  outstanding fails them all (:class:`PeerDead`).

Server side (:class:`ServerEndpoint`): sessions by number, the request
slots' state, a response cache per slot that answers a retransmitted request
without running its handler again (at-most-once), and counters for every
packet it drops.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from evpl.drpc._fast import ClientCore, ClientSlot, Request, ServerCore, ServerSession, ServerSlot
from evpl.drpc.cc import Timely
from evpl.drpc.wire import (
    FLAG_CR_RANGE,
    FLAG_ERROR,
    FLAG_NO_RTT,
    FLAG_RFR_RANGE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_REQ_TYPE,
    Connect,
    ConnectOk,
    ConnectReject,
    PacketType,
    RejectReason,
    check_data_packet,
)
from evpl.errors import EvplError, ProtocolError

__all__ = [
    "ClientSession",
    "ClientSlot",
    "DrpcError",
    "PeerDead",
    "RemoteError",
    "Request",
    "ServerEndpoint",
    "ServerSession",
    "ServerSlot",
    "SessionClosed",
    "SessionRejected",
]

REQ = PacketType.REQ.value
RESP = PacketType.RESP.value
RFR = PacketType.RFR.value
CR = PacketType.CR.value
CONNECT = PacketType.CONNECT.value
CONNECT_OK = PacketType.CONNECT_OK.value
CONNECT_REJECT = PacketType.CONNECT_REJECT.value
DISCONNECT = PacketType.DISCONNECT.value
DISCONNECT_OK = PacketType.DISCONNECT_OK.value

_pack = HEADER.pack
_pack_into = HEADER.pack_into
_unpack = HEADER.unpack_from
_struct_error = struct.error
U32 = 0xFFFFFFFF


class DrpcError(EvplError):
    """Base of the errors a drpc call fails with."""


class PeerDead(DrpcError):
    """The server sent nothing for ``peer_timeout`` while requests were
    outstanding (or never answered the connect): the session is dead."""


class SessionClosed(DrpcError):
    """The client was closed before the call completed."""


class SessionRejected(DrpcError):
    """The server refused the session (too many sessions, bad parameters)."""


class RemoteError(DrpcError):
    """The server could not run the request: no handler for its type, or
    the handler raised (the message is the server's text)."""


class CallTimeout(DrpcError, TimeoutError):
    """An awaited call (``Client.acall(..., timeout=)``) got no response in
    time; also a ``TimeoutError``. The session lives on."""


# -- client ---------------------------------------------------------------------

def rfr_batch_for(credits: int, max_datagram: int) -> int:
    """How many credits a client's ranged RFR waits for before it is sent
    in the middle of a read batch: 16, or with more credits as many
    packets as one 64 KB GSO train carries (44 of 1472 bytes), at most
    half the credits. Larger RFRs let the server send, and the client
    receive, longer trains (docs/drpc.md, ranged RFRs)."""
    return max(16, min(credits // 2, 65507 // max_datagram))


def rx_truesize(max_datagram: int) -> int:
    """What the kernel charges a socket's receive buffer for one datagram of
    ``max_datagram`` bytes: an estimate (the packet's data is a power-of-two
    allocation up to 32 KiB, then about its size, plus the ``sk_buff``).
    Measured over loopback on Linux 6.18: 2,304 bytes for 1472, 16,644 for
    8972, 67,650 for 65507; this gives 2,304, 16,640 and 69,603."""
    n = max_datagram + 320
    if n <= 32768:
        return (1 << (n - 1).bit_length()) + 256
    return max_datagram + 4096


def socket_credits(rcvbuf: int, max_datagram: int) -> int:
    """The most credits a session may have when the socket that receives
    their answers has a receive buffer of ``rcvbuf`` bytes as the kernel
    counts it (``getsockopt`` reports twice what was set): half of the
    datagrams it holds, so that they fit with as many again (another
    session's on a server; duplicates, answers to a timeout's probe, on a
    client). eRPC: a server never drops for lack of receive buffers."""
    return max(1, rcvbuf // rx_truesize(max_datagram) // 2)


def credits_used(credits: int, inflight_bytes: int, max_datagram: int, rcvbuf: int = 0) -> int:
    """The credits a client session uses of ``credits``: at most
    ``inflight_bytes`` of ``max_datagram``-byte datagrams in flight (16 of
    64 KB datagrams, not 32: 2 MiB queued on a path is milliseconds of
    delay, which Timely reads as congestion), and no more than its socket's
    receive buffer allows (``socket_credits``; ``rcvbuf`` 0: unknown), at
    least one."""
    n = min(credits, max(1, inflight_bytes // max_datagram))
    if rcvbuf:
        n = min(n, socket_credits(rcvbuf, max_datagram))
    return n


# a slot's RTO doubles with each timeout without progress, up to 2**6 times
# the base one (5 ms: 320 ms; peer_timeout still ends a dead session)
MAX_BACKOFF = 6

Done = Callable[[Any, BaseException | None], Any]


class ClientSession(ClientCore):
    """The client end of one session (the common case of ``submit`` and
    ``receive`` is in ``ClientCore``, in C; this is everything else).

    ``send_now(packet)`` sends a packet; ``out(item, tag, when_ns)`` paces
    one to leave at ``when_ns``: the pacer then calls
    ``send_paced(item, now_ns)``, which builds and sends it (``item`` is
    ``(slot, req_num, i)``, packet ``i`` of the call in ``slot``; ``tag`` is
    the slot, whose ``queued`` the pacer maintains). ``alloc(n)`` returns a writable buffer
    of ``n`` bytes for a multi-packet response. ``cc`` is the session's
    Timely (``None``: no congestion control). ``peer``: the server's
    address, for a socket that may receive from others (packets from
    anywhere else are dropped as ``bad_session``). ``inflight_bytes``
    caps the credits used to that many bytes of datagrams in flight.
    """

    def __init__(self, send_now: Callable[[Any], Any], out: Callable[[Any, Any, int], Any], *,
                 client_session: int,
                 window: int = 8, credits: int = 32, max_message: int = 8 << 20,
                 max_datagram: int = 1472, rto_ns: int = 5_000_000,
                 peer_timeout_ns: int = 1_000_000_000, cc: Timely | None = None,
                 alloc: Callable[[int], Any] = bytearray, peer: Any = None,
                 inflight_bytes: int = 1 << 20) -> None:
        self.peer = peer                    # not None: drop packets from other addresses
        self.inflight_bytes = inflight_bytes
        # the socket's receive buffer as the kernel counts it (set by the
        # Client on kernel sockets; 0: unknown): no more credits than the
        # answers it holds
        self.rcvbuf = 0
        self.send_now = send_now
        self.out = out
        self.alloc = alloc
        self.client_session = client_session
        self.want_window = window
        self.want_credits = credits
        self.max_message = max_message
        self.max_datagram = max_datagram
        self.rto_ns = rto_ns
        self.peer_timeout_ns = peer_timeout_ns
        self.cc = cc
        self.nonce = random.getrandbits(63)
        self.state = "connecting"
        self.error: BaseException | None = None
        self.server_session = 0
        self.window = window
        self.credits_total = credits
        self.credits = 0
        self.payload = max_datagram - HEADER_SIZE
        self.slots: list[ClientSlot] = []
        self.free: list[ClientSlot] = []
        self.backlog: deque[tuple[int, Any, Done]] = deque()
        self.busy = 0
        self.session_timeout_ns = 0
        self.reconnects = 0
        self.starved = False                # a slot waits for credits
        self.last_rx = 0
        self.next_tx = 0
        # counters
        self.requests = 0
        self.completed = 0
        self.withdrawn = 0
        self.retransmits = 0
        self.duplicates = 0
        self.stale = 0
        self.out_of_order = 0
        self.malformed = 0
        self.no_memory = 0
        self.bad_session = 0
        self.bad_type = 0
        self.rtt_ns = 0
        self.rtt_sum = 0
        self.rtt_samples = 0
        self.min_rtt_ns = 0
        self.srtt_ns = 0
        self.rttvar_ns = 0
        self.max_inflight = 0
        self.max_busy = 0

    # -- connecting --

    def connect_packet(self, now_ns: int) -> bytes:
        """The CONNECT packet (sent again until answered)."""
        return _pack(MAGIC, CONNECT, 0, FLAG_CR_RANGE, 0, self.nonce, 0, 0,
                     (now_ns // 1000) & U32) + \
            Connect(self.client_session, self.max_message, self.max_datagram,
                    self.want_window, self.want_credits).pack()

    def _connected(self, ok: ConnectOk, now_ns: int, rfr_range: bool = False) -> None:
        """The server's CONNECT_OK: its limits; ``rfr_range``, its header's
        FLAG_RFR_RANGE (the C path may then ask for several response packets
        in one RFR)."""
        if ok.window > self.want_window or ok.credits > self.want_credits or \
                ok.max_datagram > self.max_datagram:
            raise ProtocolError(f"the server's limits exceed what was asked for: {ok}")
        self.rfr_range = rfr_range
        self.server_session = ok.server_session
        self.window = ok.window
        self.credits_total = self.credits = credits_used(ok.credits, self.inflight_bytes,
                                                         ok.max_datagram, self.rcvbuf)
        self.rfr_batch = rfr_batch_for(self.credits_total, ok.max_datagram)
        self.max_message = min(self.max_message, ok.max_message)
        self.max_datagram = ok.max_datagram
        self.payload = ok.max_datagram - HEADER_SIZE
        self.slots = [ClientSlot(i, ok.window) for i in range(ok.window)]
        self.free = list(reversed(self.slots))
        self.state = "connected"
        self.session_timeout_ns = ok.session_timeout * 1_000_000_000
        self.last_rx = now_ns
        while self.backlog and self.free:
            req_type, payload, done = self.backlog.popleft()
            self._start(self.free.pop(), req_type, payload, done, now_ns)

    def stale_session(self, now_ns: int) -> bool:
        """True if the session sat idle so long that the server may have
        forgotten it (half its ``session_timeout``): connect again first."""
        return (self.state == "connected" and self.busy == 0 and self.session_timeout_ns > 0
                and now_ns - self.last_rx >= self.session_timeout_ns // 2)

    def reconnect(self) -> None:
        """Start over with a new CONNECT (a new nonce, the same client
        session number: the server replaces the old session). Only while
        nothing is outstanding; calls made meanwhile wait for the session."""
        self.state = "connecting"
        self.nonce = random.getrandbits(63)
        self.slots = []
        self.free = []
        self.credits = 0
        self.starved = False
        self.reconnects += 1

    # -- calls --

    def _submit(self, req_type: int, payload: Any, done: Done, now_ns: int) -> None:
        """``submit`` (``ClientCore``) for what its C path does not take."""
        if self.state == "closed":
            done(None, self.error or SessionClosed("the drpc session is closed"))
            return
        size = len(payload)
        if size > self.max_message:
            raise ValueError(f"request of {size} bytes exceeds max_message ({self.max_message})")
        if not 0 <= req_type <= MAX_REQ_TYPE:
            raise ValueError(f"request type must be in 0..{MAX_REQ_TYPE}, got {req_type}")
        self.requests += 1
        free = self.free
        if not free:
            self.backlog.append((req_type, payload, done))
            return
        self._start(free.pop(), req_type, payload, done, now_ns)

    def withdraw(self, done: Done) -> bool:
        """Drop the call ``done`` belongs to if it still waits in the backlog
        (nothing of it was sent; ``done`` is not called). False if it has
        started: then it keeps its slot until the server answers or the
        session dies, and ``done`` is called as usual."""
        backlog = self.backlog
        for i, entry in enumerate(backlog):
            if entry[2] is done:
                del backlog[i]
                self.withdrawn += 1
                return True
        return False

    def _start(self, slot: ClientSlot, req_type: int, payload: Any, done: Done,
               now_ns: int) -> None:
        size = len(payload)
        self._occupy_slot(slot, req_type, payload,
                          1 if size <= self.payload else -(-size // self.payload), done, now_ns)
        self._push(slot, now_ns)            # without credits: marks the session starved

    def _push(self, slot: ClientSlot, now_ns: int) -> None:
        """Send what the slot may send with the credits left."""
        n_req = slot.n_req
        total = n_req + slot.n_resp - 1 if slot.n_resp else n_req
        while self.credits and slot.num_tx < total:
            i = slot.num_tx
            # what this packet costs the path: a request-for-response pulls
            # a whole answer (eRPC paces the client's packets so that the
            # answers arrive at the session's rate)
            if i < n_req:
                off = i * self.payload
                wire = HEADER_SIZE + min(self.payload, slot.req_size - off)
            else:
                wire = self.max_datagram
            slot.num_tx = i + 1
            self.credits -= 1
            cc = self.cc
            # unpaced, unless a packet of this slot still waits in the
            # pacing wheel: then this one is paced behind it, so that the
            # slot's packets leave (and are answered) in order
            if (cc is None or cc.rate >= cc.link_rate) and not slot.queued:
                self.send_one(slot, i, now_ns)
            else:
                t = self.next_tx if self.next_tx > now_ns else now_ns
                self.next_tx = t + int(wire * 8e9 / cc.rate)  # type: ignore[union-attr]
                if t <= now_ns and not slot.queued:
                    self.send_one(slot, i, now_ns)
                else:
                    self.out((slot, slot.req_num, i), slot, t)
        if slot.num_tx < total:
            self.starved = True             # out of credits: pump() when they return
        inflight = self.credits_total - self.credits
        if inflight > self.max_inflight:
            self.max_inflight = inflight

    def _packet(self, slot: ClientSlot, i: int, ts: int) -> bytes:
        """Request packet ``i`` of the slot as one ``bytes`` (``send_one``'s
        way for a request in memory other than bytes, bytearray or a
        Buffer, which it cannot send from where it lies)."""
        head = _pack(MAGIC, REQ, slot.req_type, 0, self.server_session, slot.req_num,
                     slot.req_size, i, ts)
        off = i * self.payload
        return head + memoryview(slot.req)[off:off + self.payload]

    def pump(self, now_ns: int) -> None:
        """Let the slots that ran out of credits send what the returned
        credits allow."""
        if self.starved and self.credits:
            self.starved = False
            for slot in self.slots:
                if slot.busy:
                    # (also once the credits are gone: _push marks the
                    # session starved again if the slot has more to send)
                    self._push(slot, now_ns)

    # -- receiving --

    def _receive(self, batch: list[tuple[Any, Any]], now_ns: int) -> None:
        """``receive`` (``ClientCore``) for the datagrams its C path does not
        take: every packet type and every check."""
        slots = self.slots
        window = self.window
        now_us = (now_ns // 1000) & U32
        peer = self.peer
        for buf, addr in batch:
            if peer is not None and addr is not peer and addr != peer:
                self.bad_session += 1       # not from the server
                continue
            try:
                magic, ptype, _rt, flags, sid, req_num, msg_size, pkt_num, ts = _unpack(buf)
            except _struct_error:
                self.malformed += 1
                continue
            if magic != MAGIC:
                self.malformed += 1
                continue
            if sid != self.client_session:
                self.bad_session += 1
                continue
            if ptype == RESP or ptype == CR:
                if not slots:
                    self.stale += 1
                    continue
                slot = slots[req_num % window]
                if not slot.busy or slot.req_num != req_num:
                    self.stale += 1
                    continue
                if ptype == CR:
                    if pkt_num >= slot.n_req - 1:
                        self.malformed += 1
                        continue
                    j = pkt_num
                    if slot.num_rx < j:
                        # request packets up to pkt_num arrived (a ranged
                        # CR covers several): the ones before it are
                        # answered too; never one that was not sent
                        if j >= slot.num_tx:
                            self.out_of_order += 1
                            continue
                        while slot.num_rx < j:
                            self._answer_slot(slot, slot.num_rx, now_ns)
                else:
                    j = slot.n_req - 1 + pkt_num
                if j != slot.num_rx:
                    if j < slot.num_rx:
                        self.duplicates += 1
                    else:
                        self.out_of_order += 1
                    continue
                if ptype == RESP and self._response(slot, flags, msg_size, pkt_num, buf):
                    continue
                self._answer_slot(slot, j, now_ns)    # its credit comes back
                if slot.probing:
                    self._probe_answered(slot, ts)
                if not flags & FLAG_NO_RTT:
                    self.sample_rtt(((now_us - ts) & U32) * 1000, now_ns)
                if slot.n_resp and slot.num_rx == slot.n_req + slot.n_resp - 1:
                    self.complete(slot, now_ns)
                elif self.credits:
                    self._push(slot, now_ns)
            elif ptype == CONNECT_OK:
                if self.state == "connecting" and req_num == self.nonce:
                    try:
                        self._connected(ConnectOk.unpack(buf[HEADER_SIZE:]), now_ns,
                                        bool(flags & FLAG_RFR_RANGE))
                    except ProtocolError as exc:
                        self.fail(exc)
                else:
                    self.duplicates += 1
            elif ptype == CONNECT_REJECT:
                if self.state == "connecting" and req_num == self.nonce:
                    try:
                        rej = ConnectReject.unpack(buf[HEADER_SIZE:])
                        why = f"{RejectReason(rej.reason).name if rej.reason in _REASONS else rej.reason}: {rej.text}"  # noqa: E501
                    except ProtocolError as exc:
                        why = str(exc)
                    self.fail(SessionRejected(f"the server refused the session ({why})"))
                else:
                    self.stale += 1
            elif ptype == DISCONNECT_OK:
                self.stale += 1
            else:
                self.bad_type += 1
        if self.starved and self.credits:
            self.pump(now_ns)

    def _response(self, slot: ClientSlot, flags: int, msg_size: int, pkt_num: int,
                  buf: Any) -> bool:
        """Take a response packet that is next in order; True if it is
        malformed (dropped)."""
        length = len(buf) - HEADER_SIZE
        if pkt_num == 0 and msg_size == length and msg_size <= self.payload:
            slot.n_resp = 1                             # the common case: one packet
            slot.resp_size = msg_size
            slot.resp_flags = flags
            slot.resp = buf[HEADER_SIZE:]               # zero copy: a slice of the packet
            return False
        if pkt_num == 0:
            why = check_data_packet(msg_size, 0, length, self.payload, self.max_message)
            if why is not None:
                self.malformed += 1
                return True
            slot.n_resp = n = 1 if msg_size <= self.payload else -(-msg_size // self.payload)
            slot.resp_size = msg_size
            slot.resp_flags = flags
            if n == 1:
                slot.resp = buf[HEADER_SIZE:]           # zero copy: a slice of the packet
            else:
                try:
                    slot.resp = self.alloc(msg_size)
                except (EvplError, MemoryError):
                    self.no_memory += 1         # dropped: retransmitted after the RTO
                    slot.n_resp = 0
                    return True
                slot.resp_view = memoryview(slot.resp)
                slot.resp_view[:length] = memoryview(buf)[HEADER_SIZE:]
            return False
        if msg_size != slot.resp_size or (flags ^ slot.resp_flags) & FLAG_ERROR or \
                check_data_packet(msg_size, pkt_num, length, self.payload,
                                  self.max_message) is not None:
            self.malformed += 1
            return True
        off = pkt_num * self.payload
        memoryview(slot.resp)[off:off + length] = memoryview(buf)[HEADER_SIZE:]
        return False

    @staticmethod
    def _remote_error(resp: Any) -> RemoteError:
        """The error of a response flagged ERROR (``complete`` raises it in
        the call)."""
        return RemoteError(bytes(resp).decode("utf-8", "replace"))

    # -- time --

    def tick(self, now_ns: int) -> BaseException | None:
        """Retransmission timeouts (a probe per slot, go-back-N once it shows
        a loss) and dead-peer detection; returns the error that killed the
        session, if it died."""
        if self.state != "connected":
            return None
        if self.busy and now_ns - self.last_rx >= self.peer_timeout_ns:
            err = PeerDead(f"no packet from the server for "
                           f"{(now_ns - self.last_rx) / 1e9:.3f} s with {self.busy} request(s) "
                           f"outstanding (peer_timeout {self.peer_timeout_ns / 1e9:g} s): "
                           f"the server is gone or unreachable")
            self.fail(err)
            return err
        rto = self.rto()
        ts = (now_ns // 1000) & U32
        for slot in self.slots:
            if slot.busy and slot.num_tx > slot.num_rx and slot.queued == 0 and \
                    now_ns - slot.progress >= rto << slot.backoff:
                # resend the first unanswered packet only (with its credit
                # still counted in flight): its answer tells a loss, which
                # rolls the rest back, from a late original (a stalled
                # server or host), which resends nothing more
                if not slot.probing:
                    slot.probing = True
                    slot.probe_ts = ts
                self.send_one(slot, slot.num_rx, now_ns)
                slot.retransmits += 1
                self.retransmits += 1
                slot.progress = now_ns
                if slot.backoff < MAX_BACKOFF:
                    slot.backoff += 1
        return None

    def _probe_answered(self, slot: ClientSlot, ts: int) -> None:
        """The packet a timeout resent was answered (``ts``: the echoed
        send time of the packet answered). The answer to a resend (sent at
        ``probe_ts`` or later; 32-bit µs clock) means the original was lost:
        go back N, the packets after it are resent. The original's answer
        means the timeout was spurious: what is in flight is still coming."""
        slot.probing = False
        if (ts - slot.probe_ts) & U32 < 0x80000000:
            self.credits += slot.num_tx - slot.num_rx
            slot.num_tx = slot.num_rx
            self.starved = True
        else:
            self.spurious_timeouts += 1

    def pause(self, gap_ns: int) -> None:
        """This end did not run for ``gap_ns`` (its process was stopped or
        descheduled): what it could not hear in that time says nothing of
        the server, so every slot's timeout, and the dead-peer clock, start
        that much later. (Else a client stopped for longer than the timeout
        rolls back when it runs again, before it reads the answers that
        came meanwhile, or before the packets they answer have left.)"""
        self.last_rx += gap_ns
        for slot in self.slots:
            if slot.busy:
                slot.progress += gap_ns

    def rto(self) -> int:
        """The retransmission timeout (ns) of a slot's first timeout:
        ``rto_ns`` (eRPC's 5 ms), or the smoothed RTT plus four mean
        deviations if that is longer (TCP's estimate, RFC 6298): on a host
        whose RTT swings by milliseconds (processes descheduled) a swing is
        not a loss. Each further timeout of a slot without progress doubles
        it (``backoff``), so a peer stopped for a while gets a few resends
        rather than one per ``rto_ns``."""
        est = self.srtt_ns + 4 * self.rttvar_ns
        return est if est > self.rto_ns else self.rto_ns

    def fail(self, error: BaseException) -> None:
        """Close the session: every outstanding and queued call fails with
        ``error``."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.error = error
        dones = [s.done for s in self.slots if s.busy and s.done is not None]
        for s in self.slots:
            s.busy = False
            s.done = None
            s.req = b""
            s.resp = None
            s.resp_view = None
        dones.extend(d for _, _, d in self.backlog)
        self.backlog.clear()
        self.busy = 0
        for done in dones:
            done(None, error)

    def disconnect_packet(self) -> bytes:
        """The DISCONNECT packet."""
        return _pack(MAGIC, DISCONNECT, 0, 0, self.server_session, 0, 0, 0, 0)

    def stats(self) -> dict[str, Any]:
        """Per-session counters: RTT (last and minimum, µs), Timely rate,
        credits, retransmissions, drops."""
        s: dict[str, Any] = {
            "state": self.state,
            "window": self.window,
            "credits": self.credits_total,
            "credits_available": self.credits,
            "rcvbuf": self.rcvbuf,
            "max_inflight": self.max_inflight,
            "max_outstanding": self.max_busy,
            "outstanding": self.busy,
            "backlog": len(self.backlog),
            "requests": self.requests,
            "completed": self.completed,
            "withdrawn": self.withdrawn,
            "reconnects": self.reconnects,
            "retransmits": self.retransmits,
            "spurious_timeouts": self.spurious_timeouts,
            "duplicates": self.duplicates,
            "stale": self.stale,
            "out_of_order": self.out_of_order,
            "malformed": self.malformed,
            "no_memory": self.no_memory,
            "bad_session": self.bad_session,
            "bad_type": self.bad_type,
            "rto_us": self.rto() / 1000,
            "srtt_us": self.srtt_ns / 1000,
            "rtt_us": self.rtt_ns / 1000,
            "min_rtt_us": self.min_rtt_ns / 1000,
            "mean_rtt_us": self.rtt_sum / self.rtt_samples / 1000 if self.rtt_samples else 0.0,
            "rtt_samples": self.rtt_samples,
            "max_datagram": self.max_datagram,
            "max_message": self.max_message,
        }
        if self.cc is not None:
            self.cc_flush()
            s["rate_bps"] = self.cc.rate
            s["timely"] = self.cc.stats()
        return s


_REASONS = {int(r) for r in RejectReason}


# -- server ---------------------------------------------------------------------

FREE, RECEIVING, RUNNING, DONE = 0, 1, 2, 3

class ServerEndpoint(ServerCore):
    """The server end of every session of one socket (the common case of
    ``receive`` is in ``ServerCore``, in C; this is everything else).

    ``out(packet, addr)`` sends a datagram. ``handlers`` maps request types
    to the handlers the core runs itself (``handler(Request)`` returns the
    response, or ``None`` and calls ``Request.respond`` later); a request
    of another type goes to ``dispatch(session, slot, req_type, req_num,
    body)``, which returns the response or ``None`` (answered later with
    :meth:`respond`). ``failed(request, exc)`` is told when a handler
    raises (it answers with an error). ``alloc(n)`` returns a writable
    buffer for a multi-packet request. The packets of a multi-packet
    response leave as slices of it (``ServerCore.send_slice``): on a Bind,
    not copied.
    """

    def __init__(self, out: Callable[[Any, Any], Any],
                 dispatch: Callable[[ServerSession, ServerSlot, int, int, Any], Any],
                 failed: Callable[[Request, BaseException], Any], *,
                 window: int = 8, credits: int = 32, max_message: int = 8 << 20,
                 max_datagram: int = 1472, max_sessions: int = 4096,
                 session_timeout_ns: int = 60_000_000_000, max_assembly: int = 256 << 20,
                 alloc: Callable[[int], Any] = bytearray) -> None:
        self.out = out
        # CONNECT_OK says ranged RFRs are answered (the C path and this one do)
        self.rfr_range = True
        # a client whose CONNECT has FLAG_CR_RANGE gets ranged credit returns
        self.cr_range = True
        # the socket's receive buffer as the kernel counts it (set by the
        # Server on kernel sockets): sessions get no more credits than
        # ``socket_credits`` says it holds; 0: no such cap
        self.rcvbuf = 0
        self.dispatch = dispatch
        self.failed = failed
        self.handlers: dict[int, Callable[[Request], Any]] = {}
        self.alloc = alloc
        self.window = window
        self.credits = credits
        self.max_message = max_message
        self.max_datagram = max_datagram
        self.max_sessions = max_sessions
        self.session_timeout_ns = session_timeout_ns
        self.max_assembly = max_assembly
        self.assembling = 0                 # bytes of multi-packet requests being received
        self.sessions: dict[int, ServerSession] = {}
        self.by_client: dict[tuple[Any, int], ServerSession] = {}
        self.closing = False
        self.c = dict.fromkeys(
            ("requests", "responses", "truncated", "bad_magic", "bad_type",
             "bad_session", "malformed", "out_of_window", "stale", "out_of_order", "duplicates",
             "retransmitted_responses", "in_progress", "credit_returns", "rfr",
             "sessions_opened", "sessions_closed", "sessions_expired", "sessions_rejected",
             "late_responses", "assembly_full"), 0)

    # -- packets --

    def _receive(self, batch: list[tuple[Any, Any]], now_ns: int) -> None:
        """``receive`` (``ServerCore``) for the datagrams its C path does not
        take: every packet type and every check."""
        c = self.c
        sessions = self.sessions
        out = self.out
        for buf, addr in batch:
            try:
                magic, ptype, req_type, flags, sid, req_num, msg_size, pkt_num, ts = \
                    _unpack(buf)
            except _struct_error:
                c["truncated"] += 1
                continue
            if magic != MAGIC:
                c["bad_magic"] += 1
                continue
            if ptype == REQ or ptype == RFR:
                sess = sessions.get(sid)
                if sess is None or (sess.peer is not addr and sess.peer != addr):
                    c["bad_session"] += 1
                    continue
                sess.last_rx = now_ns
                slot = sess.slots[req_num % sess.window]
                if ptype == RFR:
                    if slot.req_num != req_num or slot.state != DONE or \
                            not 0 < pkt_num < slot.n_resp:
                        c["stale" if req_num < slot.req_num else "out_of_window"] += 1
                        continue
                    c["rfr"] += 1
                    # a ranged RFR asks for msg_size packets (at most the
                    # session's credits: no more can be in flight)
                    last = min(slot.n_resp, pkt_num + min(max(msg_size, 1), sess.credits))
                    for k in range(pkt_num, last):
                        off = k * sess.payload
                        self.send_slice(RESP, slot.req_type, slot.flags, sess.client_session,
                                        req_num, slot.resp_size, k, ts, slot.resp, off,
                                        min(sess.payload, slot.resp_size - off), addr)
                    continue
                if req_num == slot.req_num:
                    self._current(sess, slot, req_num, msg_size, pkt_num, ts, buf, addr)
                    continue
                expected = slot.req_num + sess.window if slot.req_num >= 0 else slot.index
                if req_num != expected:
                    c["stale" if req_num < slot.req_num else "out_of_window"] += 1
                    continue
                if slot.state == RECEIVING or slot.state == RUNNING:
                    # an honest client starts the slot's next request only
                    # once it has the whole response to the current one
                    c["out_of_window"] += 1
                    continue
                if pkt_num != 0:
                    c["out_of_order"] += 1
                    continue
                length = len(buf) - HEADER_SIZE
                if msg_size <= sess.payload:
                    if length != msg_size:
                        c["malformed"] += 1
                        continue
                    # a new single-packet request: the body is a slice of the packet
                    slot.req_num = req_num
                    slot.req_type = req_type
                    slot.req_size = msg_size
                    slot.n_req = 1
                    slot.resp = None
                    slot.state = RUNNING
                    slot.ts = ts
                    sess.requests += 1
                    c["requests"] += 1
                    handler = self.handlers.get(req_type)
                    if handler is None:
                        resp = self.dispatch(sess, slot, req_type, req_num, buf[HEADER_SIZE:])
                    else:
                        req = Request(self, sess, slot, req_type, req_num, buf[HEADER_SIZE:])
                        try:
                            resp = handler(req)
                        except Exception as exc:
                            self.failed(req, exc)
                            continue
                    if resp is None:
                        continue                # answered later (or already, with an error)
                    size = len(resp)
                    if size <= sess.payload and slot.state == RUNNING:
                        # answered at once, in one packet: the common case, inline
                        slot.resp = resp
                        slot.resp_size = size
                        slot.flags = 0
                        slot.n_resp = 1
                        slot.state = DONE
                        c["responses"] += 1
                        out(_pack(MAGIC, RESP, req_type, 0, sess.client_session, req_num, size,
                                  0, ts) + resp, addr)
                    else:
                        self.respond(sess, slot, req_num, resp, 0, True)
                    continue
                why = check_data_packet(msg_size, 0, length, sess.payload, sess.max_message)
                if why is not None:
                    c["malformed"] += 1
                    continue
                if self.assembling + msg_size > self.max_assembly:
                    c["assembly_full"] += 1     # the client retransmits later
                    continue
                try:
                    asm = self.alloc(msg_size)
                except (EvplError, MemoryError):
                    c["assembly_full"] += 1     # out of memory: the client retransmits
                    continue
                self.assembling += msg_size
                slot.req_num = req_num
                slot.req_type = req_type
                slot.req_size = msg_size
                slot.n_req = -(-msg_size // sess.payload)
                slot.resp = None
                slot.asm = asm
                memoryview(slot.asm)[:length] = memoryview(buf)[HEADER_SIZE:]
                slot.num_rx = 1
                slot.state = RECEIVING
                c["credit_returns"] += 1
                out(_pack(MAGIC, CR, req_type, 0, sess.client_session, req_num, 0, 0, ts), addr)
                continue
            if ptype == CONNECT:
                self._connect(buf, addr, req_num, now_ns, flags)
            elif ptype == DISCONNECT:
                sess = sessions.get(sid)
                if sess is not None and (sess.peer is addr or sess.peer == addr):
                    self._drop(sess)
                    c["sessions_closed"] += 1
                    out(_pack(MAGIC, DISCONNECT_OK, 0, 0, sess.client_session, 0, 0, 0, 0), addr)
                else:
                    c["bad_session"] += 1
            else:
                c["bad_type"] += 1

    def _current(self, sess: ServerSession, slot: ServerSlot, req_num: int, msg_size: int,
                 pkt_num: int, ts: int, buf: Any, addr: Any) -> None:
        """A REQ packet of the request the slot holds now: the next packet of
        a multi-packet request, or a retransmission."""
        c = self.c
        if slot.state == RECEIVING:
            if pkt_num == slot.num_rx:
                length = len(buf) - HEADER_SIZE
                if msg_size != slot.req_size or check_data_packet(
                        msg_size, pkt_num, length, sess.payload, sess.max_message) is not None:
                    c["malformed"] += 1
                    return
                off = pkt_num * sess.payload
                memoryview(slot.asm)[off:off + length] = memoryview(buf)[HEADER_SIZE:]
                slot.num_rx = pkt_num + 1
                if slot.num_rx < slot.n_req:
                    c["credit_returns"] += 1
                    self.out(_pack(MAGIC, CR, slot.req_type, 0, sess.client_session, req_num,
                                   0, pkt_num, ts), addr)
                    return
                body = slot.asm
                slot.asm = None
                self.assembling -= slot.req_size
                slot.state = RUNNING
                slot.ts = ts
                sess.requests += 1
                c["requests"] += 1
                self._run(sess, slot, req_num, body)
            elif pkt_num < slot.num_rx:
                c["duplicates"] += 1        # its credit return was lost: again
                self.out(_pack(MAGIC, CR, slot.req_type, 0, sess.client_session, req_num, 0,
                               pkt_num, ts), addr)
            else:
                c["out_of_order"] += 1
            return
        # the request is running or answered: a retransmission
        c["duplicates"] += 1
        if pkt_num < slot.n_req - 1:
            self.out(_pack(MAGIC, CR, slot.req_type, 0, sess.client_session, req_num, 0,
                           pkt_num, ts), addr)
        elif slot.state == DONE:
            # the response (or its first packet) was lost: answer from the
            # cache, without running the handler again
            c["retransmitted_responses"] += 1
            slot.ts = ts
            self._send_first(sess, slot, True)
        else:
            c["in_progress"] += 1

    def _run(self, sess: ServerSession, slot: ServerSlot, req_num: int, body: Any) -> None:
        """Hand a complete (multi-packet) request to its handler."""
        handler = self.handlers.get(slot.req_type)
        if handler is None:
            resp = self.dispatch(sess, slot, slot.req_type, req_num, body)
        else:
            req = Request(self, sess, slot, slot.req_type, req_num, body)
            try:
                resp = handler(req)
            except Exception as exc:
                self.failed(req, exc)
                return
        if resp is not None:
            self.respond(sess, slot, req_num, resp, 0, True)

    def _connect(self, buf: Any, addr: Any, nonce: int, now_ns: int, flags: int = 0) -> None:
        c = self.c
        try:
            req = Connect.unpack(buf[HEADER_SIZE:])
        except ProtocolError:
            c["malformed"] += 1
            return
        key = (addr, req.client_session)
        sess = self.by_client.get(key)
        if sess is not None and sess.nonce == nonce:
            c["duplicates"] += 1            # our CONNECT_OK was lost: send it again
            self._send_ok(sess, addr)
            return
        if sess is not None:
            self._drop(sess)                # the client started over
        reject = None
        if self.closing:
            reject = ConnectReject(RejectReason.SHUTTING_DOWN, "the server is closing")
        elif len(self.sessions) >= self.max_sessions:
            reject = ConnectReject(RejectReason.TOO_MANY_SESSIONS,
                                   f"the server has {self.max_sessions} sessions (max_sessions)")
        elif req.window < 1 or req.credits < 1 or req.max_datagram <= HEADER_SIZE:
            reject = ConnectReject(RejectReason.BAD_PARAMETERS,
                                   f"unusable window/credits/datagram size in {req}")
        if reject is not None:
            c["sessions_rejected"] += 1
            self.out(_pack(MAGIC, CONNECT_REJECT, 0, 0, req.client_session, nonce, 0, 0, 0) +
                     reject.pack(), addr)
            return
        number = random.getrandbits(32)
        while number == 0 or number in self.sessions:
            number = random.getrandbits(32)
        dgram = min(self.max_datagram, req.max_datagram)
        credits = min(self.credits, req.credits)
        if self.rcvbuf:
            credits = min(credits, socket_credits(self.rcvbuf, dgram))
        sess = ServerSession(number, addr, nonce, req.client_session,
                             min(self.window, req.window), credits,
                             min(self.max_message, req.max_message), dgram, now_ns)
        sess.cr_range = self.cr_range and bool(flags & FLAG_CR_RANGE)
        self.sessions[number] = sess
        self.by_client[key] = sess
        c["sessions_opened"] += 1
        self._send_ok(sess, addr)

    def _send_ok(self, sess: ServerSession, addr: Any) -> None:
        ok = ConnectOk(sess.number, sess.max_message, sess.max_datagram, sess.window,
                       sess.credits, self.session_timeout_ns // 1_000_000_000)
        self.out(_pack(MAGIC, CONNECT_OK, 0, FLAG_RFR_RANGE if self.rfr_range else 0,
                       sess.client_session, sess.nonce, 0, 0, 0) + ok.pack(), addr)

    def _drop(self, sess: ServerSession) -> None:
        sess.closed = True
        self.sessions.pop(sess.number, None)
        self.by_client.pop((sess.peer, sess.client_session), None)
        for slot in sess.slots:
            if slot.state == RECEIVING:
                self.assembling -= slot.req_size
            slot.asm = None
            slot.resp = None

    # -- responses --

    def respond(self, sess: ServerSession, slot: ServerSlot, req_num: int, data: Any,
                flags: int = 0, at_once: bool = False) -> bool:
        """Send the response to request ``req_num`` (its first packet now,
        the others when the client asks for them) and keep it for
        retransmissions; False if the request is no longer there (the
        session closed). ``at_once``: the handler answered while it was
        dispatched, so the first packet echoes the request's timestamp (an
        RTT sample for the client); a later answer is flagged NO_RTT."""
        if sess.closed or slot.req_num != req_num or slot.state != RUNNING:
            self.c["late_responses"] += 1
            return False
        size = len(data)
        if size > sess.max_message:
            data = (f"response of {size} bytes exceeds the session's max_message "
                    f"({sess.max_message})").encode()
            size = len(data)
            flags |= FLAG_ERROR
        slot.resp_size = size
        slot.flags = flags
        slot.n_resp = 1 if size <= sess.payload else -(-size // sess.payload)
        # a multi-packet response is sent in slices: of a memoryview, so that
        # a slice is no copy (of bytes it would be one, before the packet's)
        slot.resp = data if slot.n_resp == 1 else memoryview(data).cast("B")
        slot.state = DONE
        self.c["responses"] += 1
        self._send_first(sess, slot, at_once)
        return True

    def _send_first(self, sess: ServerSession, slot: ServerSlot, sample: bool) -> None:
        flags = slot.flags | (0 if sample else FLAG_NO_RTT)
        if slot.n_resp > 1:
            # the first slice of the kept memoryview, not copied
            self.send_slice(RESP, slot.req_type, flags, sess.client_session, slot.req_num,
                            slot.resp_size, 0, slot.ts, slot.resp, 0, sess.payload, sess.peer)
            return
        self.out(_pack(MAGIC, RESP, slot.req_type, flags, sess.client_session, slot.req_num,
                       slot.resp_size, 0, slot.ts) + slot.resp, sess.peer)

    # -- time --

    def expire(self, now_ns: int) -> int:
        """Drop sessions that sent nothing for ``session_timeout``; returns how many."""
        dead = [s for s in self.sessions.values()
                if now_ns - s.last_rx >= self.session_timeout_ns and
                not any(sl.state == RUNNING for sl in s.slots)]
        for s in dead:
            self._drop(s)
        self.c["sessions_expired"] += len(dead)
        return len(dead)

    def stats(self) -> dict[str, int]:
        """Counters: packets, requests, responses, sessions, and every kind
        of packet dropped (``truncated``, ``bad_magic``, ``bad_type``,
        ``bad_session``, ``malformed``, ``out_of_window``, ``stale``,
        ``out_of_order``, ``duplicates``); ``rcvbuf``, the receive buffer
        that caps sessions' credits (0: none)."""
        s = {"packets": self.packets, **self.c}
        s["requests"] += self.requests          # (and the C path's counts)
        s["responses"] += self.responses
        s["rfr"] += self.rfr
        s["credit_returns"] += self.credit_returns
        s["sessions"] = len(self.sessions)
        s["assembling_bytes"] = self.assembling
        s["rcvbuf"] = self.rcvbuf
        return s
