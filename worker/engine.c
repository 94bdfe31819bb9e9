/* engine.c - the step loop of a sharded model; see engine.h. */
#include "worker/engine.h"

#include "proto/status.h"
#include "worker/log.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { OP_FORWARD = 1, OP_STOP = 2 };
enum { TAG_RESULT = 1, TAG_TAIL = 2, TAG_TAIL_TOKEN = 3 };

/* The step descriptor: the same bytes reach every rank of the replica. */
typedef struct {
    int32_t op, n, want, replica, phase, pad;
    bn_batch_entry_t e[BN_STEP_MAX];
} step_t;

/* A tail draw asked of one vocabulary slice (sampler.h) */
typedef struct {
    int32_t asked;
    bn_cand_t last;
    double target;
} tail_req_t;

struct bn_engine {
    bn_comm_t *c;
    const bn_plan_t *plan;
    const bn_model_t *m;
    bn_state_t *st;
    bn_sampler_params_t sp;
    int tails;                /* these sampling parameters may draw past the candidates */
    int last_stage;           /* this rank computes logits */
    float *logits;            /* (BN_STEP_MAX, vocab rows here) */
    uint8_t *msg;             /* one result message */
    size_t msg_cap;
    bn_slice_stats_t *stats;  /* rank 0: (T, BN_STEP_MAX) every slice's statistics */
    bn_cand_t *cand;          /* rank 0: (T, BN_STEP_MAX, BN_SAMPLER_CAP) their candidates */
    int32_t *ncand_off;       /* rank 0: (T, BN_STEP_MAX) where each row's candidates start */
    tail_req_t *req;          /* (BN_STEP_MAX) */
    int32_t *tail_tok;        /* (BN_STEP_MAX) */
    int phase;                /* rank 0: the phase of the steps it sends */
    bn_phase_stats_t ps[BN_PHASES];
};

/* counters of comm before a step, to add what the step cost to its phase */
typedef struct {
    uint64_t bytes, coll, msgs;
    double t_comm, t_wait, t0;
} snap_t;

static snap_t snap(const bn_comm_t *c)
{
    return (snap_t){ c->bytes_sent, c->collectives, c->messages, c->t_comm, c->t_wait, bn_now_s() };
}

static void account(bn_engine_t *e, int phase, const snap_t *a, double idle)
{
    const bn_comm_t *c = e->c;
    bn_phase_stats_t *p = &e->ps[phase >= 0 && phase < BN_PHASES ? phase : 0];
    p->steps++;
    p->bytes_sent += c->bytes_sent - a->bytes;
    p->collectives += c->collectives - a->coll;
    p->messages += c->messages - a->msgs;
    p->t_comm += c->t_comm - a->t_comm;
    p->t_wait += c->t_wait - a->t_wait + idle;
    p->t_step += bn_now_s() - a->t0;
}

void bn_engine_set_phase(bn_engine_t *e, int phase)
{
    e->phase = phase;
}

const bn_phase_stats_t *bn_engine_stats(const bn_engine_t *e, int phase)
{
    return &e->ps[phase];
}

static size_t sample_msg_bytes(int k)
{
    return (size_t)k * (sizeof(bn_slice_stats_t) + BN_SAMPLER_CAP * sizeof(bn_cand_t));
}

int bn_engine_new(bn_comm_t *comm, const bn_plan_t *plan, const bn_model_t *m, bn_state_t *st,
                  const bn_sampler_params_t *sp, bn_engine_t **out, char *err, size_t errlen)
{
    *out = NULL;
    bn_engine_t *e = calloc(1, sizeof *e);
    if (!e)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    e->c = comm;
    e->plan = plan;
    e->m = m;
    e->st = st;
    e->sp = *sp;
    e->tails = sp->temp > 0.0f && sp->top_k == 0 && sp->top_p >= 1.0f && sp->min_p == 0.0f;
    e->last_stage = m->shard.layer1 == m->cfg.n_layer;
    const int T = plan->T;
    const size_t rows = m->w.head.n_out;
    e->msg_cap = sample_msg_bytes(BN_STEP_MAX);
    if (e->msg_cap < BN_STEP_MAX * rows * sizeof(float))
        e->msg_cap = BN_STEP_MAX * rows * sizeof(float);
    for (int r = 0; comm->rank == 0 && r < plan->world; r++) { /* rank 0 takes any slice's rows */
        size_t need = BN_STEP_MAX * (size_t)(plan->rank[r].vocab1 - plan->rank[r].vocab0) * sizeof(float);
        if (e->msg_cap < need)
            e->msg_cap = need;
    }
    e->msg = malloc(e->msg_cap);
    e->req = calloc(BN_STEP_MAX, sizeof *e->req);
    e->tail_tok = calloc(BN_STEP_MAX, sizeof *e->tail_tok);
    if (e->last_stage)
        e->logits = malloc(BN_STEP_MAX * (rows ? rows : 1) * sizeof(float));
    if (comm->rank == 0) {
        e->stats = calloc((size_t)T * BN_STEP_MAX, sizeof *e->stats);
        e->cand = malloc((size_t)T * BN_STEP_MAX * BN_SAMPLER_CAP * sizeof *e->cand);
        e->ncand_off = calloc((size_t)T * BN_STEP_MAX, sizeof *e->ncand_off);
    }
    if (!e->msg || !e->req || !e->tail_tok || (e->last_stage && !e->logits) ||
        (comm->rank == 0 && (!e->stats || !e->cand || !e->ncand_off))) {
        bn_engine_destroy(&e);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the step buffers");
    }
    *out = e;
    return BN_OK;
}

void bn_engine_destroy(bn_engine_t **pe)
{
    if (!pe || !*pe)
        return;
    bn_engine_t *e = *pe;
    free(e->logits);
    free(e->msg);
    free(e->stats);
    free(e->cand);
    free(e->ncand_off);
    free(e->req);
    free(e->tail_tok);
    free(e);
    *pe = NULL;
}

/* The result message of a last-stage rank for k rows of its logits: SAMPLE: k
 * statistics, then each row's candidates; LOGITS: the rows. Returns its size. */
static size_t make_result(bn_engine_t *e, int want, int k)
{
    const uint32_t rows = e->m->w.head.n_out;
    if (want == BN_WANT_LOGITS) {
        memcpy(e->msg, e->logits, (size_t)k * rows * sizeof(float));
        return (size_t)k * rows * sizeof(float);
    }
    bn_slice_stats_t *st = (bn_slice_stats_t *)e->msg;
    bn_cand_t *cand = (bn_cand_t *)(st + k);
    size_t used = 0;
    for (int i = 0; i < k; i++) {
        bn_sample_slice(&e->sp, e->logits + (size_t)i * rows, rows, (int32_t)e->m->shard.vocab0, cand + used, &st[i]);
        used += st[i].n_cand;
    }
    return (size_t)k * sizeof *st + used * sizeof *cand;
}

/* rank 0: file slice t's result message away for the picks */
static void take_result(bn_engine_t *e, int t, int k, const uint8_t *msg)
{
    const bn_slice_stats_t *st = (const bn_slice_stats_t *)msg;
    const bn_cand_t *cand = (const bn_cand_t *)(st + k);
    size_t used = 0;
    for (int i = 0; i < k; i++) {
        e->stats[(size_t)i * e->plan->T + t] = st[i];
        e->ncand_off[(size_t)i * e->plan->T + t] = (int32_t)used;
        memcpy(e->cand + ((size_t)t * BN_STEP_MAX * BN_SAMPLER_CAP) + used, cand + used,
               st[i].n_cand * sizeof *cand);
        used += st[i].n_cand;
    }
}

/* a tail request: this slice's tokens for the rows it was asked about */
static void answer_tails(bn_engine_t *e, int k, const tail_req_t *req, int32_t *tok)
{
    const uint32_t rows = e->m->w.head.n_out;
    for (int i = 0; i < k; i++) {
        tok[i] = -1;
        if (!req[i].asked)
            continue;
        bn_slice_stats_t st;
        bn_cand_t tmp[BN_SAMPLER_CAP];
        const float *lg = e->logits + (size_t)i * rows;
        bn_sample_slice(&e->sp, lg, rows, (int32_t)e->m->shard.vocab0, tmp, &st);
        tok[i] = bn_sample_tail(&e->sp, lg, rows, (int32_t)e->m->shard.vocab0, &st, req[i].last, req[i].target);
    }
}

static int count_wanted(const step_t *s)
{
    int k = 0;
    for (int i = 0; i < s->n; i++)
        k += s->e[i].want_logits != 0;
    return k;
}

/* every rank of the replica: this rank's part of the step; the last stage's
 * ranks other than 0 send their results to rank 0 and answer tail draws */
static int run_step(bn_engine_t *e, const step_t *s, char *err, size_t errlen)
{
    BN_DEBUG("step: %d entries from position %d, want %d", s->n, s->n ? s->e[0].pos : -1, s->want);
    int rc = bn_forward(e->m, e->st, s->e, s->n, e->last_stage ? e->logits : NULL, err, errlen);
    BN_DEBUG("step done");
    if (rc || !e->last_stage || s->want == BN_WANT_NONE || e->c->rank == 0)
        return rc;
    const int k = count_wanted(s);
    size_t len = make_result(e, s->want, k);
    if ((rc = bn_comm_send(e->c, 0, TAG_RESULT, e->msg, len, err, errlen)))
        return rc;
    if (s->want == BN_WANT_SAMPLE && e->tails) {
        if ((rc = bn_comm_recv(e->c, 0, TAG_TAIL, e->req, (size_t)k * sizeof *e->req, err, errlen)))
            return rc;
        answer_tails(e, k, e->req, e->tail_tok);
        rc = bn_comm_send(e->c, 0, TAG_TAIL_TOKEN, e->tail_tok, (size_t)k * sizeof *e->tail_tok, err, errlen);
    }
    return rc;
}

int bn_engine_serve(bn_engine_t *e, char *err, size_t errlen)
{
    step_t s;
    for (;;) {
        double w0 = e->c->t_wait;
        int rc = bn_comm_step_recv(e->c, &s, sizeof s, err, errlen);
        if (rc)
            return rc;
        double idle = e->c->t_wait - w0;
        snap_t a = snap(e->c);
        if (s.op == OP_STOP)
            return BN_OK;
        if (s.op != OP_FORWARD || s.n < 0 || s.n > BN_STEP_MAX)
            return bn_err(err, errlen, BN_EINTERNAL, "rank %d: bad step descriptor (op %d, %d entries)",
                          e->c->rank, s.op, s.n);
        if ((rc = run_step(e, &s, err, errlen)))
            return rc;
        account(e, s.phase, &a, idle);
    }
}

int bn_engine_stop(bn_engine_t *e, char *err, size_t errlen)
{
    step_t s = { .op = OP_STOP };
    for (int r = 0; r < e->plan->R; r++) {
        int rc = bn_comm_step_send(e->c, r, &s, sizeof s, err, errlen);
        if (rc)
            return rc;
    }
    return BN_OK;
}

static int step0(bn_engine_t *e, step_t *sp, bn_sampler_t **samplers, int32_t *tokens, float *logits,
                 char *err, size_t errlen);

int bn_engine_step(bn_engine_t *e, int replica, const bn_batch_entry_t *ents, int n, int want,
                   bn_sampler_t **samplers, int32_t *tokens, float *logits, char *err, size_t errlen)
{
    const bn_plan_t *p = e->plan;
    if (n < 0 || n > BN_STEP_MAX || replica < 0 || replica >= p->R)
        return bn_err(err, errlen, BN_EINVAL, "a step of %d entries for replica %d (at most %d entries, %d replicas)",
                      n, replica, BN_STEP_MAX, p->R);
    step_t s = { .op = OP_FORWARD, .n = n, .want = want, .replica = replica, .phase = e->phase };
    memcpy(s.e, ents, (size_t)n * sizeof *ents);
    snap_t a = snap(e->c);
    int rc = step0(e, &s, samplers, tokens, logits, err, errlen);
    account(e, s.phase, &a, 0.0);
    return rc;
}

/* rank 0's side of a step */
static int step0(bn_engine_t *e, step_t *sp, bn_sampler_t **samplers, int32_t *tokens, float *logits,
                 char *err, size_t errlen)
{
    const bn_plan_t *p = e->plan;
    const step_t s = *sp;
    const int replica = s.replica, want = s.want;
    int rc = bn_comm_step_send(e->c, replica, sp, sizeof *sp, err, errlen);
    if (rc)
        return rc;
    if (replica == 0 && (rc = run_step(e, &s, err, errlen)))
        return rc;
    const int k = count_wanted(&s);
    if (want == BN_WANT_NONE || k == 0)
        return BN_OK;
    const uint32_t V = e->m->cfg.n_vocab;
    /* every vocabulary slice of the replica's last stage, in order */
    for (int t = 0; t < p->T; t++) {
        const int src = bn_plan_rank(p, replica, p->P - 1, t);
        const bn_shard_t *sh = &p->rank[src];
        const uint32_t rows = sh->vocab1 - sh->vocab0;
        size_t len = want == BN_WANT_LOGITS ? (size_t)k * rows * sizeof(float) : sample_msg_bytes(k);
        if (src == 0)
            make_result(e, want, k);
        else if ((rc = bn_comm_recv(e->c, src, TAG_RESULT, e->msg, len, err, errlen)))
            return rc;
        if (want == BN_WANT_LOGITS) {
            const float *lg = (const float *)e->msg;
            for (int i = 0; i < k; i++)
                memcpy(logits + (size_t)i * V + sh->vocab0, lg + (size_t)i * rows, rows * sizeof(float));
        } else {
            take_result(e, t, k, e->msg);
        }
    }
    if (want == BN_WANT_LOGITS)
        return BN_OK;
    /* the draws: from the union of the slices' candidates, or in one slice's tail */
    int any_tail = 0;
    for (int i = 0; i < k; i++) {
        bn_cand_t all[BN_SAMPLER_CAP * 4];
        bn_cand_t *u = p->T <= 4 ? all : malloc((size_t)p->T * BN_SAMPLER_CAP * sizeof *u);
        if (!u)
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        bn_slice_stats_t *st = e->stats + (size_t)i * p->T;
        size_t used = 0;
        for (int t = 0; t < p->T; t++) {
            memcpy(u + used, e->cand + (size_t)t * BN_STEP_MAX * BN_SAMPLER_CAP + e->ncand_off[(size_t)i * p->T + t],
                   st[t].n_cand * sizeof *u);
            used += st[t].n_cand;
        }
        bn_pick_t pk = bn_sampler_pick(samplers[i], st, p->T, u);
        if (u != all)
            free(u);
        tokens[i] = pk.token;
        e->req[i] = (tail_req_t){ .asked = pk.token < 0 && pk.slice >= 0 ? pk.slice + 1 : 0, .last = pk.last,
                                  .target = pk.target };
        any_tail |= e->req[i].asked != 0;
    }
    if (!e->tails)
        return any_tail ? bn_err(err, errlen, BN_EINTERNAL, "a tail draw without tail sampling") : BN_OK;
    /* tail draws: every slice hears which rows it must finish */
    for (int t = 0; t < p->T; t++) {
        const int dst = bn_plan_rank(p, replica, p->P - 1, t);
        tail_req_t req[BN_STEP_MAX];
        for (int i = 0; i < k; i++) {
            req[i] = e->req[i];
            req[i].asked = e->req[i].asked == t + 1;
        }
        int32_t tok[BN_STEP_MAX];
        if (dst == 0) {
            answer_tails(e, k, req, tok);
        } else if ((rc = bn_comm_send(e->c, dst, TAG_TAIL, req, (size_t)k * sizeof *req, err, errlen)) ||
                   (rc = bn_comm_recv(e->c, dst, TAG_TAIL_TOKEN, tok, (size_t)k * sizeof *tok, err, errlen))) {
            return rc;
        }
        for (int i = 0; i < k; i++)
            if (req[i].asked)
                tokens[i] = tok[i] >= 0 ? tok[i] : e->req[i].last.id;
    }
    return BN_OK;
}
