/* kvbench.c - the KV cache types at long context (bench/kv.sh runs it).
 *
 *   bitnet-kvbench --model M [--threads N] [--ctx 1024,4096] [--steps 64] [--types f32,f16,q8,q4]
 *
 * For each KV type, one sequence in one process: decode speed at context 0
 * (--steps greedy tokens after a 1-token prompt); then a prompt of the first
 * context length (deterministic ids, in steps of 64), --steps decode steps
 * fed f32's greedy tokens (teacher forcing: every type sees the same
 * sequence), timed, their logits compared with f32's; then the prompt grown
 * to the next context length and the same again. Per type and context:
 * decode tokens/s, the share of a token's time in attention, the KV bytes
 * resident for the sequence, and against f32 the max and mean |logit diff|
 * and top-1 agreement. One line per (type, context) on stdout:
 *   kv=q8 ctx=4096 tps=12.3 att=0.21 kv_mb=141.6 max=0.12 mean=0.01 top1=64/64
 * f32 comes first (it is the reference); ctx=0 lines have no accuracy. */
#include "base/log.h"
#include "base/status.h"
#include "kernels/pool.h"
#include "worker/forward.h"
#include "worker/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int argmax(const float *x, size_t n)
{
    size_t b = 0;
    for (size_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return (int)b;
}

static int fail(const char *what, const char *err)
{
    fprintf(stderr, "bitnet-kvbench: %s: %s\n", what, err);
    return 1;
}

/* prompt id of position p: spread over the vocabulary, deterministic */
static int32_t prompt_id(int p, uint32_t vocab)
{
    return (int32_t)(((uint64_t)p * 2654435761u + 12345u) % (vocab - 16) + 8);
}

int main(int argc, char **argv)
{
    const char *model = NULL, *ctx_list = "1024,4096", *types = "f32,f16,q8,q4";
    int threads = 2, steps = 64;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "bitnet-kvbench: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--ctx")) ctx_list = v;
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--types")) types = v;
        else {
            fprintf(stderr, "usage: bitnet-kvbench --model M [--threads N] [--ctx 1024,4096] [--steps 64] "
                            "[--types f32,f16,q8,q4]\n");
            return 2;
        }
        i++;
    }
    int ctxs[8], n_ctx = 0;
    for (const char *p = ctx_list; *p && n_ctx < 8; p = strchr(p, ',') ? strchr(p, ',') + 1 : p + strlen(p))
        ctxs[n_ctx++] = atoi(p);
    if (!model || threads < 1 || steps < 1 || !n_ctx) {
        fprintf(stderr, "bitnet-kvbench: --model, --threads >= 1, --steps >= 1 and --ctx are needed\n");
        return 2;
    }
    bn_log_setup(BN_LOG_WARN, -1);
    char err[512];
    bn_pool_t *pool = NULL;
    bn_model_t *m = NULL;
    if (bn_pool_new(threads, &pool, err, sizeof err))
        return fail("pool", err);
    bn_model_opts_t mo = { .head_type = -1, .pool = pool };
    if (bn_model_load(model, &mo, &m, err, sizeof err))
        return fail(model, err);
    const size_t V = m->w.head.n_out;
    const uint32_t cap = (uint32_t)ctxs[n_ctx - 1] + (uint32_t)steps + 1;
    /* f32's greedy tokens and logits after each context: the reference */
    int32_t *ref_tok = malloc((size_t)n_ctx * steps * sizeof *ref_tok);
    float *ref = malloc((size_t)n_ctx * steps * V * sizeof *ref), *lg = malloc(V * sizeof *lg);
    if (!ref_tok || !ref || !lg)
        return fail("memory", "out of memory");
    int have_ref = 0;
    for (const char *tp = types; *tp; tp = strchr(tp, ',') ? strchr(tp, ',') + 1 : tp + strlen(tp)) {
        char name[8] = { 0 };
        snprintf(name, sizeof name, "%.*s", (int)strcspn(tp, ","), tp);
        const int kv = bn_kv_type_parse(name);
        if (kv < 0)
            return fail(name, "not a KV type");
        if (kv != BN_KV_F32 && !have_ref)
            return fail(name, "f32 must come first (the reference)");
        /* context 0: a 1-token prompt, then greedy decode */
        bn_state_t *st = NULL;
        if (bn_state_new(m, cap, 1, kv, pool, &st, err, sizeof err))
            return fail("state", err);
        bn_batch_entry_t e = { 0, 0, prompt_id(0, m->cfg.n_vocab), 1 };
        if (bn_forward(m, st, &e, 1, lg, err, sizeof err))
            return fail("forward", err);
        double t0 = bn_now_s(), a0 = st->t_attention;
        for (int i = 0; i < steps; i++) {
            e = (bn_batch_entry_t){ 0, 1 + i, argmax(lg, V), 1 };
            if (bn_forward(m, st, &e, 1, lg, err, sizeof err))
                return fail("forward", err);
        }
        double dt = bn_now_s() - t0;
        printf("kv=%s ctx=0 tps=%.2f att=%.3f kv_mb=%.1f\n", name, steps / dt, (st->t_attention - a0) / dt,
               bn_kvcache_resident(st->kv) / 1e6);
        fflush(stdout);
        bn_state_destroy(&st);
        /* the contexts in turn, on one sequence */
        if (bn_state_new(m, cap, 1, kv, pool, &st, err, sizeof err))
            return fail("state", err);
        int pos = 0;
        for (int c = 0; c < n_ctx; c++) {
            while (pos < ctxs[c]) { /* the prompt, 64 positions a step */
                bn_batch_entry_t b[64];
                int n = 0;
                for (; n < 64 && pos < ctxs[c]; n++, pos++)
                    b[n] = (bn_batch_entry_t){ 0, pos, prompt_id(pos, m->cfg.n_vocab), pos + 1 == ctxs[c] };
                if (bn_forward(m, st, b, n, lg, err, sizeof err))
                    return fail("forward", err);
            }
            double md = 0, sd = 0;
            int agree = 0;
            t0 = bn_now_s();
            a0 = st->t_attention;
            for (int i = 0; i < steps; i++) {
                int32_t *rt = ref_tok + (size_t)c * steps + i;
                float *rl = ref + ((size_t)c * steps + i) * V;
                if (kv == BN_KV_F32) {
                    *rt = argmax(lg, V);
                } else {
                    agree += argmax(lg, V) == argmax(rl, V);
                    for (size_t j = 0; j < V; j++) {
                        const double d = fabs((double)lg[j] - rl[j]);
                        md = d > md ? d : md;
                        sd += d;
                    }
                }
                if (kv == BN_KV_F32)
                    memcpy(rl, lg, V * sizeof *lg);
                if (i + 1 == steps)
                    break;
                e = (bn_batch_entry_t){ 0, pos++, *rt, 1 };
                if (bn_forward(m, st, &e, 1, lg, err, sizeof err))
                    return fail("forward", err);
            }
            dt = bn_now_s() - t0;
            printf("kv=%s ctx=%d tps=%.2f att=%.3f kv_mb=%.1f", name, ctxs[c], (steps - 1) / dt,
                   (st->t_attention - a0) / dt, bn_kvcache_resident(st->kv) / 1e6);
            if (kv != BN_KV_F32)
                printf(" max=%.4f mean=%.5f top1=%d/%d", md, sd / ((double)steps * V), agree, steps);
            printf("\n");
            fflush(stdout);
            /* the rest of the reference tokens' positions, for the next context */
            pos = pos < ctxs[c] + steps - 1 ? pos : ctxs[c] + steps - 1;
        }
        bn_state_destroy(&st);
        have_ref |= kv == BN_KV_F32;
    }
    free(ref_tok);
    free(ref);
    free(lg);
    bn_model_destroy(&m);
    bn_pool_destroy(&pool);
    return 0;
}
