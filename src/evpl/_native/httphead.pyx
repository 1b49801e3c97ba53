# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""An HTTP/1.1 request-head scanner in C: the hot half of evpl.http.wire.

``parse_head(buf, start, end, max_line)`` checks and splits one request head
(the bytes ``buf[start:end]``, ending with the empty line) exactly as the regular
expressions of ``evpl.http.wire`` do, byte class by byte class, and returns
``(method, target, minor, headers)`` with lower-cased header names, or
``(status, reason)`` for a head to refuse. ``wire.RequestParser`` takes it as
its ``head_parser`` (the server passes it in; wire.py itself imports nothing
from the engine), and the tests hold the two to the same answers.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeASCII

cdef unsigned char TCHAR[256]
cdef unsigned char VCHAR[256]     # field-value bytes: HTAB, SP, VCHAR, obs-text
cdef unsigned char TARGET[256]    # request-target bytes: VCHAR
cdef unsigned char LOWER[256]


cdef void _tables():
    cdef int c
    for c in range(256):
        TCHAR[c] = 0
        VCHAR[c] = 0
        TARGET[c] = 0
        LOWER[c] = c
    for c in range(ord("0"), ord("9") + 1):
        TCHAR[c] = 1
    for c in range(ord("a"), ord("z") + 1):
        TCHAR[c] = 1
    for c in range(ord("A"), ord("Z") + 1):
        TCHAR[c] = 1
        LOWER[c] = c + 32
    for c in b"!#$%&'*+-.^_`|~":
        TCHAR[c] = 1
    for c in range(0x21, 0x7F):
        VCHAR[c] = 1
        TARGET[c] = 1
    for c in range(0x80, 0x100):
        VCHAR[c] = 1
    VCHAR[0x20] = 1
    VCHAR[0x09] = 1


_tables()


cdef tuple _line_problem(const unsigned char* p, Py_ssize_t n):
    """Why a header line (``n`` bytes up to the next CRLF) is refused: the
    same words as the pure-Python parser."""
    cdef Py_ssize_t i = 0
    if n and (p[0] == 0x20 or p[0] == 0x09):
        return (400, "obsolete line folding")
    while i < n and p[i] != 0x3A:
        i += 1
    if i == n:
        return (400, "header line without a colon")
    cdef Py_ssize_t k
    for k in range(i):
        if not TCHAR[p[k]]:
            return (400, f"invalid header name {bytes(p[:min(i, 40)])!r}")
    if i == 0:
        return (400, "invalid header name b''")
    for k in range(i, n):
        if p[k] == 0x0D or p[k] == 0x0A:
            return (400, "bare CR or LF in a header")
    return (400, "control character in a header value")


def parse_head(const unsigned char[:] view, Py_ssize_t start, Py_ssize_t end,
               Py_ssize_t max_line):
    """Check and split the request head ``view[start:end]`` (see the module doc)."""
    if start < 0 or end > view.shape[0] or end - start < 4:
        return (400, "malformed request line")
    return parse_head_c(&view[start], end - start, max_line)


cdef tuple parse_head_c(const unsigned char* p, Py_ssize_t end, Py_ssize_t max_line):
    """``parse_head`` on the ``end`` bytes at ``p`` (at least 4)."""
    cdef Py_ssize_t i = 0, j, k, name_end, vstart, vend, line_end
    cdef unsigned char major, minor
    cdef list headers = []
    cdef bytes name
    cdef char* out
    # request line: method SP target SP HTTP/d.d CRLF
    while i < end and TCHAR[p[i]]:
        i += 1
    j = i
    if i == 0 or i >= end or p[i] != 0x20:
        return _bad_line(p, end, max_line)
    i += 1
    k = i
    while i < end and TARGET[p[i]]:
        i += 1
    if i == k or i + 11 > end or p[i] != 0x20:
        return _bad_line(p, end, max_line)
    method = PyUnicode_DecodeASCII(<const char*>p, j, NULL)
    target = PyUnicode_DecodeASCII(<const char*>p + k, i - k, NULL)
    i += 1
    if not (p[i] == 0x48 and p[i + 1] == 0x54 and p[i + 2] == 0x54 and p[i + 3] == 0x50
            and p[i + 4] == 0x2F and 0x30 <= p[i + 5] <= 0x39 and p[i + 6] == 0x2E
            and 0x30 <= p[i + 7] <= 0x39 and p[i + 8] == 0x0D and p[i + 9] == 0x0A):
        return _bad_line(p, end, max_line)
    major = p[i + 5]
    minor = p[i + 7]
    i += 10
    if i > max_line + 2:
        return (414, f"request line longer than {max_line} bytes")
    if major != 0x31 or (minor != 0x30 and minor != 0x31):
        return (505, f"HTTP/{chr(major)}.{chr(minor)} is not supported")
    # field lines up to the empty line
    while True:
        if i + 2 > end:
            return (400, "malformed header block")
        if p[i] == 0x0D and p[i + 1] == 0x0A:
            i += 2
            break
        k = i
        while i < end and TCHAR[p[i]]:
            i += 1
        name_end = i
        if name_end == k or i >= end or p[i] != 0x3A:
            return _line_problem(p + k, _line_len(p, k, end))
        i += 1
        while i < end and (p[i] == 0x20 or p[i] == 0x09):
            i += 1
        vstart = i
        while i < end and VCHAR[p[i]]:
            i += 1
        if i + 1 >= end or p[i] != 0x0D or p[i + 1] != 0x0A:
            return _line_problem(p + k, _line_len(p, k, end))
        vend = i
        while vend > vstart and (p[vend - 1] == 0x20 or p[vend - 1] == 0x09):
            vend -= 1
        i += 2
        name = PyBytes_FromStringAndSize(NULL, name_end - k)
        out = PyBytes_AS_STRING(name)
        for j in range(name_end - k):
            out[j] = <char>LOWER[p[k + j]]
        headers.append((name, PyBytes_FromStringAndSize(<const char*>p + vstart,
                                                        vend - vstart)))
    if i != end:
        return (400, "malformed header block")
    return (method, target, minor - 0x30, headers)


cdef Py_ssize_t _line_len(const unsigned char* p, Py_ssize_t k, Py_ssize_t end) noexcept:
    """Bytes from ``k`` to the next CRLF (or to ``end``)."""
    cdef Py_ssize_t i = k
    while i + 1 < end and not (p[i] == 0x0D and p[i + 1] == 0x0A):
        i += 1
    return i - k


cdef tuple _bad_line(const unsigned char* p, Py_ssize_t end, Py_ssize_t max_line):
    if _line_len(p, 0, end) > max_line:
        return (414, f"request line longer than {max_line} bytes")
    return (400, "malformed request line")
