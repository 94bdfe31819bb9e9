/* model.c - reads hyper-parameters and binds mapped tensors. See model.h.
 *
 * Every check that can fail here is a property of the file, so each gives
 * BN_EFORMAT/BN_EUNSUPPORTED with the file and key/tensor named. */
#include "worker/model.h"

#include "kernels/quants.h"
#include "kernels/ref/pack.h"
#include "worker/repack.h"
#include "base/status.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static int arch_key(const bn_model_t *m, const char *suffix, char *key, size_t n)
{
    return snprintf(key, n, "%s.%s", m->cfg.arch, suffix) < (int)n;
}

static int get_u32_arch(const bn_model_t *m, const char *suffix, uint32_t *v, int required,
                        char *err, size_t errlen)
{
    char key[128];
    arch_key(m, suffix, key, sizeof key);
    int rc = bn_gguf_get_u32(m->gguf, key, v, err, errlen);
    if (rc == BN_ENOTFOUND && !required)
        return BN_OK;
    return rc;
}

static int get_f32_arch(const bn_model_t *m, const char *suffix, float *v, int required,
                        char *err, size_t errlen)
{
    char key[128];
    arch_key(m, suffix, key, sizeof key);
    int rc = bn_gguf_get_f32(m->gguf, key, v, err, errlen);
    if (rc == BN_ENOTFOUND && !required)
        return BN_OK;
    return rc;
}

static int read_config(bn_model_t *m, char *err, size_t errlen)
{
    bn_config_t *c = &m->cfg;
    const char *path = m->gguf->path;
    bn_str_t arch;
    int rc = bn_gguf_get_str(m->gguf, "general.architecture", &arch, err, errlen);
    if (rc)
        return rc;
    if (arch.len >= sizeof c->arch)
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: unsupported architecture '%.*s'", path,
                      (int)(arch.len > 64 ? 64 : arch.len), arch.ptr);
    memcpy(c->arch, arch.ptr, arch.len);
    c->arch[arch.len] = 0;
    if (strcmp(c->arch, "bitnet-b1.58") == 0 || strcmp(c->arch, "bitnet-25") == 0)
        c->ffn_act = BN_FFN_RELU2;
    else if (strcmp(c->arch, "bitnet") == 0)
        c->ffn_act = BN_FFN_SILU; /* as llama.cpp computes its `bitnet` arch */
    else
        return bn_err(err, errlen, BN_EUNSUPPORTED,
                      "%s: unsupported architecture '%s' (bitnet-b1.58, bitnet-25 and bitnet are read)",
                      path, c->arch);
    /* An explicit activation key overrides the architecture's default. */
    char key[128];
    arch_key(m, "hidden_act", key, sizeof key);
    bn_str_t act;
    if (bn_gguf_get_str(m->gguf, key, &act, NULL, 0) == BN_OK) {
        if (act.len == 5 && memcmp(act.ptr, "relu2", 5) == 0)
            c->ffn_act = BN_FFN_RELU2;
        else if (act.len == 4 && memcmp(act.ptr, "silu", 4) == 0)
            c->ffn_act = BN_FFN_SILU;
        else
            return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: key '%s' = '%.*s' (relu2 or silu expected)",
                          path, key, (int)(act.len > 32 ? 32 : act.len), act.ptr);
    }

    if ((rc = get_u32_arch(m, "embedding_length", &c->n_embd, 1, err, errlen)) ||
        (rc = get_u32_arch(m, "block_count", &c->n_layer, 1, err, errlen)) ||
        (rc = get_u32_arch(m, "feed_forward_length", &c->n_ff, 1, err, errlen)) ||
        (rc = get_u32_arch(m, "attention.head_count", &c->n_head, 1, err, errlen)))
        return rc;
    c->n_head_kv = c->n_head;
    c->n_ctx_train = 4096;
    c->rope_base = 10000.0f;
    c->norm_eps = 1e-5f;
    if ((rc = get_u32_arch(m, "attention.head_count_kv", &c->n_head_kv, 0, err, errlen)) ||
        (rc = get_u32_arch(m, "context_length", &c->n_ctx_train, 0, err, errlen)) ||
        (rc = get_f32_arch(m, "rope.freq_base", &c->rope_base, 0, err, errlen)) ||
        (rc = get_f32_arch(m, "attention.layer_norm_rms_epsilon", &c->norm_eps, 0, err, errlen)))
        return rc;
    if (c->n_embd == 0 || c->n_layer == 0 || c->n_ff == 0 || c->n_head == 0 || c->n_head_kv == 0 ||
        c->n_embd > (1u << 20) || c->n_ff > (1u << 22) || c->n_layer > 4096 || c->n_head > c->n_embd)
        return bn_err(err, errlen, BN_EFORMAT,
                      "%s: implausible hyper-parameters (embedding %u, layers %u, ffn %u, heads %u/%u)",
                      path, c->n_embd, c->n_layer, c->n_ff, c->n_head, c->n_head_kv);
    if (c->n_embd % c->n_head != 0)
        return bn_err(err, errlen, BN_EFORMAT, "%s: embedding_length %u is not a multiple of head_count %u",
                      path, c->n_embd, c->n_head);
    if (c->n_head % c->n_head_kv != 0)
        return bn_err(err, errlen, BN_EFORMAT, "%s: head_count %u is not a multiple of head_count_kv %u",
                      path, c->n_head, c->n_head_kv);
    c->head_dim = c->n_embd / c->n_head;
    c->rope_dim = c->head_dim;
    if ((rc = get_u32_arch(m, "rope.dimension_count", &c->rope_dim, 0, err, errlen)))
        return rc;
    if (c->rope_dim == 0 || c->rope_dim > c->head_dim || c->rope_dim % 2)
        return bn_err(err, errlen, BN_EFORMAT, "%s: rope.dimension_count %u does not fit head_dim %u",
                      path, c->rope_dim, c->head_dim);
    if (!(c->norm_eps > 0.0f && c->norm_eps < 1.0f) || !(c->rope_base > 1.0f && isfinite(c->rope_base)))
        return bn_err(err, errlen, BN_EFORMAT, "%s: implausible eps %g or rope base %g", path,
                      (double)c->norm_eps, (double)c->rope_base);

    const bn_gguf_kv_t *toks = bn_gguf_find(m->gguf, "tokenizer.ggml.tokens");
    c->n_vocab = toks ? (uint32_t)toks->n : 0;
    uint32_t nv = c->n_vocab;
    if ((rc = get_u32_arch(m, "vocab_size", &nv, 0, err, errlen)))
        return rc;
    if (c->n_vocab == 0)
        c->n_vocab = nv;
    if (nv != c->n_vocab)
        return bn_err(err, errlen, BN_EFORMAT, "%s: %s.vocab_size = %u but the tokenizer has %u tokens",
                      path, c->arch, nv, c->n_vocab);
    c->bos_id = c->eos_id = c->eot_id = -1;
    c->add_bos = 1;
    struct { const char *key; int32_t *v; } ids[] = {
        { "tokenizer.ggml.bos_token_id", &c->bos_id },
        { "tokenizer.ggml.eos_token_id", &c->eos_id },
        { "tokenizer.ggml.eot_token_id", &c->eot_id },
    };
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        uint32_t v;
        rc = bn_gguf_get_u32(m->gguf, ids[i].key, &v, err, errlen);
        if (rc == BN_OK) {
            if (v >= c->n_vocab)
                return bn_err(err, errlen, BN_EFORMAT, "%s: key '%s' = %u is not a token id (vocabulary %u)",
                              path, ids[i].key, v, c->n_vocab);
            *ids[i].v = (int32_t)v;
        } else if (rc != BN_ENOTFOUND) {
            return rc;
        }
    }
    rc = bn_gguf_get_bool(m->gguf, "tokenizer.ggml.add_bos_token", &c->add_bos, err, errlen);
    if (rc != BN_OK && rc != BN_ENOTFOUND)
        return rc;
    if (rc == BN_ENOTFOUND)
        c->add_bos = 1;
    return BN_OK;
}

/* Find tensor `name`, check type class and shape [ne0, ne1]. */
static int find_tensor(const bn_model_t *m, const char *name, uint64_t ne0, uint64_t ne1,
                       const bn_gguf_tensor_t **out, char *err, size_t errlen)
{
    const bn_gguf_tensor_t *t = bn_gguf_tensor(m->gguf, name);
    if (!t)
        return bn_err(err, errlen, BN_EFORMAT, "%s: missing tensor '%s'", m->gguf->path, name);
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return bn_err(err, errlen, BN_EFORMAT,
                      "%s: tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu, %llu]",
                      m->gguf->path, name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                      (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                      (unsigned long long)ne0, (unsigned long long)ne1);
    *out = t;
    return BN_OK;
}

/* The weight arena. The matrices every token streams live in anonymous chunks
 * with transparent huge pages (MADV_HUGEPAGE), not in the file's mapping: the
 * hardware prefetcher stops at every page boundary, and with 2 MB pages the
 * ternary GEMV streams 28 GB/s on one Zen 4 thread against 23 GB/s from 4 KB
 * pages (the read probe: 33 against 30). Where THP is off the chunks are plain
 * anonymous memory. A chunk is filled in order; when a tensor does not fit, the
 * untouched huge pages at its end are unmapped and a new chunk starts, so at
 * most one partly used 2 MB page per chunk is resident for nothing. */
#define HUGE_PAGE ((size_t)2 << 20)
#define CHUNK_MIN ((size_t)256 << 20)

struct bn_chunk {
    uint8_t *base;
    size_t size, used;
};

static void chunk_trim(struct bn_chunk *c)
{
    size_t keep = (c->used + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    if (keep < c->size) {
        munmap(c->base + keep, c->size - keep);
        c->size = keep;
    }
}

static void *weights_alloc(bn_model_t *m, size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    struct bn_chunk *c = m->n_chunks ? &m->chunks[m->n_chunks - 1] : NULL;
    if (c && c->size - c->used >= bytes) {
        void *p = c->base + c->used;
        c->used += bytes;
        return p;
    }
    struct bn_chunk *n = realloc(m->chunks, (m->n_chunks + 1) * sizeof *n);
    if (!n)
        return NULL;
    m->chunks = n;
    if (m->n_chunks)
        chunk_trim(&m->chunks[m->n_chunks - 1]);
    size_t size = ((bytes > CHUNK_MIN ? bytes : CHUNK_MIN) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    uint8_t *p = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    /* 2 MB aligned: cut the slack off both ends */
    uint8_t *a = (uint8_t *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (a > p)
        munmap(p, (size_t)(a - p));
    if (a + size < p + size + HUGE_PAGE)
        munmap(a + size, (size_t)(p + size + HUGE_PAGE - (a + size)));
    madvise(a, size, MADV_HUGEPAGE);
    m->chunks[m->n_chunks++] = (struct bn_chunk){ .base = a, .size = size, .used = bytes };
    return a;
}

typedef struct {
    const bn_model_t *m;
    uint8_t *dst;
    const uint8_t *src; /* row-major rows, in the file's mapping or the heap */
    int from_file;
    uint32_t rows;      /* the matrix's rows, */
    size_t row_bytes;   /* their length, */
    int failed;         /* and whether a thread ran out of memory */
} copy_job_t;

/* a thread's share of a grouped copy (row-major rows into the kernels' row
 * groups, kernels.h), whole groups each; rows from the file come through a
 * bounce buffer of about 1 MB, so the file's pages are never mapped here */
static void tgroup_part(void *arg, int ith, int nth)
{
    copy_job_t *j = arg;
    const size_t gbytes = BN_TGROUP * j->row_bytes;
    const uint32_t groups = (j->rows + BN_TGROUP - 1) / BN_TGROUP;
    const uint32_t g0 = (uint32_t)((uint64_t)groups * (uint64_t)ith / (uint64_t)nth);
    const uint32_t g1 = (uint32_t)((uint64_t)groups * (uint64_t)(ith + 1) / (uint64_t)nth);
    if (g0 >= g1)
        return;
    const uint32_t step = gbytes < (1u << 20) ? (uint32_t)((1u << 20) / gbytes) : 1;
    uint8_t *bounce = NULL;
    if (j->from_file && !(bounce = malloc(step * gbytes))) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (uint32_t g = g0; g < g1; g += step) {
        const uint32_t n = g1 - g < step ? g1 - g : step;
        const uint32_t r0 = g * BN_TGROUP, r1 = r0 + n * BN_TGROUP < j->rows ? r0 + n * BN_TGROUP : j->rows;
        const uint8_t *src = j->src + (size_t)r0 * j->row_bytes;
        if (bounce) {
            bn_gguf_pread(j->m->gguf, src, (size_t)(r1 - r0) * j->row_bytes, bounce);
            src = bounce;
        }
        bn_tmat_interleave(j->dst + (size_t)g * gbytes, src, j->row_bytes, r1 - r0);
    }
    free(bounce);
}

/* a ternary matrix of row-major rows moved into the arena, grouped on the way
 * (kernels.h): from the file (read with pread, so its pages are never mapped
 * here) or from a malloc'd repacked copy (then freed); NULL when out of memory,
 * owned then still the caller's */
static const void *tmat_to_arena(bn_model_t *m, const bn_tmat_t *w, void *owned)
{
    void *dst = weights_alloc(m, bn_tmat_bytes(w->n_out, w->row_bytes));
    if (!dst)
        return NULL;
    copy_job_t job = { .m = m, .dst = dst, .src = w->data, .from_file = owned == NULL, .rows = w->n_out,
                       .row_bytes = w->row_bytes };
    bn_pool_run(m->load_pool, tgroup_part, &job);
    if (job.failed)
        return NULL;
    free(owned);
    return dst;
}

static int own(bn_model_t *m, void *p, char *err, size_t errlen)
{
    if (!p)
        return BN_OK;
    void **n = realloc(m->owned, (m->n_owned + 1) * sizeof *n);
    if (!n) {
        free(p);
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", m->gguf->path);
    }
    m->owned = n;
    m->owned[m->n_owned++] = p;
    return BN_OK;
}

static int bind_norm(bn_model_t *m, const char *name, uint64_t n, const float **out,
                     char *err, size_t errlen)
{
    const bn_gguf_tensor_t *t;
    int rc = find_tensor(m, name, n, 1, &t, err, errlen);
    if (rc)
        return rc;
    if (t->type != BN_TYPE_F32)
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: tensor '%s' has type %s (norm weights must be F32)",
                      m->gguf->path, name, bn_type_name(t->type));
    /* A copy, read with pread: the norms sit between the large tensors in the file,
     * and reading them through the mapping every step would map the large folios
     * around them (megabytes of weights already repacked elsewhere). */
    float *copy = malloc(n * sizeof(float));
    if (!copy)
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", m->gguf->path);
    bn_gguf_pread(m->gguf, t->data, n * sizeof(float), copy);
    *out = copy;
    return own(m, copy, err, errlen);
}

/* rows [r0, r1) and columns [c0, c1) of a linear weight; an empty range leaves
 * an empty matrix (a tensor rank without heads or FFN rows) */
static int bind_linear(bn_model_t *m, const char *name, uint32_t n_in, uint32_t n_out, uint32_t r0, uint32_t r1,
                       uint32_t c0, uint32_t c1, bn_tmat_t *w, char *err, size_t errlen)
{
    const bn_gguf_tensor_t *t;
    int rc = find_tensor(m, name, n_in, n_out, &t, err, errlen);
    if (rc)
        return rc;
    switch (t->type) {
    case BN_TYPE_I2_S: case BN_TYPE_TQ2_0: case BN_TYPE_TQ1_0: case BN_TYPE_F16: case BN_TYPE_F32:
        break;
    default:
        return bn_err(err, errlen, BN_EUNSUPPORTED,
                      "%s: tensor '%s' has type %s (linear weights must be I2_S, TQ2_0, TQ1_0, F16 or F32)",
                      m->gguf->path, name, bn_type_name(t->type));
    }
    if (n_in % 128)
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: tensor '%s' has rows of %u weights, not a multiple of 128",
                      m->gguf->path, name, n_in);
    memset(w, 0, sizeof *w);
    const int empty = r0 >= r1 || c0 >= c1;
    void *owned = NULL;
    char e2[384];
    /* an empty slice still needs the tensor's scale (the ranks' partial sums are
     * scaled after they are added up): take it from the first row */
    rc = empty ? bn_repack_ternary(name, t->type, t->data, n_in, n_out, 0, 1, 0, n_in, w, &owned, e2, sizeof e2)
               : bn_repack_ternary(name, t->type, t->data, n_in, n_out, r0, r1, c0, c1, w, &owned, e2, sizeof e2);
    if (rc)
        return bn_err(err, errlen, rc, "%s: %s", m->gguf->path, e2);
    if (w->bscale && (c0 > 0 || c1 < n_in)) {
        free(owned);
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: tensor '%s' has blocks with different scales; split by "
                      "columns over tensor ranks it would not give one rank's results (use --pp or --replicas)",
                      m->gguf->path, name);
    }
    if (empty) {
        float scale = w->scale;
        free(owned);
        memset(w, 0, sizeof *w);
        w->scale = scale;
        owned = NULL;
    } else if (!w->bscale) { /* (per-block scales live in the repacked buffer itself) */
        const void *data = tmat_to_arena(m, w, owned);
        if (!data) {
            if (owned)
                free(owned);
            return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory for tensor '%s' (%zu MB)", m->gguf->path,
                          name, (size_t)w->n_out * w->row_bytes >> 20);
        }
        w->data = data;
        owned = NULL;
    } else { /* grouped in the heap, the per-block scales after the rows */
        const size_t db = bn_tmat_bytes(w->n_out, w->row_bytes), nbs = (size_t)w->n_out * (w->n_in / 256);
        uint8_t *g = malloc(db + nbs * sizeof(float));
        if (!g) {
            free(owned);
            return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory for tensor '%s'", m->gguf->path, name);
        }
        bn_tmat_interleave(g, w->data, w->row_bytes, w->n_out);
        memcpy(g + db, w->bscale, nbs * sizeof(float)); /* db is a multiple of 64 */
        free(owned);
        owned = g;
        w->data = g;
        w->bscale = (const float *)(const void *)(g + db);
    }
    if ((rc = own(m, owned, err, errlen)))
        return rc;
    /* the file's pages of this tensor are no longer needed here */
    bn_gguf_release(m->gguf, t->data, t->nbytes);
    /* optional per-tensor scale beside the weight: "<name without .weight>.scale" */
    char sname[256];
    size_t base = strlen(name);
    if (base > 7 && strcmp(name + base - 7, ".weight") == 0)
        base -= 7;
    snprintf(sname, sizeof sname, "%.*s.scale", (int)base, name);
    const bn_gguf_tensor_t *st = bn_gguf_tensor(m->gguf, sname);
    if (st) {
        if (st->type != BN_TYPE_F32 || st->n_elements != 1)
            return bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' must be one F32 value",
                          m->gguf->path, sname);
        float s;
        memcpy(&s, st->data, 4);
        w->scale *= s;
    }
    if (!isfinite(w->scale))
        return bn_err(err, errlen, BN_EFORMAT, "%s: tensor '%s' has a non-finite scale", m->gguf->path, name);
    return BN_OK;
}

size_t bn_head_row_bytes(int type, uint32_t n_in)
{
    return n_in / 32 * bn_head_block_bytes((bn_head_type_t)type);
}

const char *bn_head_type_name(int t)
{
    static const char *const names[] = { "f16", "q8", "q6", "q4" };
    return t >= 0 && t < 4 ? names[t] : "?";
}

int bn_head_type_parse(const char *s)
{
    for (int t = 0; t < 4; t++)
        if (strcmp(s, bn_head_type_name(t)) == 0)
            return t;
    return -1;
}

/* The LM head in format `type`, rows [v0, v1) of the embedding converted (or, F16
 * to f16, read as they are) row by row into the head's row groups (kernels.h),
 * in chunks of rows, each split over a pool */
#define HEAD_CHUNK 4096u
typedef struct {
    bn_model_t *m;
    bn_hmat_t *h;
    uint8_t *dst;
    uint32_t r0, r1;
    volatile int failed;
} head_job_t;

static void head_rows(void *arg, int ith, int nth)
{
    head_job_t *j = arg;
    const bn_config_t *c = &j->m->cfg;
    const bn_weights_t *w = &j->m->w;
    const bn_hmat_t *h = j->h;
    const int copy = h->type == BN_HEAD_F16 && w->embd_type == BN_TYPE_F16;
    int a, b;
    bn_pool_split((int)(j->r1 - j->r0), ith, nth, 1, &a, &b);
    if (a >= b)
        return;
    float *row = malloc(c->n_embd * sizeof(float));
    uint8_t *packed = malloc(h->row_bytes);
    if (!row || !packed) {
        free(row);
        free(packed);
        j->failed = 1;
        return;
    }
    for (uint32_t r = j->r0 + (uint32_t)a; r < j->r0 + (uint32_t)b; r++) {
        const uint8_t *src = w->token_embd + (size_t)r * w->embd_row_bytes;
        if (copy) { /* read, so the file's pages are never mapped here */
            bn_gguf_pread(j->m->gguf, src, h->row_bytes, packed);
        } else {
            bn_ref_dequant_row(w->embd_type, src, row, (int)c->n_embd);
            switch (h->type) {
            case BN_HEAD_F16: bn_pack_f16(row, c->n_embd, (bn_fp16_t *)packed); break;
            case BN_HEAD_Q8: bn_pack_q8_0(row, c->n_embd, (bn_block_q8_0 *)packed); break;
            case BN_HEAD_Q6: bn_pack_q6_h(row, c->n_embd, (bn_block_q6_h *)packed); break;
            case BN_HEAD_Q4: bn_pack_q4_0(row, c->n_embd, (bn_block_q4_0 *)packed); break;
            }
        }
        bn_hmat_place_row(h, j->dst, (int)(r - j->m->shard.vocab0), packed);
    }
    free(row);
    free(packed);
}

static int build_head(bn_model_t *m, int type, bn_pool_t *pool, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    bn_weights_t *w = &m->w;
    bn_hmat_t *h = &w->head;
    const uint32_t v0 = m->shard.vocab0, v1 = m->shard.vocab1;
    h->type = (bn_head_type_t)type;
    h->n_in = c->n_embd;
    h->n_out = v1 - v0;
    if (c->n_embd % 32)
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: embedding_length %u is not a multiple of 32",
                      m->gguf->path, c->n_embd);
    h->row_bytes = bn_head_row_bytes(type, c->n_embd);
    if (h->n_out == 0)
        return BN_OK; /* not the last stage: no LM head here */
    const size_t bytes = bn_hmat_bytes(h->n_out, h->row_bytes);
    uint8_t *buf = weights_alloc(m, bytes);
    if (!buf)
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory for the LM head (%zu MB)", m->gguf->path,
                      bytes >> 20);
    /* the source rows of a chunk are released after it, so the peak is one copy,
     * not two; the padding rows of the last group are zero */
    head_job_t job = { .m = m, .h = h, .dst = buf };
    for (uint32_t r0 = v0; r0 < v1; r0 += HEAD_CHUNK) {
        job.r0 = r0;
        job.r1 = v1 - r0 < HEAD_CHUNK ? v1 : r0 + HEAD_CHUNK;
        bn_pool_run(pool, head_rows, &job);
        if (job.failed)
            break;
        bn_gguf_release(m->gguf, w->token_embd + (size_t)r0 * w->embd_row_bytes,
                        (uint64_t)(job.r1 - r0) * w->embd_row_bytes);
    }
    if (job.failed)
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory converting the LM head", m->gguf->path);
    if (h->n_out % BN_HGROUP) {
        uint8_t *zero = calloc(1, h->row_bytes);
        if (!zero)
            return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory converting the LM head", m->gguf->path);
        for (uint32_t r = h->n_out; r % BN_HGROUP; r++)
            bn_hmat_place_row(h, buf, (int)r, zero);
        free(zero);
    }
    h->data = buf;
    return BN_OK;
}

static int bind_weights(bn_model_t *m, int head_type, bn_pool_t *pool, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    bn_weights_t *w = &m->w;
    const bn_gguf_tensor_t *t;
    int rc = find_tensor(m, "token_embd.weight", c->n_embd, c->n_vocab, &t, err, errlen);
    if (rc)
        return rc;
    switch (t->type) {
    case BN_TYPE_F32: case BN_TYPE_F16: case BN_TYPE_BF16: case BN_TYPE_Q8_0: case BN_TYPE_Q6_K: case BN_TYPE_Q4_0:
        break;
    default:
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: tensor 'token_embd.weight' has unsupported type %s",
                      m->gguf->path, bn_type_name(t->type));
    }
    if (bn_gguf_tensor(m->gguf, "output.weight"))
        return bn_err(err, errlen, BN_EUNSUPPORTED,
                      "%s: tensor 'output.weight' present: untied LM heads are not supported yet", m->gguf->path);
    w->embd_type = t->type;
    w->token_embd = t->data;
    w->embd_row_bytes = (size_t)bn_type_nbytes(t->type, c->n_embd, 0);
    if ((rc = bind_norm(m, "output_norm.weight", c->n_embd, &w->output_norm, err, errlen)))
        return rc;
    w->layers = calloc(c->n_layer, sizeof *w->layers);
    if (!w->layers)
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", m->gguf->path);
    const bn_shard_t *sh = &m->shard;
    const uint32_t hd = c->head_dim, q_dim = c->n_head * hd, kv_dim = c->n_head_kv * hd;
    const uint32_t q0 = sh->head0 * hd, q1 = sh->head1 * hd, k0 = sh->kv0 * hd, k1 = sh->kv1 * hd;
    for (uint32_t l = sh->layer0; l < sh->layer1; l++) {
        bn_layer_t *L = &w->layers[l];
        char n[96];
#define NAME(s) (snprintf(n, sizeof n, "blk.%u." s ".weight", l), n)
        if ((rc = bind_norm(m, NAME("attn_norm"), c->n_embd, &L->attn_norm, err, errlen)) ||
            (rc = bind_linear(m, NAME("attn_q"), c->n_embd, q_dim, q0, q1, 0, c->n_embd, &L->wq, err, errlen)) ||
            (rc = bind_linear(m, NAME("attn_k"), c->n_embd, kv_dim, k0, k1, 0, c->n_embd, &L->wk, err, errlen)) ||
            (rc = bind_linear(m, NAME("attn_v"), c->n_embd, kv_dim, k0, k1, 0, c->n_embd, &L->wv, err, errlen)) ||
            (rc = bind_norm(m, NAME("attn_sub_norm"), q_dim, &L->attn_sub_norm, err, errlen)) ||
            (rc = bind_linear(m, NAME("attn_output"), q_dim, c->n_embd, 0, c->n_embd, q0, q1, &L->wo, err, errlen)) ||
            (rc = bind_norm(m, NAME("ffn_norm"), c->n_embd, &L->ffn_norm, err, errlen)) ||
            (rc = bind_linear(m, NAME("ffn_gate"), c->n_embd, c->n_ff, sh->ff0, sh->ff1, 0, c->n_embd, &L->w_gate,
                              err, errlen)) ||
            (rc = bind_linear(m, NAME("ffn_up"), c->n_embd, c->n_ff, sh->ff0, sh->ff1, 0, c->n_embd, &L->w_up,
                              err, errlen)) ||
            (rc = bind_norm(m, NAME("ffn_sub_norm"), c->n_ff, &L->ffn_sub_norm, err, errlen)) ||
            (rc = bind_linear(m, NAME("ffn_down"), c->n_ff, c->n_embd, 0, c->n_embd, sh->ff0, sh->ff1, &L->w_down,
                              err, errlen)))
            return rc;
#undef NAME
    }
    char first[64];
    snprintf(first, sizeof first, "blk.%u.attn_q.weight", sh->layer1 > sh->layer0 ? sh->layer0 : 0);
    const bn_gguf_tensor_t *tq = bn_gguf_tensor(m->gguf, first);
    if (!tq)
        return bn_err(err, errlen, BN_EFORMAT, "%s: missing tensor '%s'", m->gguf->path, first);
    w->wtype = tq->type;
    return build_head(m, head_type, pool, err, errlen);
}

/* a new model with the file mapped and its hyper-parameters read; *out NULL on failure */
static int open_model(const char *path, bn_model_t **out, char *err, size_t errlen)
{
    bn_model_t *m = calloc(1, sizeof *m);
    *out = NULL;
    if (!m)
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", path);
    int rc = bn_gguf_open(path, &m->gguf, err, errlen);
    if (rc == BN_OK)
        rc = read_config(m, err, errlen);
    if (rc != BN_OK)
        bn_model_destroy(&m);
    *out = m;
    return rc;
}

int bn_model_peek(const char *path, bn_config_t *cfg, char *err, size_t errlen)
{
    bn_model_t *m;
    int rc = open_model(path, &m, err, errlen);
    if (rc == BN_OK)
        *cfg = m->cfg;
    bn_model_destroy(&m);
    return rc;
}

/* the whole model, or the part of it a plan gives this rank */
static int set_shard(bn_model_t *m, const bn_shard_t *sh, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    if (!sh) {
        m->shard = (bn_shard_t){ .layer1 = c->n_layer, .head1 = c->n_head, .kv1 = c->n_head_kv, .ff1 = c->n_ff,
                                 .vocab1 = c->n_vocab };
        return BN_OK;
    }
    if (sh->layer0 > sh->layer1 || sh->layer1 > c->n_layer || sh->head0 > sh->head1 || sh->head1 > c->n_head ||
        sh->kv0 > sh->kv1 || sh->kv1 > c->n_head_kv || sh->ff0 > sh->ff1 || sh->ff1 > c->n_ff ||
        sh->vocab0 > sh->vocab1 || sh->vocab1 > c->n_vocab)
        return bn_err(err, errlen, BN_EINVAL, "%s: the shard (layers %u-%u, heads %u-%u, kv %u-%u, ffn %u-%u, "
                      "vocab %u-%u) does not fit the model", m->gguf->path, sh->layer0, sh->layer1, sh->head0,
                      sh->head1, sh->kv0, sh->kv1, sh->ff0, sh->ff1, sh->vocab0, sh->vocab1);
    m->shard = *sh;
    return BN_OK;
}

int bn_model_load(const char *path, const bn_model_opts_t *opts, bn_model_t **out, char *err, size_t errlen)
{
    *out = NULL;
    bn_model_t *m;
    int rc = open_model(path, &m, err, errlen);
    if (rc != BN_OK)
        return rc;
    rc = set_shard(m, opts ? opts->shard : NULL, err, errlen);
    m->load_pool = opts ? opts->pool : NULL;
    if (rc == BN_OK)
        rc = bind_weights(m, opts && opts->head_type >= 0 ? opts->head_type : BN_HEAD_DEFAULT,
                          m->load_pool, err, errlen);
    m->load_pool = NULL;
    if (rc != BN_OK) {
        bn_model_destroy(&m);
        return rc;
    }
    if (m->n_chunks)
        chunk_trim(&m->chunks[m->n_chunks - 1]);
    *out = m;
    return BN_OK;
}

void bn_model_destroy(bn_model_t **pm)
{
    if (!pm || !*pm)
        return;
    for (size_t i = 0; i < (*pm)->n_owned; i++)
        free((*pm)->owned[i]);
    free((*pm)->owned);
    for (size_t i = 0; i < (*pm)->n_chunks; i++)
        munmap((*pm)->chunks[i].base, (*pm)->chunks[i].size);
    free((*pm)->chunks);
    free((*pm)->w.layers);
    bn_gguf_close(&(*pm)->gguf);
    free(*pm);
    *pm = NULL;
}

void bn_model_embed(const bn_model_t *m, int32_t token, float *out)
{
    const uint8_t *row = m->w.token_embd + (size_t)token * m->w.embd_row_bytes;
    uint8_t buf[16384];
    /* read the row with pread: touching it through the mapping would map a whole
     * large folio of the file (megabytes) into the resident set per token */
    if (m->w.embd_row_bytes <= sizeof buf && bn_gguf_pread(m->gguf, row, m->w.embd_row_bytes, buf) == BN_OK)
        row = buf;
    bn_ref_dequant_row(m->w.embd_type, row, out, (int)m->cfg.n_embd);
}

uint64_t bn_model_bytes_per_token(const bn_model_t *m)
{
    uint64_t b = (uint64_t)m->w.head.row_bytes * m->w.head.n_out;
    for (uint32_t l = m->shard.layer0; l < m->shard.layer1; l++) {
        const bn_layer_t *L = &m->w.layers[l];
        const bn_tmat_t *ws[] = { &L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down };
        for (int i = 0; i < 7; i++)
            b += (uint64_t)ws[i]->n_in / 4 * ws[i]->n_out;
    }
    return b;
}
