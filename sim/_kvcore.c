/* sim._kvcore: the KV block pool's per-block loops (sim/kv.py, BlockPool), in C.

   Part of the optional compiled engine (`servetwin native build`, sim/_native.py): used
   only when that build is, and then only for what each function's comment says; the
   numpy code in sim/kv.py stays the reference and the pure-Python engine. Every function
   here does, element by element, exactly what its numpy counterpart does over the whole
   array (same blocks, same order, same queue state), so outputs stay byte-identical
   (tests/sim/test_kvcore.py compares them on random pools; tests/sim/test_native.py on
   whole scenarios).

   Why: a prompt of 12k tokens has ~770 blocks of 16 tokens, and each allocation, prefix
   lookup, indexing and free went through five to ten numpy calls (a few microseconds of
   dispatch each) plus fancy-indexing passes. One C call per operation does the walk once.

   The arrays arrive through the buffer protocol: C-contiguous, int64 for block ids,
   stamps, keys and output buffers, int32 for reference counts, and 2, 4 or 8 bytes for
   the prefix index (BlockPool._index picks the narrowest). Indices are bounds-checked. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NO_KEY (-1)

/* A buffer of `itemsize`-byte items (0: 2, 4 or 8), writable when asked. */
static int
get_buf(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    Py_ssize_t got = view->itemsize;
    int ok = itemsize ? got == itemsize : (got == 2 || got == 4 || got == 8);
    if (!ok && itemsize) {
        PyErr_Format(PyExc_TypeError, "_kvcore: %s has %zd-byte items, wanted %zd",
                     name, got, itemsize);
    }
    else if (!ok) {
        PyErr_Format(PyExc_TypeError, "_kvcore: %s has %zd-byte items, wanted 2, 4 or 8",
                     name, got);
    }
    if (!ok) {
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline Py_ssize_t
count(const Py_buffer *v)
{
    return v->len / v->itemsize;
}

/* The prefix index entry at k, whatever its width. */
static inline int64_t
index_at(const Py_buffer *v, Py_ssize_t k)
{
    switch (v->itemsize) {
    case 2: return ((const int16_t *)v->buf)[k];
    case 4: return ((const int32_t *)v->buf)[k];
    default: return ((const int64_t *)v->buf)[k];
    }
}

static inline void
index_set(Py_buffer *v, Py_ssize_t k, int64_t b)
{
    switch (v->itemsize) {
    case 2: ((int16_t *)v->buf)[k] = (int16_t)b; break;
    case 4: ((int32_t *)v->buf)[k] = (int32_t)b; break;
    default: ((int64_t *)v->buf)[k] = b; break;
    }
}

static int
bad_index(const char *what, int64_t value, Py_ssize_t size)
{
    PyErr_Format(PyExc_IndexError, "_kvcore: %s %lld out of range [0, %zd)", what,
                 (long long)value, size);
    return -1;
}

static void
release(Py_buffer *views, int n)
{
    for (int i = 0; i < n; i++) {
        PyBuffer_Release(&views[i]);
    }
}

/* one more buffer into v[n] (the caller's array of views), or off to its `fail` label */
#define GET(obj, itemsize, writable, name)                                          \
    do {                                                                            \
        if (get_buf((obj), &v[n], (itemsize), (writable), (name)) < 0) {            \
            goto fail;                                                              \
        }                                                                           \
        n++;                                                                        \
    } while (0)

#define NEED_ARGS(n, fname)                                                         \
    if (nargs != (n)) {                                                             \
        PyErr_Format(PyExc_TypeError, "_kvcore." fname " takes %d arguments", (n)); \
        return NULL;                                                                \
    }

/* take(ids, stamps, head, need, free_stamp, ref, blk_key, out, out_pos)
       -> (new_head, taken, evicted)

   One free-queue chunk's part of BlockPool._pop_free + allocate_array: from entry
   `head` on, every entry still valid (free_stamp[id] == its stamp; others are
   tombstones) is taken, in order, until `need` are: free_stamp = 0, ref = 1, its prefix
   key cleared (counted in `evicted` when it held one), the id written to
   out[out_pos + i]. new_head is the entry past the last one taken (ids.size when the
   chunk ran out). Used only when no offload tier or key bitmap watches evictions. */
static PyObject *
kv_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(9, "take");
    Py_ssize_t head = PyLong_AsSsize_t(args[2]);
    Py_ssize_t need = PyLong_AsSsize_t(args[3]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[8]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer v[6];
    int n = 0;
    GET(args[0], 8, 0, "ids");
    GET(args[1], 8, 0, "stamps");
    GET(args[4], 8, 1, "free_stamp");
    GET(args[5], 4, 1, "ref");
    GET(args[6], 8, 1, "blk_key");
    GET(args[7], 8, 1, "out");
    {
        const int64_t *ids = v[0].buf, *stamps = v[1].buf;
        int64_t *fs = v[2].buf, *key = v[4].buf, *out = v[5].buf;
        int32_t *ref = v[3].buf;
        Py_ssize_t size = count(&v[0]), nblocks = count(&v[2]);
        if (count(&v[1]) != size || count(&v[3]) != nblocks || count(&v[4]) != nblocks
            || head < 0 || need < 0 || pos < 0 || pos + need > count(&v[5])) {
            PyErr_SetString(PyExc_ValueError, "_kvcore.take: inconsistent sizes");
            goto fail;
        }
        Py_ssize_t h = head, taken = 0, evicted = 0;
        while (taken < need && h < size) {
            int64_t b = ids[h], st = stamps[h];
            h++;
            if (b < 0 || b >= nblocks) {
                bad_index("block id", b, nblocks);
                goto fail;
            }
            if (fs[b] != st) {
                continue;  /* a tombstone: the block left the queue since */
            }
            fs[b] = 0;
            ref[b] = 1;
            if (key[b] != NO_KEY) {
                key[b] = NO_KEY;
                evicted++;
            }
            out[pos + taken++] = b;
        }
        release(v, n);
        return Py_BuildValue("nnn", h, taken, evicted);
    }
fail:
    release(v, n);
    return NULL;
}

/* free(ids, ref, free_stamp, stamp, out_ids, out_stamps) -> freed

   BlockPool.free + _append_free: drop one reference on each block, last block first
   (vLLM frees a request's blocks in reverse); each block reaching zero gets the next
   free stamp (stamp + 1, + 2, ...) and is written, in that order, to out_ids /
   out_stamps, the chunk the caller appends to the free queue. A request's block ids are
   distinct, as everywhere in the pool. */
static PyObject *
kv_free(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(6, "free");
    long long stamp = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer v[5];
    int n = 0;
    GET(args[0], 8, 0, "ids");
    GET(args[1], 4, 1, "ref");
    GET(args[2], 8, 1, "free_stamp");
    GET(args[4], 8, 1, "out_ids");
    GET(args[5], 8, 1, "out_stamps");
    {
        const int64_t *ids = v[0].buf;
        int32_t *ref = v[1].buf;
        int64_t *fs = v[2].buf, *oid = v[3].buf, *ost = v[4].buf;
        Py_ssize_t size = count(&v[0]), nblocks = count(&v[1]);
        if (count(&v[2]) != nblocks || count(&v[3]) < size || count(&v[4]) < size) {
            PyErr_SetString(PyExc_ValueError, "_kvcore.free: inconsistent sizes");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < size; i++) {  /* check first: all or nothing */
            if (ids[i] < 0 || ids[i] >= nblocks) {
                bad_index("block id", ids[i], nblocks);
                goto fail;
            }
        }
        Py_ssize_t freed = 0;
        for (Py_ssize_t i = size - 1; i >= 0; i--) {
            int64_t b = ids[i];
            if (--ref[b] == 0) {
                fs[b] = ++stamp;
                oid[freed] = b;
                ost[freed++] = stamp;
            }
        }
        release(v, n);
        return PyLong_FromSsize_t(freed);
    }
fail:
    release(v, n);
    return NULL;
}

/* touch(ids, ref, free_stamp) -> were_free

   BlockPool.touch: a reference on each block of a prefix hit; a block that was free
   leaves the queue (free_stamp = 0 turns its entry into a tombstone). */
static PyObject *
kv_touch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(3, "touch");
    Py_buffer v[3];
    int n = 0;
    GET(args[0], 8, 0, "ids");
    GET(args[1], 4, 1, "ref");
    GET(args[2], 8, 1, "free_stamp");
    {
        const int64_t *ids = v[0].buf;
        int32_t *ref = v[1].buf;
        int64_t *fs = v[2].buf;
        Py_ssize_t size = count(&v[0]), nblocks = count(&v[1]);
        if (count(&v[2]) != nblocks) {
            PyErr_SetString(PyExc_ValueError, "_kvcore.touch: inconsistent sizes");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < size; i++) {
            if (ids[i] < 0 || ids[i] >= nblocks) {
                bad_index("block id", ids[i], nblocks);
                goto fail;
            }
        }
        Py_ssize_t were_free = 0;
        for (Py_ssize_t i = 0; i < size; i++) {
            int64_t b = ids[i];
            if (ref[b]++ == 0) {
                fs[b] = 0;
                were_free++;
            }
        }
        release(v, n);
        return PyLong_FromSsize_t(were_free);
    }
fail:
    release(v, n);
    return NULL;
}

/* cache(ids, keys, index, blk_key) -> None

   BlockPool.cache without a key bitmap: block ids[i] now holds keys[i]; the index points
   keys[i] at it unless a live block already holds that key (index entry valid: the
   block it names still holds the key). As numpy does it: every "already held" is judged
   before any block takes its key. */
static PyObject *
kv_cache(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(4, "cache");
    Py_buffer v[4];
    int n = 0;
    unsigned char *held = NULL;
    GET(args[0], 8, 0, "ids");
    GET(args[1], 8, 0, "keys");
    GET(args[2], 0, 1, "index");
    GET(args[3], 8, 1, "blk_key");
    {
        const int64_t *ids = v[0].buf, *keys = v[1].buf;
        int64_t *key = v[3].buf;
        Py_ssize_t size = count(&v[0]), nkeys = count(&v[2]), nblocks = count(&v[3]);
        if (count(&v[1]) != size) {
            PyErr_SetString(PyExc_ValueError, "_kvcore.cache: ids and keys differ in size");
            goto fail;
        }
        held = PyMem_Malloc(size ? (size_t)size : 1);
        if (held == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t i = 0; i < size; i++) {
            if (ids[i] < 0 || ids[i] >= nblocks) {
                bad_index("block id", ids[i], nblocks);
                goto fail;
            }
            if (keys[i] < 0 || keys[i] >= nkeys) {
                bad_index("prefix key", keys[i], nkeys);
                goto fail;
            }
            int64_t cur = index_at(&v[2], keys[i]);
            if (cur >= nblocks) {
                bad_index("indexed block", cur, nblocks);
                goto fail;
            }
            held[i] = cur >= 0 && key[cur] == keys[i];
        }
        for (Py_ssize_t i = 0; i < size; i++) {
            key[ids[i]] = keys[i];
        }
        for (Py_ssize_t i = 0; i < size; i++) {
            if (!held[i]) {
                index_set(&v[2], keys[i], ids[i]);
            }
        }
        PyMem_Free(held);
        release(v, n);
        Py_RETURN_NONE;
    }
fail:
    PyMem_Free(held);
    release(v, n);
    return NULL;
}

/* The length of the leading run of keys the cache holds; their blocks to out, if any. */
static int
leading_run(PyObject *const *args, PyObject *out_obj, Py_ssize_t *run)
{
    Py_buffer v[4];
    int n = 0;
    GET(args[0], 8, 0, "keys");
    GET(args[1], 0, 0, "index");
    GET(args[2], 8, 0, "blk_key");
    if (out_obj != NULL) {
        GET(out_obj, 8, 1, "out");
    }
    {
        const int64_t *keys = v[0].buf, *key = v[2].buf;
        int64_t *out = out_obj != NULL ? v[3].buf : NULL;
        Py_ssize_t size = count(&v[0]), nkeys = count(&v[1]), nblocks = count(&v[2]);
        if (out != NULL && count(&v[3]) < size) {
            PyErr_SetString(PyExc_ValueError, "_kvcore.lookup: out is too small");
            goto fail;
        }
        Py_ssize_t i = 0;
        for (; i < size; i++) {
            int64_t k = keys[i];
            if (k < 0 || k >= nkeys) {
                bad_index("prefix key", k, nkeys);
                goto fail;
            }
            int64_t b = index_at(&v[1], k);
            if (b < 0 || b >= nblocks || key[b] != k) {
                break;
            }
            if (out != NULL) {
                out[i] = b;
            }
        }
        *run = i;
        release(v, n);
        return 0;
    }
fail:
    release(v, n);
    return -1;
}

/* lookup(keys, index, blk_key, out) -> n: BlockPool.lookup; the blocks of the leading
   run of keys the cache holds go to out[:n]. */
static PyObject *
kv_lookup(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(4, "lookup");
    Py_ssize_t run;
    if (leading_run(args, args[3], &run) < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(run);
}

/* prefix_len(keys, index, blk_key) -> n: BlockPool.num_cached_prefix. */
static PyObject *
kv_prefix_len(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(3, "prefix_len");
    Py_ssize_t run;
    if (leading_run(args, NULL, &run) < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(run);
}

/* layout_keys(dense_ids, hash_block_tokens, block_size, out)

   PrefixLayout's keys: engine block j (tokens [j*B, (j+1)*B)) ends inside trace block
   k = ((j+1)*B - 1) // T at offset r; its key is dense_ids[k] * S + (r - 1) // B with
   S = ceil(T / B) slots per trace block, for j < out.size. */
static PyObject *
kv_layout_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NEED_ARGS(4, "layout_keys");
    long long t = PyLong_AsLongLong(args[1]);
    long long bs = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (t <= 0 || bs <= 0) {
        PyErr_SetString(PyExc_ValueError, "_kvcore.layout_keys: block sizes must be > 0");
        return NULL;
    }
    Py_buffer v[2];
    int n = 0;
    GET(args[0], 8, 0, "dense_ids");
    GET(args[3], 8, 1, "out");
    {
        const int64_t *dense = v[0].buf;
        int64_t *out = v[1].buf;
        Py_ssize_t size = count(&v[1]), ids = count(&v[0]);
        int64_t slots = (t - 1) / bs + 1;
        if (size && ((int64_t)size * bs - 1) / t >= ids) {
            PyErr_SetString(PyExc_ValueError, "_kvcore.layout_keys: more blocks than the "
                            "hash ids cover");
            goto fail;
        }
        for (Py_ssize_t j = 0; j < size; j++) {
            int64_t end = (int64_t)(j + 1) * bs;
            int64_t k = (end - 1) / t;
            out[j] = dense[k] * slots + (end - k * t - 1) / bs;
        }
        release(v, n);
        Py_RETURN_NONE;
    }
fail:
    release(v, n);
    return NULL;
}

static PyMethodDef methods[] = {
    {"take", (PyCFunction)(void (*)(void))kv_take, METH_FASTCALL,
     "take(ids, stamps, head, need, free_stamp, ref, blk_key, out, out_pos)"},
    {"free", (PyCFunction)(void (*)(void))kv_free, METH_FASTCALL,
     "free(ids, ref, free_stamp, stamp, out_ids, out_stamps) -> freed"},
    {"touch", (PyCFunction)(void (*)(void))kv_touch, METH_FASTCALL,
     "touch(ids, ref, free_stamp) -> were_free"},
    {"cache", (PyCFunction)(void (*)(void))kv_cache, METH_FASTCALL,
     "cache(ids, keys, index, blk_key)"},
    {"lookup", (PyCFunction)(void (*)(void))kv_lookup, METH_FASTCALL,
     "lookup(keys, index, blk_key, out) -> n"},
    {"layout_keys", (PyCFunction)(void (*)(void))kv_layout_keys, METH_FASTCALL,
     "layout_keys(dense_ids, hash_block_tokens, block_size, out)"},
    {"prefix_len", (PyCFunction)(void (*)(void))kv_prefix_len, METH_FASTCALL,
     "prefix_len(keys, index, blk_key) -> n"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sim._kvcore",
    "The KV block pool's per-block loops in C (see sim/_kvcore.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__kvcore(void)
{
    return PyModule_Create(&module);
}
