# cython: language_level=3
"""Pooled, refcounted receive and send memory (see buffers.pyx)."""

cdef struct Chunk:
    char* data
    size_t size
    int refs
    int heap
    Chunk* next_free


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
    cdef Chunk* free_list
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
