# cython: language_level=3
"""Tensor manifest acceptance in C speed (the rules live in meshmerge.proto.messages).

A contribution header lists every tensor (name, dtype, shape, byte size,
sha-256), so decoding one costs a few checks per tensor, thousands of times
for a large model. entries() runs exactly the rules of the checked path in
``meshmerge.proto.messages`` over the decoded maps and builds the entries in
one pass. It answers only "all valid" (the entries) or "not all valid"
(None): on None the caller re-runs its checked path, which raises the error
that names the field. Error texts thus have one source, and a hypothesis
test holds the two paths to the same verdict.
"""

from cpython.dict cimport PyDict_GetItem, PyDict_Size
from cpython.list cimport PyList_AsTuple, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.object cimport PyObject, PyObject_GenericSetAttr
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_Compare

cdef extern from *:
    """
    static int mm_mul_overflow(unsigned long long a, unsigned long long b, unsigned long long *out) {
        return __builtin_mul_overflow(a, b, out);
    }
    """
    int mm_mul_overflow(unsigned long long a, unsigned long long b, unsigned long long* out)

cdef inline bint _uint(object value, unsigned long long maximum, unsigned long long* out):
    """True and the value when ``value`` is an int (not a bool) in [0, maximum]."""
    cdef int sign = 0
    cdef long long small
    if type(value) is not int:
        return False
    small = PyLong_AsLongLongAndOverflow(value, &sign)
    if sign < 0 or (sign == 0 and small < 0):
        return False
    if sign == 0:
        out[0] = <unsigned long long>small
    else:
        try:  # 2**63 or more: rare, so an exception is affordable
            out[0] = PyLong_AsUnsignedLongLong(value)
        except OverflowError:
            return False
    return out[0] <= maximum


cdef inline bint _name_ok(object name, Py_ssize_t max_len):
    """The rule of the checked path: 1..max_len printable ASCII characters, no space."""
    cdef Py_UCS4 ch
    if type(name) is not str:
        return False
    if not 0 < len(<str>name) <= max_len:
        return False
    for ch in <str>name:
        if ch < 0x21 or ch > 0x7E:
            return False
    return True


def entries(list raw not None, bint with_digest, dict itemsize not None, object make,
            Py_ssize_t max_dims, unsigned long long max_dim, Py_ssize_t max_name):
    """All entries built with ``make`` when every one is valid and names strictly increase, else None.

    Checked per entry: a map with exactly the keys (name, dtype, shape[, size,
    sha256]); name of 1..max_name characters in U+0021..U+007E; dtype a key
    of ``itemsize``; shape a list of at most ``max_dims`` ints in
    [0, max_dim]; size == product(shape) * itemsize[dtype]; sha256 32 bytes.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(raw), i, j, ndims
    cdef Py_ssize_t keys = 5 if with_digest else 3
    cdef object obj, name, dtype, shape, size, digest, width, entry, prev = None
    cdef PyObject* found
    cdef unsigned long long numel, d = 0, nbytes = 0, want
    cdef bint overflow
    cdef tuple out = PyTuple_New(n)
    # A frozen dataclass sets its fields with object.__setattr__ in __init__; doing the
    # same here from C skips a Python frame per entry (a third of the cost of a manifest).
    cdef bint direct = with_digest and not hasattr(make, "__post_init__")
    cdef object new = make.__new__
    for i in range(n):
        obj = <object>PyList_GET_ITEM(raw, i)
        if type(obj) is not dict or PyDict_Size(obj) != keys:
            return None
        found = PyDict_GetItem(obj, "name")
        if found == NULL:
            return None
        name = <object>found
        found = PyDict_GetItem(obj, "dtype")
        if found == NULL:
            return None
        dtype = <object>found
        found = PyDict_GetItem(obj, "shape")
        if found == NULL:
            return None
        shape = <object>found
        if not _name_ok(name, max_name) or type(dtype) is not str:
            return None
        found = PyDict_GetItem(itemsize, dtype)
        if found == NULL:
            return None
        width = <object>found
        if type(shape) is not list:
            return None
        ndims = PyList_GET_SIZE(shape)
        if ndims > max_dims:
            return None
        numel = 1
        overflow = False
        for j in range(ndims):
            if not _uint(<object>PyList_GET_ITEM(shape, j), max_dim, &d):
                return None
            if d == 0:
                numel = 0
                overflow = False  # a zero dimension makes the product 0 whatever came before
            elif numel != 0 and not overflow and mm_mul_overflow(numel, d, &numel):
                overflow = True
        if with_digest:
            found = PyDict_GetItem(obj, "size")
            if found == NULL:
                return None
            size = <object>found
            found = PyDict_GetItem(obj, "sha256")
            if found == NULL:
                return None
            digest = <object>found
            if not _uint(size, 0xFFFFFFFFFFFFFFFF, &nbytes):
                return None
            if overflow or mm_mul_overflow(numel, <unsigned long long>PyLong_AsUnsignedLongLong(width), &want):
                return None  # product(shape) * itemsize >= 2**64 > any valid size
            if want != nbytes:
                return None
            if type(digest) is not bytes or len(<bytes>digest) != 32:
                return None
            if direct:
                entry = new(make)
                PyObject_GenericSetAttr(entry, "name", name)
                PyObject_GenericSetAttr(entry, "dtype", dtype)
                PyObject_GenericSetAttr(entry, "shape", PyList_AsTuple(shape))
                PyObject_GenericSetAttr(entry, "size", size)
                PyObject_GenericSetAttr(entry, "sha256", digest)
            else:
                entry = make(name, dtype, PyList_AsTuple(shape), size, digest)
        else:
            entry = make(name, dtype, PyList_AsTuple(shape))
        if prev is not None and PyUnicode_Compare(prev, name) >= 0:
            return None
        prev = name
        Py_INCREF(entry)
        PyTuple_SET_ITEM(out, i, entry)
    return out
