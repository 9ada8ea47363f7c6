/*
 * The rings' batch scans in C: the last-resort piece of the compiled
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
 * another pass over the arrays, and last the AND of all flags (whether every
 * buffer is device-writable, without a reduction when it completes).
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
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#define AVAIL_RING 4

/* The arguments of a METH_FASTCALL function, converted as PyArg_ParseTuple
 * would convert them for the same format (a subset: y* w* n p O K k I), with
 * no argument tuple and none of its general machinery: the per-call cost
 * of the batch operations is mostly their calls. Buffers taken are released
 * again when a later argument fails. Returns 0, or -1 with an exception set
 * and nothing held. */
static int fast_args(PyObject *const *args, Py_ssize_t nargs, const char *fmt, const char *who, ...)
{
    Py_buffer *held[16];
    int nheld = 0;
    Py_ssize_t want = 0;
    for (const char *f = fmt; *f; f++)
        if (*f != '*')
            want++;
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", who, want, nargs);
        return -1;
    }
    va_list ap;
    va_start(ap, who);
    Py_ssize_t i = 0;
    for (const char *f = fmt; *f; f++, i++) {
        PyObject *o = args[i];
        switch (*f) {
        case 'y':
        case 'w': {
            Py_buffer *b = va_arg(ap, Py_buffer *);
            int writable = *f == 'w';
            f++; /* the '*' */
            /* a PyBUF_SIMPLE request is contiguous or refused by the exporter */
            if (PyObject_GetBuffer(o, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
                goto fail;
            held[nheld++] = b;
            break;
        }
        case 'n': {
            Py_ssize_t *v = va_arg(ap, Py_ssize_t *);
            *v = PyNumber_AsSsize_t(o, PyExc_OverflowError);
            if (*v == -1 && PyErr_Occurred())
                goto fail;
            break;
        }
        case 'p': {
            int *v = va_arg(ap, int *);
            *v = PyObject_IsTrue(o);
            if (*v < 0)
                goto fail;
            break;
        }
        case 'O':
            *va_arg(ap, PyObject **) = o;
            break;
        case 'K':
        case 'k':
        case 'I': {
            if (!PyLong_Check(o)) {
                PyErr_Format(PyExc_TypeError, "%s: argument %zd must be int, not %.50s", who, i + 1,
                             Py_TYPE(o)->tp_name);
                goto fail;
            }
            unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
            if (v == (unsigned long long)-1 && PyErr_Occurred())
                goto fail;
            if (*f == 'K')
                *va_arg(ap, unsigned long long *) = v;
            else if (*f == 'k')
                *va_arg(ap, unsigned long *) = (unsigned long)v;
            else
                *va_arg(ap, unsigned int *) = (unsigned int)v;
            break;
        }
        default:
            PyErr_Format(PyExc_SystemError, "%s: bad argument format %s", who, fmt);
            goto fail;
        }
    }
    va_end(ap);
    return 0;
fail:
    va_end(ap);
    while (nheld)
        PyBuffer_Release(held[--nheld]);
    return -1;
}

/* A tuple of n ints (unsigned 64-bit, the first signed when first_signed),
 * without Py_BuildValue's format walk. */
static PyObject *ints(int n, int first_signed, const uint64_t *v)
{
    PyObject *t = PyTuple_New(n);
    if (t == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *x = i == 0 && first_signed ? PyLong_FromLongLong((long long)v[i])
                                             : PyLong_FromUnsignedLongLong(v[i]);
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

/* What the ring code checks and a device sums over a batch of 16-byte
 * descriptors (addr u64, len u32): lowest addr, highest addr + len
 * (saturated at 2^64 - 1 where it wraps), lowest, highest and total len. */
struct summary {
    uint64_t amin, emax, lsum;
    uint32_t lmin, lmax;
    unsigned long fand;  /* AND of the u16 flags at byte flags_at of each */
};

static void summarize(const unsigned char *d, Py_ssize_t n, Py_ssize_t flags_at, struct summary *s)
{
    s->amin = n ? UINT64_MAX : 0, s->emax = 0, s->lsum = 0;
    s->lmin = n ? UINT32_MAX : 0, s->lmax = 0;
    s->fand = n ? 0xFFFF : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        uint32_t len;
        uint16_t fl;
        memcpy(&addr, d + 16 * i, 8);
        memcpy(&len, d + 16 * i + 8, 4);
        memcpy(&fl, d + 16 * i + flags_at, 2);
        s->fand &= fl;
        s->lsum += len;
        if (len < s->lmin)
            s->lmin = len;
        if (len > s->lmax)
            s->lmax = len;
        if (addr < s->amin)
            s->amin = addr;
        uint64_t end = addr + len;
        if (end < addr)
            end = UINT64_MAX;
        if (end > s->emax)
            s->emax = end;
    }
}

/* Whether [addr, addr + len) lies inside the region [gpa, gpa + size)
 * (no arithmetic on guest values that can wrap). */
static inline int inside(uint64_t addr, uint64_t len, uint64_t gpa, uint64_t size)
{
    return addr >= gpa && addr - gpa <= size && size - (addr - gpa) >= len;
}

/* The lengths of the frames a batch copy moves: (shortest, longest, total). */
struct tally {
    uint64_t fmin, fmax, total;
};

static inline void tally_init(struct tally *t, Py_ssize_t n)
{
    t->fmin = n ? UINT64_MAX : 0, t->fmax = 0, t->total = 0;
}

static inline void tally_add(struct tally *t, uint64_t k)
{
    t->total += k;
    if (k < t->fmin)
        t->fmin = k;
    if (k > t->fmax)
        t->fmax = k;
}

static PyObject *tally_result(const struct tally *t)
{
    uint64_t v[3] = {t->fmin, t->fmax, t->total};
    return ints(3, 0, v);
}

/* A batch's column: a one-dimensional buffer of `itemsize`-byte items,
 * contiguous or strided (a field of a numpy array of descriptor records,
 * read in place: no copy to make it contiguous). Element i is at
 * col->buf + i * col->strides[0]. Returns -1 with an exception set when `o`
 * is not such a buffer. */
static int get_col(PyObject *o, Py_ssize_t itemsize, Py_buffer *col, const char *who)
{
    if (PyObject_GetBuffer(o, col, PyBUF_STRIDES) < 0)
        return -1;
    if (col->ndim != 1 || col->itemsize != itemsize || col->shape == NULL || col->strides == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: a column must be one-dimensional, %zd-byte items", who, itemsize);
        PyBuffer_Release(col);
        return -1;
    }
    return 0;
}

#define COL(col, i) ((const unsigned char *)(col).buf + (i) * (col).strides[0])

/* The columns of a batch: n u64 addresses, n u32 lengths and (when flags
 * is not NULL) n u16 flags. Returns n, or -1 with an exception set (and no
 * buffer held) when they are not such columns or their lengths disagree. */
static Py_ssize_t get_batch(PyObject *ao, PyObject *lo, PyObject *fo, Py_buffer *addrs, Py_buffer *lens,
                            Py_buffer *flags, const char *who)
{
    if (get_col(ao, 8, addrs, who) < 0)
        return -1;
    if (get_col(lo, 4, lens, who) < 0) {
        PyBuffer_Release(addrs);
        return -1;
    }
    if (fo != NULL && get_col(fo, 2, flags, who) < 0) {
        PyBuffer_Release(addrs);
        PyBuffer_Release(lens);
        return -1;
    }
    Py_ssize_t n = addrs->shape[0];
    if (lens->shape[0] != n || (fo != NULL && flags->shape[0] != n)) {
        PyErr_Format(PyExc_ValueError, "%s: one u32 length%s per u64 address", who,
                     fo != NULL ? " and one u16 flags" : "");
        PyBuffer_Release(addrs);
        PyBuffer_Release(lens);
        if (fo != NULL)
            PyBuffer_Release(flags);
        return -1;
    }
    return n;
}

/* A batch's used lengths: an int (every element) or n u32. On success
 * *same holds the int, or *have is set and buf holds the array (the caller
 * releases it). Returns -1 with an exception set otherwise. */
static int get_written(PyObject *written, Py_ssize_t n, const char *who, uint32_t *same, Py_buffer *buf, int *have)
{
    if (PyLong_Check(written)) {
        unsigned long long v = PyLong_AsUnsignedLongLong(written);
        if (PyErr_Occurred())
            return -1;
        if (v > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: a used length is a u32", who);
            return -1;
        }
        *same = (uint32_t)v;
        return 0;
    }
    if (PyObject_GetBuffer(written, buf, PyBUF_SIMPLE) < 0)
        return -1;
    *have = 1;
    if (buf->len != 4 * n) {
        PyErr_Format(PyExc_ValueError, "%s: one u32 length per id", who);
        return -1;
    }
    return 0;
}

static PyObject *split_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer avail, desc, heads, descs;
    Py_ssize_t start, n, q;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "y*y*nnnw*w*", "split_gather", &avail, &desc, &start, &n, &q, &heads, &descs) < 0)
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
            uint64_t v[8] = {(uint64_t)i, 0, 0, 0, 0, 0, 0, 0};
            result = ints(8, 1, v);
            goto out;
        }
    }
    unsigned long fl = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t flags;
        memcpy(d + 16 * i, table + 16 * (Py_ssize_t)h[i], 16);
        memcpy(&flags, d + 16 * i + 12, 2);
        fl |= flags;
    }
    struct summary sm;
    summarize(d, n, 12, &sm);
    uint64_t v[8] = {(uint64_t)-1, fl, sm.amin, sm.emax, sm.lmin, sm.lmax, sm.lsum, sm.fand};
    result = ints(8, 1, v);
out:
    PyBuffer_Release(&avail);
    PyBuffer_Release(&desc);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&descs);
    return result;
}

static PyObject *split_used(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer used, ids, lens;
    Py_ssize_t start, q;
    PyObject *written;
    int have_lens = 0;
    uint32_t same = 0;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "w*nny*O", "split_used", &used, &start, &q, &ids, &written) < 0)
        return NULL;
    Py_ssize_t n = ids.len / 2;
    if (get_written(written, n, "split_used", &same, &lens, &have_lens) < 0)
        goto out;
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
            e[1] = same;
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
/* fill's work once the columns are known: addr and len of buffer i at
 * a + i * sa and l + i * sl. */
static PyObject *fill_batch(Py_buffer *region, uint64_t gpa, const unsigned char *a, Py_ssize_t sa,
                            const unsigned char *l, Py_ssize_t sl, Py_ssize_t n, const Py_buffer *data)
{
    uint64_t size = (uint64_t)region->len, k = (uint64_t)data->len;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        uint32_t len;
        memcpy(&addr, a + i * sa, 8);
        memcpy(&len, l + i * sl, 4);
        if (len < k || !inside(addr, k, gpa, size))
            return PyErr_Format(PyExc_ValueError, "fill: buffer %zd (%llu bytes at %#llx) cannot take %llu bytes",
                                i, (unsigned long long)len, (unsigned long long)addr, (unsigned long long)k);
    }
    unsigned char *base = region->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        memcpy(&addr, a + i * sa, 8);
        memcpy(base + (addr - gpa), data->buf, (size_t)k);
    }
    Py_RETURN_NONE;
}

static PyObject *fill(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer region, addrs, lens, data;
    PyObject *ao, *lo;
    unsigned long long gpa;
    if (fast_args(args, nargs, "w*OKOy*", "fill", &region, &ao, &gpa, &lo, &data) < 0)
        return NULL;
    Py_ssize_t n = get_batch(ao, lo, NULL, &addrs, &lens, NULL, "fill");
    if (n < 0) {
        PyBuffer_Release(&region);
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = fill_batch(&region, gpa, addrs.buf, addrs.strides[0], lens.buf, lens.strides[0], n, &data);
    PyBuffer_Release(&region);
    PyBuffer_Release(&addrs);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&data);
    return result;
}

/* fill_records(region, recs, gpa, data): fill, with the batch given as its
 * 16-byte descriptor records (addr at 0, len at 8): one buffer where fill
 * takes two columns. */
static PyObject *fill_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer region, recs, data;
    unsigned long long gpa;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "w*y*Ky*", "fill_records", &region, &recs, &gpa, &data) < 0)
        return NULL;
    if (recs.len % 16) {
        PyErr_SetString(PyExc_ValueError, "fill_records: one 16-byte record per buffer");
    } else {
        const unsigned char *r = recs.buf;
        result = fill_batch(&region, gpa, r, 16, r + 8, 16, recs.len / 16, &data);
    }
    PyBuffer_Release(&region);
    PyBuffer_Release(&recs);
    PyBuffer_Release(&data);
    return result;
}

/*
 * The packed ring, same idea. Flags are bit 7 AVAIL, bit 15 USED, bit 0 NEXT,
 * bit 1 WRITE, bit 2 INDIRECT; a descriptor is addr u64, len u32, id u16,
 * flags u16 (flags at byte 14).
 *
 * packed_scan(desc, slot, want, q, limit, budget, chunk, lists, count_lists, out)
 * continues PackedRing._scan_vector after its one-slot probe (out[0] holds
 * the probed flags): reads the flags of the following slots in chunks, as
 * the numpy loop does (same chunk sizes, so the same slots read), and stops
 * at the first slot not available, at `budget` slots in all, or after
 * `limit` descriptor lists when count_lists. Returns (total, reads, OR of
 * the run's flags, AND of them): out[:total] are the run's flags, reads the
 * slots read.
 *
 * packed_bodies(desc, start, n, q, out, flags): the n 16-byte descriptors from
 * slot start (wrapping) into out, each record's flags then replaced by
 * flags[i] (n u16: the flags the scan read, so that a batch keeps the one
 * snapshot its decisions were made on, and the caller may reuse the scan's
 * array); returns (lowest addr, highest addr + len saturated, lowest len,
 * highest len, sum of lens).
 *
 * packed_used(desc, u, q, wrap, recs, written): the used descriptors of one
 * batch (recs: its n 16-byte descriptor records, addr|len|id|flags, as
 * packed_bodies wrote them; written: an int or n u32) from slot u, one 8-byte
 * len|id|flags store each except the first, whose value is returned for the
 * caller to store last; WRITE where the buffer was writable and not empty.
 */
#define P_NEXT 0x1
#define P_WRITE 0x2
#define P_AVAIL 0x80
#define P_USED 0x8000
#define P_BOTH (P_AVAIL | P_USED)

static PyObject *packed_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer desc, out;
    Py_ssize_t slot, q, limit, budget, chunk, lists;
    unsigned int want;
    int count_lists;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "y*nInnnnnpw*", "packed_scan", &desc, &slot, &want, &q, &limit, &budget, &chunk, &lists,
                          &count_lists, &out) < 0)
        return NULL;
    Py_ssize_t cap = out.len / 2;
    if (q <= 0 || q > 32768 || slot < 0 || slot >= q || budget < 1 || budget > q || chunk < 1 || limit < 1
            || desc.len < 16 * q || cap < q + 1 || (want != P_AVAIL && want != P_USED)) {
        PyErr_Format(PyExc_ValueError, "packed_scan: bad arguments (q=%zd slot=%zd budget=%zd chunk=%zd)",
                     q, slot, budget, chunk);
        goto out;
    }
    const unsigned char *table = desc.buf;
    uint16_t *fl = out.buf;
    Py_ssize_t total = 1, reads = 0;
    unsigned long f_or = fl[0], f_and = fl[0];
    while (lists < limit && total <= budget) {
        Py_ssize_t k = chunk;
        if (q - slot < k)
            k = q - slot;
        if (budget - total + 1 < k)
            k = budget - total + 1;
        /* read k flags (counted as k reads, as np_load16_strided does) */
        Py_ssize_t m = k;
        for (Py_ssize_t i = 0; i < k; i++) {
            uint16_t v;
            memcpy(&v, table + 16 * (slot + i) + 14, 2);
            if (total + i < cap)
                fl[total + i] = v;
            if (m == k && (v & P_BOTH) != want)
                m = i;
        }
        reads += k;
        if (total + m > budget)
            m = budget - total;
        if (total + m > cap) {
            PyErr_SetString(PyExc_ValueError, "packed_scan: run longer than the output");
            goto out;
        }
        if (count_lists) {
            Py_ssize_t ends = 0, cut = -1;
            for (Py_ssize_t i = 0; i < m; i++) {
                if (!(fl[total + i] & P_NEXT)) {
                    ends++;
                    if (lists + ends >= limit) {
                        cut = i + 1;
                        break;
                    }
                }
            }
            if (cut >= 0) {
                for (Py_ssize_t i = 0; i < cut; i++) {
                    f_or |= fl[total + i];
                    f_and &= fl[total + i];
                }
                total += cut;
                break;
            }
            lists += ends;
        }
        for (Py_ssize_t i = 0; i < m; i++) {
            f_or |= fl[total + i];
            f_and &= fl[total + i];
        }
        total += m;
        if (m < k)
            break;
        slot += m;
        if (slot == q) {
            slot = 0;
            want ^= P_BOTH;
        }
        chunk = chunk > k ? chunk - k : 2 * chunk;
    }
    uint64_t v[4] = {(uint64_t)total, (uint64_t)reads, f_or, f_and};
    result = ints(4, 0, v);
out:
    PyBuffer_Release(&desc);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *packed_bodies(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer desc, out, flags;
    Py_ssize_t start, n, q;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "y*nnnw*y*", "packed_bodies", &desc, &start, &n, &q, &out, &flags) < 0)
        return NULL;
    if (q <= 0 || q > 32768 || n < 0 || n > q || start < 0 || start >= q || desc.len < 16 * q || out.len < 16 * n
            || flags.len < 2 * n) {
        PyErr_SetString(PyExc_ValueError, "packed_bodies: bad ring geometry or buffers");
        goto out;
    }
    const unsigned char *table = desc.buf;
    unsigned char *d = out.buf;
    Py_ssize_t first = q - start < n ? q - start : n;
    memcpy(d, table + 16 * start, (size_t)(16 * first));
    memcpy(d + 16 * first, table, (size_t)(16 * (n - first)));
    for (Py_ssize_t i = 0; i < n; i++)
        memcpy(d + 16 * i + 14, (const unsigned char *)flags.buf + 2 * i, 2);
    struct summary sm;
    summarize(d, n, 14, &sm);
    uint64_t v[5] = {sm.amin, sm.emax, sm.lmin, sm.lmax, sm.lsum};
    result = ints(5, 0, v);
out:
    PyBuffer_Release(&desc);
    PyBuffer_Release(&out);
    PyBuffer_Release(&flags);
    return result;
}

static PyObject *packed_used(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer desc, recs, wl;
    Py_ssize_t u, q;
    int wrap, have_wl = 0;
    PyObject *written;
    uint32_t same = 0;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "w*nnpy*O", "packed_used", &desc, &u, &q, &wrap, &recs, &written) < 0)
        return NULL;
    /* the batch's descriptor records, as packed_bodies wrote them (one buffer:
     * one export, where three strided field columns cost three) */
    Py_ssize_t n = recs.len / 16;
    if (get_written(written, n, "packed_used", &same, &wl, &have_wl) < 0)
        goto out;
    if (q <= 0 || q > 32768 || n < 1 || n > q || u < 0 || u >= q || desc.len < 16 * q || recs.len != 16 * n) {
        PyErr_SetString(PyExc_ValueError, "packed_used: bad ring geometry or buffers");
        goto out;
    }
    unsigned char *table = desc.buf;
    const unsigned char *r = recs.buf;
    const unsigned char *w = have_wl ? wl.buf : NULL;
    uint64_t used_flags = wrap ? P_BOTH : 0, head = 0;
    for (Py_ssize_t i = 0; i < n; i++, r += 16) {
        uint32_t len, wr;
        uint16_t id, fl;
        memcpy(&len, r + 8, 4);
        memcpy(&id, r + 12, 2);
        memcpy(&fl, r + 14, 2);
        if (w)
            memcpy(&wr, w + 4 * i, 4);
        else
            wr = same;
        uint64_t word = used_flags | ((fl & P_WRITE) && len ? P_WRITE : 0);
        uint64_t v = (uint64_t)wr | ((uint64_t)id << 32) | (word << 48);
        if (i == 0)
            head = v;
        else
            memcpy(table + 16 * u + 8, &v, 8);
        if (++u == q) {
            u = 0;
            used_flags ^= P_BOTH;
        }
    }
    result = PyLong_FromUnsignedLongLong(head);
out:
    if (have_wl)
        PyBuffer_Release(&wl);
    PyBuffer_Release(&desc);
    PyBuffer_Release(&recs);
    return result;
}

/*
 * iov_table(table, nr, gpa, size, host): a long indirect table (n entries of
 * 16 bytes: addr u64, len u32, flags, next) as a `struct iovec[]` for
 * preadv(2)/pwritev(2), when every buffer lies inside the one memory region
 * [gpa, gpa + size) mapped at host address `host`. Returns (iov bytes, sum
 * of the first nr lengths, sum of all), or None when a buffer is outside
 * the region (the caller then walks the table the general way, which says
 * what is wrong). The table is the caller's snapshot: read once here.
 */
static PyObject *iov_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer table;
    Py_ssize_t nr;
    unsigned long long gpa, size, host;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "y*nKKK", "iov_table", &table, &nr, &gpa, &size, &host) < 0)
        return NULL;
    Py_ssize_t n = table.len / 16;
    if (table.len % 16 || nr < 0 || nr > n || gpa + size < gpa || host + size < host) {
        PyErr_SetString(PyExc_ValueError, "iov_table: a table of 16-byte entries, nr <= entries, a region that fits");
        goto out;
    }
    const unsigned char *t = table.buf;
    uint64_t rsum = 0, tsum = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        uint32_t len;
        memcpy(&addr, t + 16 * i, 8);
        memcpy(&len, t + 16 * i + 8, 4);
        if (!inside(addr, len, gpa, size)) {
            result = Py_None;
            Py_INCREF(result);
            goto out;
        }
        tsum += len;
        if (i < nr)
            rsum += len;
    }
    result = PyBytes_FromStringAndSize(NULL, 16 * n);
    if (result == NULL)
        goto out;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr, len = 0;
        memcpy(&addr, t + 16 * i, 8);
        memcpy(&len, t + 16 * i + 8, 4);
        addr = host + (addr - gpa);
        memcpy(o + 16 * i, &addr, 8);
        memcpy(o + 16 * i + 8, &len, 8);
    }
    PyObject *tuple = Py_BuildValue("(NKK)", result, (unsigned long long)rsum, (unsigned long long)tsum);
    result = tuple;
out:
    PyBuffer_Release(&table);
    return result;
}

/*
 * scatter(region, addrs, gpa, lens, flags, frames, patch_at, patch): copy
 * frames[i] (bytes) to the start of buffer i of a batch (buffer i at region
 * offset addrs[i] - gpa, lens[i] bytes, flags[i] u16), then `patch` over
 * bytes [patch_at, patch_at + len(patch)) of the copy when patch_at >= 0:
 * what a loopback does with a batch of receive buffers (the patch is the
 * virtio-net header's num_buffers). One frame per buffer. Returns (shortest
 * frame, longest, total), or None having written nothing when a buffer is
 * not device-writable, lies outside the region or is shorter than its
 * frame, or a frame is shorter than the patch.
 */
static PyObject *scatter(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer region, addrs, lens, flags, patch;
    PyObject *ao, *lo, *fo;
    unsigned long long gpa;
    Py_ssize_t patch_at;
    PyObject *frames, *seq = NULL, *result = NULL;
    if (fast_args(args, nargs, "w*OKOOOny*", "scatter", &region, &ao, &gpa, &lo, &fo, &frames, &patch_at, &patch) < 0)
        return NULL;
    Py_ssize_t n = get_batch(ao, lo, fo, &addrs, &lens, &flags, "scatter");
    if (n < 0) {
        PyBuffer_Release(&region);
        PyBuffer_Release(&patch);
        return NULL;
    }
    seq = PySequence_Fast(frames, "scatter: frames must be a sequence of bytes");
    if (seq == NULL)
        goto out;
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_SetString(PyExc_ValueError, "scatter: one frame per buffer");
        goto out;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint64_t size = (uint64_t)region.len;
    uint64_t need = patch_at >= 0 ? (uint64_t)patch_at + (uint64_t)patch.len : 0;
    struct tally t;
    tally_init(&t, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_SetString(PyExc_TypeError, "scatter: frames must be bytes");
            goto out;
        }
        uint64_t addr, k = (uint64_t)PyBytes_GET_SIZE(items[i]);
        uint32_t len;
        uint16_t fl;
        memcpy(&addr, COL(addrs, i), 8);
        memcpy(&len, COL(lens, i), 4);
        memcpy(&fl, COL(flags, i), 2);
        if (!(fl & 0x2) || len < k || k < need || !inside(addr, k, gpa, size)) {
            result = Py_None;
            Py_INCREF(result);
            goto out;
        }
        tally_add(&t, k);
    }
    unsigned char *base = region.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        memcpy(&addr, COL(addrs, i), 8);
        unsigned char *dst = base + (addr - gpa);
        memcpy(dst, PyBytes_AS_STRING(items[i]), (size_t)PyBytes_GET_SIZE(items[i]));
        if (patch_at >= 0)
            memcpy(dst + patch_at, patch.buf, (size_t)patch.len);
    }
    result = tally_result(&t);
out:
    Py_XDECREF(seq);
    PyBuffer_Release(&region);
    PyBuffer_Release(&addrs);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&flags);
    PyBuffer_Release(&patch);
    return result;
}

/*
 * gather(region, addrs, gpa, lens, flags, lo, hi) -> (frames, lead_or):
 * a copy (bytes) of every device-readable buffer of a batch whose length is
 * in [lo, hi], in ring order; the others are skipped (the caller counts
 * them: len(frames) < n). lead_or is the OR of the copies' first two bytes
 * (as a little-endian u16): for virtio-net frames the header's flags and
 * gso_type, 0 when no frame asks for an offload. Buffers outside the region
 * are refused (ValueError) before anything is copied.
 */
static PyObject *gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer region, addrs, lens, flags;
    PyObject *ao, *lno, *fo;
    unsigned long long gpa, lo, hi;
    PyObject *list = NULL, *result = NULL;
    if (fast_args(args, nargs, "y*OKOOKK", "gather", &region, &ao, &gpa, &lno, &fo, &lo, &hi) < 0)
        return NULL;
    Py_ssize_t n = get_batch(ao, lno, fo, &addrs, &lens, &flags, "gather");
    if (n < 0) {
        PyBuffer_Release(&region);
        return NULL;
    }
    uint64_t size = (uint64_t)region.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        uint32_t len;
        memcpy(&addr, COL(addrs, i), 8);
        memcpy(&len, COL(lens, i), 4);
        if (!inside(addr, len, gpa, size)) {
            PyErr_Format(PyExc_ValueError, "gather: buffer %zd (%lu bytes at %#llx) is outside the region",
                         i, (unsigned long)len, (unsigned long long)addr);
            goto out;
        }
    }
    list = PyList_New(0);
    if (list == NULL)
        goto out;
    unsigned int lead = 0;
    const unsigned char *base = region.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t addr;
        uint32_t len;
        uint16_t fl;
        memcpy(&addr, COL(addrs, i), 8);
        memcpy(&len, COL(lens, i), 4);
        memcpy(&fl, COL(flags, i), 2);
        if ((fl & 0x2) || len < lo || len > hi)
            continue;
        const unsigned char *src = base + (addr - gpa);
        PyObject *b = PyBytes_FromStringAndSize((const char *)src, (Py_ssize_t)len);
        if (b == NULL || PyList_Append(list, b) < 0) {
            Py_XDECREF(b);
            goto out;
        }
        Py_DECREF(b);
        if (len >= 2)
            lead |= (unsigned int)src[0] | ((unsigned int)src[1] << 8);
    }
    result = Py_BuildValue("(Ok)", list, (unsigned long)lead);
out:
    Py_XDECREF(list);
    PyBuffer_Release(&region);
    PyBuffer_Release(&addrs);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&flags);
    return result;
}

/*
 * forward(src, s_addrs, s_gpa, s_lens, s_flags, dst, d_addrs, d_gpa, d_lens,
 *         d_flags, lo, hi, patch_at, patch) -> (shortest, longest, total)
 * copies buffer i of one batch (src region) to the start of buffer i of
 * another (dst region, maybe the same memory), then `patch` over bytes
 * [patch_at, patch_at + len(patch)) of the copy when patch_at >= 0: a
 * loopback's transmitted frames straight into receive buffers, with no
 * copy in between. Both batches have n buffers. Every pair is checked
 * before anything is written; None (nothing written) unless each source
 * buffer is device-readable, lo <= its length <= hi, and its first two
 * bytes are zero (a virtio-net header asking for no offload), and each
 * destination buffer is device-writable and long enough, and both lie
 * inside their regions. Buffers may overlap (the guest chose them): the
 * copy is a memmove.
 */
/* One batch's columns for forward: element i of each at base + i * stride. */
struct cols {
    const unsigned char *addr, *len, *flags;
    Py_ssize_t sa, sl, sf;
};

static struct cols cols_of(const Py_buffer *a, const Py_buffer *l, const Py_buffer *f)
{
    struct cols c = {a->buf, l->buf, f->buf, a->strides[0], l->strides[0], f->strides[0]};
    return c;
}

/* n 16-byte descriptor records: addr at 0, len at 8, flags at flags_at. */
static struct cols cols_of_records(const Py_buffer *r, Py_ssize_t flags_at)
{
    const unsigned char *b = r->buf;
    struct cols c = {b, b + 8, b + flags_at, 16, 16, 16};
    return c;
}

/* forward's work once the columns are known (see forward above). */
static PyObject *forward_batch(const Py_buffer *src, uint64_t sgpa, const struct cols *s, const Py_buffer *dst,
                               uint64_t dgpa, const struct cols *d, Py_ssize_t n, uint64_t lo, uint64_t hi,
                               Py_ssize_t patch_at, const Py_buffer *patch)
{
    uint64_t ssize = (uint64_t)src->len, dsize = (uint64_t)dst->len;
    uint64_t need = patch_at >= 0 ? (uint64_t)patch_at + (uint64_t)patch->len : 0;
    struct tally t;
    tally_init(&t, n);
    const unsigned char *sbase = src->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t sa, da;
        uint32_t k, room;
        uint16_t sfl, dfl;
        memcpy(&sa, s->addr + i * s->sa, 8);
        memcpy(&k, s->len + i * s->sl, 4);
        memcpy(&sfl, s->flags + i * s->sf, 2);
        memcpy(&da, d->addr + i * d->sa, 8);
        memcpy(&room, d->len + i * d->sl, 4);
        memcpy(&dfl, d->flags + i * d->sf, 2);
        if ((sfl & 0x2) || !(dfl & 0x2) || k < lo || k > hi || k < need || k < 2 || room < k
                || !inside(sa, k, sgpa, ssize) || !inside(da, k, dgpa, dsize)
                || sbase[sa - sgpa] || sbase[sa - sgpa + 1])
            Py_RETURN_NONE;
        tally_add(&t, k);
    }
    unsigned char *dbase = dst->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t sa, da;
        uint32_t k;
        memcpy(&sa, s->addr + i * s->sa, 8);
        memcpy(&k, s->len + i * s->sl, 4);
        memcpy(&da, d->addr + i * d->sa, 8);
        unsigned char *to = dbase + (da - dgpa);
        memmove(to, sbase + (sa - sgpa), (size_t)k);
        if (patch_at >= 0)
            memcpy(to + patch_at, patch->buf, (size_t)patch->len);
    }
    return tally_result(&t);
}

static PyObject *forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer src, dst, sa, sl, sf, da, dl, df, patch;
    PyObject *sao, *slo, *sfo, *dao, *dlo, *dfo;
    unsigned long long sgpa, dgpa, lo, hi;
    Py_ssize_t patch_at;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "y*OKOOw*OKOOKKny*", "forward", &src, &sao, &sgpa, &slo, &sfo, &dst, &dao, &dgpa, &dlo, &dfo,
                          &lo, &hi, &patch_at, &patch) < 0)
        return NULL;
    Py_ssize_t n = get_batch(sao, slo, sfo, &sa, &sl, &sf, "forward");
    if (n < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyBuffer_Release(&patch);
        return NULL;
    }
    Py_ssize_t m = get_batch(dao, dlo, dfo, &da, &dl, &df, "forward");
    if (m < 0) {
        PyBuffer_Release(&sa);
        PyBuffer_Release(&sl);
        PyBuffer_Release(&sf);
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyBuffer_Release(&patch);
        return NULL;
    }
    if (m != n) {
        PyErr_SetString(PyExc_ValueError, "forward: one destination buffer per source buffer");
    } else {
        struct cols s = cols_of(&sa, &sl, &sf), d = cols_of(&da, &dl, &df);
        result = forward_batch(&src, sgpa, &s, &dst, dgpa, &d, n, lo, hi, patch_at, &patch);
    }
    PyBuffer_Release(&sa);
    PyBuffer_Release(&sl);
    PyBuffer_Release(&sf);
    PyBuffer_Release(&da);
    PyBuffer_Release(&dl);
    PyBuffer_Release(&df);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&patch);
    return result;
}

/*
 * forward_records(src, s_recs, s_gpa, s_flags_at, dst, d_recs, d_gpa,
 *                 d_flags_at, lo, hi, patch_at, patch): forward, with each
 * batch given as its 16-byte descriptor records (addr at 0, len at 8, the
 * flags at 12 (split) or 14 (packed)): two buffers where forward takes six
 * columns.
 */
static PyObject *forward_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer src, dst, sr, dr, patch;
    unsigned long long sgpa, dgpa, lo, hi;
    Py_ssize_t sat, dat, patch_at;
    PyObject *result = NULL;
    if (fast_args(args, nargs, "y*y*Knw*y*KnKKny*", "forward_records", &src, &sr, &sgpa, &sat, &dst, &dr, &dgpa,
                  &dat, &lo, &hi, &patch_at, &patch) < 0)
        return NULL;
    if (sr.len % 16 || dr.len != sr.len || (sat != 12 && sat != 14) || (dat != 12 && dat != 14)) {
        PyErr_SetString(PyExc_ValueError, "forward_records: one 16-byte record per buffer on both sides, flags at 12 or 14");
    } else {
        struct cols s = cols_of_records(&sr, sat), d = cols_of_records(&dr, dat);
        result = forward_batch(&src, sgpa, &s, &dst, dgpa, &d, sr.len / 16, lo, hi, patch_at, &patch);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&sr);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&dr);
    PyBuffer_Release(&patch);
    return result;
}

static PyMethodDef methods[] = {
    {"split_gather", (PyCFunction)(void (*)(void))split_gather, METH_FASTCALL,
     "split_gather(avail, desc, start, n, q, heads, descs) -> "
     "(bad_index, flags_or, addr_min, end_max, len_min, len_max, len_sum)"},
    {"split_used", (PyCFunction)(void (*)(void))split_used, METH_FASTCALL, "split_used(used, start, q, ids, written): write n used elements."},
    {"packed_scan", (PyCFunction)(void (*)(void))packed_scan, METH_FASTCALL,
     "packed_scan(desc, slot, want, q, limit, budget, chunk, lists, count_lists, out) -> "
     "(total, reads, flags_or, flags_and)"},
    {"packed_bodies", (PyCFunction)(void (*)(void))packed_bodies, METH_FASTCALL,
     "packed_bodies(desc, start, n, q, out, flags) -> (addr_min, end_max, len_min, len_max, len_sum)"},
    {"packed_used", (PyCFunction)(void (*)(void))packed_used, METH_FASTCALL,
     "packed_used(desc, u, q, wrap, recs, written) -> the first descriptor's len|id|flags"},
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL, "fill(region, addrs, gpa, lens, data): copy data to the start of every buffer."},
    {"fill_records", (PyCFunction)(void (*)(void))fill_records, METH_FASTCALL,
     "fill_records(region, recs, gpa, data): fill, the batch given as its descriptor records."},
    {"scatter", (PyCFunction)(void (*)(void))scatter, METH_FASTCALL,
     "scatter(region, addrs, gpa, lens, flags, frames, patch_at, patch) -> (shortest, longest, total), or None"},
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
     "gather(region, addrs, gpa, lens, flags, lo, hi) -> (copies of the readable buffers lo <= len <= hi, lead_or)"},
    {"forward", (PyCFunction)(void (*)(void))forward, METH_FASTCALL,
     "forward(src, s_addrs, s_gpa, s_lens, s_flags, dst, d_addrs, d_gpa, d_lens, d_flags, lo, hi, patch_at, patch)"
     " -> (shortest, longest, total), or None"},
    {"forward_records", (PyCFunction)(void (*)(void))forward_records, METH_FASTCALL,
     "forward_records(src, s_recs, s_gpa, s_flags_at, dst, d_recs, d_gpa, d_flags_at, lo, hi, patch_at, patch)"
     " -> (shortest, longest, total), or None"},
    {"iov_table", (PyCFunction)(void (*)(void))iov_table, METH_FASTCALL,
     "iov_table(table, nr, gpa, size, host) -> (iov, readable_len, total_len), or None (a buffer outside)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringscan", "The ring engine's batch operations in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__ringscan(void)
{
    return PyModule_Create(&module);
}
