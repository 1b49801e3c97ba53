"""Type stubs of drpc's per-packet common case (see _fast.pyx)."""

from typing import Any

class Port:
    core: Any
    after: Any
    def on_datagrams(self, bind: Any, datagrams: list[tuple[Any, Any]]) -> None: ...

class ClientSlot:
    busy: bool
    done: Any
    index: int
    n_req: int
    n_resp: int
    num_rx: int
    num_tx: int
    progress: int
    queued: int
    req: Any
    req_num: int
    req_size: int
    req_type: int
    resp: Any
    resp_flags: int
    resp_size: int
    retransmits: int
    backoff: int
    probing: bool
    probe_ts: int
    resp_view: Any
    def __init__(self, index: int, window: int) -> None: ...

class ServerSlot:
    index: int
    req_num: int
    state: int
    req_type: int
    req_size: int
    n_req: int
    num_rx: int
    resp_size: int
    n_resp: int
    asm: Any
    resp: Any
    flags: int
    ts: int
    cr_count: int
    cr_ts: int
    def __init__(self, index: int) -> None: ...

class ServerSession:
    number: int
    client_session: int
    peer: Any
    nonce: int
    window: int
    credits: int
    max_message: int
    max_datagram: int
    payload: int
    slots: list[ServerSlot]
    last_rx: int
    requests: int
    closed: bool
    cr_range: bool
    def __init__(self, number: int, peer: Any, nonce: int, client_session: int, window: int,
                 credits: int, max_message: int, max_datagram: int, now_ns: int) -> None: ...

class Request:
    _endpoint: Any
    _sess: ServerSession
    _slot: ServerSlot
    req_type: int
    req_num: int
    body: Any
    def __init__(self, endpoint: Any, sess: ServerSession, slot: ServerSlot, req_type: int,
                 req_num: int, body: Any) -> None: ...
    @property
    def peer(self) -> Any: ...
    def respond(self, data: Any) -> bool: ...

class ClientCore:
    send_now: Any
    send_bind: Any
    peer: Any
    state: str
    slots: list[ClientSlot]
    free: list[ClientSlot]
    backlog: Any
    client_session: int
    server_session: int
    window: int
    credits: int
    credits_total: int
    payload: int
    max_message: int
    busy: int
    max_busy: int
    max_inflight: int
    requests: int
    completed: int
    stale: int
    duplicates: int
    spurious_timeouts: int
    out_of_order: int
    malformed: int
    bad_session: int
    last_rx: int
    next_tx: int
    rtt_ns: int
    rtt_sum: int
    rtt_samples: int
    min_rtt_ns: int
    srtt_ns: int
    rttvar_ns: int
    starved: bool
    rfr_range: bool
    rfr_batch: int
    cc: Any
    @property
    def uncongested(self) -> bool: ...
    def sample_rtt(self, rtt: int, now_ns: int) -> None: ...
    def cc_flush(self) -> None: ...
    def complete(self, slot: ClientSlot, now_ns: int) -> None: ...
    session_timeout_ns: int
    def submit(self, req_type: int, payload: Any, done: Any, now_ns: int) -> None: ...
    def receive(self, batch: list[tuple[Any, Any]], now_ns: int) -> None: ...
    def send_one(self, slot: ClientSlot, i: int, now_ns: int) -> None: ...
    def send_paced(self, item: tuple[ClientSlot, int, int], now_ns: int = ...) -> None: ...

class Caller:
    core: ClientCore | None
    slow: Any
    ticking: bool
    def call(self, req_type: int, payload: Any = ..., callback: Any = ...) -> Any: ...

class ServerCore:
    out: Any
    send_bind: Any
    sessions: dict[int, ServerSession]
    handlers: dict[int, Any]
    packets: int
    requests: int
    responses: int
    rfr: int
    credit_returns: int
    send_queue_full: int
    def send_slice(self, ptype: int, req_type: int, flags: int, session: int, req_num: int,
                   msg_size: int, pkt_num: int, ts: int, data: Any, off: int, n: int,
                   addr: Any) -> None: ...
    def receive(self, batch: list[tuple[Any, Any]], now_ns: int) -> None: ...
