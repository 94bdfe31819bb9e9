/* forward.c - the forward pass of BitNet b1.58, as DESIGN.md section 1 writes it.
 *
 * Read top to bottom: each step comment is one line of that maths. Work is done
 * per chunk of up to max_batch entries; within a chunk each op runs over every
 * token before the next op starts, which is where the kernels unpack a weight row
 * once for many tokens. All arithmetic is in the kernels (kernels/). */
#include "worker/forward.h"

#include "proto/status.h"

#include <stdlib.h>
#include <string.h>

#define MAX_BATCH 64

static uint32_t umax3(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t m = a > b ? a : b;
    return m > c ? m : c;
}

int bn_state_new(const bn_model_t *m, uint32_t n_ctx, uint32_t n_seq, bn_state_t **out,
                 char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    *out = NULL;
    if (n_ctx == 0 || n_seq == 0 || n_ctx > (1u << 24) || n_seq > 4096)
        return bn_err(err, errlen, BN_EINVAL, "context %u and sequences %u must be in 1..%u and 1..4096",
                      n_ctx, n_seq, 1u << 24);
    bn_state_t *s = calloc(1, sizeof *s);
    if (!s)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the run state");
    s->n_ctx = n_ctx;
    s->n_seq = n_seq;
    s->max_batch = MAX_BATCH;
    s->q_dim = c->n_head * c->head_dim;
    s->kv_dim = c->n_head_kv * c->head_dim;
    size_t B = s->max_batch, wide = umax3(c->n_embd, s->q_dim, c->n_ff);
    size_t cache = (size_t)n_seq * c->n_layer * n_ctx * s->kv_dim;
    s->x = malloc(B * c->n_embd * sizeof(float));
    s->xn = malloc(B * wide * sizeof(float));
    s->xq = malloc(B * wide);
    s->xs = malloc(B * sizeof(float));
    s->xqsum = malloc(B * sizeof(int32_t));
    s->q = malloc(B * s->q_dim * sizeof(float));
    s->k = malloc(B * s->kv_dim * sizeof(float));
    s->v = malloc(B * s->kv_dim * sizeof(float));
    s->att = malloc(B * s->q_dim * sizeof(float));
    s->gate = malloc(B * c->n_ff * sizeof(float));
    s->up = malloc(B * c->n_ff * sizeof(float));
    s->out = malloc(B * c->n_embd * sizeof(float));
    s->scores = malloc((size_t)n_ctx * sizeof(float));
    s->key_cache = calloc(cache, sizeof(float));   /* large: calloc maps zero pages lazily */
    s->value_cache = calloc(cache, sizeof(float));
    if (!s->x || !s->xn || !s->xq || !s->xs || !s->xqsum || !s->q || !s->k || !s->v || !s->att ||
        !s->gate || !s->up || !s->out || !s->scores || !s->key_cache || !s->value_cache) {
        bn_state_destroy(&s);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the run state (KV cache of %zu MB)",
                      cache * 2 * sizeof(float) >> 20);
    }
    *out = s;
    return BN_OK;
}

void bn_state_destroy(bn_state_t **ps)
{
    if (!ps || !*ps)
        return;
    bn_state_t *s = *ps;
    free(s->x); free(s->xn); free(s->xq); free(s->xs); free(s->xqsum);
    free(s->q); free(s->k); free(s->v); free(s->att); free(s->gate); free(s->up);
    free(s->out); free(s->scores); free(s->key_cache); free(s->value_cache);
    free(s);
    *ps = NULL;
}

/* y (nt, w->n_out) = bitlinear(x (nt, n_in)): quantize each token, then the product. */
static void bitlinear(const bn_kernels_t *K, bn_state_t *s, const bn_tmat_t *w, const float *x,
                      int nt, float *y)
{
    int n = (int)w->n_in;
    for (int t = 0; t < nt; t++)
        K->quantize_act(x + (size_t)t * n, n, s->xq + (size_t)t * n, &s->xs[t], &s->xqsum[t]);
    for (int t = 0; t < nt; t++)
        K->bitlinear(w, s->xq + (size_t)t * n, s->xs[t], s->xqsum[t], y + (size_t)t * w->n_out, 0,
                     (int)w->n_out);
}

static float *cache_at(const bn_state_t *s, float *cache, const bn_config_t *c, int seq, int layer, int pos)
{
    return cache + (((size_t)seq * c->n_layer + layer) * s->n_ctx + pos) * s->kv_dim;
}

static void forward_chunk(const bn_model_t *m, bn_state_t *s, const bn_batch_entry_t *b, int nt,
                          float *logits, int *n_logits)
{
    const bn_kernels_t *K = bn_kernels_get();
    const bn_config_t *c = &m->cfg;
    const int D = (int)c->n_embd, F = (int)c->n_ff, HD = (int)c->head_dim;
    const int QD = (int)s->q_dim, KVD = (int)s->kv_dim, group = (int)(c->n_head / c->n_head_kv);

    /* x = token_embd[token] */
    for (int t = 0; t < nt; t++)
        bn_model_embed(m, b[t].token, s->x + (size_t)t * D);

    for (uint32_t l = 0; l < c->n_layer; l++) {
        const bn_layer_t *L = &m->w.layers[l];
        /* n = rmsnorm(x) * attn_norm */
        for (int t = 0; t < nt; t++)
            K->rmsnorm(s->x + (size_t)t * D, L->attn_norm, D, c->norm_eps, s->xn + (size_t)t * D);
        /* q, k, v = bitlinear(n) */
        bitlinear(K, s, &L->wq, s->xn, nt, s->q);
        bitlinear(K, s, &L->wk, s->xn, nt, s->k);
        bitlinear(K, s, &L->wv, s->xn, nt, s->v);
        /* q, k = rope_neox(q, k); k and v go into the cache at their positions */
        for (int t = 0; t < nt; t++) {
            K->rope_neox(s->q + (size_t)t * QD, (int)c->n_head, HD, (int)c->rope_dim, b[t].pos, c->rope_base);
            K->rope_neox(s->k + (size_t)t * KVD, (int)c->n_head_kv, HD, (int)c->rope_dim, b[t].pos, c->rope_base);
            memcpy(cache_at(s, s->key_cache, c, b[t].seq, (int)l, b[t].pos), s->k + (size_t)t * KVD,
                   (size_t)KVD * sizeof(float));
            memcpy(cache_at(s, s->value_cache, c, b[t].seq, (int)l, b[t].pos), s->v + (size_t)t * KVD,
                   (size_t)KVD * sizeof(float));
        }
        /* a = causal_gqa_attention(q, k, v): query head h reads KV head h / group */
        for (int t = 0; t < nt; t++) {
            const float *kc = cache_at(s, s->key_cache, c, b[t].seq, (int)l, 0);
            const float *vc = cache_at(s, s->value_cache, c, b[t].seq, (int)l, 0);
            for (int h = 0; h < (int)c->n_head; h++) {
                int kh = h / group;
                K->attention(s->q + (size_t)t * QD + h * HD, kc + kh * HD, vc + kh * HD, (size_t)KVD,
                             b[t].pos + 1, HD, s->scores, s->att + (size_t)t * QD + h * HD);
            }
        }
        /* a = rmsnorm(a) * attn_sub_norm  (over all heads) */
        for (int t = 0; t < nt; t++)
            K->rmsnorm(s->att + (size_t)t * QD, L->attn_sub_norm, QD, c->norm_eps, s->xn + (size_t)t * QD);
        /* x = x + bitlinear_o(a) */
        bitlinear(K, s, &L->wo, s->xn, nt, s->out);
        for (size_t i = 0; i < (size_t)nt * D; i++)
            s->x[i] += s->out[i];
        /* n = rmsnorm(x) * ffn_norm */
        for (int t = 0; t < nt; t++)
            K->rmsnorm(s->x + (size_t)t * D, L->ffn_norm, D, c->norm_eps, s->xn + (size_t)t * D);
        /* f = act(bitlinear_gate(n)) * bitlinear_up(n); act = relu^2 (or silu for `bitnet`) */
        bitlinear(K, s, &L->w_gate, s->xn, nt, s->gate);
        bitlinear(K, s, &L->w_up, s->xn, nt, s->up);
        for (int t = 0; t < nt; t++)
            K->ffn_act(s->gate + (size_t)t * F, s->up + (size_t)t * F, F, c->ffn_act == BN_FFN_RELU2,
                       s->gate + (size_t)t * F);
        /* f = rmsnorm(f) * ffn_sub_norm  (over the full FFN width) */
        for (int t = 0; t < nt; t++)
            K->rmsnorm(s->gate + (size_t)t * F, L->ffn_sub_norm, F, c->norm_eps, s->xn + (size_t)t * F);
        /* x = x + bitlinear_down(f) */
        bitlinear(K, s, &L->w_down, s->xn, nt, s->out);
        for (size_t i = 0; i < (size_t)nt * D; i++)
            s->x[i] += s->out[i];
    }

    /* logits = token_embd . (rmsnorm(x) * output_norm), for the entries that want them */
    for (int t = 0; t < nt; t++) {
        if (!b[t].want_logits)
            continue;
        float *xn = s->xn;
        K->rmsnorm(s->x + (size_t)t * D, m->w.output_norm, D, c->norm_eps, xn);
        K->lm_head(m->w.embd_type, m->w.token_embd, m->w.embd_row_bytes, xn, D,
                   logits + (size_t)(*n_logits) * c->n_vocab, 0, (int)c->n_vocab);
        (*n_logits)++;
    }
}

int bn_forward(const bn_model_t *m, bn_state_t *st, const bn_batch_entry_t *batch, int n,
               float *logits, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    for (int i = 0; i < n; i++) {
        const bn_batch_entry_t *e = &batch[i];
        if (e->seq < 0 || (uint32_t)e->seq >= st->n_seq)
            return bn_err(err, errlen, BN_EINVAL, "batch entry %d: sequence %d out of range (0..%u)",
                          i, e->seq, st->n_seq - 1);
        if (e->token < 0 || (uint32_t)e->token >= c->n_vocab)
            return bn_err(err, errlen, BN_EINVAL, "batch entry %d: token id %d out of range (vocabulary %u)",
                          i, e->token, c->n_vocab);
        if (e->pos < 0 || (uint32_t)e->pos >= st->n_ctx)
            return bn_err(err, errlen, BN_ECONTEXT, "batch entry %d: position %d beyond the context of %u",
                          i, e->pos, st->n_ctx);
        if (e->want_logits && !logits)
            return bn_err(err, errlen, BN_EINVAL, "batch entry %d wants logits but no buffer was given", i);
    }
    int n_logits = 0;
    for (int i = 0; i < n; i += (int)st->max_batch) {
        int nt = n - i < (int)st->max_batch ? n - i : (int)st->max_batch;
        forward_chunk(m, st, batch + i, nt, logits, &n_logits);
    }
    return BN_OK;
}
