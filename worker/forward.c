/* forward.c - the forward pass of BitNet b1.58, as DESIGN.md section 1 writes it.
 *
 * Read top to bottom in forward_chunk(): each step comment is one line of that
 * maths. Each step is one job of the thread pool (one barrier between steps, none
 * inside): matrices are split by output rows, so each thread streams its own rows
 * of the weights once for every token of the chunk; per-token steps are split by
 * tokens; attention by (token, head). All arithmetic is in the kernels. */
#include "worker/forward.h"

#include "base/log.h"
#include "base/status.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_BATCH 64
#define ROW_ALIGN 8 /* rows per thread in multiples of this: whole SIMD row groups */
/* Rows per chunk when the threads take a matrix's rows chunk by chunk (a multiple
 * of ROW_ALIGN): 40-330 KB of weights, a long run for the prefetchers, and at most
 * one chunk's time waited at the barrier. */
#define ROW_CHUNK 64

static uint32_t umax3(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t m = a > b ? a : b;
    return m > c ? m : c;
}

static uint32_t my_layers(const bn_model_t *m)
{
    return m->shard.layer1 - m->shard.layer0;
}

int bn_state_new(const bn_model_t *m, uint32_t n_ctx, uint32_t n_seq, int kv_type, bn_pool_t *pool,
                 bn_state_t **out, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    const bn_shard_t *sh = &m->shard;
    *out = NULL;
    if (n_ctx == 0 || n_seq == 0 || n_ctx > (1u << 24) || n_seq > 4096)
        return bn_err(err, errlen, BN_EINVAL, "context %u and sequences %u must be in 1..%u and 1..4096",
                      n_ctx, n_seq, 1u << 24);
    bn_state_t *s = calloc(1, sizeof *s);
    if (!s)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the run state");
    s->n_ctx = n_ctx;
    s->n_seq = n_seq;
    s->pool = pool;
    s->max_batch = MAX_BATCH;
    s->kv_type = kv_type;
    s->q_dim = (sh->head1 - sh->head0) * c->head_dim;
    s->kv_dim = (sh->kv1 - sh->kv0) * c->head_dim;
    s->n_ff = sh->ff1 - sh->ff0;
    /* widths of the o and down inputs: this rank's columns, padded to whole blocks */
    s->q_pad = (s->q_dim + 127) / 128 * 128;
    s->ff_pad = (s->n_ff + 127) / 128 * 128;
    size_t B = s->max_batch, wide = umax3(c->n_embd, s->q_pad, s->ff_pad);
    s->x = malloc(B * c->n_embd * sizeof(float));
    s->xn = malloc(B * wide * sizeof(float));
    s->xq = aligned_alloc(64, (B * wide + 63) / 64 * 64); /* whole cache lines for the SIMD loads */
    s->xs = malloc(B * sizeof(float));
    s->xr = malloc(B * sizeof(float));
    s->xqsum = malloc(B * sizeof(int32_t));
    /* sub-norm blocks: one per head (attention), one per 128 FFN rows */
    size_t nb_att = c->n_head, nb_ffn = (c->n_ff + 127) / 128;
    s->stats_len = 1 + (nb_att > nb_ffn ? nb_att : nb_ffn);
    s->stats = malloc(B * s->stats_len * sizeof(double));
    s->ones = malloc(B * sizeof(float));
    s->q = malloc(B * (s->q_dim + 1) * sizeof(float));
    s->k = malloc(B * (s->kv_dim + 1) * sizeof(float));
    s->v = malloc(B * (s->kv_dim + 1) * sizeof(float));
    s->att = malloc(B * (s->q_dim + 1) * sizeof(float));
    /* runs of at least 1024 positions, at most 8 of them in a context: fixed by
     * n_ctx alone, so a head's result never depends on the threads, the batch
     * or the plan */
    s->att_run = (n_ctx + 7) / 8 < 1024 ? 1024 : ((n_ctx + 7) / 8 + 255) / 256 * 256;
    s->att_runs = (n_ctx + s->att_run - 1) / s->att_run;
    if (s->att_runs > 1 && kv_type != BN_KV_F32) {
        s->att_part = malloc(B * s->att_runs * (s->q_dim + 1) * sizeof(float));
        s->att_ml = malloc(B * s->att_runs * (sh->head1 - sh->head0 + 1) * 2 * sizeof(float));
        if (!s->att_part || !s->att_ml) {
            bn_state_destroy(&s);
            return bn_err(err, errlen, BN_ENOMEM, "out of memory for the run state");
        }
    }
    s->gate = malloc(B * (s->n_ff + 1) * sizeof(float));
    s->up = malloc(B * (s->n_ff + 1) * sizeof(float));
    s->out = malloc(B * c->n_embd * sizeof(float));
    s->rope = malloc(B * c->rope_dim * sizeof(float));
    s->hq = malloc(B * c->n_embd);
    s->hd = malloc(B * (c->n_embd / 32 + 1) * sizeof(float));
    int rc = bn_kvcache_new(n_seq, n_ctx, my_layers(m), sh->kv1 - sh->kv0, c->head_dim, kv_type, &s->kv, err, errlen);
    if (rc) {
        bn_state_destroy(&s);
        return rc;
    }
    if (!s->x || !s->xn || !s->xq || !s->xs || !s->xr || !s->xqsum || !s->stats || !s->ones || !s->q ||
        !s->k || !s->v || !s->att || !s->gate || !s->up || !s->out || !s->rope || !s->hq || !s->hd) {
        bn_state_destroy(&s);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the run state");
    }
    for (size_t t = 0; t < B; t++)
        s->ones[t] = 1.0f;
    *out = s;
    return BN_OK;
}

void bn_state_destroy(bn_state_t **ps)
{
    if (!ps || !*ps)
        return;
    bn_state_t *s = *ps;
    free(s->x); free(s->xn); free(s->xq); free(s->xs); free(s->xr); free(s->xqsum); free(s->stats);
    free(s->stats_all); free(s->ones);
    free(s->q); free(s->k); free(s->v); free(s->att); free(s->att_part); free(s->att_ml); free(s->gate); free(s->up);
    free(s->out); free(s->rope); free(s->hq); free(s->hd);
    bn_kvcache_destroy(&s->kv);
    free(s);
    *ps = NULL;
}

int bn_state_set_dist(bn_state_t *s, const bn_dist_t *d, char *err, size_t errlen)
{
    s->dist = d;
    free(s->stats_all);
    s->stats_all = NULL;
    if (d && d->tp > 1 && !(s->stats_all = malloc(s->stats_len * s->max_batch * d->tp * sizeof(double))))
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the run state");
    return BN_OK;
}

/* One chunk's shared context, read by every job. */
typedef struct {
    const bn_model_t *m;
    bn_state_t *s;
    const bn_kernels_t *K;
    const bn_batch_entry_t *b;
    int nt;
    int att_runs;           /* the most runs of positions any token's attention is cut into (att_span) */
    uint32_t layer;
    int tp;                 /* tensor ranks of this stage: 1 = the whole layer is here */
    /* per step */
    const bn_tmat_t *mats[3];
    float *outs[3];
    int n_mats;
    const float *sub_in;    /* the sub-norm's input (att or gate), its width here, */
    int sub_w, sub_pad;     /* padded width of the next matrix's input, */
    int sub_n;              /* the full width over every tensor rank, */
    int sub_off, sub_block; /* where this rank's slice starts in it, its blocks' width, */
    const float *sub_norm;  /* and this rank's norm weights */
    const float *mm_s;      /* NULL, or the scales job_matmul uses instead of s->xs */
    atomic_int next_chunk;  /* the next chunk of rows a thread takes (job_matmul, job_head) */
    const int *logit_rows;  /* tokens whose logits are wanted */
    int n_logit_rows;
    float *logits;
} ctx_t;

/* The cache is (seq, layer, KV head, position, head_dim): one KV head's positions
 * follow one another, so attention, which reads one KV head at a time, reads one
 * stream (with rows of kv_dim, a head's slice of each row is too short a run for
 * the hardware prefetchers, and decode waited on memory). This is the row of
 * (seq, layer, KV head kh of the rank, pos): head_dim values of the KV type. */
static void *cache_at(const bn_state_t *s, void *cache, const bn_model_t *m, int seq, int layer, int kh, int pos)
{
    return bn_kvcache_row(s->kv, cache, seq, layer - (int)m->shard.layer0, kh, pos);
}

/* one token's k or v (kv_dim floats, the rank's KV heads one after another) into
 * its rows of the cache */
static void cache_put(const bn_state_t *s, const bn_kernels_t *K, void *cache, const bn_model_t *m, int seq,
                      int layer, int pos, const float *x)
{
    const uint32_t hd = m->cfg.head_dim;
    for (uint32_t kh = 0; kh < s->kv_dim / hd; kh++) {
        void *row = cache_at(s, cache, m, seq, layer, (int)kh, pos);
        const float *xh = x + (size_t)kh * hd;
        if (s->kv_type == BN_KV_F16)
            K->to_f16(xh, (int)hd, row);
        else if (s->kv_type == BN_KV_F32)
            memcpy(row, xh, (size_t)hd * sizeof(float));
        else /* the one quantizer for every ISA: the stored bytes never depend on the CPU */
            bn_ref_kvq_quantize(xh, (int)hd, bn_kv_type_bits(s->kv_type), row);
    }
}

static void run(ctx_t *cx, bn_pool_fn fn)
{
    if (cx->s->pool)
        bn_pool_run(cx->s->pool, fn, cx);
    else
        fn(cx, 0, 1);
}

/* tokens [t0, t1) of this thread */
static void my_tokens(const ctx_t *cx, int ith, int nth, int *t0, int *t1)
{
    bn_pool_split(cx->nt, ith, nth, 1, t0, t1);
}

/* quantize the BitLinear input xn (width n) of tokens [t0, t1) */
static void quantize_tokens(ctx_t *cx, int n, int t0, int t1)
{
    bn_state_t *s = cx->s;
    for (int t = t0; t < t1; t++)
        cx->K->quantize_act(s->xn + (size_t)t * n, n, s->xq + (size_t)t * n, &s->xs[t], &s->xqsum[t]);
}

/* Each matrix's rows: the first TAIL_FROM eighths split evenly over the threads
 * (each thread streams one contiguous run), then the rest of every matrix in
 * chunks of ROW_CHUNK that each thread takes when it is done, so a thread that
 * streams slower or starts later takes fewer of them rather than the others
 * waiting for it at the barrier. Which thread computes a row does not change its
 * bits. */
#define TAIL_FROM 7
static int static_rows(const bn_tmat_t *w, int nth)
{
    return nth > 1 ? (int)w->n_out * TAIL_FROM / 8 / ROW_ALIGN * ROW_ALIGN : (int)w->n_out;
}

/* y = bitlinear(x) for the n_mats matrices of the step, sharing one quantized input */
static void job_matmul(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const float *xs = cx->mm_s ? cx->mm_s : s->xs;
    for (int i = 0; i < cx->n_mats; i++) {
        const bn_tmat_t *w = cx->mats[i];
        int r0, r1;
        bn_pool_split(static_rows(w, nth), ith, nth, ROW_ALIGN, &r0, &r1);
        if (r0 < r1)
            (w->bscale ? bn_ref_tgemm : cx->K->tgemm)(w, s->xq, xs, s->xqsum, cx->nt, cx->outs[i], w->n_out, r0, r1);
    }
    for (;;) {
        int c = atomic_fetch_add_explicit(&cx->next_chunk, 1, memory_order_relaxed), i = 0, r0 = 0;
        for (; i < cx->n_mats; i++) {
            r0 = static_rows(cx->mats[i], nth);
            const int n = ((int)cx->mats[i]->n_out - r0 + ROW_CHUNK - 1) / ROW_CHUNK;
            if (c < n)
                break;
            c -= n;
        }
        if (i == cx->n_mats)
            return;
        const bn_tmat_t *w = cx->mats[i];
        r0 += c * ROW_CHUNK;
        const int r1 = (int)w->n_out - r0 > ROW_CHUNK ? r0 + ROW_CHUNK : (int)w->n_out;
        (w->bscale ? bn_ref_tgemm : cx->K->tgemm)(w, s->xq, xs, s->xqsum, cx->nt, cx->outs[i], w->n_out, r0, r1);
    }
}

static void matmul(ctx_t *cx, const bn_tmat_t *a, float *ya, const bn_tmat_t *b, float *yb,
                   const bn_tmat_t *c, float *yc)
{
    cx->mats[0] = a; cx->outs[0] = ya;
    cx->mats[1] = b; cx->outs[1] = yb;
    cx->mats[2] = c; cx->outs[2] = yc;
    cx->n_mats = c ? 3 : b ? 2 : 1;
    atomic_store_explicit(&cx->next_chunk, 0, memory_order_relaxed);
    run(cx, job_matmul);
}

/* rope tables of the tokens' positions; x = token_embd[token] on the first stage */
static void job_embed(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    const bn_config_t *c = &cx->m->cfg;
    const int first = cx->m->shard.layer0 == 0;
    int t0, t1;
    my_tokens(cx, ith, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        if (first)
            bn_model_embed(cx->m, cx->b[t].token, cx->s->x + (size_t)t * c->n_embd);
        bn_ref_rope_table(cx->b[t].pos, (int)c->rope_dim, c->rope_base, cx->s->rope + (size_t)t * c->rope_dim);
    }
}

/* x = x + out (when add_out), then n = rmsnorm(x) * norm, quantized: the input of
 * the attention and FFN blocks (x is the same on every tensor rank) */
static void residual_norm(ctx_t *cx, int ith, int nth, int add_out, const float *norm)
{
    bn_state_t *s = cx->s;
    const bn_config_t *c = &cx->m->cfg;
    const int D = (int)c->n_embd;
    int t0, t1;
    my_tokens(cx, ith, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        float *x = s->x + (size_t)t * D;
        if (add_out)
            for (int i = 0; i < D; i++)
                x[i] += s->out[(size_t)t * D + i];
        if (norm)
            cx->K->rmsnorm(x, norm, D, c->norm_eps, s->xn + (size_t)t * D);
    }
    if (norm)
        quantize_tokens(cx, D, t0, t1);
}

/* (the previous layer's x += bitlinear_down(f), when it was computed here;) n = rmsnorm(x) * attn_norm */
static void job_attn_in(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    residual_norm(cx, ith, nth, cx->layer > cx->m->shard.layer0, cx->m->w.layers[cx->layer].attn_norm);
}

/* x = x + bitlinear_down(f): the last layer of a stage that hands x on */
static void job_residual(void *arg, int ith, int nth)
{
    residual_norm(arg, ith, nth, 1, NULL);
}

/* q, k = rope_neox(q, k); k and v go into the cache at their positions */
static void job_rope_cache(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const bn_config_t *c = &cx->m->cfg;
    const int HD = (int)c->head_dim, QD = (int)s->q_dim, KVD = (int)s->kv_dim;
    const bn_shard_t *sh = &cx->m->shard;
    int t0, t1;
    my_tokens(cx, ith, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        const float *cs = s->rope + (size_t)t * c->rope_dim;
        cx->K->rope_neox(s->q + (size_t)t * QD, (int)(sh->head1 - sh->head0), HD, (int)c->rope_dim, cs);
        cx->K->rope_neox(s->k + (size_t)t * KVD, (int)(sh->kv1 - sh->kv0), HD, (int)c->rope_dim, cs);
        if (!KVD)
            continue;
        cache_put(s, cx->K, s->kv->k, cx->m, cx->b[t].seq, (int)cx->layer, cx->b[t].pos, s->k + (size_t)t * KVD);
        cache_put(s, cx->K, s->kv->v, cx->m, cx->b[t].seq, (int)cx->layer, cx->b[t].pos, s->v + (size_t)t * KVD);
    }
}

/* Into how many parts each GQA group's query heads are cut: 1 (keys and values
 * read once per group) when there are jobs enough for the threads; otherwise
 * (decode: one token, few KV heads) the fewest parts that give every thread the
 * same number of jobs. 2B4T decode at 2000 positions, 2 threads: 5 groups split
 * 3:2 over the threads, 10 half-groups 5:5, +5% tokens/s. Each head's result
 * does not depend on the heads it is computed with (kernels.h), so any cut gives
 * the same bits. */
static int attention_parts(int jobs, int group, int nth)
{
    if (jobs >= 4 * nth || jobs % nth == 0)
        return 1;
    for (int p = 2; p < group; p++)
        if (group % p == 0 && jobs * p % nth == 0)
            return p;
    return group;
}

/* The positions token t attends to: p0..pos, all of them or the last `window`,
 * in *np; returns how many runs of s->att_run they are cut into (1: one call,
 * straight into s->att; the f32 cache is never cut) */
static int att_span(const ctx_t *cx, int t, int *p0, int *np)
{
    const bn_state_t *s = cx->s;
    const int pos = cx->b[t].pos;
    *p0 = s->window && pos + 1 > (int)s->window ? pos + 1 - (int)s->window : 0;
    *np = pos + 1 - *p0;
    if (!s->att_part || *np <= (int)s->att_run)
        return 1;
    return (*np + (int)s->att_run - 1) / (int)s->att_run;
}

/* a = causal_gqa_attention(q, k, v): query head h reads KV head h / (n_head / n_head_kv).
 * Split by (token, KV head, part of the group, run of positions): the query
 * heads of a group (or of a part) are done together, so their keys and values
 * are read once; a long context's runs (decode at 4k: one token, few KV heads)
 * keep every thread busy without cutting a group, and are merged after
 * (job_att_merge). Each head's result depends only on its positions. */
static void job_attention(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const bn_config_t *c = &cx->m->cfg;
    const bn_shard_t *sh = &cx->m->shard;
    const int HD = (int)c->head_dim, QD = (int)s->q_dim, KVH = (int)(sh->kv1 - sh->kv0);
    const int NH = (int)(sh->head1 - sh->head0), R = (int)s->att_runs;
    const int group = (int)(c->n_head / c->n_head_kv), runs = cx->att_runs;
    const int parts = attention_parts(cx->nt * KVH * runs, group, nth);
    int i0, i1;
    bn_pool_split(cx->nt * KVH * parts * runs, ith, nth, 1, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        const int t = i / (KVH * parts * runs), kh = i / (parts * runs) % KVH, part = i / runs % parts;
        const int run = i % runs, g = (int)sh->kv0 + kh;
        int p0, np;
        const int nr = att_span(cx, t, &p0, &np);
        if (run >= nr)
            continue;
        /* this rank's query heads that read KV head g */
        int h0 = g * group + part * group / parts, h1 = g * group + (part + 1) * group / parts;
        h0 = h0 > (int)sh->head0 ? h0 : (int)sh->head0;
        h1 = h1 < (int)sh->head1 ? h1 : (int)sh->head1;
        if (h0 >= h1)
            continue;
        const float *q = s->q + (size_t)t * QD + (h0 - (int)sh->head0) * HD;
        float *out = s->att + (size_t)t * QD + (h0 - (int)sh->head0) * HD, *ml = NULL;
        if (nr > 1) { /* run `run` of the token's positions, into its own output and softmax state */
            out = s->att_part + ((size_t)t * R + run) * QD + (h0 - (int)sh->head0) * HD;
            ml = s->att_ml + (((size_t)t * R + run) * NH + (h0 - (int)sh->head0)) * 2;
            p0 += run * (int)s->att_run;
            np = np - run * (int)s->att_run < (int)s->att_run ? np - run * (int)s->att_run : (int)s->att_run;
        }
        const int seq = cx->b[t].seq;
        const void *kc = cache_at(s, s->kv->k, cx->m, seq, (int)cx->layer, kh, p0);
        const void *vc = cache_at(s, s->kv->v, cx->m, seq, (int)cx->layer, kh, p0);
        if (bn_kv_type_bits(s->kv_type))
            cx->K->attention_heads_q(q, h1 - h0, (size_t)HD, kc, vc, s->kv->row_bytes, bn_kv_type_bits(s->kv_type), np,
                                     HD, out, (size_t)HD, ml);
        else if (s->kv_type == BN_KV_F16)
            cx->K->attention_heads_f16(q, h1 - h0, (size_t)HD, kc, vc, (size_t)HD, np, HD, out, (size_t)HD, ml);
        else if (cx->K->attention_heads)
            cx->K->attention_heads(q, h1 - h0, (size_t)HD, kc, vc, (size_t)HD, np, HD, out, (size_t)HD);
        else
            for (int h = 0; h < h1 - h0; h++)
                cx->K->attention(q + h * HD, kc, vc, (size_t)HD, np, HD, out + h * HD);
    }
}

/* The runs of a long context merged, per (token, head), in run order: each
 * run's output (normalized by its own sum l) weighted by l * exp(m - M), M the
 * largest of the runs' maxima, over the sum of those weights. */
static void job_att_merge(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const int HD = (int)cx->m->cfg.head_dim, QD = (int)s->q_dim, R = (int)s->att_runs;
    const int NH = (int)(cx->m->shard.head1 - cx->m->shard.head0);
    int i0, i1;
    bn_pool_split(cx->nt * NH, ith, nth, 1, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        const int t = i / NH, h = i % NH;
        int p0, np;
        const int nr = att_span(cx, t, &p0, &np);
        if (nr < 2)
            continue;
        float w[64], M = -INFINITY, sum = 0.0f;
        for (int r = 0; r < nr; r++) {
            const float m = s->att_ml[(((size_t)t * R + r) * NH + h) * 2];
            M = m > M ? m : M;
        }
        for (int r = 0; r < nr; r++) {
            const float *ml = s->att_ml + (((size_t)t * R + r) * NH + h) * 2;
            w[r] = ml[1] * expf(ml[0] - M);
            sum += w[r];
        }
        float *out = s->att + (size_t)t * QD + (size_t)h * HD;
        for (int d = 0; d < HD; d++) {
            float a = 0.0f;
            for (int r = 0; r < nr; r++)
                a += w[r] * s->att_part[((size_t)t * R + r) * QD + (size_t)h * HD + d];
            out[d] = a / sum;
        }
    }
}

/* The sub-norms (over all heads, over the full FFN width) are computed so that
 * any split of the width over tensor ranks gives the same bits as one rank:
 * the sum of squares is summed in double per block (a head, or 128 FFN rows),
 * then over the blocks in order; max|v * norm| is exact in any order; and
 * max|v * norm / rms| is taken as max|v * norm| / rms, so one exchange gives
 * both the norm and the int8 scale. Then xn = v * (1/rms) * norm and
 * q = round(xn * 127 / max(max|xn|, 1e-5)) as in bitlinear().
 * Before the exchange: this rank's blocks' sums and its max, per token. */
static inline void stat1(double *sum, float *max, float x, float g)
{
    const float a = fabsf(x * g);
    *sum += (double)x * x;
    *max = a > *max ? a : *max;
}

/* The sum of x[i]^2 over one block, in double, in four running sums (element i
 * in sum i % 4; the same order on every rank, and four additions in flight); *am
 * raised to the largest |x[i] * g[i]| (NaNs skipped), also in four parts. */
static double block_stats(const float *x, const float *g, int n, float *am)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    float m0 = *am, m1 = *am, m2 = *am, m3 = *am;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        stat1(&s0, &m0, x[i], g[i]);
        stat1(&s1, &m1, x[i + 1], g[i + 1]);
        stat1(&s2, &m2, x[i + 2], g[i + 2]);
        stat1(&s3, &m3, x[i + 3], g[i + 3]);
    }
    if (i < n)
        stat1(&s0, &m0, x[i], g[i]);
    if (i + 1 < n)
        stat1(&s1, &m1, x[i + 1], g[i + 1]);
    if (i + 2 < n)
        stat1(&s2, &m2, x[i + 2], g[i + 2]);
    m0 = m1 > m0 ? m1 : m0;
    m2 = m3 > m2 ? m3 : m2;
    *am = m2 > m0 ? m2 : m0;
    return (s0 + s1) + (s2 + s3);
}

static void job_sub_stats(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const int W = cx->sub_w, B = cx->sub_block, nb = (cx->sub_n + B - 1) / B, off = cx->sub_off;
    const float *g = cx->sub_norm;
    int t0, t1;
    my_tokens(cx, ith, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        const float *v = cx->sub_in + (size_t)t * W;
        double *st = s->stats + (size_t)t * s->stats_len;
        memset(st, 0, (1 + (size_t)nb) * sizeof *st);
        float am = 0.0f;
        /* block by block (this rank's slice starts on a block boundary) */
        for (int i0 = 0; i0 < W; i0 += B) {
            const int i1 = W - i0 < B ? W : i0 + B;
            st[1 + (off + i0) / B] = block_stats(v + i0, g + i0, i1 - i0, &am);
        }
        st[0] = am;
    }
}

/* After the exchange (xr = 1 / rms, xs = the int8 scale of the whole width): the
 * slice normed and quantized (the kernels' quantize_scaled), zeros in the padding. */
static void job_sub_apply(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const int W = cx->sub_w, P = cx->sub_pad;
    const float *g = cx->sub_norm;
    int t0, t1;
    my_tokens(cx, ith, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        const float *v = cx->sub_in + (size_t)t * W;
        int8_t *q = s->xq + (size_t)t * P;
        cx->K->quantize_scaled(v, g, s->xr[t], s->xs[t], W, q, &s->xqsum[t]);
        memset(q + W, 0, (size_t)(P - W));
    }
}

/* v = rmsnorm(v) * norm over the full width n, quantized for the next BitLinear */
static int sub_norm(ctx_t *cx, const float *in, int w, int pad, int n, int off, int block, const float *norm,
                    char *err, size_t errlen)
{
    bn_state_t *s = cx->s;
    cx->sub_in = in;
    cx->sub_w = w;
    cx->sub_pad = pad;
    cx->sub_n = n;
    cx->sub_off = off;
    cx->sub_block = block;
    cx->sub_norm = norm;
    run(cx, job_sub_stats);
    const size_t L = s->stats_len, nb = (size_t)(n + block - 1) / block;
    const double *all = s->stats;
    size_t stride = 0; /* between ranks' records */
    if (cx->tp > 1) {
        const bn_dist_t *d = s->dist;
        int rc = d->allgather(d->ctx, s->stats, (size_t)cx->nt * L * sizeof(double), s->stats_all, err, errlen);
        if (rc)
            return rc;
        all = s->stats_all;
        stride = (size_t)cx->nt * L;
    }
    for (int t = 0; t < cx->nt; t++) {
        double ss = 0.0;
        float am = 0.0f;
        for (size_t b = 0; b < nb; b++) {
            double blk = 0.0; /* one rank's block; the others hold exact zeros there */
            for (int r = 0; r < cx->tp; r++)
                blk += all[r * stride + (size_t)t * L + 1 + b];
            ss += blk;
        }
        for (int r = 0; r < cx->tp; r++)
            am = fmaxf(am, (float)all[r * stride + (size_t)t * L]);
        s->xr[t] = 1.0f / sqrtf((float)(ss / n) + cx->m->cfg.norm_eps);
        s->xs[t] = 127.0f / fmaxf(am * s->xr[t], 1e-5f);
    }
    run(cx, job_sub_apply);
    return BN_OK;
}

/* x = x + bitlinear_o(a); n = rmsnorm(x) * ffn_norm */
static void job_ffn_in(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    residual_norm(cx, ith, nth, 1, cx->m->w.layers[cx->layer].ffn_norm);
}

/* f = act(gate) * up, for this rank's FFN rows */
static void job_ffn_act(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const int F = (int)s->n_ff;
    int t0, t1;
    my_tokens(cx, ith, nth, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        float *g = s->gate + (size_t)t * F;
        cx->K->ffn_act(g, s->up + (size_t)t * F, F, cx->m->cfg.ffn_act == BN_FFN_RELU2, g);
    }
}

/* x = x + bitlinear_down(f) (last layer) and h = rmsnorm(x) * output_norm, for the
 * tokens that want logits only (no later step reads the others' x), in the head's
 * input format */
static void job_head_in(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const bn_config_t *c = &cx->m->cfg;
    const int D = (int)c->n_embd;
    int i0, i1;
    bn_pool_split(cx->n_logit_rows, ith, nth, 1, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        int t = cx->logit_rows[i];
        float *x = s->x + (size_t)t * D, *xn = s->xn + (size_t)i * D;
        for (int k = 0; k < D; k++)
            x[k] += s->out[(size_t)t * D + k];
        cx->K->rmsnorm(x, cx->m->w.output_norm, D, c->norm_eps, xn);
        if (cx->m->w.head.type != BN_HEAD_F16)
            cx->K->head_quantize(xn, D, s->hq + (size_t)i * D, s->hd + (size_t)i * (D / 32));
    }
}

/* logits = token_embd . h   (the tied LM head: this rank's vocabulary rows, taken
 * by the threads in chunks of HEAD_CHUNK rows as job_matmul takes its rows) */
#define HEAD_CHUNK 256
static void job_head(void *arg, int ith, int nth)
{
    ctx_t *cx = arg;
    bn_state_t *s = cx->s;
    const bn_hmat_t *h = &cx->m->w.head;
    const int D = (int)h->n_in, n = (int)h->n_out;
    const int ch = nth > 1 || cx->n_logit_rows > 1 ? HEAD_CHUNK : n; /* (several rows: each chunk's weights from cache for the rest) */
    for (;;) {
        const int c = atomic_fetch_add_explicit(&cx->next_chunk, 1, memory_order_relaxed);
        if (c >= (n + ch - 1) / ch)
            return;
        const int r0 = c * ch, r1 = n - r0 > ch ? r0 + ch : n;
        for (int i = 0; i < cx->n_logit_rows; i++) {
            bn_hact_t a = { s->xn + (size_t)i * D, s->hq + (size_t)i * D, s->hd + (size_t)i * (D / 32) };
            cx->K->head_gemv(h, &a, cx->logits + (size_t)i * h->n_out, r0, r1);
        }
    }
}

/* y = bitlinear(v) of a row-parallel matrix (o, down): this rank's columns give a
 * partial sum, the tensor ranks' partial sums add up to y. The partial sums are
 * the integer dots (the kernels with scale 1 and s 1 give them exactly as floats,
 * |dot| < 2^24), so their sum is exact in any order and y = dot * scale / s has
 * the bits of one rank's result. (TQ files whose blocks have their own scales
 * add float partial sums instead: equal up to rounding.) */
static int row_parallel(ctx_t *cx, const bn_tmat_t *w, float *y, char *err, size_t errlen)
{
    bn_state_t *s = cx->s;
    const int D = (int)cx->m->cfg.n_embd;
    const size_t n = (size_t)cx->nt * D;
    if (cx->tp == 1) {
        matmul(cx, w, y, NULL, NULL, NULL, NULL);
        return BN_OK;
    }
    const int exact = !w->bscale;
    bn_tmat_t w1 = *w;
    if (exact) {
        w1.scale = 1.0f;
        cx->mm_s = s->ones;
    }
    if (w->n_out)
        matmul(cx, &w1, y, NULL, NULL, NULL, NULL);
    else
        memset(y, 0, n * sizeof(float)); /* no heads or FFN rows here: adds nothing */
    cx->mm_s = NULL;
    const bn_dist_t *d = s->dist;
    int rc = d->allreduce_sum(d->ctx, y, n, err, errlen);
    if (rc || !exact)
        return rc;
    const float scale = w->scale; /* the tensor's, known here even without columns (model.c) */
    for (int t = 0; t < cx->nt; t++)
        for (int i = 0; i < D; i++)
            y[(size_t)t * D + i] = y[(size_t)t * D + i] * scale / s->xs[t];
    return BN_OK;
}

static int forward_chunk(const bn_model_t *m, bn_state_t *s, const bn_batch_entry_t *b, int nt, float *logits,
                         char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    const bn_shard_t *sh = &m->shard;
    const bn_dist_t *d = s->dist;
    int rows[MAX_BATCH], n_rows = 0, rc;
    for (int t = 0; t < nt; t++)
        if (b[t].want_logits)
            rows[n_rows++] = t;
    ctx_t cx = { .m = m, .s = s, .K = bn_kernels_get(), .b = b, .nt = nt, .tp = d ? d->tp : 1,
                 .logit_rows = rows, .n_logit_rows = n_rows, .logits = logits, .att_runs = 1 };
    const size_t xn = (size_t)nt * c->n_embd;
    for (int t = 0; t < nt; t++) { /* the same for every layer */
        int p0, np, r = att_span(&cx, t, &p0, &np);
        cx.att_runs = r > cx.att_runs ? r : cx.att_runs;
    }

    /* x = token_embd[token]  (or x from the previous stage) */
    run(&cx, job_embed);
    if (sh->layer0 > 0 && (rc = d->recv_prev(d->ctx, s->x, xn, err, errlen)))
        return rc;
    for (cx.layer = sh->layer0; cx.layer < sh->layer1; cx.layer++) {
        const bn_layer_t *L = &m->w.layers[cx.layer];
        /* n = rmsnorm(x) * attn_norm */
        run(&cx, job_attn_in);
        /* q, k, v = bitlinear(n)  (this rank's heads) */
        matmul(&cx, &L->wq, s->q, &L->wk, s->k, &L->wv, s->v);
        /* q, k = rope_neox(q, k) */
        run(&cx, job_rope_cache);
        /* a = causal_gqa_attention(q, k, v) */
        const double t_att = bn_now_s();
        run(&cx, job_attention);
        if (cx.att_runs > 1)
            run(&cx, job_att_merge);
        s->t_attention += bn_now_s() - t_att;
        /* a = rmsnorm(a) * attn_sub_norm  (over all heads of every tensor rank) */
        if ((rc = sub_norm(&cx, s->att, (int)s->q_dim, (int)s->q_pad, (int)(c->n_head * c->head_dim),
                           (int)(sh->head0 * c->head_dim), (int)c->head_dim, L->attn_sub_norm + sh->head0 * c->head_dim,
                           err, errlen)))
            return rc;
        /* x = x + bitlinear_o(a)  (the sum is done by the next job) */
        if ((rc = row_parallel(&cx, &L->wo, s->out, err, errlen)))
            return rc;
        /* n = rmsnorm(x) * ffn_norm */
        run(&cx, job_ffn_in);
        /* f = act(bitlinear_gate(n)) * bitlinear_up(n); act = relu^2 (or silu for `bitnet`) */
        if (s->n_ff) {
            matmul(&cx, &L->w_gate, s->gate, &L->w_up, s->up, NULL, NULL);
            run(&cx, job_ffn_act);
        }
        /* f = rmsnorm(f) * ffn_sub_norm  (over the full FFN width) */
        if ((rc = sub_norm(&cx, s->gate, (int)s->n_ff, (int)s->ff_pad, (int)c->n_ff, (int)sh->ff0, 128,
                           L->ffn_sub_norm + sh->ff0, err, errlen)))
            return rc;
        /* x = x + bitlinear_down(f)  (the sum is done by the next layer's first job) */
        if ((rc = row_parallel(&cx, &L->w_down, s->out, err, errlen)))
            return rc;
    }
    if (sh->layer1 < c->n_layer) { /* hand x to the next stage */
        run(&cx, job_residual);
        return d->send_next(d->ctx, s->x, xn, err, errlen);
    }
    /* logits = token_embd . (rmsnorm(x) * output_norm), for the entries that want them */
    run(&cx, job_head_in);
    if (n_rows && m->w.head.n_out) {
        atomic_store_explicit(&cx.next_chunk, 0, memory_order_relaxed);
        run(&cx, job_head);
    }
    return BN_OK;
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
        if (e->want_logits && !logits && m->w.head.n_out)
            return bn_err(err, errlen, BN_EINVAL, "batch entry %d wants logits but no buffer was given", i);
    }
    for (int i = 0; i < n; i += (int)st->max_batch) {
        int nt = n - i < (int)st->max_batch ? n - i : (int)st->max_batch;
        int n_logits = 0;
        for (int t = 0; t < nt; t++)
            n_logits += batch[i + t].want_logits != 0;
        int rc = forward_chunk(m, st, batch + i, nt, logits, err, errlen);
        if (rc)
            return rc;
        if (logits)
            logits += (size_t)n_logits * m->w.head.n_out;
    }
    /* a sliding window: position pos + 1 reads from pos + 2 - window on, so
     * what lies below will never be read again */
    for (int i = 0; st->window && i < n; i++)
        if ((uint32_t)batch[i].pos + 2 > st->window)
            bn_kvcache_forget(st->kv, batch[i].seq, (uint32_t)batch[i].pos + 2 - st->window);
    return BN_OK;
}
