# cython: language_level=3
"""Pooled, refcounted receive and send memory (see buffers.pyx)."""

cdef struct Chunk:
    char* data
    size_t size
    int refs
    int heap
    Chunk* next_free
    Chunk* prev_free        # the warm free list is doubly linked (trimmed from its tail)


cdef struct Slab:
    char* base          # slab_size bytes, mmap'd
    Chunk* descs        # the chunk descriptors that cut it up


cdef class Pool:
    cdef readonly size_t buffer_size
    cdef readonly size_t slab_size
    cdef readonly size_t max_bytes
    cdef readonly bint huge_pages
    # A C array, not a list of objects: the Pool holds no Python object, so it
    # is not tracked by the garbage collector, which therefore can never clear
    # (unmap) its slabs while a Buffer, Bind or loop still uses their chunks.
    # The slabs go only in __dealloc__, after the last holder is gone.
    cdef Slab* slabs
    cdef readonly size_t keep_bytes
    cdef size_t trim_above_bytes
    cdef bint trim_above_set    # False: trim_above=None, no automatic trimming
    cdef readonly bint pinned   # slab pages pinned by the kernel: never trim (see trim_idle)
    cdef Chunk* free_list       # warm free buffers, most recently released first
    cdef Chunk* free_tail       # ... and the coldest of them
    cdef Chunk* clean_list      # free buffers whose pages were dropped or never touched
    cdef size_t nwarm
    cdef size_t nclean
    cdef size_t auto_keep       # put() trims the warm list down to this many buffers
    cdef size_t trimmed_bytes
    cdef size_t trim_errors
    cdef size_t nslabs
    cdef size_t nbuffers
    cdef size_t in_use
    cdef size_t heap_in_use
    cdef size_t heap_bytes
    cdef size_t forced_bytes
    cdef size_t exhausted
    cdef size_t releases
    cdef bint huge_used
    cdef Chunk* get(self) noexcept
    cdef Chunk* get_heap(self, size_t size) noexcept
    cdef Chunk* get_heap_forced(self, size_t size, size_t credit=*) noexcept
    cdef Chunk* _heap(self, size_t size, int kind) noexcept
    cdef Chunk* get_size(self, size_t size) noexcept
    cdef void put(self, Chunk* c) noexcept
    cdef int _grow(self) noexcept
    cdef size_t trim_idle(self, size_t keep_bytes) noexcept
    cdef size_t _trim_to(self, size_t keep) noexcept
    cdef size_t trim_tail(self, Chunk* c, size_t offset) noexcept
    cdef tuple _residency(self)


cdef inline bint pool_trim_wanted(Pool pool) noexcept:
    """True when ``pool.trim_idle(pool.keep_bytes)`` would release something:
    more than ``keep_bytes`` of free buffers may hold resident pages. Cheap
    (no system call), for a loop deciding whether to wake up to trim."""
    return (not pool.pinned and pool.trim_errors == 0 and pool.nwarm > 0
            and pool.nwarm * pool.buffer_size > pool.keep_bytes)


cdef class Buffer:
    cdef Pool pool
    cdef Chunk* chunk
    cdef char* ptr
    cdef Py_ssize_t length
    cdef bint writable
    cdef Py_ssize_t exports


cdef Buffer make_buffer(Pool pool, Chunk* c, char* ptr, Py_ssize_t n)


cdef inline void chunk_unref(Pool pool, Chunk* c) noexcept:
    c.refs -= 1
    if c.refs == 0:
        pool.put(c)
