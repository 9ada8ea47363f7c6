/*
 * The split ring's batch scan in C: the last-resort piece of the compiled
 * engine (see README, "The compiled ring engine").
 *
 * Profiling `bench dpdk --mode tx` showed the compiled engine spending most
 * of each batch in `SplitRing.fetch_bulk`: some ten numpy calls (load the
 * heads, check them, gather the descriptors, four reductions), each a few
 * microseconds however small the batch. mypyc cannot make those cheaper: the
 * work is already inside numpy, the cost is the calls. This file does the
 * same reads in one call. `SplitRing.fetch_bulk` keeps the numpy version
 * beside it, which runs with PYVIRTIO_PURE=1 or when this could not be
 * built, and the engine-equivalence tests compare the two.
 *
 * split_gather(avail, desc, start, n, q, heads, descs)
 *   avail: the avail ring area (flags, idx, ring[q], ...), bytes-like
 *   desc:  the descriptor table area (q records of 16 bytes)
 *   start: ring slot of the first entry (last_avail & (q - 1)); n <= q
 *   heads: out, n u16; descs: out, n records of 16 bytes (addr, len, flags, next)
 * Reads the n heads (one bulk read of the avail ring, wrapping at q). If a
 * head is >= q, returns (index of the first such head, 0, ...) having read
 * no descriptor. Otherwise copies each head's descriptor (one 16-byte read
 * each) and returns (-1, OR of all flags, lowest addr, highest addr + len
 * (saturated at 2^64 - 1 when addr + len wraps), lowest len, highest len,
 * sum of lens): what the ring code checks and what a device sums, without
 * another pass over the arrays.
 *
 * split_used(used, start, q, ids, written)
 *   used: the used ring area (flags, idx, ring[q] of (u32 id, u32 len), ...)
 *   ids: n u16 (a batch's heads); written: an int (every element's length)
 *   or n u32 (one each)
 * Writes the n used elements from slot `start`, wrapping at q. The caller
 * then stores used.idx (after a release fence where one is needed).
 *
 * Every size and index is checked against the buffers given: a guest value
 * only ever selects a record inside them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define AVAIL_RING 4

static PyObject *split_gather(PyObject *self, PyObject *args)
{
    Py_buffer avail, desc, heads, descs;
    Py_ssize_t start, n, q;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*nnnw*w*", &avail, &desc, &start, &n, &q, &heads, &descs))
        return NULL;
    if (q <= 0 || (q & (q - 1)) != 0 || q > 32768 || n < 0 || n > q || start < 0 || start >= q) {
        PyErr_Format(PyExc_ValueError, "split_gather: bad ring geometry (q=%zd n=%zd start=%zd)", q, n, start);
        goto out;
    }
    if (avail.len < AVAIL_RING + 2 * q || desc.len < 16 * q || heads.len < 2 * n || descs.len < 16 * n) {
        PyErr_SetString(PyExc_ValueError, "split_gather: a buffer is smaller than the ring");
        goto out;
    }
    const unsigned char *ring = (const unsigned char *)avail.buf + AVAIL_RING;
    const unsigned char *table = desc.buf;
    uint16_t *h = heads.buf;
    unsigned char *d = descs.buf;
    Py_ssize_t mask = q - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t v;
        memcpy(&v, ring + 2 * ((start + i) & mask), 2);
        h[i] = v;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (h[i] >= q) {
            result = Py_BuildValue("(nkKKkkK)", i, 0UL, 0ULL, 0ULL, 0UL, 0UL, 0ULL);
            goto out;
        }
    }
    uint64_t amin = UINT64_MAX, emax = 0, lsum = 0;
    uint32_t lmin = UINT32_MAX, lmax = 0;
    unsigned long fl = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *rec = table + 16 * (Py_ssize_t)h[i];
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        memcpy(d + 16 * i, rec, 16);
        memcpy(&addr, d + 16 * i, 8);
        memcpy(&len, d + 16 * i + 8, 4);
        memcpy(&flags, d + 16 * i + 12, 2);
        fl |= flags;
        lsum += len;
        if (len < lmin)
            lmin = len;
        if (len > lmax)
            lmax = len;
        if (addr < amin)
            amin = addr;
        uint64_t end = addr + len;
        if (end < addr)
            end = UINT64_MAX;
        if (end > emax)
            emax = end;
    }
    if (n == 0)
        amin = 0, lmin = 0;
    result = Py_BuildValue("(nkKKkkK)", (Py_ssize_t)-1, fl, (unsigned long long)amin, (unsigned long long)emax,
                           (unsigned long)lmin, (unsigned long)lmax, (unsigned long long)lsum);
out:
    PyBuffer_Release(&avail);
    PyBuffer_Release(&desc);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&descs);
    return result;
}

static PyObject *split_used(PyObject *self, PyObject *args)
{
    Py_buffer used, ids, lens;
    Py_ssize_t start, q;
    PyObject *written;
    int have_lens = 0;
    unsigned long long same = 0;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*nny*O", &used, &start, &q, &ids, &written))
        return NULL;
    Py_ssize_t n = ids.len / 2;
    if (PyLong_Check(written)) {
        same = PyLong_AsUnsignedLongLong(written);
        if (PyErr_Occurred())
            goto out;
        if (same > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "split_used: a used length is a u32");
            goto out;
        }
    } else {
        if (PyObject_GetBuffer(written, &lens, PyBUF_SIMPLE) < 0)
            goto out;
        have_lens = 1;
        if (lens.len != 4 * n) {
            PyErr_SetString(PyExc_ValueError, "split_used: one u32 length per id");
            goto out;
        }
    }
    if (q <= 0 || (q & (q - 1)) != 0 || q > 32768 || n > q || start < 0 || start >= q
            || used.len < AVAIL_RING + 8 * q) {
        PyErr_Format(PyExc_ValueError, "split_used: bad ring geometry (q=%zd n=%zd start=%zd)", q, n, start);
        goto out;
    }
    unsigned char *ring = (unsigned char *)used.buf + AVAIL_RING;  /* flags, idx, then the ring, as avail */
    const uint16_t *id = ids.buf;
    const unsigned char *ln = have_lens ? lens.buf : NULL;
    Py_ssize_t mask = q - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t e[2];
        e[0] = id[i];
        if (ln)
            memcpy(&e[1], ln + 4 * i, 4);
        else
            e[1] = (uint32_t)same;
        memcpy(ring + 8 * ((start + i) & mask), e, 8);
    }
    result = Py_None;
    Py_INCREF(result);
out:
    if (have_lens)
        PyBuffer_Release(&lens);
    PyBuffer_Release(&used);
    PyBuffer_Release(&ids);
    return result;
}

/*
 * fill(region, addrs, gpa, lens, data): copy `data` to the start of every
 * buffer of a batch (buffer i at region offset addrs[i] - gpa, lens[i] bytes
 * long): what a generator does to a batch of receive buffers. Every buffer
 * is checked first (inside the region, at least len(data) long); nothing is
 * written unless all are.
 */
static PyObject *fill(PyObject *self, PyObject *args)
{
    Py_buffer region, addrs, lens, data;
    unsigned long long gpa;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*y*Ky*y*", &region, &addrs, &gpa, &lens, &data))
        return NULL;
    Py_ssize_t n = addrs.len / 8;
    if (addrs.len % 8 || lens.len != 4 * n) {
        PyErr_SetString(PyExc_ValueError, "fill: one u32 length per u64 address");
        goto out;
    }
    const unsigned char *a = addrs.buf, *l = lens.buf;
    uint64_t size = (uint64_t)region.len, k = (uint64_t)data.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        uint32_t len;
        memcpy(&addr, a + 8 * i, 8);
        memcpy(&len, l + 4 * i, 4);
        if (len < k || addr < gpa || addr - gpa > size || size - (addr - gpa) < k) {
            PyErr_Format(PyExc_ValueError, "fill: buffer %zd (%llu bytes at %#llx) cannot take %llu bytes",
                         i, (unsigned long long)len, (unsigned long long)addr, (unsigned long long)k);
            goto out;
        }
    }
    unsigned char *base = region.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        memcpy(&addr, a + 8 * i, 8);
        memcpy(base + (addr - gpa), data.buf, (size_t)k);
    }
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&region);
    PyBuffer_Release(&addrs);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"split_gather", split_gather, METH_VARARGS,
     "split_gather(avail, desc, start, n, q, heads, descs) -> "
     "(bad_index, flags_or, addr_min, end_max, len_min, len_max, len_sum)"},
    {"split_used", split_used, METH_VARARGS, "split_used(used, start, q, ids, written): write n used elements."},
    {"fill", fill, METH_VARARGS, "fill(region, addrs, gpa, lens, data): copy data to the start of every buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringscan", "The split ring's batch scan.", -1, methods,
};

PyMODINIT_FUNC PyInit__ringscan(void)
{
    return PyModule_Create(&module);
}
