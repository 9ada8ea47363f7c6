/*
 * Memory barriers for pyvirtio's queue hot path.
 *
 * CPython exposes no fence. The two StoreLoad points of the virtio protocol
 * (arm the kick then re-check the ring; publish used.idx then read the
 * driver's event) need a real full barrier, so this module compiles a
 * sequentially consistent fence (mfence / lock-prefixed op on x86-64,
 * dmb ish on arm64). acquire() and release() are the cheaper one-sided
 * barriers; on x86-64 they only stop the compiler, which a C call already does.
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

static PyMethodDef methods[] = {
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
