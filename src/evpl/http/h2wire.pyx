# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""evpl's own server-side HTTP/2 core (RFC 9113) with HPACK (RFC 7541), sans-I/O.

:class:`H2Server` takes the bytes a client sent (``receive``) and gives
back events, as tuples (the first item says which):

- ``(EV_REQUEST, sid, method, path, authority, scheme, headers, end_stream)``:
  a request head. ``method`` and ``path`` are ``str``, ``authority`` and
  ``scheme`` bytes (or None); ``headers`` the regular fields as ``(name,
  value)`` bytes, with ``(b"host", authority)`` first when there is an
  authority.
- ``(EV_DATA, sid, data, end_stream)``: request body bytes (give the window
  back with :meth:`H2Server.acknowledge` once they are taken).
- ``(EV_END, sid, trailers)``: the request ended with trailers (a list).
- ``(EV_RESET, sid, code)``: a stream the caller knows was reset (by the
  client, or by the core after a stream error).
- ``(EV_WINDOW,)``: send windows grew (once per receive at most).
- ``(EV_GOAWAY, last_sid, code)``: the client is going away.
- ``(EV_ERROR, code, message)``: a connection error; a GOAWAY is queued and
  the core takes no more input. Send what is queued, then close.

Responses go in through :meth:`H2Server.respond` (a whole response),
:meth:`send_headers`, :meth:`send_data`, :meth:`send_trailers`, and
everything to send comes out of :meth:`data_to_send` as one bytes object, so
a read's responses leave in one send. It knows nothing of sockets.

What the core refuses on its own (with a stream error or a GOAWAY, never an
exception): malformed frames and sizes, frames on idle or closed streams,
HPACK errors (bad indexes, integers, Huffman padding or EOS, table size
updates), header lists over ``max_header_list_size`` (431), header blocks
over their cap or split into too many CONTINUATION frames (CVE-2024-27316),
more streams than ``max_concurrent_streams``, DATA beyond a window, window
overflow past 2**31-1, malformed requests (RFC 9113 8.2 and 8.3), and
floods: client resets (CVE-2023-44487) and control frames (SETTINGS, PING,
PRIORITY, empty DATA) above a per-interval cap give ENHANCE_YOUR_CALM.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int16_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

__all__ = ["Decoder", "Encoder", "H2Server", "HPACKError", "huffman_decode",
           "huffman_encode", "STATIC_TABLE"]

EV_REQUEST = 1
EV_DATA = 2
EV_END = 3
EV_RESET = 4
EV_WINDOW = 5
EV_GOAWAY = 6
EV_ERROR = 7

# error codes (RFC 9113 7)
NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
FLOW_CONTROL_ERROR = 3
STREAM_CLOSED = 5
FRAME_SIZE_ERROR = 6
REFUSED_STREAM = 7
CANCEL = 8
COMPRESSION_ERROR = 9
ENHANCE_YOUR_CALM = 11

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

cdef enum:
    F_DATA = 0
    F_HEADERS = 1
    F_PRIORITY = 2
    F_RST_STREAM = 3
    F_SETTINGS = 4
    F_PUSH_PROMISE = 5
    F_PING = 6
    F_GOAWAY = 7
    F_WINDOW_UPDATE = 8
    F_CONTINUATION = 9

    FL_END_STREAM = 0x1
    FL_ACK = 0x1
    FL_END_HEADERS = 0x4
    FL_PADDED = 0x8
    FL_PRIORITY = 0x20

    S_RECV_CLOSED = 1
    S_SEND_CLOSED = 2
    S_HEADERS_SENT = 4

    MAX_WINDOW = 0x7fffffff
    RECENT = 32                      # recently reset stream ids remembered


class HPACKError(ValueError):
    """A header block that cannot be decoded (RFC 7541): a COMPRESSION_ERROR."""


# ---------------------------------------------------------------------------
# Huffman code (RFC 7541 Appendix B). The code is canonical: codes are given
# out in order of (length, symbol), so the lengths are the whole table; the
# codes are rebuilt from them below (sym 0 -> 0x1ff8/13, EOS -> 0x3fffffff/30).

cdef uint8_t[257] HLEN
cdef uint32_t[257] HCODE
_LENGTHS = (
    # 0-31: control characters
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    # 32-47: ' ' ! " # $ % & ' ( ) * + , - . /
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    # 48-63: 0-9 : ; < = > ?
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    # 64-79: @ A-O
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    # 80-95: P-Z [ \ ] ^ _
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    # 96-111: ` a-o
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    # 112-127: p-z { | } ~ DEL
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    # 128-255
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    # 256: EOS
    30,
)

# decoding: a binary tree of the 256 internal nodes, then a state machine
# that eats four bits at a time (a code is >= 5 bits, so a nibble finishes
# at most one symbol): DEC_NEXT[node][nibble], DEC_SYM (-1 none, -2 EOS)
cdef int16_t[256][2] TREE
cdef uint8_t[256][16] DEC_NEXT
cdef int16_t[256][16] DEC_SYM
cdef uint8_t[256] ACCEPT            # a node where the string may end (padding ok)


cdef void _build_huffman():
    cdef int order[257]
    cdef int i, j, s, t, n, nodes, b, child, cur, sym, nib
    cdef uint32_t code = 0
    for i in range(257):
        HLEN[i] = _LENGTHS[i]
        order[i] = i
    # sort symbols by (length, symbol): insertion sort, 257 items, once
    for i in range(1, 257):
        t = order[i]
        j = i - 1
        while j >= 0 and (HLEN[order[j]] > HLEN[t]):
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = t
    for i in range(257):
        s = order[i]
        if i:
            code = (code + 1) << (HLEN[s] - HLEN[order[i - 1]])
        HCODE[s] = code
    for i in range(256):
        TREE[i][0] = 0
        TREE[i][1] = 0
        ACCEPT[i] = 0
    nodes = 1
    for s in range(257):
        n = 0
        for j in range(HLEN[s] - 1, -1, -1):
            b = (HCODE[s] >> j) & 1
            if j == 0:
                TREE[n][b] = -(s + 1)
            else:
                if TREE[n][b] == 0:
                    TREE[n][b] = nodes
                    nodes += 1
                n = TREE[n][b]
    n = 0
    for i in range(8):                  # up to 7 one-bits of padding
        ACCEPT[n] = 1
        n = TREE[n][1]
    for n in range(256):
        for nib in range(16):
            cur = n
            sym = -1
            for j in range(3, -1, -1):
                child = TREE[cur][(nib >> j) & 1]
                if child < 0:
                    if child == -257:
                        sym = -2
                        cur = 0
                        break
                    sym = -child - 1
                    cur = 0
                else:
                    cur = child
            DEC_NEXT[n][nib] = cur
            DEC_SYM[n][nib] = sym


_build_huffman()


cdef Py_ssize_t _huff_decode(const uint8_t* p, Py_ssize_t n, uint8_t* out) noexcept nogil:
    """Decode ``n`` Huffman bytes into ``out`` (room for n*8/5+1); -1 if bad."""
    cdef Py_ssize_t i, k = 0
    cdef int state = 0, nib, sym, shift
    for i in range(n):
        for shift in range(4, -1, -4):          # high nibble, then low
            nib = (p[i] >> shift) & 15
            sym = DEC_SYM[state][nib]
            state = DEC_NEXT[state][nib]
            if sym >= 0:
                out[k] = <uint8_t>sym
                k += 1
            elif sym == -2:
                return -1
    if not ACCEPT[state]:
        return -1
    return k


cdef inline Py_ssize_t _huff_len(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, bits = 0
    for i in range(n):
        bits += HLEN[p[i]]
    return (bits + 7) >> 3


cdef Py_ssize_t _huff_encode(const uint8_t* p, Py_ssize_t n, uint8_t* out) noexcept nogil:
    cdef uint64_t acc = 0
    cdef int nbits = 0
    cdef Py_ssize_t i, k = 0
    cdef uint8_t c
    for i in range(n):
        c = p[i]
        acc = (acc << HLEN[c]) | HCODE[c]
        nbits += HLEN[c]
        while nbits >= 8:
            nbits -= 8
            out[k] = <uint8_t>(acc >> nbits)
            k += 1
    if nbits:
        out[k] = <uint8_t>((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1))
        k += 1
    return k


def huffman_encode(bytes data):
    """``data`` Huffman-coded (RFC 7541 5.2), padded with ones."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _huff_len(<const uint8_t*>PyBytes_AS_STRING(data), n))
    _huff_encode(<const uint8_t*>PyBytes_AS_STRING(data), n, <uint8_t*>PyBytes_AS_STRING(out))
    return out


def huffman_decode(bytes data):
    """The bytes Huffman-coded in ``data``; HPACKError on EOS or bad padding."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef uint8_t* buf = <uint8_t*>malloc(n * 8 // 5 + 1)
    cdef Py_ssize_t k
    if buf == NULL:
        raise MemoryError()
    try:
        k = _huff_decode(<const uint8_t*>PyBytes_AS_STRING(data), n, buf)
        if k < 0:
            raise HPACKError("bad Huffman code (EOS or padding)")
        return PyBytes_FromStringAndSize(<char*>buf, k)
    finally:
        free(buf)


# ---------------------------------------------------------------------------
# HPACK tables (RFC 7541 Appendix A)

STATIC_TABLE = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"),
    (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""),
    (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
)
cdef tuple _STATIC = STATIC_TABLE
cdef dict _STATIC_FULL = {}           # (name, value) -> index
cdef dict _STATIC_NAME = {}           # name -> first index
for _i, _f in enumerate(STATIC_TABLE):
    _STATIC_FULL.setdefault(_f, _i + 1)
    _STATIC_NAME.setdefault(_f[0], _i + 1)

# field names: lower-case tchar (RFC 9110 5.6.2); values: no NUL, CR, LF
cdef uint8_t[256] NAME_OK
for _i in range(256):
    NAME_OK[_i] = 1 if (chr(_i) in "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz") else 0


cdef bint _field_ok(bytes name, bytes value) noexcept:
    """RFC 9113 8.2.1: lower-case token names (a leading ':' for pseudo
    fields), values without NUL/CR/LF and without white space at either end."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name), i = 0
    if n == 0:
        return False
    if p[0] == 58:                      # ':'
        i = 1
        if n == 1:
            return False
    while i < n:
        if not NAME_OK[p[i]]:
            return False
        i += 1
    p = <const uint8_t*>PyBytes_AS_STRING(value)
    n = PyBytes_GET_SIZE(value)
    if n:
        if p[0] == 32 or p[0] == 9 or p[n - 1] == 32 or p[n - 1] == 9:
            return False
        for i in range(n):
            if p[i] == 0 or p[i] == 10 or p[i] == 13:
                return False
    return True


# ---------------------------------------------------------------------------
# output buffer

cdef struct OutBuf:
    uint8_t* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _reserve(OutBuf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = b.n + extra
    cdef Py_ssize_t cap
    cdef uint8_t* np
    if want <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < want:
        cap *= 2
    np = <uint8_t*>realloc(b.p, cap)
    if np == NULL:
        raise MemoryError()
    b.p = np
    b.cap = cap
    return 0


cdef inline void _put_int(OutBuf* b, uint8_t first, int prefix, uint64_t v) noexcept:
    """An HPACK integer with ``first``'s high bits (room reserved by caller: 11)."""
    cdef uint64_t mx = (1 << prefix) - 1
    if v < mx:
        b.p[b.n] = first | <uint8_t>v
        b.n += 1
        return
    b.p[b.n] = first | <uint8_t>mx
    b.n += 1
    v -= mx
    while v >= 128:
        b.p[b.n] = <uint8_t>((v & 127) | 128)
        b.n += 1
        v >>= 7
    b.p[b.n] = <uint8_t>v
    b.n += 1


cdef inline void _frame_head(uint8_t* p, Py_ssize_t length, int ftype, int flags,
                             uint32_t sid) noexcept:
    p[0] = <uint8_t>(length >> 16)
    p[1] = <uint8_t>(length >> 8)
    p[2] = <uint8_t>length
    p[3] = <uint8_t>ftype
    p[4] = <uint8_t>flags
    p[5] = <uint8_t>(sid >> 24)
    p[6] = <uint8_t>(sid >> 16)
    p[7] = <uint8_t>(sid >> 8)
    p[8] = <uint8_t>sid


cdef inline uint32_t _u32(const uint8_t* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


# ---------------------------------------------------------------------------
# HPACK decoder
cdef uint64_t _read_int(const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos, int prefix) except? 0xffffffffffffffff:
    cdef uint64_t mx = (1 << prefix) - 1
    cdef uint64_t v = p[pos[0]] & mx
    cdef int shift = 0
    cdef uint8_t c
    pos[0] += 1
    if v < mx:
        return v
    while True:
        if pos[0] >= n:
            raise HPACKError("truncated integer")
        c = p[pos[0]]
        pos[0] += 1
        v += <uint64_t>(c & 127) << shift
        shift += 7
        if not (c & 128):
            break
        if shift > 28:
            raise HPACKError("integer too large")
    if v > 0x7fffffff:
        raise HPACKError("integer too large")
    return v



cdef class Decoder:
    """HPACK decoding (RFC 7541) with a dynamic table of at most
    ``max_table_size`` bytes (the SETTINGS_HEADER_TABLE_SIZE we announce).

    Indexed fields come back as the very tuples kept in the tables (no
    allocation); a field whose literal broke RFC 9113 8.2.1's rules sets
    :attr:`malformed` (the block still updates the table, which must stay
    in step with the peer's encoder)."""

    cdef list entries                   # oldest first; live from self.first on
    cdef Py_ssize_t first
    cdef public Py_ssize_t size
    cdef public Py_ssize_t max_table_size
    cdef public Py_ssize_t table_size    # the limit the peer last set (<= max)
    cdef public bint malformed
    cdef public bint oversize
    cdef uint8_t* scratch
    cdef Py_ssize_t scratch_cap

    def __cinit__(self, Py_ssize_t max_table_size=4096):
        self.entries = []
        self.first = 0
        self.size = 0
        self.max_table_size = max_table_size
        self.table_size = max_table_size
        self.scratch = NULL
        self.scratch_cap = 0

    def __dealloc__(self):
        free(self.scratch)

    def dynamic_table(self):
        """The dynamic table, newest first, as (name, value) pairs."""
        return [tuple(e[:2]) for e in reversed(self.entries[self.first:])]

    def decode(self, bytes block, Py_ssize_t max_list_size=1 << 30):
        """The fields of one header block; HPACKError when it is bad. Past
        ``max_list_size`` (RFC 9113 sizes) fields are decoded but not kept,
        and :attr:`oversize` is set."""
        cdef list out = []
        self._decode(<const uint8_t*>PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block),
                     out, max_list_size)
        return out

    cdef inline int _evict(self, Py_ssize_t limit) except -1:
        cdef object e
        while self.size > limit:
            e = <object>PyList_GET_ITEM(self.entries, self.first)
            self.size -= PyBytes_GET_SIZE(e[0]) + PyBytes_GET_SIZE(e[1]) + 32
            self.entries[self.first] = None
            self.first += 1
        if self.first > 64 and self.first * 2 > PyList_GET_SIZE(self.entries):
            del self.entries[:self.first]
            self.first = 0
        return 0

    cdef int _add(self, tuple field) except -1:
        cdef Py_ssize_t sz = PyBytes_GET_SIZE(field[0]) + PyBytes_GET_SIZE(field[1]) + 32
        if sz > self.table_size:
            self._evict(0)              # too big: the table ends up empty (RFC 7541 4.4)
            return 0
        self._evict(self.table_size - sz)
        self.entries.append(field)
        self.size += sz
        return 0

    cdef tuple _get(self, uint64_t idx):
        cdef Py_ssize_t live
        if idx == 0:
            raise HPACKError("index 0")
        if idx <= 61:
            return <tuple>PyTuple_GET_ITEM(_STATIC, idx - 1)
        live = PyList_GET_SIZE(self.entries) - self.first
        if idx - 62 >= <uint64_t>live:
            raise HPACKError(f"index {idx} past the tables")
        return <tuple>PyList_GET_ITEM(self.entries, PyList_GET_SIZE(self.entries) - 1 - <Py_ssize_t>(idx - 62))

    cdef bytes _string(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos):
        cdef uint64_t length
        cdef bint huff
        cdef Py_ssize_t k, need
        if pos[0] >= n:
            raise HPACKError("truncated string")
        huff = p[pos[0]] & 0x80
        length = _read_int(p, n, pos, 7)
        if length > <uint64_t>(n - pos[0]):
            raise HPACKError("string longer than the block")
        if not huff:
            k = pos[0]
            pos[0] += <Py_ssize_t>length
            return PyBytes_FromStringAndSize(<const char*>p + k, <Py_ssize_t>length)
        need = <Py_ssize_t>length * 8 // 5 + 1
        if need > self.scratch_cap:
            free(self.scratch)
            self.scratch = <uint8_t*>malloc(need)
            if self.scratch == NULL:
                self.scratch_cap = 0
                raise MemoryError()
            self.scratch_cap = need
        k = _huff_decode(p + pos[0], <Py_ssize_t>length, self.scratch)
        if k < 0:
            raise HPACKError("bad Huffman code (EOS or padding)")
        pos[0] += <Py_ssize_t>length
        return PyBytes_FromStringAndSize(<const char*>self.scratch, k)

    cdef int _decode(self, const uint8_t* p, Py_ssize_t n, list out,
                     Py_ssize_t max_list) except -1:
        cdef Py_ssize_t pos = 0, total = 0
        cdef uint8_t c
        cdef uint64_t idx
        cdef tuple field
        cdef bytes name, value
        cdef bint fields_seen = False
        cdef int mode
        self.malformed = False
        self.oversize = False
        while pos < n:
            c = p[pos]
            if c & 0x80:                             # indexed field
                idx = _read_int(p, n, &pos, 7)
                field = self._get(idx)
                if PyTuple_GET_SIZE(field) == 3:      # kept from a malformed literal
                    self.malformed = True
                    field = field[:2]
            elif (c & 0xe0) == 0x20:                 # dynamic table size update
                if fields_seen:
                    raise HPACKError("table size update after a field")
                idx = _read_int(p, n, &pos, 5)
                if idx > <uint64_t>self.max_table_size:
                    raise HPACKError("table size update above the limit")
                self.table_size = <Py_ssize_t>idx
                self._evict(self.table_size)
                continue
            else:
                mode = 1 if (c & 0xc0) == 0x40 else 0   # 1: incremental indexing
                idx = _read_int(p, n, &pos, 6 if mode else 4)
                if idx:
                    name = <bytes>self._get(idx)[0]
                else:
                    name = self._string(p, n, &pos)
                value = self._string(p, n, &pos)
                if _field_ok(name, value):
                    field = (name, value)
                else:
                    field = (name, value, False)
                    self.malformed = True
                if mode:
                    self._add(field)
                if PyTuple_GET_SIZE(field) == 3:
                    field = (name, value)
            fields_seen = True
            total += PyBytes_GET_SIZE(<bytes>field[0]) + PyBytes_GET_SIZE(<bytes>field[1]) + 32
            if total > max_list:
                self.oversize = True
            else:
                out.append(field)
        return 0




# ---------------------------------------------------------------------------
# HPACK encoder

cdef class Encoder:
    """HPACK encoding for responses. A field seen before is one index (a
    byte or two); a new one is added to the dynamic table when it is at
    most three quarters of it; strings are Huffman-coded when that is not longer
    (``huffman=False``: never)."""

    cdef list entries                   # keys, oldest first, from self.first
    cdef Py_ssize_t first
    cdef Py_ssize_t base                # insertion number of entries[0]
    cdef Py_ssize_t inserted            # insertions so far
    cdef dict index                     # key -> insertion number
    cdef public Py_ssize_t size
    cdef public Py_ssize_t table_size
    cdef Py_ssize_t pending_update      # -1, or the size to announce first
    cdef Py_ssize_t min_update
    cdef bint huffman

    def __cinit__(self, Py_ssize_t table_size=4096, bint huffman=True):
        self.entries = []
        self.first = 0
        self.base = 0
        self.inserted = 0
        self.index = {}
        self.size = 0
        self.table_size = table_size
        self.pending_update = -1
        self.min_update = -1
        self.huffman = huffman

    def set_table_size(self, Py_ssize_t size):
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: announce (in the
        next block) and apply the smaller of it and 4096."""
        if size > 4096:
            size = 4096
        if size == self.table_size and self.pending_update < 0:
            return
        if self.min_update < 0 or size < self.min_update:
            self.min_update = size
        self.pending_update = size
        self.table_size = size
        self._evict(size)

    def encode(self, headers):
        """One header block for ``headers`` ((name, value) bytes pairs)."""
        cdef OutBuf b
        b.p = NULL
        b.n = 0
        b.cap = 0
        try:
            self._check(headers)
            self._encode(&b, headers)
            return PyBytes_FromStringAndSize(<char*>b.p, b.n)
        finally:
            free(b.p)

    def dynamic_table(self):
        return [self.entries[i] for i in range(len(self.entries) - 1, self.first - 1, -1)]

    cdef int _evict(self, Py_ssize_t limit) except -1:
        cdef tuple key
        cdef object seq
        while self.size > limit:
            key = <tuple>PyList_GET_ITEM(self.entries, self.first)
            self.size -= PyBytes_GET_SIZE(key[0]) + PyBytes_GET_SIZE(key[1]) + 32
            seq = self.index.get(key)
            if seq is not None and <Py_ssize_t>seq == self.base + self.first:
                del self.index[key]
            self.entries[self.first] = None
            self.first += 1
        if self.first > 64 and self.first * 2 > PyList_GET_SIZE(self.entries):
            del self.entries[:self.first]
            self.base += self.first
            self.first = 0
        return 0

    cdef int _check(self, headers) except -1:
        """Refuse (ValueError) a field that must not go out, before anything
        changes the table (the peer's decoder must stay in step)."""
        cdef object f
        cdef object k, v
        for f in headers:
            if type(f) is tuple and (PyDict_GetItem(self.index, f) != NULL
                                     or PyDict_GetItem(_STATIC_FULL, f) != NULL):
                continue
            k, v = f
            if type(k) is not bytes or type(v) is not bytes or not _field_ok(k, v):
                raise ValueError(f"bad header field {f!r}")
        return 0

    cdef int _string(self, OutBuf* b, bytes s) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(s)
        cdef Py_ssize_t hl = _huff_len(p, n) if self.huffman else n
        _reserve(b, 11 + n)
        if self.huffman and hl <= n:
            _put_int(b, 0x80, 7, hl)
            b.n += _huff_encode(p, n, b.p + b.n)
        else:
            _put_int(b, 0, 7, n)
            memcpy(b.p + b.n, p, n)
            b.n += n
        return 0

    cdef int _field(self, OutBuf* b, tuple f) except -1:
        cdef PyObject* hit
        cdef Py_ssize_t idx, sz
        cdef bytes name, value
        _reserve(b, 11)
        hit = PyDict_GetItem(self.index, f)
        if hit != NULL:
            _put_int(b, 0x80, 7, 62 + self.inserted - 1 - <Py_ssize_t><object>hit)
            return 0
        hit = PyDict_GetItem(_STATIC_FULL, f)
        if hit != NULL:
            _put_int(b, 0x80, 7, <Py_ssize_t><object>hit)
            return 0
        name = <bytes>f[0]
        value = <bytes>f[1]
        hit = PyDict_GetItem(_STATIC_NAME, name)
        idx = <Py_ssize_t><object>hit if hit != NULL else 0
        sz = PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 32
        if sz * 4 <= self.table_size * 3:
            _put_int(b, 0x40, 6, idx)
            if not idx:
                self._string(b, name)
            self._string(b, value)
            self._evict(self.table_size - sz)
            self.entries.append(f)
            self.index[f] = self.inserted
            self.inserted += 1
            self.size += sz
        else:
            _put_int(b, 0, 4, idx)
            if not idx:
                self._string(b, name)
            self._string(b, value)
        return 0

    cdef int _updates(self, OutBuf* b) except -1:
        if self.pending_update >= 0:
            _reserve(b, 22)
            if self.min_update < self.pending_update:
                _put_int(b, 0x20, 5, self.min_update)
            _put_int(b, 0x20, 5, self.pending_update)
            self.pending_update = -1
            self.min_update = -1
        return 0

    cdef int _encode(self, OutBuf* b, headers) except -1:
        cdef object f
        self._updates(b)
        for f in headers:
            self._field(b, f if type(f) is tuple else tuple(f))
        return 0


# ---------------------------------------------------------------------------
# the connection

cdef struct Stream:
    uint32_t sid
    int state
    int64_t send_window
    int64_t recv_window
    int64_t recv_unacked
    int64_t expect_length           # content-length still to come; -1: none
    bint announced


cdef dict _STATUS_BYTES = {}
cdef dict _LENGTH_FIELDS = {}
cdef bytes _CONTENT_LENGTH = b"content-length"
cdef bytes _HOST = b"host"
cdef bytes _COOKIE = b"cookie"
cdef tuple _STATUS_431 = ((b":status", b"431"), (b"content-length", b"0"))


cdef inline bint _name_is(bytes name, const char* s, Py_ssize_t n) noexcept:
    return PyBytes_GET_SIZE(name) == n and memcmp(PyBytes_AS_STRING(name), s, n) == 0


cdef class H2Server:
    """The server side of one HTTP/2 connection (see the module docstring).

    Limits: ``max_concurrent_streams`` (more are refused with
    REFUSED_STREAM), ``max_header_list_size`` (431 beyond it),
    ``initial_window`` (each stream's receive window) and
    ``connection_window``, ``max_resets`` and ``max_control`` per
    ``interval`` seconds (CVE-2023-44487 rapid reset, SETTINGS/PING/PRIORITY
    floods), ``max_continuations`` per header block."""

    cdef OutBuf out
    cdef Stream* streams
    cdef public int nstreams
    cdef int cap_streams
    cdef Decoder decoder
    cdef Encoder encoder
    cdef bytes rbuf
    cdef bytearray hblock
    cdef uint32_t cont_sid
    cdef int cont_flags
    cdef int cont_frames
    cdef public bint preface_done
    cdef bint settings_seen
    cdef public bint dead
    cdef public bint going_away
    cdef bint sent_goaway
    cdef public uint32_t last_sid
    cdef int64_t conn_send_window
    cdef int64_t conn_recv_window
    cdef int64_t conn_recv_unacked
    cdef int64_t peer_initial_window
    cdef public Py_ssize_t peer_max_frame
    cdef Py_ssize_t max_frame
    cdef public int max_concurrent_streams
    cdef public Py_ssize_t max_header_list_size
    cdef int64_t initial_window
    cdef int64_t connection_window
    cdef int max_resets
    cdef int max_control
    cdef double interval
    cdef double interval_start
    cdef int resets
    cdef int control
    cdef int max_continuations
    cdef Py_ssize_t max_block
    cdef uint32_t[RECENT] recent        # streams the server reset (late frames ignored)
    cdef int recent_pos
    cdef uint32_t[RECENT] closed        # streams that closed (late HEADERS: STREAM_CLOSED)
    cdef int closed_pos
    cdef list events
    cdef bint window_event
    cdef dict strs
    cdef object last_authority
    cdef tuple last_host
    cdef tuple date_field
    cdef tuple server_field

    def __cinit__(self, *, int max_concurrent_streams=128, Py_ssize_t max_header_list_size=65536,
                  int64_t initial_window=262144, int64_t connection_window=1 << 20,
                  int max_resets=200, int max_control=1000, double interval=1.0,
                  int max_continuations=64, Py_ssize_t header_table_size=4096):
        for name, v, lo, hi in (
                ("max_concurrent_streams", max_concurrent_streams, 1, 1 << 16),
                ("initial_window", initial_window, 1, MAX_WINDOW),
                # (the peer may send 65,535 bytes before the update that opens the rest)
                ("connection_window", connection_window, 65535, MAX_WINDOW),
                ("max_resets", max_resets, 1, 1 << 30), ("max_control", max_control, 1, 1 << 30),
                ("max_continuations", max_continuations, 1, 1 << 20),
                ("max_header_list_size", max_header_list_size, 1, 1 << 30),
                ("header_table_size", header_table_size, 0, 1 << 20)):
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.out.p = NULL
        self.out.n = 0
        self.out.cap = 0
        self.cap_streams = max_concurrent_streams
        self.streams = <Stream*>malloc(sizeof(Stream) * max(1, max_concurrent_streams))
        if self.streams == NULL:
            raise MemoryError()
        self.nstreams = 0
        self.decoder = Decoder(header_table_size)
        self.encoder = Encoder(4096)
        self.rbuf = b""
        self.hblock = bytearray()
        self.cont_sid = 0
        self.preface_done = False
        self.settings_seen = False
        self.dead = False
        self.going_away = False
        self.sent_goaway = False
        self.last_sid = 0
        self.conn_send_window = 65535
        self.conn_recv_window = connection_window
        self.conn_recv_unacked = 0
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.max_frame = 16384
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        self.initial_window = initial_window
        self.connection_window = connection_window
        self.max_resets = max_resets
        self.max_control = max_control
        self.interval = interval
        self.interval_start = -1e18
        self.resets = 0
        self.control = 0
        self.max_continuations = max_continuations
        self.max_block = max_header_list_size + 16384
        cdef int i
        for i in range(RECENT):
            self.recent[i] = 0
            self.closed[i] = 0
        self.recent_pos = 0
        self.closed_pos = 0
        self.events = []
        self.window_event = False
        self.strs = {}
        self.last_authority = None
        self.last_host = None
        self.date_field = None
        self.server_field = None
        self._settings_frame()

    def __dealloc__(self):
        free(self.out.p)
        free(self.streams)

    # ---- the server's own frames ----
    cdef int _settings_frame(self) except -1:
        cdef uint8_t* p
        cdef int k
        cdef uint32_t values[3]
        values[0] = self.max_concurrent_streams
        values[1] = <uint32_t>self.initial_window
        values[2] = <uint32_t>self.max_header_list_size
        _reserve(&self.out, 9 + 18 + 13)
        p = self.out.p + self.out.n
        _frame_head(p, 18, F_SETTINGS, 0, 0)
        p += 9
        for k in range(3):
            p[0] = 0
            p[1] = <uint8_t>(3 if k == 0 else 4 if k == 1 else 6)
            p[2] = <uint8_t>(values[k] >> 24)
            p[3] = <uint8_t>(values[k] >> 16)
            p[4] = <uint8_t>(values[k] >> 8)
            p[5] = <uint8_t>values[k]
            p += 6
        self.out.n += 27
        if self.connection_window > 65535:
            self._window_update(0, self.connection_window - 65535)
        return 0

    cdef int _frame_u32(self, uint8_t ftype, uint32_t sid, uint32_t value) except -1:
        """A frame whose payload is one 32-bit number (WINDOW_UPDATE, RST_STREAM)."""
        _reserve(&self.out, 13)
        _frame_head(self.out.p + self.out.n, 4, ftype, 0, sid)
        self.out.p[self.out.n + 9] = <uint8_t>(value >> 24)
        self.out.p[self.out.n + 10] = <uint8_t>(value >> 16)
        self.out.p[self.out.n + 11] = <uint8_t>(value >> 8)
        self.out.p[self.out.n + 12] = <uint8_t>value
        self.out.n += 13
        return 0

    cdef int _window_update(self, uint32_t sid, int64_t inc) except -1:
        return self._frame_u32(F_WINDOW_UPDATE, sid, <uint32_t>inc)

    cdef int _rst(self, uint32_t sid, uint32_t code) except -1:
        self._frame_u32(F_RST_STREAM, sid, code)
        self.recent[self.recent_pos] = sid
        self.recent_pos = (self.recent_pos + 1) % RECENT
        return 0

    cdef int _goaway(self, uint32_t code, bytes debug) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(debug)
        _reserve(&self.out, 17 + n)
        _frame_head(self.out.p + self.out.n, 8 + n, F_GOAWAY, 0, 0)
        cdef uint8_t* p = self.out.p + self.out.n + 9
        p[0] = <uint8_t>(self.last_sid >> 24)
        p[1] = <uint8_t>(self.last_sid >> 16)
        p[2] = <uint8_t>(self.last_sid >> 8)
        p[3] = <uint8_t>self.last_sid
        p[4] = <uint8_t>(code >> 24)
        p[5] = <uint8_t>(code >> 16)
        p[6] = <uint8_t>(code >> 8)
        p[7] = <uint8_t>code
        memcpy(p + 8, PyBytes_AS_STRING(debug), n)
        self.out.n += 17 + n
        return 0

    cdef int _error(self, uint32_t code, str message) except -1:
        """A connection error: GOAWAY, then nothing more is read."""
        if not self.dead:
            self._goaway(code, message.encode()[:64])
            self.dead = True
            self.going_away = True
            self.events.append((EV_ERROR, code, message))
        return 1

    # ---- streams ----
    cdef inline int _find(self, uint32_t sid) noexcept:
        cdef int i
        for i in range(self.nstreams):
            if self.streams[i].sid == sid:
                return i
        return -1

    cdef int _remove(self, int i) noexcept:
        self.closed[self.closed_pos] = self.streams[i].sid
        self.closed_pos = (self.closed_pos + 1) % RECENT
        self.nstreams -= 1
        if i != self.nstreams:
            self.streams[i] = self.streams[self.nstreams]
        return 0

    cdef int _stream_reset(self, int i, uint32_t code, bint send) except -1:
        """Drop stream slot ``i`` (RST_STREAM sent when ``send``), telling the
        caller if it knew of it."""
        cdef uint32_t sid = self.streams[i].sid
        cdef bint announced = self.streams[i].announced
        # what the peer may still send on it counts against the connection only
        self._remove(i)
        if send:
            self._rst(sid, code)
        if announced:
            self.events.append((EV_RESET, sid, code))
        return 0

    cdef bint _recent(self, uint32_t sid) noexcept:
        cdef int i
        for i in range(RECENT):
            if self.recent[i] == sid:
                return True
        return False

    cdef int _calm(self, double now, bint reset) except -1:
        """Count a reset or a control frame; 1 when over the caps."""
        if now - self.interval_start >= self.interval:
            self.interval_start = now
            self.resets = 0
            self.control = 0
        if reset:
            self.resets += 1
            if self.resets > self.max_resets:
                return self._error(ENHANCE_YOUR_CALM, "too many stream resets")
        else:
            self.control += 1
            if self.control > self.max_control:
                return self._error(ENHANCE_YOUR_CALM, "too many control frames")
        return 0

    # ---- input ----
    def receive(self, bytes data, double now=0.0):
        """Take bytes from the client; returns the events they complete."""
        cdef Py_ssize_t n, pos, length
        cdef const uint8_t* p
        cdef int ftype, flags, r
        cdef uint32_t sid
        cdef list events
        self.events = events = []
        self.window_event = False
        if self.dead:
            return events
        if PyBytes_GET_SIZE(self.rbuf):
            data = self.rbuf + data
            self.rbuf = b""
        n = PyBytes_GET_SIZE(data)
        p = <const uint8_t*>PyBytes_AS_STRING(data)
        pos = 0
        if not self.preface_done:
            if n < 24:
                if memcmp(p, PyBytes_AS_STRING(PREFACE), n) != 0:
                    self._error(PROTOCOL_ERROR, "bad connection preface")
                    return events
                self.rbuf = data
                return events
            if memcmp(p, PyBytes_AS_STRING(PREFACE), 24) != 0:
                self._error(PROTOCOL_ERROR, "bad connection preface")
                return events
            self.preface_done = True
            pos = 24
        while n - pos >= 9:
            length = (<Py_ssize_t>p[pos] << 16) | (<Py_ssize_t>p[pos + 1] << 8) | p[pos + 2]
            if length > self.max_frame:
                self._error(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                return events
            if n - pos - 9 < length:
                break
            ftype = p[pos + 3]
            flags = p[pos + 4]
            sid = _u32(p + pos + 5) & 0x7fffffff
            r = self._frame(ftype, flags, sid, p + pos + 9, length, data, pos + 9, now)
            pos += 9 + length
            if r or self.dead:
                return events
        if pos < n:
            self.rbuf = data[pos:]
        if self.window_event:
            events.append((EV_WINDOW,))
        return events

    cdef int _frame(self, int ftype, int flags, uint32_t sid, const uint8_t* p,
                    Py_ssize_t length, bytes data, Py_ssize_t offset, double now) except -1:
        if self.cont_sid:
            if ftype != F_CONTINUATION or sid != self.cont_sid:
                return self._error(PROTOCOL_ERROR, "expected CONTINUATION")
            return self._continuation(flags, p, length, now)
        if not self.settings_seen:
            if ftype != F_SETTINGS or (flags & FL_ACK):
                return self._error(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
            self.settings_seen = True
        if ftype == F_HEADERS:
            return self._headers(flags, sid, p, length, now)
        if ftype == F_DATA:
            return self._data(flags, sid, p, length, data, offset, now)
        if ftype == F_WINDOW_UPDATE:
            return self._window(sid, p, length)
        if ftype == F_SETTINGS:
            return self._settings(flags, sid, p, length, now)
        if ftype == F_PING:
            if length != 8:
                return self._error(FRAME_SIZE_ERROR, "PING of the wrong size")
            if sid:
                return self._error(PROTOCOL_ERROR, "PING on a stream")
            if flags & FL_ACK:
                return 0
            if self._calm(now, False):
                return 1
            _reserve(&self.out, 17)
            _frame_head(self.out.p + self.out.n, 8, F_PING, FL_ACK, 0)
            memcpy(self.out.p + self.out.n + 9, p, 8)
            self.out.n += 17
            return 0
        if ftype == F_RST_STREAM:
            return self._rst_stream(sid, p, length, now)
        if ftype == F_PRIORITY:
            if sid == 0:
                return self._error(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if length != 5:
                return self._error(FRAME_SIZE_ERROR, "PRIORITY of the wrong size")
            return self._calm(now, False)
        if ftype == F_GOAWAY:
            if sid:
                return self._error(PROTOCOL_ERROR, "GOAWAY on a stream")
            if length < 8:
                return self._error(FRAME_SIZE_ERROR, "GOAWAY too short")
            self.going_away = True
            self.events.append((EV_GOAWAY, _u32(p) & 0x7fffffff, _u32(p + 4)))
            return 0
        if ftype == F_PUSH_PROMISE:
            return self._error(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        if ftype == F_CONTINUATION:
            return self._error(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        return self._calm(now, False)          # unknown types are ignored (and counted)

    cdef int _settings(self, int flags, uint32_t sid, const uint8_t* p, Py_ssize_t length,
                       double now) except -1:
        cdef Py_ssize_t i
        cdef int code, j
        cdef uint32_t value
        cdef int64_t delta
        if sid:
            return self._error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FL_ACK:
            if length:
                return self._error(FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return 0
        if length % 6:
            return self._error(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        if self._calm(now, False):
            return 1
        i = 0
        while i < length:
            code = (p[i] << 8) | p[i + 1]
            value = _u32(p + i + 2)
            i += 6
            if code == 1:
                self.encoder.set_table_size(value)
            elif code == 2:
                if value > 1:
                    return self._error(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            elif code == 4:
                if value > MAX_WINDOW:
                    return self._error(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = <int64_t>value - self.peer_initial_window
                self.peer_initial_window = value
                for j in range(self.nstreams):
                    self.streams[j].send_window += delta
                    if self.streams[j].send_window > MAX_WINDOW:
                        return self._error(FLOW_CONTROL_ERROR, "a stream window passed 2**31-1")
                if delta > 0:
                    self.window_event = True
            elif code == 5:
                if value < 16384 or value > 16777215:
                    return self._error(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        _reserve(&self.out, 9)
        _frame_head(self.out.p + self.out.n, 0, F_SETTINGS, FL_ACK, 0)
        self.out.n += 9
        return 0

    def apply_settings(self, bytes payload):
        """The client's settings from an h2c upgrade's HTTP2-Settings field
        (decoded); ValueError if malformed."""
        if PyBytes_GET_SIZE(payload) % 6:
            raise ValueError("HTTP2-Settings is not a list of settings")
        self._settings(0, 0, <const uint8_t*>PyBytes_AS_STRING(payload),
                       PyBytes_GET_SIZE(payload), 0.0)
        if self.dead:
            raise ValueError("bad HTTP2-Settings")
        self.out.n -= 9                 # no SETTINGS ack for these (RFC 7540 3.2.1)
        self.interval_start = -1e18

    def upgraded_stream(self):
        """Stream 1 holds the request that asked for the h2c upgrade (RFC
        7540 3.2): half closed (remote), its response to come."""
        cdef Stream* s = &self.streams[self.nstreams]
        s.sid = 1
        s.state = S_RECV_CLOSED
        s.send_window = self.peer_initial_window
        s.recv_window = 0
        s.recv_unacked = 0
        s.expect_length = -1
        s.announced = True
        self.nstreams += 1
        self.last_sid = 1

    cdef int _window(self, uint32_t sid, const uint8_t* p, Py_ssize_t length) except -1:
        cdef int i
        cdef int64_t inc
        if length != 4:
            return self._error(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        inc = _u32(p) & 0x7fffffff
        if sid == 0:
            if inc == 0:
                return self._error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.conn_send_window += inc
            if self.conn_send_window > MAX_WINDOW:
                return self._error(FLOW_CONTROL_ERROR, "connection window passed 2**31-1")
            self.window_event = True
            return 0
        i = self._find(sid)
        if i < 0:
            if sid > self.last_sid:
                return self._error(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return 0                    # closed: ignored
        if inc == 0:
            return self._stream_reset(i, PROTOCOL_ERROR, True)
        self.streams[i].send_window += inc
        if self.streams[i].send_window > MAX_WINDOW:
            return self._stream_reset(i, FLOW_CONTROL_ERROR, True)
        self.window_event = True
        return 0

    cdef int _rst_stream(self, uint32_t sid, const uint8_t* p, Py_ssize_t length,
                         double now) except -1:
        cdef int i
        if length != 4:
            return self._error(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if sid == 0:
            return self._error(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if sid > self.last_sid:
            return self._error(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        i = self._find(sid)
        if self._calm(now, True):
            return 1
        if i >= 0:
            self._stream_reset(i, _u32(p), False)
        return 0

    cdef int _data(self, int flags, uint32_t sid, const uint8_t* p, Py_ssize_t length,
                   bytes data, Py_ssize_t offset, double now) except -1:
        cdef int i
        cdef Py_ssize_t pad = 0, start = 0, size
        cdef Stream* s
        if sid == 0:
            return self._error(PROTOCOL_ERROR, "DATA on stream 0")
        if flags & FL_PADDED:
            if length < 1 or p[0] >= length:
                return self._error(PROTOCOL_ERROR, "bad DATA padding")
            pad = p[0] + 1                      # the Pad Length octet and the padding
            start = 1
        size = length - pad
        if length > self.conn_recv_window:
            return self._error(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.conn_recv_window -= length
        i = self._find(sid)
        if i < 0:
            if sid > self.last_sid:
                return self._error(PROTOCOL_ERROR, "DATA on an idle stream")
            self._credit_conn(length)          # closed: dropped, window given back
            if not self._recent(sid):
                self._rst(sid, STREAM_CLOSED)
            return self._calm(now, False)
        s = &self.streams[i]
        if s.state & S_RECV_CLOSED:
            self._credit_conn(length)
            self._stream_reset(i, STREAM_CLOSED, True)
            return self._calm(now, True)
        if length > s.recv_window:
            return self._error(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        s.recv_window -= length
        if pad:
            self._credit(i, pad)
        if size == 0 and not (flags & FL_END_STREAM):
            if self._calm(now, False):
                return 1
        if s.expect_length >= 0:
            s.expect_length -= size
            if s.expect_length < 0 or ((flags & FL_END_STREAM) and s.expect_length != 0):
                return self._stream_reset(i, PROTOCOL_ERROR, True)
        if flags & FL_END_STREAM:
            s.state |= S_RECV_CLOSED
        self.events.append((EV_DATA, sid, data[offset + start:offset + start + size],
                            bool(flags & FL_END_STREAM)))
        if (flags & FL_END_STREAM) and (s.state & S_SEND_CLOSED):
            self._remove(i)
        return 0

    cdef int _credit_conn(self, int64_t n) except -1:
        self.conn_recv_unacked += n
        if self.conn_recv_unacked * 2 >= self.connection_window:
            self._window_update(0, self.conn_recv_unacked)
            self.conn_recv_window += self.conn_recv_unacked
            self.conn_recv_unacked = 0
        return 0

    cdef int _credit(self, int i, int64_t n) except -1:
        cdef Stream* s = &self.streams[i]
        self._credit_conn(n)
        if s.state & S_RECV_CLOSED:
            return 0
        s.recv_unacked += n
        if s.recv_unacked * 2 >= self.initial_window:
            self._window_update(s.sid, s.recv_unacked)
            s.recv_window += s.recv_unacked
            s.recv_unacked = 0
        return 0

    def acknowledge(self, uint32_t sid, Py_ssize_t n):
        """``n`` bytes of ``sid``'s body were taken: give the windows back."""
        cdef int i = self._find(sid)
        if i >= 0:
            self._credit(i, n)
        else:
            self._credit_conn(n)

    cdef int _headers(self, int flags, uint32_t sid, const uint8_t* p, Py_ssize_t length,
                      double now) except -1:
        cdef Py_ssize_t start = 0, end = length
        if sid == 0 or not (sid & 1):
            return self._error(PROTOCOL_ERROR, "HEADERS on stream 0 or an even stream")
        if flags & FL_PADDED:
            if length < 1:
                return self._error(FRAME_SIZE_ERROR, "HEADERS too short")
            start = 1
            end = length - p[0]
        if flags & FL_PRIORITY:
            start += 5
        if end < start:
            return self._error(PROTOCOL_ERROR, "bad HEADERS padding")
        if flags & FL_END_HEADERS:
            return self._block(sid, flags, p + start, end - start, now)
        if end - start > self.max_block:
            return self._error(ENHANCE_YOUR_CALM, "header block too large")
        self.hblock = bytearray(p[start:end])
        self.cont_sid = sid
        self.cont_flags = flags
        self.cont_frames = 0
        return 0

    cdef int _continuation(self, int flags, const uint8_t* p, Py_ssize_t length,
                           double now) except -1:
        cdef bytearray block
        cdef uint32_t sid
        self.cont_frames += 1
        if self.cont_frames > self.max_continuations:
            return self._error(ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if len(self.hblock) + length > self.max_block:
            return self._error(ENHANCE_YOUR_CALM, "header block too large")
        self.hblock += p[:length]
        if not (flags & FL_END_HEADERS):
            return 0
        block = self.hblock
        self.hblock = bytearray()
        sid = self.cont_sid
        self.cont_sid = 0
        cdef bytes b = bytes(block)
        return self._block(sid, self.cont_flags, <const uint8_t*>PyBytes_AS_STRING(b),
                           PyBytes_GET_SIZE(b), now)

    cdef int _block(self, uint32_t sid, int flags, const uint8_t* p, Py_ssize_t n,
                    double now) except -1:
        """A whole header block on ``sid``."""
        cdef list fields = []
        cdef int i
        try:
            self.decoder._decode(p, n, fields, self.max_header_list_size)
        except HPACKError as exc:
            return self._error(COMPRESSION_ERROR, str(exc))
        i = self._find(sid)
        if i >= 0:                                  # trailers
            if self.streams[i].state & S_RECV_CLOSED:
                return self._error(STREAM_CLOSED, "HEADERS on a closed stream")
            if not (flags & FL_END_STREAM):
                return self._stream_reset(i, PROTOCOL_ERROR, True)
            if self.decoder.malformed or self.decoder.oversize:
                return self._stream_reset(i, PROTOCOL_ERROR, True)
            for f in fields:
                if PyBytes_GET_SIZE(f[0]) and PyBytes_AS_STRING(f[0])[0] == b':':
                    return self._stream_reset(i, PROTOCOL_ERROR, True)
            if self.streams[i].expect_length > 0:
                return self._stream_reset(i, PROTOCOL_ERROR, True)
            self.streams[i].state |= S_RECV_CLOSED
            self.events.append((EV_END, sid, fields))
            if self.streams[i].state & S_SEND_CLOSED:
                self._remove(i)
            return 0
        if sid <= self.last_sid:
            if self._recent(sid):
                return self._calm(now, False)
            for i in range(RECENT):
                if self.closed[i] == sid:
                    return self._error(STREAM_CLOSED, "HEADERS on a closed stream")
            return self._error(PROTOCOL_ERROR, "HEADERS with a stream id below the last one")
        self.last_sid = sid
        if self.going_away:
            self._rst(sid, REFUSED_STREAM)
            return 0
        if self.nstreams >= self.cap_streams:
            self._rst(sid, REFUSED_STREAM)
            return self._calm(now, True)
        if self.decoder.oversize:
            self._reply_431(sid, flags)
            return self._calm(now, True)
        if self.decoder.malformed:
            self._rst(sid, PROTOCOL_ERROR)
            return self._calm(now, True)
        return self._request(sid, flags, fields, now)

    cdef int _reply_431(self, uint32_t sid, int flags) except -1:
        cdef Py_ssize_t at
        _reserve(&self.out, 9)
        at = self.out.n
        self.out.n += 9
        self.encoder._encode(&self.out, _STATUS_431)
        _frame_head(self.out.p + at, self.out.n - at - 9, F_HEADERS,
                    FL_END_HEADERS | FL_END_STREAM, sid)
        if not (flags & FL_END_STREAM):
            self._rst(sid, NO_ERROR)
        else:
            self.recent[self.recent_pos] = sid
            self.recent_pos = (self.recent_pos + 1) % RECENT
        return 0

    cdef object _str(self, bytes b):
        cdef PyObject* hit = PyDict_GetItem(self.strs, b)
        cdef const uint8_t* p
        cdef Py_ssize_t i, n
        if hit != NULL:
            return <object>hit
        p = <const uint8_t*>PyBytes_AS_STRING(b)
        n = PyBytes_GET_SIZE(b)
        for i in range(n):
            if p[i] < 33 or p[i] > 126:
                return None
        s = b.decode("ascii")
        if len(self.strs) >= 512:
            self.strs.clear()
        self.strs[b] = s
        return s

    cdef int _request(self, uint32_t sid, int flags, list fields, double now) except -1:
        """RFC 9113 8.3.1: pseudo fields first, :method :scheme :path once
        each (not for CONNECT), no connection-specific fields."""
        cdef Py_ssize_t k, nf = PyList_GET_SIZE(fields), npseudo = 0, cookies = 0
        cdef tuple f
        cdef bytes name, value
        cdef object method = None, path = None, authority = None, scheme = None
        cdef int64_t clen = -1, v
        cdef const uint8_t* q
        cdef Py_ssize_t j
        cdef Stream* s
        cdef bint bad = False, end_stream = flags & FL_END_STREAM
        for k in range(nf):
            f = <tuple>PyList_GET_ITEM(fields, k)
            name = <bytes>PyTuple_GET_ITEM(f, 0)
            if PyBytes_AS_STRING(name)[0] == b':':
                if k != npseudo:
                    bad = True
                    break
                npseudo += 1
                value = <bytes>PyTuple_GET_ITEM(f, 1)
                if _name_is(name, ":method", 7) and method is None:
                    method = value
                elif _name_is(name, ":path", 5) and path is None:
                    path = value
                elif _name_is(name, ":authority", 10) and authority is None:
                    authority = value
                elif _name_is(name, ":scheme", 7) and scheme is None:
                    scheme = value
                else:
                    bad = True
                    break
                continue
            if PyBytes_GET_SIZE(name) == 14 and memcmp(PyBytes_AS_STRING(name), "content-length", 14) == 0:
                value = <bytes>PyTuple_GET_ITEM(f, 1)
                q = <const uint8_t*>PyBytes_AS_STRING(value)
                v = 0
                if PyBytes_GET_SIZE(value) == 0 or PyBytes_GET_SIZE(value) > 15:
                    bad = True
                    break
                for j in range(PyBytes_GET_SIZE(value)):
                    if q[j] < 48 or q[j] > 57:
                        bad = True
                        break
                    v = v * 10 + q[j] - 48
                if bad or (clen >= 0 and v != clen):
                    bad = True
                    break
                clen = v
            elif (_name_is(name, "connection", 10) or _name_is(name, "keep-alive", 10)
                  or _name_is(name, "proxy-connection", 16) or _name_is(name, "upgrade", 7)
                  or _name_is(name, "transfer-encoding", 17)):
                bad = True
                break
            elif _name_is(name, "te", 2):
                if not _name_is(<bytes>PyTuple_GET_ITEM(f, 1), "trailers", 8):
                    bad = True
                    break
            elif _name_is(name, "cookie", 6):
                cookies += 1
        if not bad:
            if method is not None and _name_is(method, "CONNECT", 7):
                if authority is None or path is not None or scheme is not None:
                    bad = True
                else:
                    path = authority
            elif method is None or path is None or scheme is None or PyBytes_GET_SIZE(path) == 0:
                bad = True
        if not bad:
            method = self._str(method)
            path = self._str(path)
            if method is None or path is None:
                bad = True
        if not bad and end_stream and clen > 0:
            bad = True
        if bad:
            self._rst(sid, PROTOCOL_ERROR)
            return self._calm(now, True)
        # the regular fields, with the authority as Host first
        if authority is not None:
            if authority is not self.last_authority:
                self.last_authority = authority
                self.last_host = (_HOST, authority)
            if npseudo:
                fields[npseudo - 1] = self.last_host
                npseudo -= 1
            else:
                fields.insert(0, self.last_host)
        if npseudo:
            del fields[:npseudo]
        if cookies > 1:
            _join_cookies(fields)
        s = &self.streams[self.nstreams]
        s.sid = sid
        s.state = S_RECV_CLOSED if end_stream else 0
        s.send_window = self.peer_initial_window
        s.recv_window = self.initial_window
        s.recv_unacked = 0
        s.expect_length = clen
        s.announced = True
        self.nstreams += 1
        self.events.append((EV_REQUEST, sid, method, path, authority, scheme, fields,
                            end_stream))
        return 0

    # ---- output ----
    def set_date(self, bytes date, bytes server=None):
        """The Date (and Server, if any) field values every response gets."""
        self.date_field = (b"date", date)
        self.server_field = (b"server", server) if server else None

    cdef int _head(self, int i, int status, object headers, Py_ssize_t body_len, bint end) except -1:
        """Encode and queue a HEADERS frame (+CONTINUATIONs) for stream slot i."""
        cdef Stream* s = &self.streams[i]
        cdef Py_ssize_t at, blen, maxf, done, piece, nframes, j
        cdef object st, cl
        cdef PyObject* hit
        cdef uint8_t* tmp
        if status < 100 or status > 999:
            raise ValueError(f"bad status {status!r}")
        self.encoder._check(headers)
        hit = PyDict_GetItem(_STATUS_BYTES, status)
        if hit == NULL:
            st = (b":status", b"%d" % status)
            _STATUS_BYTES[status] = st
        else:
            st = <object>hit
        _reserve(&self.out, 9)
        at = self.out.n
        self.out.n += 9
        self.encoder._updates(&self.out)
        self.encoder._field(&self.out, <tuple>st)
        if self.date_field is not None:
            self.encoder._field(&self.out, self.date_field)
        if self.server_field is not None:
            self.encoder._field(&self.out, self.server_field)
        for f in headers:
            name = f[0]
            if (_name_is(name, "connection", 10) or _name_is(name, "keep-alive", 10)
                    or _name_is(name, "transfer-encoding", 17) or _name_is(name, "upgrade", 7)
                    or _name_is(name, "proxy-connection", 16)
                    or (body_len >= 0 and _name_is(name, "content-length", 14))):
                continue
            self.encoder._field(&self.out, f if type(f) is tuple else tuple(f))
        if body_len >= 0:
            hit = PyDict_GetItem(_LENGTH_FIELDS, body_len)
            if hit == NULL:
                cl = (_CONTENT_LENGTH, b"%d" % body_len)
                if len(_LENGTH_FIELDS) < 1024:
                    _LENGTH_FIELDS[body_len] = cl
            else:
                cl = <object>hit
            self.encoder._field(&self.out, <tuple>cl)
        blen = self.out.n - at - 9
        maxf = self.peer_max_frame
        if blen <= maxf:
            _frame_head(self.out.p + at, blen, F_HEADERS,
                        FL_END_HEADERS | (FL_END_STREAM if end else 0), s.sid)
        else:
            # split into HEADERS + CONTINUATION frames
            nframes = (blen + maxf - 1) // maxf
            tmp = <uint8_t*>malloc(blen)
            if tmp == NULL:
                raise MemoryError()
            memcpy(tmp, self.out.p + at + 9, blen)
            self.out.n = at
            _reserve(&self.out, blen + 9 * nframes)
            done = 0
            j = 0
            while done < blen:
                piece = min(maxf, blen - done)
                _frame_head(self.out.p + self.out.n, piece,
                            F_HEADERS if j == 0 else F_CONTINUATION,
                            (FL_END_HEADERS if done + piece == blen else 0)
                            | (FL_END_STREAM if (j == 0 and end) else 0), s.sid)
                memcpy(self.out.p + self.out.n + 9, tmp + done, piece)
                self.out.n += 9 + piece
                done += piece
                j += 1
            free(tmp)
        s.state |= S_HEADERS_SENT
        if end:
            self._sent_end(i)
        return 0

    cdef int _sent_end(self, int i) except -1:
        cdef uint32_t sid = self.streams[i].sid
        cdef bint recv_closed = self.streams[i].state & S_RECV_CLOSED
        self._remove(i)
        if not recv_closed:
            # answered before the request ended: the rest of it is not wanted
            # (RFC 9113 8.1), the stream is closed with NO_ERROR
            self._rst(sid, NO_ERROR)
        return 0

    cdef Py_ssize_t _data_frames(self, int i, const uint8_t* p, Py_ssize_t n, bint end) except -1:
        """Queue DATA for stream slot i within the windows; the count taken.
        The stream is closed when all of it (and ``end``) went."""
        cdef Stream* s = &self.streams[i]
        cdef int64_t room = s.send_window
        cdef Py_ssize_t take, done = 0, piece
        if self.conn_send_window < room:
            room = self.conn_send_window
        take = n if n <= room else (room if room > 0 else 0)
        if take:
            _reserve(&self.out, take + 9 * ((take + self.peer_max_frame - 1) // self.peer_max_frame))
        while done < take:
            piece = min(self.peer_max_frame, take - done)
            _frame_head(self.out.p + self.out.n, piece, F_DATA,
                        FL_END_STREAM if (end and done + piece == n) else 0, s.sid)
            memcpy(self.out.p + self.out.n + 9, p + done, piece)
            self.out.n += 9 + piece
            done += piece
        s.send_window -= take
        self.conn_send_window -= take
        if take == n and end:
            if n == 0:
                _reserve(&self.out, 9)
                _frame_head(self.out.p + self.out.n, 0, F_DATA, FL_END_STREAM, s.sid)
                self.out.n += 9
            self._sent_end(i)
        return take

    def respond(self, uint32_t sid, int status, headers, bytes body, bint head_only=False):
        """A whole response: HEADERS (with Date, Server and Content-Length),
        then as much of ``body`` as the windows allow. Returns the number of
        body bytes queued (``len(body)``: the stream is done; fewer: send the
        rest with send_data); -1 if the stream is gone. ValueError for a bad
        status or field (nothing is queued then)."""
        cdef int i = self._find(sid)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
        if i < 0 or (self.streams[i].state & (S_SEND_CLOSED | S_HEADERS_SENT)):
            return -1
        if status < 200:
            raise ValueError(f"bad final status {status!r}")
        if head_only or n == 0 or status == 204 or status == 304:
            self._head(i, status, headers,
                       -1 if (status == 204 or status == 304) else n, True)
            return n
        self._head(i, status, headers, n, False)
        i = self._find(sid)
        return self._data_frames(i, <const uint8_t*>PyBytes_AS_STRING(body), n, True)

    def send_headers(self, uint32_t sid, int status, headers, bint end_stream=False):
        """A response head (the Date and Server fields added); False if the
        stream is gone. ValueError for a bad status or field."""
        cdef int i = self._find(sid)
        if i < 0 or (self.streams[i].state & (S_SEND_CLOSED | S_HEADERS_SENT)):
            return False
        self._head(i, status, headers, -1, end_stream)
        return True

    def send_data(self, uint32_t sid, bytes data, Py_ssize_t offset=0, bint end_stream=False):
        """Body bytes ``data[offset:]`` within the flow-control windows;
        returns the count queued (-1 if the stream is gone). With
        ``end_stream`` the stream ends once all of it went."""
        cdef int i = self._find(sid)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if i < 0 or (self.streams[i].state & S_SEND_CLOSED):
            return -1
        if offset < 0 or offset > n:
            raise ValueError("offset out of range")
        return self._data_frames(i, <const uint8_t*>PyBytes_AS_STRING(data) + offset,
                                 n - offset, end_stream)

    def send_trailers(self, uint32_t sid, headers):
        """Trailer fields, ending the stream. ValueError for a bad field."""
        cdef int i = self._find(sid)
        cdef Py_ssize_t at
        if i < 0 or (self.streams[i].state & S_SEND_CLOSED):
            return False
        self.encoder._check(headers)
        _reserve(&self.out, 9)
        at = self.out.n
        self.out.n += 9
        self.encoder._encode(&self.out, headers)
        if self.out.n - at - 9 > self.peer_max_frame:
            self.out.n = at
            raise ValueError("trailers larger than a frame")
        _frame_head(self.out.p + at, self.out.n - at - 9, F_HEADERS,
                    FL_END_HEADERS | FL_END_STREAM, self.streams[i].sid)
        self._sent_end(i)
        return True

    def reset_stream(self, uint32_t sid, uint32_t code=CANCEL):
        """Reset ``sid`` (if open) with ``code``."""
        cdef int i = self._find(sid)
        if i >= 0:
            self.streams[i].announced = False
            self._stream_reset(i, code, True)

    def window(self, uint32_t sid):
        """How many body bytes ``sid`` may send now (-1: the stream is gone)."""
        cdef int i = self._find(sid)
        if i < 0:
            return -1
        return max(0, min(self.streams[i].send_window, self.conn_send_window))

    def is_open(self, uint32_t sid):
        return self._find(sid) >= 0

    def goaway(self, uint32_t code=NO_ERROR):
        """Graceful GOAWAY: streams up to the last one seen are finished, new
        ones refused."""
        if not self.sent_goaway and not self.dead:
            self.sent_goaway = True
            self._goaway(code, b"")
        self.going_away = True

    def data_to_send(self):
        """Everything queued, as one bytes object (b"" when nothing is)."""
        if self.out.n == 0:
            return b""
        cdef bytes b = PyBytes_FromStringAndSize(<char*>self.out.p, self.out.n)
        self.out.n = 0
        if self.out.cap > 1 << 20:
            free(self.out.p)
            self.out.p = NULL
            self.out.cap = 0
        return b


cdef int _join_cookies(list fields) except -1:
    """RFC 9113 8.2.3: split cookie fields become one, joined with '; '."""
    cdef list parts = []
    cdef Py_ssize_t k = 0, first = -1
    while k < len(fields):
        f = fields[k]
        if f[0] == _COOKIE:
            parts.append(f[1])
            if first < 0:
                first = k
                k += 1
            else:
                del fields[k]
        else:
            k += 1
    fields[first] = (_COOKIE, b"; ".join(parts))
    return 0
