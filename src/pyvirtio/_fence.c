/*
 * Memory barriers for pyvirtio's queue hot path.
 *
 * CPython exposes no fence. The two StoreLoad points of the virtio protocol
 * (arm the kick then re-check the ring; publish used.idx then read the
 * driver's event) need a real full barrier, so this module compiles a
 * sequentially consistent fence (mfence / lock-prefixed op on x86-64,
 * dmb ish on arm64). acquire() and release() are the cheaper one-sided
 * barriers; on x86-64 they only stop the compiler, which a C call already does.
 *
 * The dirty log of live migration lives here too, for the same reason: the
 * front-end clears the bitmap with atomic exchanges while the back-end sets
 * bits, so setting one needs an atomic OR, which Python has no way to do.
 * log_mark(bitmap, first, last) sets bits first..last (one per 4 KiB page);
 * address(buffer) gives a writable buffer's address (to find the guest page
 * behind a view of guest memory).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *fence_full(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *fence_acquire(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    Py_RETURN_NONE;
}

static PyObject *fence_release(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *log_mark(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long first, last;
    if (!PyArg_ParseTuple(args, "w*KK", &view, &first, &last))
        return NULL;
    unsigned long long nbits = (unsigned long long)view.len * 8;
    if (first > last || last >= nbits) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_IndexError, "pages %llu..%llu are outside a log of %llu pages", first, last, nbits);
        return NULL;
    }
    unsigned char *bits = view.buf;
    unsigned long long page = first;
    while (page <= last) {
        unsigned long long byte = page >> 3;
        unsigned int lo = (unsigned int)(page & 7);
        unsigned long long top = (byte << 3) + 7;
        unsigned int hi = (unsigned int)((last < top ? last : top) & 7);
        unsigned char mask = (unsigned char)(((1u << (hi - lo + 1)) - 1) << lo);
        /* seq_cst: the guest-memory writes this page covers are ordered before the bit */
        __atomic_fetch_or(&bits[byte], mask, __ATOMIC_SEQ_CST);
        page = top + 1;
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *buffer_address(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *addr = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return addr;
}

static PyMethodDef methods[] = {
    {"log_mark", log_mark, METH_VARARGS, "log_mark(bitmap, first, last): atomically set bits first..last."},
    {"address", buffer_address, METH_O, "address(buffer): the address of a writable buffer's first byte."},
    {"full", fence_full, METH_NOARGS, "Sequentially consistent (StoreLoad) fence."},
    {"acquire", fence_acquire, METH_NOARGS, "Acquire fence (LoadLoad|LoadStore)."},
    {"release", fence_release, METH_NOARGS, "Release fence (LoadStore|StoreStore)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fence", "Hardware memory barriers.", -1, methods,
};

PyMODINIT_FUNC PyInit__fence(void)
{
    return PyModule_Create(&module);
}
