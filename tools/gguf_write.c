/* gguf_write.c - GGUF v3 writer. See gguf_write.h.
 *
 * Key/values are serialised into one growing byte buffer as they are added (so the
 * writer keeps no typed copy of them); tensors are kept as descriptors until
 * write time, when their offsets are laid out and their data streamed in order. */
#include "gguf_write.h"

#include "base/status.h"
#include "worker/gguf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ALIGN 32
#define MAX_DIMS 4

/* A byte buffer that grows by doubling. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

typedef struct {
    char *name;
    uint32_t type, n_dims;
    uint64_t ne[MAX_DIMS];
    uint64_t nbytes, offset;
    const void *data;        /* either data ... */
    bn_gguf_fill_fn fill;    /* ... or fill(sink, user) */
    void *user;
} tensor_t;

struct bn_gguf_writer {
    buf_t kv;                /* serialised key/values */
    uint64_t n_kv;
    char **keys;             /* (n_kv) for the duplicate check */
    size_t keys_cap;
    tensor_t *tensors;
    uint64_t n_tensors;
    size_t tensors_cap;
};

struct bn_gguf_sink {
    FILE *f;
    const char *path;
    const tensor_t *t;
    uint64_t written;        /* bytes of the current tensor so far */
};

static int buf_reserve(buf_t *b, size_t more)
{
    if (b->cap - b->len >= more)
        return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < more) {
        if (cap > SIZE_MAX / 2)
            return 0;
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

static int buf_put(buf_t *b, const void *src, size_t n)
{
    if (n == 0) /* src may be NULL then (an empty buffer) */
        return 1;
    if (!buf_reserve(b, n))
        return 0;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 1;
}

/* Little-endian integers, whatever the host. */
static int buf_le(buf_t *b, uint64_t v, int nbytes)
{
    uint8_t tmp[8];
    for (int i = 0; i < nbytes; i++)
        tmp[i] = (uint8_t)(v >> (8 * i));
    return buf_put(b, tmp, (size_t)nbytes);
}

static int buf_str(buf_t *b, const char *s)
{
    size_t n = strlen(s);
    return buf_le(b, n, 8) && buf_put(b, s, n);
}

/* One scalar from its C representation, as little endian bytes. */
static int buf_scalar(buf_t *b, uint32_t t, const void *v)
{
    int n = (int)bn_gguf_value_size(t);
    uint64_t x = 0;
    switch (n) {
    case 1: { uint8_t u; memcpy(&u, v, 1); x = t == BN_GGUF_BOOL ? (u != 0) : u; break; }
    case 2: { uint16_t u; memcpy(&u, v, 2); x = u; break; }
    case 4: { uint32_t u; memcpy(&u, v, 4); x = u; break; }
    case 8: { memcpy(&x, v, 8); break; }
    }
    return buf_le(b, x, n);
}

bn_gguf_writer_t *bn_gguf_writer_new(void)
{
    return calloc(1, sizeof(bn_gguf_writer_t));
}

void bn_gguf_writer_destroy(bn_gguf_writer_t **pw)
{
    if (!pw || !*pw)
        return;
    bn_gguf_writer_t *w = *pw;
    for (uint64_t i = 0; i < w->n_kv; i++)
        free(w->keys[i]);
    for (uint64_t i = 0; i < w->n_tensors; i++)
        free(w->tensors[i].name);
    free(w->keys);
    free(w->tensors);
    free(w->kv.p);
    free(w);
    *pw = NULL;
}

/* Checks the key and writes it with its value type; the caller appends the value.
 * On a later failure the caller rolls kv.len back to `*mark`. */
static int begin_kv(bn_gguf_writer_t *w, const char *key, uint32_t type, size_t *mark,
                    char *err, size_t errlen)
{
    if (!key || !*key)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: empty key");
    for (uint64_t i = 0; i < w->n_kv; i++)
        if (strcmp(w->keys[i], key) == 0)
            return bn_err(err, errlen, BN_EINVAL, "gguf writer: key '%s' added twice", key);
    if (w->n_kv == w->keys_cap) {
        size_t cap = w->keys_cap ? 2 * w->keys_cap : 32;
        char **k = realloc(w->keys, cap * sizeof *k);
        if (!k)
            return bn_err(err, errlen, BN_ENOMEM, "gguf writer: out of memory for key '%s'", key);
        w->keys = k;
        w->keys_cap = cap;
    }
    *mark = w->kv.len;
    if (!buf_str(&w->kv, key) || !buf_le(&w->kv, type, 4)) {
        w->kv.len = *mark;
        return bn_err(err, errlen, BN_ENOMEM, "gguf writer: out of memory for key '%s'", key);
    }
    return BN_OK;
}

/* Records the key once its value is in the buffer. */
static int end_kv(bn_gguf_writer_t *w, const char *key, size_t mark, int ok, char *err, size_t errlen)
{
    char *k = ok ? strdup(key) : NULL;
    if (!k) {
        w->kv.len = mark;
        return bn_err(err, errlen, BN_ENOMEM, "gguf writer: out of memory for key '%s'", key);
    }
    w->keys[w->n_kv++] = k;
    return BN_OK;
}

int bn_gguf_writer_add_kv(bn_gguf_writer_t *w, const char *key, uint32_t type, const void *value,
                          char *err, size_t errlen)
{
    if (type != BN_GGUF_STRING && (int)bn_gguf_value_size(type) == 0)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: key '%s': value type %u is not a scalar type",
                      key ? key : "", type);
    if (!value || (type == BN_GGUF_STRING && !*(const char *const *)value))
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: key '%s': no value", key ? key : "");
    size_t mark;
    int rc = begin_kv(w, key, type, &mark, err, errlen);
    if (rc != BN_OK)
        return rc;
    int ok = type == BN_GGUF_STRING ? buf_str(&w->kv, *(const char *const *)value)
                                    : buf_scalar(&w->kv, type, value);
    return end_kv(w, key, mark, ok, err, errlen);
}

int bn_gguf_writer_add_u32(bn_gguf_writer_t *w, const char *key, uint32_t v, char *err, size_t errlen)
{
    return bn_gguf_writer_add_kv(w, key, BN_GGUF_UINT32, &v, err, errlen);
}

int bn_gguf_writer_add_f32(bn_gguf_writer_t *w, const char *key, float v, char *err, size_t errlen)
{
    return bn_gguf_writer_add_kv(w, key, BN_GGUF_FLOAT32, &v, err, errlen);
}

int bn_gguf_writer_add_bool(bn_gguf_writer_t *w, const char *key, int v, char *err, size_t errlen)
{
    uint8_t b = v != 0;
    return bn_gguf_writer_add_kv(w, key, BN_GGUF_BOOL, &b, err, errlen);
}

int bn_gguf_writer_add_str(bn_gguf_writer_t *w, const char *key, const char *s, char *err, size_t errlen)
{
    return bn_gguf_writer_add_kv(w, key, BN_GGUF_STRING, &s, err, errlen);
}

int bn_gguf_writer_add_arr(bn_gguf_writer_t *w, const char *key, uint32_t elem_type, const void *elems,
                           uint64_t n, char *err, size_t errlen)
{
    int es = (int)bn_gguf_value_size(elem_type);
    if (es == 0)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: key '%s': array element type %u is not numeric",
                      key ? key : "", elem_type);
    if (n > 0 && !elems)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: key '%s': no elements", key ? key : "");
    size_t mark;
    int rc = begin_kv(w, key, BN_GGUF_ARRAY, &mark, err, errlen);
    if (rc != BN_OK)
        return rc;
    int ok = n <= SIZE_MAX / (size_t)es && buf_le(&w->kv, elem_type, 4) && buf_le(&w->kv, n, 8) &&
             buf_reserve(&w->kv, (size_t)n * (size_t)es);
    for (uint64_t i = 0; ok && i < n; i++)
        ok = buf_scalar(&w->kv, elem_type, (const uint8_t *)elems + i * (size_t)es);
    return end_kv(w, key, mark, ok, err, errlen);
}

int bn_gguf_writer_add_arr_str(bn_gguf_writer_t *w, const char *key, const char *const *strs, uint64_t n,
                               char *err, size_t errlen)
{
    for (uint64_t i = 0; i < n; i++)
        if (!strs || !strs[i])
            return bn_err(err, errlen, BN_EINVAL, "gguf writer: key '%s': string %llu is NULL",
                          key ? key : "", (unsigned long long)i);
    size_t mark;
    int rc = begin_kv(w, key, BN_GGUF_ARRAY, &mark, err, errlen);
    if (rc != BN_OK)
        return rc;
    int ok = buf_le(&w->kv, BN_GGUF_STRING, 4) && buf_le(&w->kv, n, 8);
    for (uint64_t i = 0; ok && i < n; i++)
        ok = buf_str(&w->kv, strs[i]);
    return end_kv(w, key, mark, ok, err, errlen);
}

static int add_tensor(bn_gguf_writer_t *w, const char *name, uint32_t type, uint32_t n_dims,
                      const uint64_t *ne, uint64_t nbytes, const void *data, bn_gguf_fill_fn fill,
                      void *user, char *err, size_t errlen)
{
    if (!name || !*name)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: tensor with an empty name");
    if (n_dims == 0 || n_dims > MAX_DIMS)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: tensor '%s' has %u dimensions (1..%d allowed)",
                      name, n_dims, MAX_DIMS);
    for (uint32_t d = 0; d < n_dims; d++)
        if (ne[d] == 0)
            return bn_err(err, errlen, BN_EINVAL, "gguf writer: tensor '%s' has dimension %u = 0", name, d);
    if (!data && !fill && nbytes > 0)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: tensor '%s' has no data", name);
    for (uint64_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return bn_err(err, errlen, BN_EINVAL, "gguf writer: tensor '%s' added twice", name);
    if (w->n_tensors == w->tensors_cap) {
        size_t cap = w->tensors_cap ? 2 * w->tensors_cap : 64;
        tensor_t *t = realloc(w->tensors, cap * sizeof *t);
        if (!t)
            return bn_err(err, errlen, BN_ENOMEM, "gguf writer: out of memory for tensor '%s'", name);
        w->tensors = t;
        w->tensors_cap = cap;
    }
    tensor_t *t = &w->tensors[w->n_tensors];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return bn_err(err, errlen, BN_ENOMEM, "gguf writer: out of memory for tensor '%s'", name);
    t->type = type;
    t->n_dims = n_dims;
    memcpy(t->ne, ne, n_dims * sizeof *ne);
    t->nbytes = nbytes;
    t->data = data;
    t->fill = fill;
    t->user = user;
    w->n_tensors++;
    return BN_OK;
}

int bn_gguf_writer_add_tensor(bn_gguf_writer_t *w, const char *name, uint32_t type, uint32_t n_dims,
                              const uint64_t *ne, uint64_t nbytes, const void *data, char *err, size_t errlen)
{
    return add_tensor(w, name, type, n_dims, ne, nbytes, data, NULL, NULL, err, errlen);
}

int bn_gguf_writer_add_tensor_fn(bn_gguf_writer_t *w, const char *name, uint32_t type, uint32_t n_dims,
                                 const uint64_t *ne, uint64_t nbytes, bn_gguf_fill_fn fill, void *user,
                                 char *err, size_t errlen)
{
    if (!fill)
        return bn_err(err, errlen, BN_EINVAL, "gguf writer: tensor '%s' has no fill callback", name ? name : "");
    return add_tensor(w, name, type, n_dims, ne, nbytes, NULL, fill, user, err, errlen);
}

/* fwrite that reports why it failed (ENOSPC...). */
static int put(FILE *f, const char *path, const void *p, size_t n, char *err, size_t errlen)
{
    if (n == 0)
        return BN_OK;
    errno = 0;
    if (fwrite(p, 1, n, f) != n)
        return bn_err(err, errlen, BN_EIO, "%s: write failed: %s", path,
                      errno ? strerror(errno) : "short write");
    return BN_OK;
}

static int pad(FILE *f, const char *path, uint64_t pos, char *err, size_t errlen)
{
    static const uint8_t zeros[ALIGN];
    return put(f, path, zeros, (size_t)((ALIGN - pos % ALIGN) % ALIGN), err, errlen);
}

int bn_gguf_sink_write(bn_gguf_sink_t *s, const void *data, size_t n, char *err, size_t errlen)
{
    if (n > s->t->nbytes - s->written)
        return bn_err(err, errlen, BN_EINVAL, "%s: tensor '%s': %llu bytes written, more than the declared %llu",
                      s->path, s->t->name, (unsigned long long)(s->written + n),
                      (unsigned long long)s->t->nbytes);
    int rc = put(s->f, s->path, data, n, err, errlen);
    if (rc == BN_OK)
        s->written += n;
    return rc;
}

/* The header up to and including the tensor descriptors, with the offsets laid out. */
static int build_header(bn_gguf_writer_t *w, buf_t *h)
{
    uint64_t off = 0;
    for (uint64_t i = 0; i < w->n_tensors; i++) {
        w->tensors[i].offset = off;
        off += (w->tensors[i].nbytes + ALIGN - 1) / ALIGN * ALIGN;
    }
    int ok = buf_le(h, BN_GGUF_MAGIC, 4) && buf_le(h, 3, 4) && buf_le(h, w->n_tensors, 8) &&
             buf_le(h, w->n_kv, 8) && buf_put(h, w->kv.p, w->kv.len);
    for (uint64_t i = 0; ok && i < w->n_tensors; i++) {
        const tensor_t *t = &w->tensors[i];
        ok = buf_str(h, t->name) && buf_le(h, t->n_dims, 4);
        for (uint32_t d = 0; ok && d < t->n_dims; d++)
            ok = buf_le(h, t->ne[d], 8);
        ok = ok && buf_le(h, t->type, 4) && buf_le(h, t->offset, 8);
    }
    return ok;
}

static int write_all(bn_gguf_writer_t *w, FILE *f, const char *path, char *err, size_t errlen)
{
    buf_t h = { 0 };
    if (!build_header(w, &h)) {
        free(h.p);
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory for the GGUF header", path);
    }
    int rc = put(f, path, h.p, h.len, err, errlen);
    if (rc == BN_OK)
        rc = pad(f, path, h.len, err, errlen);
    free(h.p);
    for (uint64_t i = 0; rc == BN_OK && i < w->n_tensors; i++) {
        const tensor_t *t = &w->tensors[i];
        if (t->fill) {
            bn_gguf_sink_t sink = { f, path, t, 0 };
            rc = t->fill(&sink, t->user, err, errlen);
            if (rc == BN_OK && sink.written != t->nbytes)
                rc = bn_err(err, errlen, BN_EINVAL, "%s: tensor '%s': %llu bytes written, %llu declared",
                            path, t->name, (unsigned long long)sink.written, (unsigned long long)t->nbytes);
        } else {
            /* fwrite takes size_t: write huge buffers in pieces on 32-bit hosts. */
            const uint8_t *p = t->data;
            for (uint64_t left = t->nbytes; rc == BN_OK && left > 0;) {
                size_t n = left > (1u << 30) ? (1u << 30) : (size_t)left;
                rc = put(f, path, p, n, err, errlen);
                p += n;
                left -= n;
            }
        }
        if (rc == BN_OK)
            rc = pad(f, path, t->nbytes, err, errlen);
    }
    return rc;
}

int bn_gguf_writer_write(bn_gguf_writer_t *w, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return bn_err(err, errlen, BN_EIO, "%s: cannot create: %s", path, strerror(errno));
    /* Only a regular file we made is removed on failure (never /dev/full, a fifo...). */
    struct stat st;
    int regular = fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode);
    /* Large stdio buffer: tensors arrive in small pieces from the fill callbacks. */
    setvbuf(f, NULL, _IOFBF, 1 << 22);
    int rc = write_all(w, f, path, err, errlen);
    if (rc == BN_OK && fflush(f) != 0)
        rc = bn_err(err, errlen, BN_EIO, "%s: write failed: %s", path, strerror(errno));
    if (fclose(f) != 0 && rc == BN_OK)
        rc = bn_err(err, errlen, BN_EIO, "%s: close failed: %s", path, strerror(errno));
    if (rc != BN_OK && regular)
        unlink(path);
    return rc;
}
