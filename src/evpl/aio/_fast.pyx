# cython: language_level=3, binding=True
"""``StreamTransport``'s per-read and per-write methods, compiled.

They run once per read and once per ``transport.write``: as Python
methods they were two interpreter frames around the one frame that matters
(the protocol's ``data_received``), which is what uvloop saves by being
Cython. They are plain functions bound as methods of the Python class
(``binding=True``), so the transport keeps its asyncio base classes and
its attributes; only the frames go. Behaviour is the Python version's,
line for line.
"""

from asyncio import constants
from asyncio.log import logger

from cpython.bytes cimport PyBytes_FromStringAndSize

from evpl._native.bind cimport Bind
from evpl._native.buffers cimport Buffer
from evpl._native.loop cimport LoopCore

from evpl.errors import EvplError


def on_data(self, bind, data):
    """A read: ``data_received(bytes)`` (a copy, as asyncio promises), or
    the BufferedProtocol's buffers filled. ``_recv`` is the protocol's
    ``data_received`` while plain bytes are delivered (not closing, not a
    BufferedProtocol): one attribute read on the common path."""
    recv = _field(self, S_RECV) if _is_stream(self) else self._recv
    try:
        if recv is not None and type(data) is Buffer:
            recv(PyBytes_FromStringAndSize((<Buffer>data).ptr, (<Buffer>data).length))
            return
        if self._closing:
            return
        if self._buffered:
            self._feed_buffered(data)
        else:
            self._protocol.data_received(bytes(data))
    except (SystemExit, KeyboardInterrupt) as exc:
        self._loop._stash(exc)
    except BaseException as exc:
        self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")


def write(self, data):
    """Queue ``data`` on the Bind (bytes are sent from where they lie,
    mutable buffers copied once); dropped, with asyncio's warning after a
    few, once the connection is lost. ``_wbind`` is the Bind while writes
    go straight to it (no write_eof, no sendfile running): one attribute
    read on the common path."""
    if type(data) is not bytes and not isinstance(data, (bytearray, memoryview)):
        raise TypeError(f"data argument must be a bytes-like object, "
                        f"not {type(data).__name__!r}")
    wbind = _field(self, S_WBIND) if _is_stream(self) else self._wbind
    if wbind is not None and data:
        try:
            if isinstance(wbind, Bind):
                (<Bind>wbind)._send_data(data)
            else:
                wbind.send(data)
            return
        except EvplError:
            pass        # closed meanwhile: the full checks below
    if self._eof:
        raise RuntimeError(self._write_refused())
    if not data:
        return
    bind = self._bind
    if not self._conn_lost and bind is not None:
        try:
            bind.send(data)
            return
        except EvplError:
            if not bind.closed and not self._closing:
                raise
    # the connection is gone (or going): asyncio drops the data, and warns
    # once a program keeps writing
    if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
        logger.warning("socket.send() raised exception.")
    self._conn_lost += 1


# ---- callbacks and timers -----------------------------------------------------

from asyncio import events, format_helpers
from contextvars import copy_context

from cpython.ref cimport PyObject

_Handle = events.Handle

# asyncio's Handle and TimerHandle are Python classes with __slots__: their
# fields are member descriptors at fixed offsets in the object. Handles made
# here are allocated with the type's tp_alloc and their fields written at
# those offsets, and the fields the loop reads per callback (_cancelled,
# _context, _callback, _args) are read there: no attribute look-up (with
# its type look-up and descriptor call) per field. The offsets are taken
# from the descriptors at import; where a field is not a plain member
# descriptor (another Python), the attribute paths are used.
cdef extern from *:
    """
    #include <structmember.h>
    static PyObject *evpl_aio_alloc(PyObject *cls) {
        PyTypeObject *t = (PyTypeObject *)cls;
        return t->tp_alloc(t, 0);
    }
    static Py_ssize_t evpl_aio_member_offset(PyObject *descr) {
        return ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    static inline void evpl_aio_slot_init(PyObject *o, Py_ssize_t off, PyObject *v) {
        Py_INCREF(v);
        *(PyObject **)((char *)o + off) = v;
    }
    static inline PyObject *evpl_aio_slot(PyObject *o, Py_ssize_t off) {
        return *(PyObject **)((char *)o + off);
    }
    static inline void evpl_aio_slot_clear(PyObject *o, Py_ssize_t off) {
        PyObject **p = (PyObject **)((char *)o + off);
        PyObject *v = *p;
        *p = NULL;
        Py_XDECREF(v);
    }
    /* Handles that ran and that nothing else referenced, fields emptied,
       kept for the next call_soon (out of the GC's sight meanwhile) */
    #define EVPL_AIO_FREE_MAX 64
    static PyObject *evpl_aio_free[EVPL_AIO_FREE_MAX];
    static int evpl_aio_nfree = 0;
    static PyObject *evpl_aio_handle_new(PyObject *cls) {
        if (evpl_aio_nfree > 0) {
            PyObject *h = evpl_aio_free[--evpl_aio_nfree];
            PyObject_GC_Track(h);
            return h;
        }
        return evpl_aio_alloc(cls);
    }
    static inline int evpl_aio_unshared(PyObject *o) {
        Py_ssize_t off = Py_TYPE(o)->tp_weaklistoffset;
        return Py_REFCNT(o) == 1 && evpl_aio_nfree < EVPL_AIO_FREE_MAX
            && (off <= 0 || *(PyObject **)((char *)o + off) == NULL);
    }
    static inline void evpl_aio_keep(PyObject *o) {
        if (evpl_aio_nfree < EVPL_AIO_FREE_MAX) {
            PyObject_GC_UnTrack(o);
            Py_INCREF(o);
            evpl_aio_free[evpl_aio_nfree++] = o;
        }
    }
    """
    object evpl_aio_alloc(object cls)
    Py_ssize_t evpl_aio_member_offset(object descr)
    void evpl_aio_slot_init(object o, Py_ssize_t off, object v)
    PyObject* evpl_aio_slot(object o, Py_ssize_t off)
    void evpl_aio_slot_clear(object o, Py_ssize_t off)
    object evpl_aio_handle_new(object cls)
    bint evpl_aio_unshared(object o)
    void evpl_aio_keep(object o)
    int PyContext_Enter(object ctx) except -1
    int PyContext_Exit(object ctx) except -1

cdef Py_ssize_t OFF_CALLBACK, OFF_ARGS, OFF_CANCELLED, OFF_LOOP, OFF_TB, OFF_REPR, OFF_CONTEXT
cdef Py_ssize_t OFF_SCHEDULED, OFF_WHEN, OFF_EVTIMER
cdef bint _OFFSETS = False      # the offsets above are valid (set at the end of this section)

# The same for the slots of evpl's own classes that the per-callback paths
# read: EvplEventLoop's and StreamTransport's (registered by their modules
# once the classes exist; until then, or for another class, attributes).
cdef object _LoopType = None
cdef Py_ssize_t L_CLOSED, L_DEBUG, L_READY, L_STOPPING, L_STASHED, L_FACTORY, L_APPEND
cdef object _StreamType = None
cdef Py_ssize_t S_RECV, S_WBIND, S_CLOSING
cdef object _DgramType = None
cdef Py_ssize_t D_RECV, D_SBIND, D_ADDRESS, D_CONNECTED

from cpython.object cimport PyObject_TypeCheck, PyTypeObject


cdef inline bint _is_loop(obj):
    return _LoopType is not None and PyObject_TypeCheck(obj, <PyTypeObject*>_LoopType)


cdef inline bint _l_stopping(loop) except -1:
    return bool(_field(loop, L_STOPPING) if _is_loop(loop) else loop._stopping)


cdef inline bint _l_closed(loop) except -1:
    return bool(_field(loop, L_CLOSED) if _is_loop(loop) else loop._closed)


cdef inline bint _l_debug(loop) except -1:
    return bool(_field(loop, L_DEBUG) if _is_loop(loop) else loop._debug)


cdef inline bint _is_stream(obj):
    return _StreamType is not None and PyObject_TypeCheck(obj, <PyTypeObject*>_StreamType)


cdef inline bint _is_dgram(obj):
    return _DgramType is not None and PyObject_TypeCheck(obj, <PyTypeObject*>_DgramType)


def register_slots(cls, kind):
    """Record the slot offsets of ``cls`` (``kind``: "loop" for
    EvplEventLoop, "stream" for StreamTransport, "dgram" for
    DatagramTransport); a class whose fields are not plain slots is left to
    attribute look-ups."""
    global _LoopType, L_CLOSED, L_DEBUG, L_READY, L_STOPPING, L_STASHED, L_FACTORY, L_APPEND
    global _StreamType, S_RECV, S_WBIND, S_CLOSING
    global _DgramType, D_RECV, D_SBIND, D_ADDRESS, D_CONNECTED
    if kind == "loop":
        offs = [_offset(cls, n) for n in ("_closed", "_debug", "_ready", "_stopping",
                                          "_stashed", "_task_factory", "_ready_append")]
        if min(offs) > 0:
            L_CLOSED, L_DEBUG, L_READY, L_STOPPING, L_STASHED, L_FACTORY, L_APPEND = offs
            _LoopType = cls
    elif kind == "stream":
        offs = [_offset(cls, n) for n in ("_recv", "_wbind", "_closing")]
        if min(offs) > 0:
            S_RECV, S_WBIND, S_CLOSING = offs
            _StreamType = cls
    elif kind == "dgram":
        offs = [_offset(cls, n) for n in ("_recv", "_sbind", "_address", "_connected")]
        if min(offs) > 0:
            D_RECV, D_SBIND, D_ADDRESS, D_CONNECTED = offs
            _DgramType = cls
    else:
        raise ValueError(f"unknown kind {kind!r}")


cdef inline bint _is_ours(handle):
    """A Handle (or our TimerHandle) whose fields are at the known offsets."""
    return _OFFSETS and (type(handle) is _Handle or type(handle) is TimerHandle)


cdef inline object _field(handle, Py_ssize_t off):
    cdef PyObject* p = evpl_aio_slot(handle, off)
    if p == NULL:
        raise AttributeError("asyncio Handle field not set")
    return <object>p


cdef int _run_fields(handle) except -1:
    """``handle._context.run(handle._callback, *handle._args)`` read from
    the slots and run with the context entered directly."""
    ctx = _field(handle, OFF_CONTEXT)
    callback = _field(handle, OFF_CALLBACK)
    args = _field(handle, OFF_ARGS)
    PyContext_Enter(ctx)
    try:
        callback(*args)
    finally:
        PyContext_Exit(ctx)
    return 0


cdef int _run(handle) except -1:
    """``run_handle``: errors reported as asyncio reports them."""
    try:
        if _is_ours(handle):
            _run_fields(handle)
        else:
            handle._context.run(handle._callback, *handle._args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _report(handle, exc)
    return 0


cdef inline int _recycle(handle) except -1:
    """A plain Handle that ran and that nothing else holds (no reference,
    no weak reference): empty its fields (what its deallocation would
    release, released now) and keep it for the next ``call_soon``, which
    then fills it instead of allocating (asyncio's Handles are GC objects
    of a Python class: allocation and deallocation are most of a
    callback's cost in the loop)."""
    if not _OFFSETS or type(handle) is not _Handle or not evpl_aio_unshared(handle):
        return 0
    evpl_aio_slot_clear(handle, OFF_CALLBACK)
    evpl_aio_slot_clear(handle, OFF_ARGS)
    evpl_aio_slot_clear(handle, OFF_CONTEXT)
    evpl_aio_slot_clear(handle, OFF_LOOP)
    evpl_aio_slot_clear(handle, OFF_CANCELLED)
    evpl_aio_slot_clear(handle, OFF_REPR)
    evpl_aio_slot_clear(handle, OFF_TB)
    evpl_aio_keep(handle)
    return 0


cdef inline bint _cancelled(handle) except -1:
    if _is_ours(handle):
        return _field(handle, OFF_CANCELLED) is True
    return bool(handle._cancelled)


def run_handle(handle):
    """``handle._run()`` without its frame: the callback in the handle's
    context; an exception goes to the loop's exception handler, as asyncio
    reports it."""
    _run(handle)


cdef void _report(handle, exc) except *:
    """A callback's exception, to the loop's exception handler (asyncio's
    message and context)."""
    cb = format_helpers._format_callback_source(handle._callback, handle._args)
    context = {"message": f"Exception in callback {cb}", "exception": exc,
               "handle": handle}
    if handle._source_traceback:
        context["source_traceback"] = handle._source_traceback
    handle._loop.call_exception_handler(context)


cdef int _iteration(self, LoopCore core, ready, bint first) except -1:
    """One iteration of ``EvplEventLoop`` (see its ``_run_once``); ``first``:
    look at ``_stopping`` before the callbacks too (``run_iterations``
    knows it was false at the end of the iteration before)."""
    cdef Py_ssize_t ntodo
    if first and _l_stopping(self):
        # stop() came before this iteration: poll once without waiting (as
        # asyncio does), run what is ready, leave
        core._iterate(0)
        self._raise_stashed()
    ntodo = len(ready)
    if ntodo:
        popleft = ready.popleft
        if _l_debug(self):
            for _ in range(ntodo):
                handle = popleft()
                if not handle._cancelled:
                    self._run_debug(handle)
        else:
            for _ in range(ntodo):
                handle = popleft()
                if not _cancelled(handle):
                    _run(handle)
                _recycle(handle)
        if _l_stopping(self):
            # no more I/O for a loop that stops (asyncio polls before its
            # callbacks, not after), but what they wrote is sent now
            core.flush()
            return 0
    elif first and _l_stopping(self):
        core.flush()                    # (no callback ran since run_iterations looked)
        return 0
    core._iterate(0 if ready else -1)
    return 0


cdef LoopCore _entered(self):
    cdef LoopCore core = self._core
    if not core.running:
        raise EvplError("iterate() runs only between enter() and leave()")
    return core


def run_once(self):
    """``EvplEventLoop._run_once`` (see its docstring), compiled."""
    _iteration(self, _entered(self), self._ready, True)
    if self._stashed is not None:
        self._raise_stashed()


def run_iterations(self):
    """What ``run_forever`` repeats: iterations until ``stop()`` was called
    (asyncio's ``while True: _run_once(); if _stopping: break``), with no
    interpreter frame or attribute look-up per iteration beyond
    ``_stopping``. A SystemExit/KeyboardInterrupt an engine callback
    stashed sets ``_stopping`` too (``EvplEventLoop._stash``): it is
    raised here, after the iteration."""
    cdef LoopCore core = _entered(self)
    cdef bint first = True
    ready = self._ready
    while True:
        _iteration(self, core, ready, first)
        if _l_stopping(self):
            if self._stashed is not None:
                self._raise_stashed()
            return
        first = False


# EvplEventLoop.call_soon is a method descriptor over a C function that
# takes its arguments as a vector (METH_FASTCALL | METH_KEYWORDS): C futures
# and tasks call it per callback with ``context=`` as a keyword, and a
# compiled ``def`` would parse that keyword generically and get a bound
# method object made per look-up.
cdef extern from *:
    """
    typedef PyObject *(*evpl_aio_soon_fn)(PyObject *, PyObject *, PyObject *, PyObject *);
    static evpl_aio_soon_fn evpl_aio_soon_target = NULL;
    static PyObject *evpl_aio_str_context = NULL;

    static PyObject *evpl_aio_call_soon(PyObject *self, PyObject *const *args,
                                        Py_ssize_t nargsf, PyObject *kwnames) {
        Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
        PyObject *context = Py_None;
        if (kwnames != NULL) {
            Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
            for (Py_ssize_t i = 0; i < nkw; i++) {
                PyObject *key = PyTuple_GET_ITEM(kwnames, i);
                if (key != evpl_aio_str_context
                        && PyUnicode_Compare(key, evpl_aio_str_context) != 0) {
                    if (!PyErr_Occurred())
                        PyErr_Format(PyExc_TypeError,
                                     "call_soon() got an unexpected keyword argument '%S'",
                                     key);
                    return NULL;
                }
                context = args[nargs + i];
            }
        }
        if (nargs < 1) {
            PyErr_SetString(PyExc_TypeError,
                            "call_soon() missing 1 required positional argument: 'callback'");
            return NULL;
        }
        PyObject *rest = PyTuple_New(nargs - 1);
        if (rest == NULL)
            return NULL;
        for (Py_ssize_t i = 1; i < nargs; i++) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(rest, i - 1, args[i]);
        }
        PyObject *h = evpl_aio_soon_target(self, args[0], rest, context);
        Py_DECREF(rest);
        return h;
    }

    static PyMethodDef evpl_aio_call_soon_def = {
        "call_soon", (PyCFunction)(void (*)(void))evpl_aio_call_soon,
        METH_FASTCALL | METH_KEYWORDS,
        "call_soon($self, callback, /, *args, context=None)\\n--\\n\\n"
        "Run ``callback(*args)`` in the next iteration (asyncio's, with debug "
        "mode's checks only in debug mode)."};

    static PyObject *evpl_aio_call_soon_descr(PyObject *cls, PyObject *context_name,
                                              evpl_aio_soon_fn target) {
        Py_INCREF(context_name);
        evpl_aio_str_context = context_name;
        evpl_aio_soon_target = target;
        return PyDescr_NewMethod((PyTypeObject *)cls, &evpl_aio_call_soon_def);
    }
    """
    ctypedef object (*evpl_aio_soon_fn)(object, object, object, object)
    object evpl_aio_call_soon_descr(object cls, object context_name, evpl_aio_soon_fn target)


cdef object _call_soon_entry(self, callback, args, context):
    return _call_soon(self, callback, <tuple>args, context)


def call_soon_method(cls):
    """``call_soon`` for ``cls`` (EvplEventLoop): ``callback(*args)`` run in
    the next iteration, as a method descriptor of ``cls``."""
    return evpl_aio_call_soon_descr(cls, _sys.intern("context"), _call_soon_entry)


cdef object _call_soon(self, callback, tuple args, context):
    if _l_closed(self):
        raise RuntimeError("Event loop is closed")
    if not _OFFSETS or _l_debug(self):
        return self._call_soon_slow(callback, args, context)
    h = evpl_aio_handle_new(_Handle)
    _fill(h, self, callback, args, context)
    if _is_loop(self):
        _field(self, L_APPEND)(h)       # the ready deque's bound append
    else:
        self._ready.append(h)
    return h


# AttachedEventLoop's per-callback paths: its ready callbacks run from a
# Deferral at the end of the engine's iteration, with the loop set as the
# thread's running loop.
cdef object _get_running_loop = events._get_running_loop
cdef object _set_running_loop = events._set_running_loop


def attached_call_soon(self, callback, *args, context=None):
    """``AttachedEventLoop.call_soon``: queue the callback and arm the
    Deferral that runs the ready queue."""
    h = _call_soon(self, callback, args, context)
    self._deferral.arm()
    return h


def attached_run_ready(self):
    """``AttachedEventLoop._run_ready`` (the Deferral): run the callbacks
    ready now; what they schedule arms the Deferral again."""
    if _l_closed(self):
        return
    ready = _field(self, L_READY) if _is_loop(self) else self._ready
    cdef Py_ssize_t n = len(ready)
    if n == 0:
        return
    if n == 1:
        run_handles(self, (ready.popleft(),))
    else:
        popleft = ready.popleft
        run_handles(self, [popleft() for _ in range(n)])


def run_handles(self, handles):
    """Run ``handles`` (those not cancelled) with ``self`` set as the
    thread's running loop (an AttachedEventLoop's callbacks and timers)."""
    prev = _get_running_loop()
    _set_running_loop(self)
    try:
        if _l_debug(self):
            for handle in handles:
                if not handle._cancelled:
                    self._run_debug(handle)
        else:
            for handle in handles:
                if not _cancelled(handle):
                    _run(handle)
    finally:
        _set_running_loop(prev)


cdef inline void _fill(h, loop, callback, args, context) except *:
    """The fields asyncio's Handle ``__init__`` sets, outside debug mode, in
    a Handle just allocated (every field empty)."""
    evpl_aio_slot_init(h, OFF_CONTEXT, copy_context() if context is None else context)
    evpl_aio_slot_init(h, OFF_LOOP, loop)
    evpl_aio_slot_init(h, OFF_CALLBACK, callback)
    evpl_aio_slot_init(h, OFF_ARGS, args)
    evpl_aio_slot_init(h, OFF_CANCELLED, False)
    evpl_aio_slot_init(h, OFF_REPR, None)
    evpl_aio_slot_init(h, OFF_TB, None)


class TimerHandle(events.TimerHandle):
    """asyncio's TimerHandle, carrying the engine timer that fires it. The
    engine timer calls the handle itself (no bound method per timer)."""

    __slots__ = ("_evtimer",)

    __call__ = run_handle


def _slots(cls):
    names = set()
    for c in cls.__mro__:
        slots = c.__dict__.get("__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    return names


# the fields asyncio's Handle and TimerHandle __init__ set (3.11-3.13); if a
# Python version has others, or they are not plain member descriptors,
# handles are made by asyncio's own __init__ and read as attributes
_FIELDS = {"_callback", "_args", "_cancelled", "_loop", "_source_traceback", "_repr",
           "__weakref__", "_context", "_scheduled", "_when"}


def _offset(cls, name):
    """The offset of slot ``name`` of ``cls``, or -1."""
    for c in cls.__mro__:
        d = c.__dict__.get(name)
        if d is not None:
            return evpl_aio_member_offset(d) if type(d) is _MemberDescriptor else -1
    return -1


from types import MemberDescriptorType as _MemberDescriptor

if (_slots(events.TimerHandle) == _FIELDS
        and _slots(events.Handle) == _FIELDS - {"_scheduled", "_when"}):
    _offs = [_offset(TimerHandle, n) for n in
             ("_callback", "_args", "_cancelled", "_loop", "_source_traceback", "_repr",
              "_context", "_scheduled", "_when", "_evtimer")]
    if min(_offs) > 0 and all(_offset(_Handle, n) == o for n, o in
                              zip(("_callback", "_args", "_cancelled", "_loop",
                                   "_source_traceback", "_repr", "_context"), _offs)):
        (OFF_CALLBACK, OFF_ARGS, OFF_CANCELLED, OFF_LOOP, OFF_TB, OFF_REPR, OFF_CONTEXT,
         OFF_SCHEDULED, OFF_WHEN, OFF_EVTIMER) = _offs
        _OFFSETS = True


def timer(loop, when, delay, callback, args, context):
    """A scheduled TimerHandle for ``callback(*args)`` at loop time
    ``when`` (``delay`` seconds from now) on an engine timer: what
    asyncio's TimerHandle ``__init__`` does, without its two frames (not
    in debug mode, which keeps asyncio's, for the source traceback)."""
    if _l_closed(loop):
        raise RuntimeError("Event loop is closed")
    if not _OFFSETS or _l_debug(loop):
        return loop._timer_slow(when, delay, callback, args, context)
    h = evpl_aio_alloc(TimerHandle)
    _fill(h, loop, callback, args, context)
    evpl_aio_slot_init(h, OFF_WHEN, when)
    evpl_aio_slot_init(h, OFF_SCHEDULED, True)
    evpl_aio_slot_init(h, OFF_EVTIMER, loop._core.call_at(when, h))
    return h


# ---- datagram transports (evpl.aio.datagram) ------------------------------------

import sys as _sys

# Python 3.13 sends a zero-length datagram for sendto(b""); 3.11/3.12 drop it
_SEND_EMPTY = _sys.version_info >= (3, 13)


def on_datagram(self, bind, data, addr):
    """A datagram: ``datagram_received(bytes, addr)``. An exception from the
    protocol is reported and the transport stays open (as asyncio's)."""
    # protocol.datagram_received; None once closing
    recv = _field(self, D_RECV) if _is_dgram(self) else self._recv
    if recv is None:
        return
    try:
        if type(data) is Buffer:
            recv(PyBytes_FromStringAndSize((<Buffer>data).ptr, (<Buffer>data).length), addr)
        else:
            recv(bytes(data), addr)
    except (SystemExit, KeyboardInterrupt) as exc:
        self._loop._stash(exc)
    except BaseException as exc:
        self._loop.call_exception_handler({
            "message": "Exception in protocol.datagram_received()", "exception": exc,
            "transport": self, "protocol": self._protocol})


def dg_sendto(self, data, addr=None):
    """``DatagramTransport.sendto``: queue one datagram to ``addr`` (to the
    peer on a connected transport, where ``addr`` must be None or the
    peer's address); it leaves with the iteration's batch. A send the
    kernel refuses is reported to ``error_received``; after ``close()``
    datagrams are dropped."""
    if type(data) is not bytes and not isinstance(data, (bytearray, memoryview)):
        raise TypeError(f"data argument must be a bytes-like object, "
                        f"not {type(data).__name__!r}")
    if not data and not _SEND_EMPTY:
        return
    cdef bint fast = _is_dgram(self)
    address = _field(self, D_ADDRESS) if fast else self._address
    if address:
        if addr is not None and addr != address:
            raise ValueError(f"Invalid address: must be None or {address}")
        addr = address
    # _sbind: the Bind while datagrams go straight to it (not closing)
    sbind = _field(self, D_SBIND) if fast else self._sbind
    if sbind is not None:
        try:
            if not (_field(self, D_CONNECTED) if fast else self._connected):
                sbind.sendto(data, addr)
            elif isinstance(sbind, Bind):
                (<Bind>sbind)._send_data(data)
            else:
                sbind.send(data)
            return
        except ValueError as exc:
            self._refused_send(sbind, data, addr, exc)
            return
        except EvplError:
            pass            # closed meanwhile: the checks below
    bind = self._bind
    if self._conn_lost or self._closing or bind is None:
        if self._conn_lost:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
        return
    try:
        if self._connected:
            bind.send(data)
        else:
            bind.sendto(data, addr)
    except ValueError as exc:
        self._refused_send(bind, data, addr, exc)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        self._fatal_error(exc, "Fatal write error on datagram transport")


# ---- loop methods C futures and tasks call per request ---------------------------

from asyncio import futures as _futures, tasks as _tasks
from time import monotonic as _monotonic

_Future = _futures.Future
_Task = _tasks.Task


def get_debug(self):
    """``loop.get_debug()`` (every Future and Task asks, at creation)."""
    return _field(self, L_DEBUG) if _is_loop(self) else self._debug


def loop_time(self):
    """``loop.time()``: ``time.monotonic()``, as asyncio's."""
    return _monotonic()


def create_future(self):
    """``loop.create_future()``: a Future attached to this loop."""
    return _Future(loop=self)


def create_task(self, coro, *, name=None, context=None, **kwargs):
    """``loop.create_task()``: a Task made directly when no task factory is
    set and debug mode is off; otherwise (and for arguments newer Pythons
    add) asyncio's own method, which also names the task a factory made."""
    if (kwargs or _l_debug(self) or _l_closed(self)
            or (_field(self, L_FACTORY) if _is_loop(self) else self._task_factory) is not None):
        return _BaseCreateTask(self, coro, name=name, context=context, **kwargs)
    if name is None and context is None:
        return _Task(coro, loop=self)       # (one keyword: a smaller dict for the call)
    return _Task(coro, loop=self, name=name, context=context)


def is_closing(self):
    """``transport.is_closing()`` (aiohttp asks before every write)."""
    return _field(self, S_CLOSING) if _is_stream(self) else self._closing


from asyncio.base_events import BaseEventLoop as _BaseEventLoop

_BaseCreateTask = _BaseEventLoop.create_task
