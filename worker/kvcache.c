/* kvcache.c - the KV cache's mapping, release and accounting; see kvcache.h. */
#include "worker/kvcache.h"

#include "base/status.h"
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static const char *const kv_names[] = { "f32", "f16", "q8", "q4" };

const char *bn_kv_type_name(int t)
{
    return t >= 0 && t < 4 ? kv_names[t] : "?";
}

int bn_kv_type_parse(const char *s)
{
    for (int t = 0; t < 4; t++)
        if (strcmp(s, kv_names[t]) == 0)
            return t;
    return -1;
}

size_t bn_kv_row_bytes(int t, uint32_t head_dim)
{
    if (t == BN_KV_F32 || t == BN_KV_F16)
        return (size_t)head_dim * (t == BN_KV_F16 ? 2 : 4);
    if ((t == BN_KV_Q8 || t == BN_KV_Q4) && head_dim % BN_KVQ_BLOCK == 0 && head_dim <= BN_KVQ_MAX_DIM)
        return bn_kvq_row_bytes(bn_kv_type_bits(t), (int)head_dim);
    return 0;
}

/* Zero pages mapped lazily. No transparent huge pages: each layer's first
 * position would otherwise fault in a whole 2 MB page (120 MB of resident memory
 * for one token of a 30-layer model), and a release would split them. */
static void *map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, bytes, MADV_NOHUGEPAGE);
    return p;
}

int bn_kvcache_new(uint32_t n_seq, uint32_t n_ctx, uint32_t n_layer, uint32_t n_kv, uint32_t head_dim, int type,
                   bn_kvcache_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n_ctx == 0 || n_seq == 0 || n_ctx > (1u << 24) || n_seq > 4096)
        return bn_err(err, errlen, BN_EINVAL, "context %u and sequences %u must be in 1..%u and 1..4096", n_ctx,
                      n_seq, 1u << 24);
    if (type < BN_KV_F32 || type > BN_KV_Q4)
        return bn_err(err, errlen, BN_EINVAL, "KV cache type %d is not f32, f16, q8 or q4", type);
    if (!bn_kv_row_bytes(type, head_dim))
        return bn_err(err, errlen, BN_EINVAL,
                      "KV cache type %s needs a head size that is a multiple of %d (at most %d); this model's is %u",
                      bn_kv_type_name(type), BN_KVQ_BLOCK, BN_KVQ_MAX_DIM, head_dim);
    bn_kvcache_t *kv = calloc(1, sizeof *kv);
    if (!kv)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the KV cache");
    *kv = (bn_kvcache_t){ .type = type, .n_seq = n_seq, .n_ctx = n_ctx, .n_layer = n_layer, .n_kv = n_kv,
                          .head_dim = head_dim, .row_bytes = bn_kv_row_bytes(type, head_dim) };
    kv->seq_bytes = (size_t)n_layer * n_kv * n_ctx * kv->row_bytes;
    kv->bytes = kv->seq_bytes * n_seq;
    if (!(kv->forgot = calloc(n_seq, sizeof *kv->forgot))) {
        free(kv);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the KV cache");
    }
    if (kv->bytes && (!(kv->k = map(kv->bytes)) || !(kv->v = map(kv->bytes)))) {
        size_t mb = kv->bytes * 2 >> 20;
        bn_kvcache_destroy(&kv);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory: cannot map the KV cache (%zu MB)", mb);
    }
    *out = kv;
    return BN_OK;
}

void bn_kvcache_destroy(bn_kvcache_t **pkv)
{
    if (!pkv || !*pkv)
        return;
    bn_kvcache_t *kv = *pkv;
    if (kv->k)
        munmap(kv->k, kv->bytes);
    if (kv->v)
        munmap(kv->v, kv->bytes);
    free(kv->forgot);
    free(kv);
    *pkv = NULL;
}

/* madvise(DONTNEED) the whole pages inside [a, b) of both mappings */
static void drop(bn_kvcache_t *kv, size_t a, size_t b)
{
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    a = (a + pg - 1) / pg * pg;
    b = b / pg * pg;
    if (b > a) {
        madvise((uint8_t *)kv->k + a, b - a, MADV_DONTNEED);
        madvise((uint8_t *)kv->v + a, b - a, MADV_DONTNEED);
    }
}

void bn_kvcache_copy(bn_kvcache_t *kv, int src, int dst, uint32_t n)
{
    if (!kv || !kv->bytes || src == dst || src < 0 || dst < 0 || (uint32_t)src >= kv->n_seq ||
        (uint32_t)dst >= kv->n_seq)
        return;
    n = n < kv->n_ctx ? n : kv->n_ctx;
    for (uint32_t l = 0; l < kv->n_layer; l++)
        for (uint32_t h = 0; h < kv->n_kv; h++) {
            memcpy(bn_kvcache_row(kv, kv->k, dst, (int)l, (int)h, 0), bn_kvcache_row(kv, kv->k, src, (int)l, (int)h, 0),
                   (size_t)n * kv->row_bytes);
            memcpy(bn_kvcache_row(kv, kv->v, dst, (int)l, (int)h, 0), bn_kvcache_row(kv, kv->v, src, (int)l, (int)h, 0),
                   (size_t)n * kv->row_bytes);
        }
}

void bn_kvcache_forget(bn_kvcache_t *kv, int seq, uint32_t below)
{
    if (!kv || !kv->bytes || seq < 0 || (uint32_t)seq >= kv->n_seq)
        return;
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    below = below < kv->n_ctx ? below : kv->n_ctx;
    /* act when at least two pages' worth of positions have fallen out since
     * the last time, so a (layer, head) run always has a whole page to give */
    if (below <= kv->forgot[seq] || (size_t)(below - kv->forgot[seq]) * kv->row_bytes < 2 * pg)
        return;
    for (uint32_t l = 0; l < kv->n_layer; l++)
        for (uint32_t h = 0; h < kv->n_kv; h++) {
            const size_t a = (size_t)((uint8_t *)bn_kvcache_row(kv, kv->k, seq, (int)l, (int)h, 0) - (uint8_t *)kv->k);
            drop(kv, a, a + (size_t)below * kv->row_bytes); /* (pages dropped before cost nothing) */
        }
    kv->forgot[seq] = below;
}

void bn_kvcache_release(bn_kvcache_t *kv, int seq)
{
    if (!kv || !kv->bytes || seq < 0 || (uint32_t)seq >= kv->n_seq)
        return;
    kv->forgot[seq] = 0;
    /* seq_bytes is a whole number of pages when n_ctx * head_dim * size is (a
     * 4 KB page holds 16 positions of a 128-wide f16 head); otherwise the shared
     * edge pages stay, and only whole pages inside the slot go */
    drop(kv, (size_t)seq * kv->seq_bytes, (size_t)(seq + 1) * kv->seq_bytes);
}

size_t bn_kvcache_pos_bytes(const bn_kvcache_t *kv)
{
    return 2 * (size_t)kv->n_layer * kv->n_kv * kv->row_bytes;
}

static size_t resident(const void *p, size_t bytes)
{
    if (!p || !bytes)
        return 0;
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = (bytes + pg - 1) / pg;
    size_t count = 0;
    unsigned char vec[4096];
    for (size_t i = 0; i < n; i += sizeof vec) {
        size_t k = n - i < sizeof vec ? n - i : sizeof vec;
        size_t len = i + k == n ? bytes - i * pg : k * pg;
        if (mincore((uint8_t *)p + i * pg, len, vec) != 0)
            return 0;
        for (size_t j = 0; j < k; j++)
            count += vec[j] & 1;
    }
    return count * pg;
}

size_t bn_kvcache_resident(const bn_kvcache_t *kv)
{
    return kv ? resident(kv->k, kv->bytes) + resident(kv->v, kv->bytes) : 0;
}
