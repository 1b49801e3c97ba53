# cython: language_level=3
"""The request-head scanner's C entry point (see httphead.pyx)."""

cdef tuple parse_head_c(const unsigned char* p, Py_ssize_t end, Py_ssize_t max_line)
