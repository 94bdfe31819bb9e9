/* gguf.c - GGUF v3 reader: map, parse, validate. See gguf.h.
 *
 * Every read goes through a cursor that checks the remaining length first, so a
 * count or length from the file can never make us read past the mapping, and
 * counts are checked against what the remaining bytes could possibly hold before
 * anything is allocated (a file cannot ask for more memory than its own size). */
#include "gguf.h"

#include "kernels/quants.h"
#include "base/status.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_DIMS 4
#define MAX_KEY_LEN 65535

typedef struct {
    const uint8_t *p, *end;
} cursor_t;

static int take(cursor_t *c, void *dst, size_t n)
{
    if ((size_t)(c->end - c->p) < n)
        return 0;
    memcpy(dst, c->p, n);
    c->p += n;
    return 1;
}

static int take_str(cursor_t *c, bn_str_t *s)
{
    uint64_t len;
    if (!take(c, &len, 8) || len > (uint64_t)(c->end - c->p))
        return 0;
    s->ptr = (const char *)c->p;
    s->len = len;
    c->p += len;
    return 1;
}

static char *dup_str(bn_str_t s)
{
    char *d = malloc(s.len + 1);
    if (d) {
        memcpy(d, s.ptr, s.len);
        d[s.len] = 0;
    }
    return d;
}

size_t bn_gguf_value_size(uint32_t t)
{
    switch (t) {
    case BN_GGUF_UINT8: case BN_GGUF_INT8: case BN_GGUF_BOOL: return 1;
    case BN_GGUF_UINT16: case BN_GGUF_INT16: return 2;
    case BN_GGUF_UINT32: case BN_GGUF_INT32: case BN_GGUF_FLOAT32: return 4;
    case BN_GGUF_UINT64: case BN_GGUF_INT64: case BN_GGUF_FLOAT64: return 8;
    }
    return 0;
}

const char *bn_type_name(uint32_t type)
{
    switch (type) {
    case BN_TYPE_F32: return "F32";
    case BN_TYPE_F16: return "F16";
    case BN_TYPE_BF16: return "BF16";
    case BN_TYPE_Q4_0: return "Q4_0";
    case BN_TYPE_Q8_0: return "Q8_0";
    case BN_TYPE_Q6_K: return "Q6_K";
    case BN_TYPE_TQ1_0: return "TQ1_0";
    case BN_TYPE_TQ2_0: return "TQ2_0";
    case BN_TYPE_I2_S: return "I2_S";
    }
    return NULL;
}

uint32_t bn_type_block(uint32_t type)
{
    switch (type) {
    case BN_TYPE_F32: case BN_TYPE_F16: case BN_TYPE_BF16: return 1;
    case BN_TYPE_Q4_0: case BN_TYPE_Q8_0: return 32;
    case BN_TYPE_Q6_K: case BN_TYPE_TQ1_0: case BN_TYPE_TQ2_0: return 256;
    case BN_TYPE_I2_S: return BN_QK_I2S;
    }
    return 0;
}

uint64_t bn_type_nbytes(uint32_t type, uint64_t n, int whole_tensor)
{
    uint32_t blk = bn_type_block(type);
    if (blk == 0 || n % blk != 0 || n > (UINT64_MAX / 8))
        return 0;
    uint64_t nb = n / blk;
    switch (type) {
    case BN_TYPE_F32: return n * 4;
    case BN_TYPE_F16: case BN_TYPE_BF16: return n * 2;
    case BN_TYPE_Q4_0: return nb * sizeof(bn_block_q4_0);
    case BN_TYPE_Q8_0: return nb * sizeof(bn_block_q8_0);
    case BN_TYPE_Q6_K: return nb * sizeof(bn_block_q6_k);
    case BN_TYPE_TQ1_0: return nb * sizeof(bn_block_tq1_0);
    case BN_TYPE_TQ2_0: return nb * sizeof(bn_block_tq2_0);
    case BN_TYPE_I2_S: return n / 4 + (whole_tensor ? 32 : 0);
    }
    return 0;
}

static int parse_kv(bn_gguf_t *g, cursor_t *c, uint64_t i, char *err, size_t errlen)
{
    bn_gguf_kv_t *kv = &g->kv[i];
    bn_str_t key;
    if (!take_str(c, &key))
        return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (key of metadata entry %llu)",
                      g->path, (unsigned long long)i);
    if (key.len == 0 || key.len > MAX_KEY_LEN)
        return bn_err(err, errlen, BN_EFORMAT, "%s: metadata entry %llu has a key of length %llu",
                      g->path, (unsigned long long)i, (unsigned long long)key.len);
    if (!(kv->key = dup_str(key)))
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", g->path);
    if (!take(c, &kv->type, 4))
        return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (type of key '%s')", g->path, kv->key);
    uint32_t et = kv->type;
    kv->n = 1;
    if (kv->type == BN_GGUF_ARRAY) {
        if (!take(c, &kv->arr_type, 4) || !take(c, &kv->n, 8))
            return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (array key '%s')", g->path, kv->key);
        et = kv->arr_type;
        if (et == BN_GGUF_ARRAY)
            return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: key '%s' is an array of arrays", g->path, kv->key);
    }
    uint64_t left = (uint64_t)(c->end - c->p);
    if (et == BN_GGUF_STRING) {
        /* Each string needs at least its 8-byte length: bounds n before allocating. */
        if (kv->n > left / 8)
            return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' claims %llu strings, more than the file holds",
                          g->path, kv->key, (unsigned long long)kv->n);
        kv->strs = malloc((kv->n ? kv->n : 1) * sizeof(bn_str_t));
        if (!kv->strs)
            return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory for key '%s'", g->path, kv->key);
        for (uint64_t j = 0; j < kv->n; j++)
            if (!take_str(c, &kv->strs[j]))
                return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (string %llu of key '%s')",
                              g->path, (unsigned long long)j, kv->key);
        return BN_OK;
    }
    size_t es = bn_gguf_value_size(et);
    if (es == 0)
        return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' has unknown value type %u", g->path, kv->key, et);
    if (kv->n > left / es)
        return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (value of key '%s')", g->path, kv->key);
    kv->data = c->p;
    c->p += kv->n * es;
    return BN_OK;
}

static int parse_tensor(bn_gguf_t *g, cursor_t *c, uint64_t i, char *err, size_t errlen)
{
    bn_gguf_tensor_t *t = &g->tensors[i];
    bn_str_t name;
    if (!take_str(c, &name))
        return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (name of tensor %llu)",
                      g->path, (unsigned long long)i);
    if (name.len == 0 || name.len > MAX_KEY_LEN)
        return bn_err(err, errlen, BN_EFORMAT, "%s: tensor %llu has a name of length %llu",
                      g->path, (unsigned long long)i, (unsigned long long)name.len);
    if (!(t->name = dup_str(name)))
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", g->path);
    if (!take(c, &t->n_dims, 4))
        return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (tensor '%s')", g->path, t->name);
    if (t->n_dims == 0 || t->n_dims > MAX_DIMS)
        return bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' has %u dimensions (1..%d allowed)",
                      g->path, t->name, t->n_dims, MAX_DIMS);
    t->n_elements = 1;
    for (uint32_t d = 0; d < MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d < t->n_dims && !take(c, &t->ne[d], 8))
            return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (tensor '%s')", g->path, t->name);
        if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || t->n_elements > (1ull << 48) / t->ne[d])
            return bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' has an invalid dimension %u = %llu",
                          g->path, t->name, d, (unsigned long long)t->ne[d]);
        t->n_elements *= t->ne[d];
    }
    if (!take(c, &t->type, 4) || !take(c, &t->offset, 8))
        return bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (tensor '%s')", g->path, t->name);
    if (!bn_type_name(t->type))
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: unknown tensor type %u in '%s'", g->path, t->type, t->name);
    if (t->ne[0] % bn_type_block(t->type) != 0)
        return bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' of type %s has rows of %llu elements, not a multiple of its block of %u",
                      g->path, t->name, bn_type_name(t->type), (unsigned long long)t->ne[0], bn_type_block(t->type));
    t->nbytes = bn_type_nbytes(t->type, t->n_elements, 1);
    return BN_OK;
}

int bn_gguf_open(const char *path, bn_gguf_t **out, char *err, size_t errlen)
{
    *out = NULL;
    bn_gguf_t *g = calloc(1, sizeof *g);
    if (g)
        g->fd = -1;
    if (!g || !(g->path = strdup(path))) {
        free(g);
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", path);
    }
    int rc = BN_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = bn_err(err, errlen, BN_EIO, "%s: not a regular file", path);
        goto fail;
    }
    g->size = (uint64_t)st.st_size;
    if (g->size < 24) {
        rc = bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (%llu bytes)", path, (unsigned long long)g->size);
        goto fail;
    }
    void *m = mmap(NULL, g->size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot map: %s", path, strerror(errno));
        goto fail;
    }
    g->map = m;
    g->fd = fd; /* kept for bn_gguf_pread */
    fd = -1;

    cursor_t c = { g->map, g->map + g->size };
    uint32_t magic = 0;
    take(&c, &magic, 4);
    if (magic != BN_GGUF_MAGIC) {
        rc = bn_err(err, errlen, BN_EFORMAT, "%s: bad magic (not a GGUF file)", path);
        goto fail;
    }
    take(&c, &g->version, 4);
    if (g->version != 3 && g->version != 2) {
        rc = bn_err(err, errlen, BN_EUNSUPPORTED, "%s: GGUF version %u (only 2 and 3 are read)", path, g->version);
        goto fail;
    }
    take(&c, &g->n_tensors, 8);
    take(&c, &g->n_kv, 8);
    /* Each kv needs >= 12 bytes, each tensor descriptor >= 28: bound counts by file size. */
    uint64_t left = (uint64_t)(c.end - c.p);
    if (g->n_kv > left / 12 || g->n_tensors > left / 28) {
        rc = bn_err(err, errlen, BN_EFORMAT, "%s: truncated header (%llu keys and %llu tensors cannot fit in %llu bytes)",
                    path, (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors, (unsigned long long)g->size);
        goto fail;
    }
    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors) {
        rc = bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (uint64_t i = 0; i < g->n_kv; i++)
        if ((rc = parse_kv(g, &c, i, err, errlen)) != BN_OK)
            goto fail;
    g->alignment = BN_GGUF_DEFAULT_ALIGNMENT;
    const bn_gguf_kv_t *al = bn_gguf_find(g, "general.alignment");
    if (al) {
        if (al->type != BN_GGUF_UINT32) {
            rc = bn_err(err, errlen, BN_EFORMAT, "%s: key 'general.alignment' is not a u32", path);
            goto fail;
        }
        memcpy(&g->alignment, al->data, 4);
        if (g->alignment == 0 || (g->alignment & (g->alignment - 1)) || g->alignment > (1u << 20)) {
            rc = bn_err(err, errlen, BN_EFORMAT, "%s: key 'general.alignment' = %u is not a power of two",
                        path, g->alignment);
            goto fail;
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((rc = parse_tensor(g, &c, i, err, errlen)) != BN_OK)
            goto fail;
    uint64_t hdr = (uint64_t)(c.p - g->map);
    g->data_offset = (hdr + g->alignment - 1) / g->alignment * g->alignment;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        bn_gguf_tensor_t *t = &g->tensors[i];
        if (t->offset % g->alignment != 0) {
            rc = bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' data offset %llu is not aligned to %u",
                        path, t->name, (unsigned long long)t->offset, g->alignment);
            goto fail;
        }
        if (g->data_offset > g->size || t->offset > g->size - g->data_offset) {
            rc = bn_err(err, errlen, BN_EFORMAT, "%s: offset out of range for tensor '%s' (offset %llu, file %llu bytes)",
                        path, t->name, (unsigned long long)t->offset, (unsigned long long)g->size);
            goto fail;
        }
        if (t->nbytes > g->size - g->data_offset - t->offset) {
            rc = bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' data beyond the end of the file (needs %llu bytes at offset %llu, file %llu bytes)",
                        path, t->name, (unsigned long long)t->nbytes,
                        (unsigned long long)(g->data_offset + t->offset), (unsigned long long)g->size);
            goto fail;
        }
        for (uint64_t j = 0; j < i; j++)
            if (strcmp(g->tensors[j].name, t->name) == 0) {
                rc = bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' appears twice", path, t->name);
                goto fail;
            }
        t->data = g->map + g->data_offset + t->offset;
    }
    *out = g;
    return BN_OK;
fail:
    if (fd >= 0)
        close(fd);
    bn_gguf_close(&g);
    return rc;
}

void bn_gguf_close(bn_gguf_t **pg)
{
    if (!pg || !*pg)
        return;
    bn_gguf_t *g = *pg;
    if (g->kv)
        for (uint64_t i = 0; i < g->n_kv; i++) {
            free(g->kv[i].key);
            free(g->kv[i].strs);
        }
    if (g->tensors)
        for (uint64_t i = 0; i < g->n_tensors; i++)
            free(g->tensors[i].name);
    free(g->kv);
    free(g->tensors);
    if (g->map)
        munmap((void *)g->map, g->size);
    if (g->fd >= 0)
        close(g->fd);
    free(g->path);
    free(g);
    *pg = NULL;
}

int bn_gguf_pread(const bn_gguf_t *g, const void *p, size_t len, void *dst)
{
    const uint8_t *b = p;
    if (b < g->map || b + len > g->map + g->size)
        return BN_EINVAL;
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(g->fd, (uint8_t *)dst + done, len - done, (off_t)(b - g->map + done));
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            memcpy((uint8_t *)dst + done, b + done, len - done); /* fall back to the mapping */
            break;
        }
        done += (size_t)r;
    }
    return BN_OK;
}

void bn_gguf_release(const bn_gguf_t *g, const void *p, uint64_t len)
{
    /* whole pages inside the range only: neighbours may still be in use */
    long ps = sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + ps - 1) & ~(uintptr_t)(ps - 1), b = ((uintptr_t)p + len) & ~(uintptr_t)(ps - 1);
    if ((const uint8_t *)p < g->map || (const uint8_t *)p + len > g->map + g->size || b <= a)
        return;
    madvise((void *)a, b - a, MADV_DONTNEED);
}

const bn_gguf_kv_t *bn_gguf_find(const bn_gguf_t *g, const char *key)
{
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].key && strcmp(g->kv[i].key, key) == 0)
            return &g->kv[i];
    return NULL;
}

const bn_gguf_tensor_t *bn_gguf_tensor(const bn_gguf_t *g, const char *name)
{
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0)
            return &g->tensors[i];
    return NULL;
}

static int is_int_type(uint32_t t)
{
    return t == BN_GGUF_UINT8 || t == BN_GGUF_INT8 || t == BN_GGUF_UINT16 || t == BN_GGUF_INT16 ||
           t == BN_GGUF_UINT32 || t == BN_GGUF_INT32 || t == BN_GGUF_UINT64 || t == BN_GGUF_INT64 ||
           t == BN_GGUF_BOOL;
}

/* Integer element i of data of type t, widened. Unsigned 64-bit values above
 * INT64_MAX are clamped (no key we read can be that large). */
static int64_t int_at(uint32_t t, const uint8_t *data, uint64_t i)
{
    switch (t) {
    case BN_GGUF_UINT8: case BN_GGUF_BOOL: return data[i];
    case BN_GGUF_INT8: return (int8_t)data[i];
    case BN_GGUF_UINT16: { uint16_t v; memcpy(&v, data + 2 * i, 2); return v; }
    case BN_GGUF_INT16: { int16_t v; memcpy(&v, data + 2 * i, 2); return v; }
    case BN_GGUF_UINT32: { uint32_t v; memcpy(&v, data + 4 * i, 4); return v; }
    case BN_GGUF_INT32: { int32_t v; memcpy(&v, data + 4 * i, 4); return v; }
    case BN_GGUF_UINT64: { uint64_t v; memcpy(&v, data + 8 * i, 8); return v > INT64_MAX ? INT64_MAX : (int64_t)v; }
    case BN_GGUF_INT64: { int64_t v; memcpy(&v, data + 8 * i, 8); return v; }
    }
    return 0;
}

int64_t bn_gguf_arr_int(const bn_gguf_kv_t *kv, uint64_t i)
{
    uint32_t t = kv->type == BN_GGUF_ARRAY ? kv->arr_type : kv->type;
    if (i >= kv->n || !is_int_type(t))
        return 0;
    return int_at(t, kv->data, i);
}

static int get_int(const bn_gguf_t *g, const char *key, int64_t lo, int64_t hi, int64_t *v,
                   char *err, size_t errlen)
{
    const bn_gguf_kv_t *kv = bn_gguf_find(g, key);
    if (!kv)
        return bn_err(err, errlen, BN_ENOTFOUND, "%s: missing required key '%s'", g->path, key);
    if (!is_int_type(kv->type))
        return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' is not an integer (value type %u)", g->path, key, kv->type);
    *v = int_at(kv->type, kv->data, 0);
    if (*v < lo || *v > hi)
        return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' = %lld is out of range [%lld, %lld]",
                      g->path, key, (long long)*v, (long long)lo, (long long)hi);
    return BN_OK;
}

int bn_gguf_get_u32(const bn_gguf_t *g, const char *key, uint32_t *out, char *err, size_t errlen)
{
    int64_t v;
    int rc = get_int(g, key, 0, UINT32_MAX, &v, err, errlen);
    if (rc == BN_OK)
        *out = (uint32_t)v;
    return rc;
}

int bn_gguf_get_i32(const bn_gguf_t *g, const char *key, int32_t *out, char *err, size_t errlen)
{
    int64_t v;
    int rc = get_int(g, key, INT32_MIN, INT32_MAX, &v, err, errlen);
    if (rc == BN_OK)
        *out = (int32_t)v;
    return rc;
}

int bn_gguf_get_bool(const bn_gguf_t *g, const char *key, int *out, char *err, size_t errlen)
{
    int64_t v;
    int rc = get_int(g, key, 0, 1, &v, err, errlen);
    if (rc == BN_OK)
        *out = (int)v;
    return rc;
}

int bn_gguf_get_f32(const bn_gguf_t *g, const char *key, float *out, char *err, size_t errlen)
{
    const bn_gguf_kv_t *kv = bn_gguf_find(g, key);
    if (!kv)
        return bn_err(err, errlen, BN_ENOTFOUND, "%s: missing required key '%s'", g->path, key);
    if (kv->type == BN_GGUF_FLOAT32) {
        memcpy(out, kv->data, 4);
    } else if (kv->type == BN_GGUF_FLOAT64) {
        double d;
        memcpy(&d, kv->data, 8);
        *out = (float)d;
    } else if (is_int_type(kv->type)) {
        *out = (float)int_at(kv->type, kv->data, 0);
    } else {
        return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' is not a number (value type %u)", g->path, key, kv->type);
    }
    return BN_OK;
}

int bn_gguf_get_str(const bn_gguf_t *g, const char *key, bn_str_t *out, char *err, size_t errlen)
{
    const bn_gguf_kv_t *kv = bn_gguf_find(g, key);
    if (!kv)
        return bn_err(err, errlen, BN_ENOTFOUND, "%s: missing required key '%s'", g->path, key);
    if (kv->type != BN_GGUF_STRING)
        return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' is not a string (value type %u)", g->path, key, kv->type);
    *out = kv->strs[0];
    return BN_OK;
}
