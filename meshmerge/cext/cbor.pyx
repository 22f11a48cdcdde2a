# cython: language_level=3
"""Canonical CBOR: a validating scanner and an encoder, in C speed.

scan() walks raw bytes once, without building objects, and proves that they
are exactly one item in RFC 8949 §4.2.1 core deterministic encoding within
the given limits: shortest heads, definite lengths, no tags, only
false/true/null among simple values, finite floats in their shortest exact
width, map keys that are integers or text strings, strictly increasing by
their encoded bytes, valid UTF-8. Errors raise ScanError(offset, reason).

dumps() writes that same encoding for int, str, bytes, bool, None, float,
list/tuple and dict (text or integer keys), so dumps(loads(x)) == x for
every x scan() accepts.
"""

from libc.string cimport memcmp, memcpy
from libc.math cimport isfinite
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
import struct

_HALF = struct.Struct(">e")
_SINGLE = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")
# Encoded forms of short text map keys: message schemas reuse a handful of keys.
_KEY_CACHE = {}


class ScanError(ValueError):
    def __init__(self, offset, reason):
        super().__init__(f"@{offset}: {reason}")
        self.offset = offset
        self.reason = reason


cdef struct Limits:
    Py_ssize_t max_depth
    Py_ssize_t max_items
    Py_ssize_t max_text
    Py_ssize_t max_bytes
    Py_ssize_t max_container


cdef class _Scan:
    cdef const unsigned char* data
    cdef Py_ssize_t n
    cdef Py_ssize_t items
    cdef Limits lim
    cdef object err_offset
    cdef object err_reason

    cdef int fail(self, Py_ssize_t offset, str reason) except -1:
        raise ScanError(offset, reason)

    cdef Py_ssize_t head(self, Py_ssize_t pos, int* major, int* info, unsigned long long* arg) except -1:
        cdef unsigned char initial
        cdef Py_ssize_t width, i
        cdef unsigned long long value = 0, minimal
        if pos >= self.n:
            self.fail(pos, "truncated: expected an item")
        initial = self.data[pos]
        major[0] = initial >> 5
        info[0] = initial & 0x1F
        if info[0] < 24:
            arg[0] = info[0]
            return pos + 1
        if info[0] > 27:
            if info[0] == 31:
                self.fail(pos, "indefinite-length items are not allowed")
            self.fail(pos, f"reserved additional information {info[0]}")
        width = 1 << (info[0] - 24)
        if pos + 1 + width > self.n:
            self.fail(pos, "truncated item head")
        for i in range(width):
            value = (value << 8) | self.data[pos + 1 + i]
        if major[0] != 7:
            minimal = 24 if width == 1 else (1ULL << (8 * (width >> 1)))
            if value < minimal:
                self.fail(pos, "non-minimal length or integer encoding")
        arg[0] = value
        return pos + 1 + width

    cdef Py_ssize_t item(self, Py_ssize_t pos, Py_ssize_t depth) except -1:
        cdef int major, info
        cdef unsigned long long arg
        cdef Py_ssize_t start = pos, limit, entries, i, key_start, key_end
        cdef Py_ssize_t prev_start = -1, prev_end = -1, la, lb
        cdef int c
        if depth > self.lim.max_depth:
            self.fail(pos, f"nesting deeper than {self.lim.max_depth}")
        self.items += 1
        if self.items > self.lim.max_items:
            self.fail(pos, f"more than {self.lim.max_items} items")
        pos = self.head(pos, &major, &info, &arg)
        if major == 0 or major == 1:
            return pos
        if major == 2 or major == 3:
            limit = self.lim.max_bytes if major == 2 else self.lim.max_text
            if arg > <unsigned long long>limit:
                self.fail(start, f"string of {arg} bytes exceeds limit {limit}")
            if <unsigned long long>(self.n - pos) < arg:
                self.fail(start, "truncated string")
            if major == 3 and not _valid_utf8(self.data + pos, <Py_ssize_t>arg):
                self.fail(start, "text string is not valid UTF-8")
            return pos + <Py_ssize_t>arg
        if major == 4 or major == 5:
            if arg > <unsigned long long>self.lim.max_container:
                self.fail(start, f"container of {arg} entries exceeds limit {self.lim.max_container}")
            entries = <Py_ssize_t>arg
            if major == 5:
                entries *= 2
            if entries > self.n - pos:
                self.fail(start, "truncated container")
            for i in range(entries):
                if major == 5 and i % 2 == 0:
                    if pos < self.n and (self.data[pos] >> 5) not in (0, 1, 3):
                        self.fail(pos, "map keys must be text strings or integers")
                    key_start = pos
                    pos = self.item(pos, depth + 1)
                    key_end = pos
                    if prev_start >= 0:
                        la = prev_end - prev_start
                        lb = key_end - key_start
                        c = memcmp(self.data + prev_start, self.data + key_start, la if la < lb else lb)
                        if c > 0 or (c == 0 and la >= lb):
                            self.fail(key_start, "map keys not in canonical order, or duplicated")
                    prev_start, prev_end = key_start, key_end
                else:
                    pos = self.item(pos, depth + 1)
            return pos
        if major == 6:
            self.fail(start, f"tag {arg} is not allowed")
        if info == 20 or info == 21 or info == 22:
            return pos
        if info == 25 or info == 26 or info == 27:
            self.check_float(start, info, pos)
            return pos
        self.fail(start, f"simple value {arg} is not allowed")

    cdef int check_float(self, Py_ssize_t start, int info, Py_ssize_t end) except -1:
        cdef bytes raw = <bytes>self.data[start + 1:end]
        cdef double value
        if info == 25:
            value = _HALF.unpack(raw)[0]
        elif info == 26:
            value = _SINGLE.unpack(raw)[0]
        else:
            value = _DOUBLE.unpack(raw)[0]
        if not isfinite(value):
            self.fail(start, "NaN and infinities are not allowed")
        if info > 25 and _float_width(value) < info:
            self.fail(start, "float not in its shortest exact width")
        return 0


cdef bint _valid_utf8(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (RFC 3629): no overlongs, no surrogates, nothing above U+10FFFF."""
    cdef Py_ssize_t i = 0, k
    cdef unsigned char c, c1
    cdef int need
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            need = 1
        elif 0xE0 <= c <= 0xEF:
            need = 2
        elif 0xF0 <= c <= 0xF4:
            need = 3
        else:
            return False
        if i + need > n - 1:
            return False
        c1 = s[i + 1]
        if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F):
            return False
        if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F):
            return False
        for k in range(1, need + 1):
            if (s[i + k] & 0xC0) != 0x80:
                return False
        i += need + 1
    return True


cdef int _float_width(double value) except -1:
    """25, 26 or 27: the narrowest of half, single, double holding value exactly."""
    cdef float single = <float>value
    if <double>single != value:
        return 27
    try:
        if _HALF.unpack(_HALF.pack(value))[0] == value:
            return 25
    except OverflowError:
        pass
    return 26


def scan(const unsigned char[::1] data not None, Py_ssize_t max_depth, Py_ssize_t max_items,
         Py_ssize_t max_text, Py_ssize_t max_bytes, Py_ssize_t max_container):
    """Validate `data` as exactly one canonical item; raise ScanError otherwise."""
    cdef _Scan s = _Scan()
    cdef Py_ssize_t end
    s.n = data.shape[0]
    if s.n == 0:
        raise ScanError(0, "empty input")
    s.data = &data[0]
    s.items = 0
    s.lim.max_depth = max_depth
    s.lim.max_items = max_items
    s.lim.max_text = max_text
    s.lim.max_bytes = max_bytes
    s.lim.max_container = max_container
    end = s.item(0, 0)
    if end != s.n:
        raise ScanError(end, f"{s.n - end} trailing bytes after the item")


cdef class _Writer:
    """Appends canonical CBOR to a growable C buffer."""

    cdef unsigned char* p
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.cap = 256
        self.n = 0
        self.p = <unsigned char*>PyMem_Malloc(self.cap)
        if self.p == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.p)

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t want = self.n + extra
        cdef unsigned char* grown
        if want <= self.cap:
            return 0
        while self.cap < want:
            self.cap *= 2
        grown = <unsigned char*>PyMem_Realloc(self.p, self.cap)
        if grown == NULL:
            raise MemoryError()
        self.p = grown
        return 0

    cdef int raw(self, const unsigned char* data, Py_ssize_t length) except -1:
        self.reserve(length)
        memcpy(self.p + self.n, data, length)
        self.n += length
        return 0

    cdef int head(self, int major, unsigned long long arg) except -1:
        cdef int width, i
        self.reserve(9)
        if arg < 24:
            self.p[self.n] = (major << 5) | <unsigned char>arg
            self.n += 1
            return 0
        if arg < 0x100:
            width = 1
            self.p[self.n] = (major << 5) | 24
        elif arg < 0x10000:
            width = 2
            self.p[self.n] = (major << 5) | 25
        elif arg < 0x100000000:
            width = 4
            self.p[self.n] = (major << 5) | 26
        else:
            width = 8
            self.p[self.n] = (major << 5) | 27
        for i in range(width):
            self.p[self.n + 1 + i] = (arg >> (8 * (width - 1 - i))) & 0xFF
        self.n += 1 + width
        return 0

    cdef int byte(self, unsigned char b) except -1:
        self.reserve(1)
        self.p[self.n] = b
        self.n += 1
        return 0

    cdef int write(self, object value, int depth) except -1:
        cdef list keys
        cdef bytes raw
        cdef _Writer sub
        if depth > 64:
            raise ValueError("nesting deeper than 64")
        if value is None:
            self.byte(0xF6)
        elif value is True:
            self.byte(0xF5)
        elif value is False:
            self.byte(0xF4)
        elif isinstance(value, int):
            if value >= 0:
                if value >= 2 ** 64:
                    raise ValueError("integer outside the 64-bit CBOR range")
                self.head(0, value)
            else:
                if value < -(2 ** 64):
                    raise ValueError("integer outside the 64-bit CBOR range")
                self.head(1, -1 - value)
        elif isinstance(value, str):
            raw = (<str>value).encode("utf-8")
            self.head(3, len(raw))
            self.raw(raw, len(raw))
        elif isinstance(value, bytes):
            self.head(2, len(<bytes>value))
            self.raw(<bytes>value, len(<bytes>value))
        elif isinstance(value, (bytearray, memoryview)):
            raw = bytes(value)
            self.head(2, len(raw))
            self.raw(raw, len(raw))
        elif isinstance(value, float):
            self.write_float(value)
        elif isinstance(value, (list, tuple)):
            self.head(4, len(value))
            for item in value:
                self.write(item, depth + 1)
        elif isinstance(value, dict):
            keys = []
            for key in value:
                encoded = _KEY_CACHE.get(key) if type(key) is str else None
                if encoded is None:
                    if isinstance(key, bool) or not isinstance(key, (str, int)):
                        raise ValueError(f"map key {key!r} must be a text string or integer")
                    sub = _Writer()
                    sub.write(key, depth + 1)
                    encoded = PyBytes_FromStringAndSize(<char*>sub.p, sub.n)
                    if type(key) is str and len(_KEY_CACHE) < 1024 and len(<str>key) <= 32:
                        _KEY_CACHE[key] = encoded
                keys.append((encoded, key))
            keys.sort()
            self.head(5, len(keys))
            for encoded, key in keys:
                self.raw(<bytes>encoded, len(<bytes>encoded))
                self.write(value[key], depth + 1)
        else:
            raise ValueError(f"type {type(value).__name__} cannot be encoded")
        return 0

    cdef int write_float(self, double value) except -1:
        cdef int width
        cdef bytes packed
        if not isfinite(value):
            raise ValueError("NaN and infinities are not allowed")
        width = _float_width(value)
        if width == 25:
            packed = b"\xf9" + _HALF.pack(value)
        elif width == 26:
            packed = b"\xfa" + _SINGLE.pack(value)
        else:
            packed = b"\xfb" + _DOUBLE.pack(value)
        self.raw(packed, len(packed))
        return 0


def dumps(value):
    """Canonical encoding; ValueError names what cannot be encoded."""
    cdef _Writer w = _Writer()
    w.write(value, 0)
    return PyBytes_FromStringAndSize(<char*>w.p, w.n)
