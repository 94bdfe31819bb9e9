/* kvcache.c - the KV cache's mapping, release and accounting; see kvcache.h. */
#include "worker/kvcache.h"

#include "base/status.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

const char *bn_kv_type_name(int t)
{
    return t == BN_KV_F32 ? "f32" : t == BN_KV_F16 ? "f16" : "?";
}

int bn_kv_type_parse(const char *s)
{
    return strcmp(s, "f32") == 0 ? BN_KV_F32 : strcmp(s, "f16") == 0 ? BN_KV_F16 : -1;
}

size_t bn_kv_type_size(int t)
{
    return t == BN_KV_F16 ? 2 : 4;
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
    if (type != BN_KV_F32 && type != BN_KV_F16)
        return bn_err(err, errlen, BN_EINVAL, "KV cache type %d is not f32 or f16", type);
    bn_kvcache_t *kv = calloc(1, sizeof *kv);
    if (!kv)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the KV cache");
    *kv = (bn_kvcache_t){ .type = type, .n_seq = n_seq, .n_ctx = n_ctx, .n_layer = n_layer, .n_kv = n_kv,
                          .head_dim = head_dim };
    kv->seq_bytes = (size_t)n_layer * n_kv * n_ctx * head_dim * bn_kv_type_size(type);
    kv->bytes = kv->seq_bytes * n_seq;
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
    free(kv);
    *pkv = NULL;
}

void bn_kvcache_release(bn_kvcache_t *kv, int seq)
{
    if (!kv || !kv->bytes || seq < 0 || (uint32_t)seq >= kv->n_seq)
        return;
    /* seq_bytes is a whole number of pages when n_ctx * head_dim * size is (a
     * 4 KB page holds 16 positions of a 128-wide f16 head); otherwise the shared
     * edge pages stay, and only whole pages inside the slot go */
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    size_t a = (size_t)seq * kv->seq_bytes, b = a + kv->seq_bytes;
    a = (a + pg - 1) / pg * pg;
    b = b / pg * pg;
    if (b > a) {
        madvise((uint8_t *)kv->k + a, b - a, MADV_DONTNEED);
        madvise((uint8_t *)kv->v + a, b - a, MADV_DONTNEED);
    }
}

size_t bn_kvcache_pos_bytes(const bn_kvcache_t *kv)
{
    return 2 * (size_t)kv->n_layer * kv->n_kv * kv->head_dim * bn_kv_type_size(kv->type);
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
