"""Type stubs of rpc2's native paths: the server's batch loop, the client's
reply head, XDR's counted encoders (see _fast.pyx)."""

from collections.abc import Callable
from typing import Any

class Proc:
    fn: Callable[..., Any]
    unpack_args: Any
    pack_result: Any
    with_ctx: bool
    raw: bool
    def __init__(self, fn: Callable[..., Any], unpack_args: Any, pack_result: Any,
                 with_ctx: bool, raw: bool = ...) -> None: ...

class BatchCall:
    conn: Any
    peer: Any
    cred: Any
    ctx: Any
    pack: Any
    xid: int
    prog: int
    vers: int
    proc: int
    def __init__(self, conn: Any, peer: Any, ctx_type: Callable[..., Any]) -> None: ...
    def context(self) -> Any: ...

class FastPath:
    def __init__(self, programs: dict[int, dict[int, dict[int, Proc]]],
                 authsys: dict[bytes, Any], dispatch: Callable[..., bool],
                 handler_raised: Callable[[Any], None], auth_none: Any,
                 unpack_noargs: Any, pack_void: Any, defer: Any, scatter_buf: type,
                 fallback_errors: tuple[type[BaseException], ...],
                 stats: dict[str, int]) -> None: ...
    def serve(self, conn: Any, msgs: list[Any], cur: BatchCall,
              replies: list[Any]) -> bool: ...

def configure(xdr_error: type[Exception], scatter_buf: type, scatter_minimum: int) -> None: ...
def pack_opaque(buf: bytearray, data: Any, maxlen: int = ...) -> None: ...
def pack_string(buf: bytearray, s: Any, maxlen: int = ...) -> None: ...
def success_xid(msg: Any) -> int: ...
def call_message(xid: int, prog: int, vers: int, proc: int, auth: bytes, args: Any) -> bytes: ...
