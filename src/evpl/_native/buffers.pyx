# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Buffer pool: slabs allocated once, cut into equal buffers, handed out as
refcounted chunks.

A chunk's refcount counts the engine's own holds (the loop's receive cursor, a
Bind's partial message) plus one per live :class:`Buffer` that slices it. A
Buffer releases its hold when Python drops the last reference to it, so Python
object lifetime is the ownership model and nothing needs an explicit free.
Messages larger than one buffer are carried by exact-size heap chunks that
count against the same memory limit.

Free buffers sit on one of two lists. The warm list (LIFO, so the buffers
just released are reused first and stay in cache and in the page tables)
holds buffers whose pages may be resident; the clean list holds buffers whose
pages were dropped with madvise(MADV_DONTNEED), or never touched (a new
slab). Trimming moves the coldest warm buffers to the clean list: their
pages go back to the kernel, the mapping stays (backends register slab
addresses with the kernel), and the next write to them faults in zeroed pages.
"""

from cpython.buffer cimport PyBuffer_FillInfo, PyBUF_WRITABLE
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.object cimport PyTypeObject
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF
from libc.errno cimport errno
from libc.stdint cimport SIZE_MAX
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
cimport cython

from evpl.errors import ConfigError, PoolExhausted

cdef extern from "<sys/mman.h>":
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void* addr, size_t length) nogil
    int madvise(void* addr, size_t length, int advice) nogil
    int mincore(void* addr, size_t length, unsigned char* vec) nogil
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_HUGETLB, MADV_HUGEPAGE
    int MADV_DONTNEED
    void* MAP_FAILED

cdef extern from "<unistd.h>":
    long sysconf(int name) nogil
    int _SC_PAGESIZE


cdef class Pool:
    """A pool of equal buffers carved from slabs that are allocated on demand.

    ``slab_size`` bytes are mapped at a time (with ``huge_pages`` the slab is
    asked for with MAP_HUGETLB and falls back to transparent huge pages), up
    to ``max_bytes`` in total, slabs plus heap chunks. Slabs are kept once
    mapped: that is what lets backends register them with the kernel.

    Idle memory is bounded: whenever free buffers that may hold resident
    pages add up to more than ``trim_above`` bytes (None: never), ``put``
    drops the pages of the coldest of them, so idle buffers never keep more
    than ``trim_above`` bytes resident. :meth:`trim` drops the pages of every
    free buffer beyond the ``keep_bytes`` most recently used; a loop calls it
    once it has been idle for a while.
    """

    def __init__(self, *, size_t slab_size=64 << 20, size_t buffer_size=2 << 20,
                 size_t max_bytes=1 << 30, bint huge_pages=False,
                 size_t keep_bytes=8 << 20, trim_above=64 << 20):
        if buffer_size < 4096 or buffer_size % 4096:
            raise ConfigError(f"buffer_size must be a multiple of 4096, got {buffer_size}")
        if slab_size < buffer_size or slab_size % buffer_size:
            raise ConfigError(
                f"slab_size ({slab_size}) must be a multiple of buffer_size ({buffer_size})")
        if max_bytes < slab_size:
            raise ConfigError(f"max_bytes ({max_bytes}) must be at least slab_size ({slab_size})")
        if trim_above is not None:
            if not isinstance(trim_above, int) or isinstance(trim_above, bool) or trim_above < 0:
                raise ConfigError(f"trim_above must be None or an int >= 0, got {trim_above!r}")
            if trim_above < keep_bytes:
                raise ConfigError(
                    f"trim_above ({trim_above}) must be at least keep_bytes ({keep_bytes})")
        self.buffer_size = buffer_size
        self.slab_size = slab_size
        self.max_bytes = max_bytes
        self.huge_pages = huge_pages
        self.keep_bytes = keep_bytes
        self.trim_above_set = trim_above is not None
        self.trim_above_bytes = trim_above if trim_above is not None else 0
        self.auto_keep = self.trim_above_bytes // buffer_size if self.trim_above_set else SIZE_MAX

    @property
    def trim_above(self):
        """Idle bytes above which released buffers are trimmed at once (None:
        never)."""
        return self.trim_above_bytes if self.trim_above_set else None

    def __dealloc__(self):
        cdef size_t i
        if self.slabs != NULL:
            for i in range(self.nslabs):
                munmap(self.slabs[i].base, self.slab_size)
                PyMem_Free(self.slabs[i].descs)
            PyMem_Free(self.slabs)
            self.slabs = NULL

    cdef int _grow(self) noexcept:
        cdef size_t n, i
        cdef void* p
        cdef Slab* slabs
        cdef Chunk* descs
        if (self.nslabs + 1) * self.slab_size + self.heap_bytes > self.max_bytes:
            return -1
        slabs = <Slab*>PyMem_Realloc(self.slabs, (self.nslabs + 1) * sizeof(Slab))
        if slabs == NULL:
            return -1
        self.slabs = slabs
        p = MAP_FAILED
        if self.huge_pages:
            p = mmap(NULL, self.slab_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
            if p != MAP_FAILED:
                self.huge_used = True
        if p == MAP_FAILED:
            p = mmap(NULL, self.slab_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if p == MAP_FAILED:
                return -1
            if self.huge_pages:
                madvise(p, self.slab_size, MADV_HUGEPAGE)
        n = self.slab_size // self.buffer_size
        descs = <Chunk*>PyMem_Malloc(n * sizeof(Chunk))
        if descs == NULL:
            munmap(p, self.slab_size)
            return -1
        for i in range(n):
            descs[i].data = <char*>p + i * self.buffer_size
            descs[i].size = self.buffer_size
            descs[i].refs = 0
            descs[i].heap = 0
            descs[i].prev_free = NULL
            descs[i].next_free = self.clean_list      # untouched: nothing resident
            self.clean_list = &descs[i]
        self.nclean += n
        self.slabs[self.nslabs].base = <char*>p
        self.slabs[self.nslabs].descs = descs
        self.nslabs += 1
        self.nbuffers += n
        return 0

    cdef Chunk* get(self) noexcept:
        """One pool buffer with refcount 1, or NULL when the limit is reached.
        Warm buffers (most recently released first) before clean ones."""
        cdef Chunk* c = self.free_list
        if (self.in_use + 1) * self.buffer_size + self.heap_bytes > self.max_bytes:
            self.exhausted += 1         # heap chunks count against the limit too
            return NULL
        if c != NULL:
            self.free_list = c.next_free
            if self.free_list != NULL:
                self.free_list.prev_free = NULL
            else:
                self.free_tail = NULL
            self.nwarm -= 1
        else:
            if self.clean_list == NULL and self._grow() < 0:
                self.exhausted += 1
                return NULL
            c = self.clean_list
            self.clean_list = c.next_free
            self.nclean -= 1
        c.refs = 1
        self.in_use += 1
        return c

    cdef Chunk* get_heap(self, size_t size) noexcept:
        """An exact-size chunk for a message larger than one buffer. The limit
        counts memory held (buffers in use plus heap chunks), not slabs that
        are mapped but free."""
        if self.in_use * self.buffer_size + self.heap_bytes + size > self.max_bytes:
            self.exhausted += 1
            return NULL
        return self._heap(size, 1)

    cdef Chunk* get_heap_forced(self, size_t size, size_t credit=0) noexcept:
        """An exact-size chunk past ``max_bytes``, to complete one message
        whose parts already sit in pool memory (a progress guarantee). Such
        chunks together stay under max(2 buffers, max_bytes / 8), except that
        one such chunk of any size is always allowed (one message at a time
        can always be completed). ``credit``: forced bytes the caller is about
        to free (the chunk this one replaces)."""
        cdef size_t cap = max(2 * self.buffer_size, self.max_bytes // 8)
        cdef size_t held = self.forced_bytes - min(credit, self.forced_bytes)
        if held and held + size > cap:
            self.exhausted += 1
            return NULL
        return self._heap(size, 2)

    cdef Chunk* _heap(self, size_t size, int kind) noexcept:
        cdef Chunk* c
        c = <Chunk*>malloc(sizeof(Chunk) + size)
        if c == NULL:
            self.exhausted += 1
            return NULL
        c.data = (<char*>c) + sizeof(Chunk)
        c.size = size
        c.refs = 1
        c.heap = kind
        c.next_free = NULL
        self.heap_in_use += 1
        self.heap_bytes += size
        if kind == 2:
            self.forced_bytes += size
        return c

    cdef Chunk* get_size(self, size_t size) noexcept:
        if size <= self.buffer_size:
            return self.get()
        return self.get_heap(size)

    cdef void put(self, Chunk* c) noexcept:
        self.releases += 1
        if c.heap:
            self.heap_in_use -= 1
            self.heap_bytes -= c.size
            if c.heap == 2:
                self.forced_bytes -= c.size
            free(c)
            return
        c.prev_free = NULL
        c.next_free = self.free_list
        if self.free_list != NULL:
            self.free_list.prev_free = c
        else:
            self.free_tail = c
        self.free_list = c
        self.nwarm += 1
        self.in_use -= 1
        if self.nwarm > self.auto_keep and not self.pinned:
            self._trim_to(self.auto_keep)     # one buffer: the coldest

    cdef size_t trim_idle(self, size_t keep_bytes) noexcept:
        """Drop the pages of the free buffers beyond the ``keep_bytes`` most
        recently released ones; the bytes released. For the loop, once it
        has been idle for a while (see ``pool_trim_wanted``)."""
        return self._trim_to(keep_bytes // self.buffer_size)

    cdef size_t _trim_to(self, size_t keep) noexcept:
        """Move the coldest warm buffers to the clean list until ``keep`` are
        left, dropping their pages (the mapping stays). Safe only for pages
        that nothing else writes to: a free buffer has no reader or writer
        left, and the io_uring rings copy into the buffers they hold (not in
        the free lists); memory the kernel pins (registered buffers, an AF_XDP
        UMEM) must set ``pinned``, because dropping a pinned page would leave
        the kernel's pin and our mapping on different pages."""
        cdef Chunk* c
        cdef size_t released = 0
        if self.pinned:
            return 0
        while self.nwarm > keep:
            c = self.free_tail
            if madvise(c.data, c.size, MADV_DONTNEED) != 0:
                # e.g. a MAP_HUGETLB slab with buffers smaller than its pages:
                # such memory cannot be trimmed, stop trying on every put()
                self.trim_errors += 1
                self.auto_keep = SIZE_MAX
                break
            self.free_tail = c.prev_free
            if self.free_tail != NULL:
                self.free_tail.next_free = NULL
            else:
                self.free_list = NULL
            self.nwarm -= 1
            c.prev_free = NULL
            c.next_free = self.clean_list
            self.clean_list = c
            self.nclean += 1
            released += c.size
        self.trimmed_bytes += released
        return released

    cdef size_t trim_tail(self, Chunk* c, size_t offset) noexcept:
        """Drop the pages of pool buffer ``c`` (in use) from ``offset``,
        rounded up to a page, to its end; the bytes released. For a buffer
        handed to the kernel to fill from ``offset`` on (an io_uring provided
        buffer), while it is certain that nothing writes into it concurrently:
        the bytes before ``offset`` are kept, later writes fault in zeroed
        pages. The io_uring stream ring's buffers at an idle point are the
        use (docs/engine.md, "Returning memory")."""
        cdef size_t page = <size_t>sysconf(_SC_PAGESIZE)
        cdef size_t start = (offset + page - 1) // page * page
        if self.pinned or c.heap or start >= c.size:
            return 0
        if madvise(c.data + start, c.size - start, MADV_DONTNEED) != 0:
            self.trim_errors += 1
            return 0
        self.trimmed_bytes += c.size - start
        return c.size - start

    def _trim_tail(self, Buffer buf, size_t offset) -> int:
        """Testing hook for ``trim_tail``: drop the pages of the pool buffer
        under ``buf`` (allocated from this pool) from ``offset`` on."""
        if buf.pool is not self or buf.chunk == NULL or buf.chunk.heap:
            raise ValueError("not a buffer of this pool")
        return self.trim_tail(buf.chunk, offset)

    def trim(self, keep_bytes=None) -> int:
        """Give the pages of idle buffers back to the kernel: every free
        buffer beyond the ``keep_bytes`` (default: the pool's ``keep_bytes``)
        most recently released ones. The slabs stay mapped; a trimmed buffer
        is reused after the warm ones and costs page faults when next
        written. Returns the bytes released (0 when the pool is ``pinned``)."""
        cdef size_t keep
        if keep_bytes is None:
            keep = self.keep_bytes
        elif keep_bytes < 0:
            raise ValueError("keep_bytes must be >= 0")
        else:
            keep = keep_bytes
        return self.trim_idle(keep)

    def allocate(self, Py_ssize_t size) -> Buffer:
        """A writable Buffer of ``size`` bytes, to build a message in place
        and send it without a copy. Raises PoolExhausted at the limit."""
        if size < 0:
            raise ValueError("size must be >= 0")
        cdef Chunk* c = self.get_size(<size_t>size if size else 1)
        if c == NULL:
            raise PoolExhausted(f"buffer pool limit reached ({self.max_bytes} bytes)")
        cdef Buffer b = make_buffer(self, c, c.data, size)
        chunk_unref(self, c)
        b.writable = True
        return b

    cdef tuple _residency(self):
        """(resident bytes of every slab, resident bytes of free buffers),
        from mincore()."""
        cdef size_t page = <size_t>sysconf(_SC_PAGESIZE)
        cdef size_t npages = self.slab_size // page, per = self.buffer_size // page
        cdef size_t s, i, j, k, total = 0, idle = 0
        cdef unsigned char* vec
        if self.nslabs == 0:
            return 0, 0
        vec = <unsigned char*>PyMem_Malloc(npages)
        if vec == NULL:
            raise MemoryError()
        try:
            for s in range(self.nslabs):
                if mincore(self.slabs[s].base, self.slab_size, vec) != 0:
                    raise OSError(errno, "mincore of a pool slab")
                for i in range(self.slab_size // self.buffer_size):
                    k = 0
                    for j in range(i * per, (i + 1) * per):
                        k += vec[j] & 1
                    total += k * page
                    if self.slabs[s].descs[i].refs == 0:
                        idle += k * page
        finally:
            PyMem_Free(vec)
        return total, idle

    def stats(self) -> dict:
        """Counters and memory figures (see docs/api.md, "Buffers")."""
        resident, idle = self._residency()
        return {
            "slabs": self.nslabs,
            "buffers": self.nbuffers,
            "buffers_in_use": self.in_use,
            "bytes_in_use": self.in_use * self.buffer_size + self.heap_bytes,
            "heap_in_use": self.heap_in_use,
            "heap_bytes": self.heap_bytes,
            "forced_bytes": self.forced_bytes,
            "slab_bytes": self.nslabs * self.slab_size,
            "buffer_size": self.buffer_size,
            "max_bytes": self.max_bytes,
            "exhausted": self.exhausted,
            "huge_pages": bool(self.huge_used),
            "idle_warm_bytes": self.nwarm * self.buffer_size,
            "idle_clean_bytes": self.nclean * self.buffer_size,
            "resident_bytes": resident,
            "idle_resident_bytes": idle,
            "trimmed_bytes": self.trimmed_bytes,
            "trim_errors": self.trim_errors,
        }

    def __repr__(self):
        return (f"<evpl.Pool slabs={self.nslabs} buffers={self.nbuffers} "
                f"in_use={self.in_use} heap_in_use={self.heap_in_use}>")


# Buffers come and go once per message, so they are made and freed here, not
# by Cython's generated tp_new/tp_dealloc: those would run __cinit__ and
# argument checks, and save and restore the exception state around
# __dealloc__ (about 120 instructions a Buffer, a fifth of a small echoed
# message's user-space cost). BufferObj is the C struct Cython generates
# for the class below; it is accessed without reference counting, which the
# deallocator needs (the object is already at refcount zero there).
cdef extern from *:
    ctypedef struct BufferObj "struct __pyx_obj_4evpl_7_native_7buffers_Buffer":
        void* pool
        Chunk* chunk
        char* ptr
        Py_ssize_t length
        bint writable
        Py_ssize_t exports
    PyObject* PyObject_Init(PyObject* o, PyTypeObject* t)

cdef enum:
    BUFFER_FREELIST = 1024      # dead Buffer objects kept for reuse

cdef PyObject* buffer_free[BUFFER_FREELIST]
cdef int buffer_nfree = 0


cdef Buffer make_buffer(Pool pool, Chunk* c, char* ptr, Py_ssize_t n):
    cdef PyObject* o
    cdef BufferObj* b
    cdef Buffer r
    global buffer_nfree
    if buffer_nfree == 0:
        return _new_buffer(pool, c, ptr, n)
    buffer_nfree -= 1
    o = buffer_free[buffer_nfree]
    b = <BufferObj*>o
    b.chunk = c
    b.ptr = ptr
    b.length = n
    b.writable = False
    b.exports = 0
    b.pool = <void*>pool
    Py_INCREF(pool)
    c.refs += 1
    PyObject_Init(o, <PyTypeObject*>Buffer)      # refcount 1: ours
    r = <Buffer>o                                # +1
    Py_DECREF(r)                                 # back to ours alone
    return r


cdef Buffer _new_buffer(Pool pool, Chunk* c, char* ptr, Py_ssize_t n):
    """make_buffer with an empty free list: a fresh object."""
    cdef Buffer b = Buffer.__new__(Buffer)
    b.pool = pool
    b.chunk = c
    b.ptr = ptr
    b.length = n
    c.refs += 1
    return b


cdef void buffer_dealloc(PyObject* o) noexcept:
    """Buffer's tp_dealloc: the chunk back to the pool (when this was its
    last reference), then the object to the free list."""
    global buffer_nfree
    cdef BufferObj* b = <BufferObj*>o
    cdef PyObject* pool = <PyObject*>b.pool
    if b.chunk != NULL:
        chunk_unref(<Pool>pool, b.chunk)
        b.chunk = NULL
    b.pool = NULL
    Py_XDECREF(pool)
    if buffer_nfree < BUFFER_FREELIST:
        buffer_free[buffer_nfree] = o
        buffer_nfree += 1
    else:
        (<PyTypeObject*>Buffer).tp_free(o)


# no_gc: a Buffer refers to nothing but its Pool, which refers to no Python
# object, so no reference cycle can run through a Buffer; leaving Buffers out
# of the garbage collector saves tracking every one and the collections that
# many short-lived Buffers would trigger
@cython.final
@cython.no_gc
cdef class Buffer:
    """A slice of pooled memory, with the buffer protocol and no copy.

    ``memoryview(buf)``, ``bytes(buf)``, ``struct.unpack_from(fmt, buf)`` and
    slicing (which shares the memory) all work. Received buffers are
    read-only; :meth:`Pool.allocate` hands out writable ones. The memory goes
    back to the pool when the last reference to the Buffer (or to a
    memoryview of it) is dropped.
    """

    # no __cinit__ or __dealloc__: a new Buffer's fields are zeroed by its
    # allocation, make_buffer fills them in, and buffer_dealloc (installed
    # below) releases them

    def __getbuffer__(self, Py_buffer* view, int flags):
        if (flags & PyBUF_WRITABLE) and not self.writable:
            raise BufferError("evpl.Buffer is read-only")
        PyBuffer_FillInfo(view, self, self.ptr, self.length, not self.writable, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    def __len__(self):
        return self.length

    def __bytes__(self):
        return self.ptr[:self.length]

    def __getitem__(self, idx):
        cdef Py_ssize_t start, stop, step, n, i
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.length)
            if step != 1:
                return bytes(self)[idx]
            n = stop - start if stop > start else 0
            b = make_buffer(self.pool, self.chunk, self.ptr + start, n)
            (<Buffer>b).writable = self.writable
            return b
        i = idx
        if i < 0:
            i += self.length
        if i < 0 or i >= self.length:
            raise IndexError("evpl.Buffer index out of range")
        return <unsigned char>self.ptr[i]

    def __eq__(self, other):
        try:
            return memoryview(self) == memoryview(other)
        except TypeError:
            return NotImplemented

    __hash__ = None

    @property
    def readonly(self) -> bool:
        return not self.writable

    def tobytes(self) -> bytes:
        """A copy of the contents as ``bytes``."""
        return self.ptr[:self.length]

    def __repr__(self):
        if self.length <= 32:
            return f"<evpl.Buffer {self.length} bytes {self.tobytes()!r}>"
        return f"<evpl.Buffer {self.length} bytes {self.ptr[:32]!r}...>"


(<PyTypeObject*>Buffer).tp_dealloc = buffer_dealloc
