# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Engine-side framing parameters.

A Framer says where one message ends in a byte stream: the built-in kinds
(length prefix, ONC RPC record marking) are scanned in C by the inline
scanners of framing.pxd; a callable framer asks Python. The reassembler that
turns received bytes into whole messages with these scanners is the receive
half of every stream Bind (bind.pyx), shared by all backends.
"""


cdef class Framer:
    """Engine-side framing parameters (built by ``evpl.framing``)."""

    def __init__(self, int kind, int size=4, bint big=True, bint includes_header=False,
                 size_t max_message=64 << 20, fn=None):
        self.kind = kind
        self.size = size
        self.big = big
        self.includes_header = includes_header
        self.max_message = max_message
        self.fn = fn
