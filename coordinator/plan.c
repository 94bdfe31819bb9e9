/* plan.c - the sharding planner. See plan.h. Pure arithmetic: no MPI, no I/O
 * except bn_plan_print. */
#include "coordinator/plan.h"

#include "base/status.h"

#include <stdlib.h>
#include <string.h>

/* Byte counts saturate instead of wrapping, so an absurd n_ctx or shape reads
 * as "does not fit" rather than as a small number that does. */
static uint64_t mul_sat(uint64_t a, uint64_t b)
{
    return a && b > UINT64_MAX / a ? UINT64_MAX : a * b;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return b > UINT64_MAX - a ? UINT64_MAX : a + b;
}

/* start of share t of n units over T ranks: t*n/T, so shares differ by at most one */
static uint32_t share(uint32_t n, int t, int T)
{
    return (uint32_t)((uint64_t)n * (uint64_t)t / (uint64_t)T);
}

/* Rows [*r0, *r1) of share t of n rows cut into blocks of blk: whole blocks,
 * the last one clipped to n. */
static void block_share(uint32_t n, uint32_t blk, int t, int T, uint32_t *r0, uint32_t *r1)
{
    const uint32_t nb = (uint32_t)(((uint64_t)n + blk - 1) / blk);
    const uint64_t a = (uint64_t)share(nb, t, T) * blk, b = (uint64_t)share(nb, t + 1, T) * blk;
    *r0 = (uint32_t)(a < n ? a : n);
    *r1 = (uint32_t)(b < n ? b : n);
}

/* bytes of one row slice of c inputs in a column-split matrix: padded to 128 */
static uint64_t col_bytes(uint64_t c)
{
    return (c + 127) / 128 * 32;
}

/* The parts of a shard that depend only on the tensor rank t of T (and on
 * whether its stage is the last): heads, KV heads, FFN rows, vocabulary rows. */
static void split_tensor(const bn_plan_model_t *m, int t, int T, int last, bn_shard_t *s)
{
    const uint32_t H = m->n_head, nkv = m->n_head_kv, g = H / nkv;
    if ((uint32_t)T <= nkv && nkv % (uint32_t)T == 0) {
        /* whole KV groups, as many on every rank: no KV head is stored twice */
        s->kv0 = share(nkv, t, T);
        s->kv1 = share(nkv, t + 1, T);
        s->head0 = s->kv0 * g;
        s->head1 = s->kv1 * g;
    } else {
        /* query heads split finely; a KV head shared by two ranks is held by both
         * (for 2B4T's 5 KV heads over 4 ranks whole groups would give one rank
         * twice the heads of the others, 118 MB against 84) */
        s->head0 = share(H, t, T);
        s->head1 = share(H, t + 1, T);
        s->kv0 = s->head0 / g;
        s->kv1 = s->head1 > s->head0 ? (s->head1 + g - 1) / g : s->kv0;
    }
    block_share(m->n_ff, BN_PLAN_FFN_BLOCK, t, T, &s->ff0, &s->ff1);
    s->vocab0 = s->vocab1 = 0;
    if (last)
        block_share(m->n_vocab, BN_PLAN_VOCAB_BLOCK, t, T, &s->vocab0, &s->vocab1);
}

/* weight_bytes as plan.h defines it, for `layers` layers, with or without the LM head rows */
static uint64_t weight_bytes(const bn_plan_model_t *m, const bn_shard_t *s, uint32_t layers, int with_vocab)
{
    const uint64_t row = m->n_embd / 4;
    const uint64_t q = (uint64_t)(s->head1 - s->head0) * m->head_dim;
    const uint64_t kv = (uint64_t)(s->kv1 - s->kv0) * m->head_dim;
    const uint64_t ff = s->ff1 - s->ff0;
    uint64_t layer = mul_sat(q, row);                                     /* wq */
    layer = add_sat(layer, mul_sat(2 * kv, row));                         /* wk, wv */
    layer = add_sat(layer, mul_sat(m->n_embd, col_bytes(q)));   /* wo */
    layer = add_sat(layer, mul_sat(2 * ff, row));                         /* gate, up */
    layer = add_sat(layer, mul_sat(m->n_embd, col_bytes(ff)));  /* down */
    uint64_t b = mul_sat(layer, layers);
    if (with_vocab)
        b = add_sat(b, mul_sat(s->vocab1 - s->vocab0, m->head_row_bytes));
    return b;
}

/* kv_bytes as plan.h defines it: multiply first, divide last */
static uint64_t kv_bytes(const bn_plan_model_t *m, const bn_plan_in_t *in, const bn_shard_t *s, uint32_t layers)
{
    uint64_t b = mul_sat(layers, in->n_seq);
    b = mul_sat(b, in->n_ctx);
    b = mul_sat(b, s->kv1 - s->kv0);
    b = mul_sat(b, m->kv_bytes_per_pos);
    return b == UINT64_MAX ? b : b / m->n_head_kv;
}

/* what a rank of tensor part s needs for `layers` layers */
static uint64_t rank_cost(const bn_plan_model_t *m, const bn_plan_in_t *in, const bn_shard_t *s,
                          uint32_t layers, int with_vocab)
{
    return add_sat(weight_bytes(m, s, layers, with_vocab), kv_bytes(m, in, s, layers));
}

/* the largest rank cost over the T tensor parts */
static uint64_t stage_cost(const bn_plan_model_t *m, const bn_plan_in_t *in, const bn_shard_t *part, int T,
                           uint32_t layers, int with_vocab)
{
    uint64_t worst = 0;
    for (int t = 0; t < T; t++) {
        uint64_t c = rank_cost(m, in, &part[t], layers, with_vocab);
        if (c > worst)
            worst = c;
    }
    return worst;
}

/* Layers of the last stage. Every layer costs the same, so the other P-1 stages
 * share the remaining L-k layers evenly and their worst costs ceil((L-k)/(P-1))
 * layers; k minimises the larger of that and the last stage's k layers plus its
 * LM head. Ties go to the larger k, which lightens the other stages. */
static uint32_t last_stage_layers(const bn_plan_model_t *m, const bn_plan_in_t *in, const bn_shard_t *part,
                                  int T, int P)
{
    const uint32_t L = m->n_layer;
    if (P == 1)
        return L;
    uint32_t best_k = 1;
    uint64_t best = UINT64_MAX;
    for (uint32_t k = 1; k + (uint32_t)(P - 1) <= L; k++) {
        uint32_t other = (L - k + (uint32_t)P - 2) / (uint32_t)(P - 1);
        uint64_t a = stage_cost(m, in, part, T, other, 0), b = stage_cost(m, in, part, T, k, 1);
        uint64_t c = a > b ? a : b;
        if (c <= best) {
            best = c;
            best_k = k;
        }
    }
    return best_k;
}

/* Fill every rank of an R x P x T grid. `part` is scratch for T shards. */
static void fill(const bn_plan_model_t *m, const bn_plan_in_t *in, int R, int P, int T, bn_shard_t *part,
                 bn_shard_t *rank)
{
    for (int t = 0; t < T; t++) {
        memset(&part[t], 0, sizeof part[t]);
        split_tensor(m, t, T, 1, &part[t]);
    }
    const uint32_t k = last_stage_layers(m, in, part, T, P), first = m->n_layer - k;
    for (int r = 0; r < R; r++)
        for (int s = 0; s < P; s++)
            for (int t = 0; t < T; t++) {
                bn_shard_t *x = &rank[(r * P + s) * T + t];
                const int last = s == P - 1;
                memset(x, 0, sizeof *x);
                x->replica = r;
                x->stage = s;
                x->tp = t;
                split_tensor(m, t, T, last, x);
                x->layer0 = last ? first : share(first, s, P - 1);
                x->layer1 = last ? m->n_layer : share(first, s + 1, P - 1);
                x->weight_bytes = weight_bytes(m, x, x->layer1 - x->layer0, last);
                x->kv_bytes = kv_bytes(m, in, x, x->layer1 - x->layer0);
            }
}

/* the rank needing the most memory */
static int worst_rank(const bn_shard_t *rank, int world)
{
    int w = 0;
    for (int i = 1; i < world; i++)
        if (add_sat(rank[i].weight_bytes, rank[i].kv_bytes) > add_sat(rank[w].weight_bytes, rank[w].kv_bytes))
            w = i;
    return w;
}

static int check_model(const bn_plan_model_t *m, char *err, size_t errlen)
{
    if (m->n_layer == 0)
        return bn_err(err, errlen, BN_EINVAL, "the model has no layers");
    if (m->n_head == 0 || m->n_head_kv == 0)
        return bn_err(err, errlen, BN_EINVAL, "the model has %u query heads and %u KV heads; both must be >= 1",
                      m->n_head, m->n_head_kv);
    if (m->n_head % m->n_head_kv)
        return bn_err(err, errlen, BN_EINVAL, "n_head %u is not a multiple of n_head_kv %u", m->n_head,
                      m->n_head_kv);
    return BN_OK;
}

/* "--tp 3 x --pp 2" for the pins that are set; returns how many are set and
 * their product (saturated, so absurd pins cannot overflow) */
static int pin_text(const bn_plan_in_t *in, char *buf, size_t len, uint64_t *prod)
{
    const char *name[3] = { "--tp", "--pp", "--replicas" };
    const int val[3] = { in->tp, in->pp, in->replicas };
    int n_set = 0;
    size_t n = 0;
    *prod = 1;
    buf[0] = 0;
    for (int i = 0; i < 3; i++) {
        if (!val[i])
            continue;
        int w = snprintf(buf + n, len - n, "%s%s %d", n_set ? " x " : "", name[i], val[i]);
        if (w > 0 && (size_t)w < len - n)
            n += (size_t)w;
        *prod = mul_sat(*prod, (uint64_t)val[i]);
        n_set++;
    }
    return n_set;
}

static int check_pins(const bn_plan_model_t *m, const bn_plan_in_t *in, char *err, size_t errlen)
{
    if (in->world < 1)
        return bn_err(err, errlen, BN_EINVAL, "the world has %d ranks; it needs at least one", in->world);
    if (in->ranks_per_node < 1)
        return bn_err(err, errlen, BN_EINVAL, "ranks per node is %d; it must be >= 1", in->ranks_per_node);
    if (in->tp < 0)
        return bn_err(err, errlen, BN_EINVAL, "--tp %d must be >= 0 (0 lets the planner choose)", in->tp);
    if (in->pp < 0)
        return bn_err(err, errlen, BN_EINVAL, "--pp %d must be >= 0 (0 lets the planner choose)", in->pp);
    if (in->replicas < 0)
        return bn_err(err, errlen, BN_EINVAL, "--replicas %d must be >= 0 (0 lets the planner choose)",
                      in->replicas);
    if (in->pp > 0 && (uint32_t)in->pp > m->n_layer)
        return bn_err(err, errlen, BN_EINVAL, "--pp %d: the model has %u layers and every stage needs at least one",
                      in->pp, m->n_layer);
    char pins[96];
    uint64_t prod;
    int n_set = pin_text(in, pins, sizeof pins, &prod);
    const uint64_t world = (uint64_t)in->world;
    if (prod > world || world % prod) {
        if (n_set == 1)
            return bn_err(err, errlen, BN_EINVAL, "%s does not divide the world size of %d ranks", pins, in->world);
        return bn_err(err, errlen, BN_EINVAL, "%s = %llu does not divide the world size of %d ranks", pins,
                      (unsigned long long)prod, in->world);
    }
    if (n_set == 3 && prod != world)
        return bn_err(err, errlen, BN_EINVAL, "%s = %llu does not equal the world size of %d ranks "
                      "(with all three pinned their product must be the world)", pins,
                      (unsigned long long)prod, in->world);
    return BN_OK;
}

/* The smallest stage count > after that works with T tensor ranks and the pins
 * (at most one stage per layer), or 0 when there is none. */
static int next_p(const bn_plan_model_t *m, const bn_plan_in_t *in, int T, int after)
{
    const int rest = in->world / T;
    for (int P = after + 1; P <= rest && (uint32_t)P <= m->n_layer; P++) {
        if (rest % P || (in->pp && P != in->pp) || (in->replicas && rest / P != in->replicas))
            continue;
        return P;
    }
    return 0;
}

static int valid_t(const bn_plan_model_t *m, const bn_plan_in_t *in, int T)
{
    return in->world % T == 0 && (!in->tp || T == in->tp) && next_p(m, in, T, 0) != 0;
}

/* Tensor ranks: the largest that fits in a node, as plan.h says. When the pins
 * leave no valid stage count for it (say --replicas 1 with one rank per node and
 * more ranks than layers), the smallest larger one that works. */
static int choose_t(const bn_plan_model_t *m, const bn_plan_in_t *in)
{
    const int top = in->ranks_per_node < in->world ? in->ranks_per_node : in->world;
    for (int T = top; T >= 1; T--)
        if (valid_t(m, in, T))
            return T;
    for (int T = top + 1; T <= in->world; T++)
        if (valid_t(m, in, T))
            return T;
    return 0;
}

static double mb(uint64_t b) { return (double)b / 1e6; }

static const char *plural(int n) { return n == 1 ? "" : "s"; }

int bn_plan_make(const bn_plan_model_t *m, const bn_plan_in_t *in, bn_plan_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    int rc = check_model(m, err, errlen);
    if (!rc)
        rc = check_pins(m, in, err, errlen);
    if (rc)
        return rc;
    const int T = choose_t(m, in);
    if (!T) /* the pin checks leave T = world / (pins), P = 1 at least */
        return bn_err(err, errlen, BN_EINTERNAL, "no grid for %d ranks and these pins", in->world);
    bn_shard_t *rank = malloc((size_t)in->world * sizeof *rank);
    bn_shard_t *part = malloc((size_t)T * sizeof *part);
    if (!rank || !part) {
        free(rank);
        free(part);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the plan of %d ranks", in->world);
    }
    /* the fewest stages that fit; remember the best miss for the message */
    bn_shard_t miss = { 0 };
    int miss_rank = -1, miss_P = 0, tried = 0;
    for (int P = next_p(m, in, T, 0); P; P = next_p(m, in, T, P)) {
        const int R = in->world / (T * P);
        fill(m, in, R, P, T, part, rank);
        tried++;
        const int w = worst_rank(rank, in->world);
        const uint64_t need = add_sat(rank[w].weight_bytes, rank[w].kv_bytes);
        if (in->mem_per_rank == 0 || need <= in->mem_per_rank) {
            free(part);
            *out = (bn_plan_t){ .world = in->world, .R = R, .P = P, .T = T, .rank = rank };
            return BN_OK;
        }
        if (miss_rank < 0 || need < add_sat(miss.weight_bytes, miss.kv_bytes)) {
            miss = rank[w];
            miss_rank = w;
            miss_P = P;
        }
    }
    free(part);
    free(rank);
    const uint64_t need = add_sat(miss.weight_bytes, miss.kv_bytes);
    const int miss_R = in->world / (T * miss_P);
    return bn_err(err, errlen, BN_EINVAL,
                  "%s: rank %d (replica %d stage %d tp %d of %d replica%s x %d stage%s x %d tensor rank%s) needs "
                  "%llu bytes (%.1f MB: %.1f MB of weights + %.1f MB of KV cache) but mem_per_rank is %llu bytes "
                  "(%.1f MB); use more stages (--pp), more ranks or a shorter context",
                  tried > 1 ? "no plan fits" : "the plan does not fit", miss_rank, miss.replica, miss.stage,
                  miss.tp, miss_R, plural(miss_R), miss_P, plural(miss_P), T, plural(T),
                  (unsigned long long)need, mb(need),
                  mb(miss.weight_bytes), mb(miss.kv_bytes), (unsigned long long)in->mem_per_rank,
                  mb(in->mem_per_rank));
}

void bn_plan_free(bn_plan_t *p)
{
    if (!p)
        return;
    free(p->rank);
    memset(p, 0, sizeof *p);
}

/* "a-b" (inclusive) for [a, b), "-" when empty */
static const char *range(char *buf, size_t len, uint32_t a, uint32_t b)
{
    if (a >= b)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%u-%u", a, b - 1);
    return buf;
}

void bn_plan_print(const bn_plan_t *p, FILE *f, const char *prefix)
{
    if (!prefix)
        prefix = "";
    fprintf(f, "%splan: %d rank%s = %d replica%s x %d stage%s x %d tensor rank%s (ranges inclusive)\n", prefix,
            p->world, plural(p->world), p->R, plural(p->R), p->P, plural(p->P), p->T, plural(p->T));
    for (int i = 0; i < p->world; i++) {
        const bn_shard_t *s = &p->rank[i];
        char l[32], h[32], kv[32], ff[32], v[32];
        fprintf(f, "%srank %d: replica %d stage %d tp %d: layers %s, heads %s (kv %s), ffn rows %s, vocab %s, "
                "%.1f MB weights + %.1f MB KV\n", prefix, i, s->replica, s->stage, s->tp,
                range(l, sizeof l, s->layer0, s->layer1), range(h, sizeof h, s->head0, s->head1),
                range(kv, sizeof kv, s->kv0, s->kv1), range(ff, sizeof ff, s->ff0, s->ff1),
                range(v, sizeof v, s->vocab0, s->vocab1), mb(s->weight_bytes), mb(s->kv_bytes));
    }
}
