/* engine.c - the steps of a sharded model, submitted and polled; see engine.h. */
#include "worker/engine.h"

#include "base/status.h"
#include "base/log.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { OP_FORWARD = 1, OP_STOP = 2 };
enum { TAG_RESULT = 1, TAG_TAIL = 2, TAG_TAIL_TOKEN = 3 };
enum { FIFO_CAP = 4 }; /* steps of one replica in flight at most (comm.c's STEP_RING is 8) */

/* A wanting entry's sampling parameters, as the last stage needs them to choose
 * its candidates (the seed stays with rank 0's sampler). */
typedef struct {
    float temp, top_p, min_p;
    int32_t top_k;
} samp_t;

/* The step descriptor: the same bytes reach every rank of the replica. About
 * 2.3 KB: under Open MPI's eager limits (4 KB shared memory, 64 KB TCP), so a
 * send to a busy replica's leader never waits for it. */
typedef struct {
    int32_t op, n, want, replica, phase, n_release, tails, n_copy;
    bn_batch_entry_t e[BN_STEP_MAX];
    samp_t sp[BN_STEP_MAX];
    int32_t release[BN_STEP_MAX];
    bn_kv_copy_t copy[BN_STEP_COPY_MAX];
} step_t;

/* A tail draw asked of one vocabulary slice (sampler.h) */
typedef struct {
    int32_t asked;
    bn_cand_t last;
    double target;
} tail_req_t;

/* rank 0: a step in flight */
typedef struct {
    uint64_t id;
    int want, k, tails, exclusive, phase;
    void *smp[BN_STEP_MAX];
    float *logits;
} ticket_t;

typedef struct {
    ticket_t t[FIFO_CAP];
    int head, count;
} fifo_t;

struct bn_engine {
    bn_comm_t *c;
    const bn_plan_t *plan;
    const bn_model_t *m;
    bn_state_t *st;
    int last_stage;           /* this rank computes logits */
    bn_picker_t picker;       /* rank 0 */
    int cap;                  /* steps of one replica in flight at most */
    float *logits;            /* (BN_STEP_MAX, vocab rows here) */
    uint8_t *msg;             /* one result message */
    size_t msg_cap;
    step_t cur;               /* the step this rank computed last (its tail draws need it) */
    /* rank 0 */
    fifo_t *fifo;             /* (R) steps in flight per replica */
    uint64_t next_id;
    int rr;                   /* the replica poll looks at first */
    uint8_t *own;             /* rank 0's own result message of replica 0's step in flight */
    bn_slice_stats_t *stats;  /* (T, BN_STEP_MAX) every slice's statistics */
    bn_cand_t *cand;          /* (T, BN_STEP_MAX, BN_SAMPLER_CAP) their candidates */
    int32_t *ncand_off;       /* (T, BN_STEP_MAX) where each row's candidates start */
    bn_cand_t *u;             /* (T * BN_SAMPLER_CAP) the union of one row's candidates */
    tail_req_t req[BN_STEP_MAX];
    int32_t tail_tok[BN_STEP_MAX];
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

const bn_phase_stats_t *bn_engine_stats(const bn_engine_t *e, int phase)
{
    return &e->ps[phase];
}

static size_t sample_msg_bytes(int k)
{
    return (size_t)k * (sizeof(bn_slice_stats_t) + BN_SAMPLER_CAP * sizeof(bn_cand_t));
}

static bn_sampler_params_t params_of(const samp_t *s)
{
    return (bn_sampler_params_t){ .temp = s->temp, .top_k = s->top_k, .top_p = s->top_p, .min_p = s->min_p };
}

int bn_engine_new(bn_comm_t *comm, const bn_plan_t *plan, const bn_model_t *m, bn_state_t *st,
                  bn_engine_t **out, char *err, size_t errlen)
{
    *out = NULL;
    bn_engine_t *e = calloc(1, sizeof *e);
    if (!e)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    e->c = comm;
    e->plan = plan;
    e->m = m;
    e->st = st;
    e->last_stage = m->shard.layer1 == m->cfg.n_layer;
    e->cap = plan->P < FIFO_CAP ? plan->P : FIFO_CAP;
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
    if (e->last_stage)
        e->logits = malloc(BN_STEP_MAX * (rows ? rows : 1) * sizeof(float));
    if (comm->rank == 0) {
        e->fifo = calloc((size_t)plan->R, sizeof *e->fifo);
        e->own = malloc(sample_msg_bytes(BN_STEP_MAX));
        e->stats = calloc((size_t)T * BN_STEP_MAX, sizeof *e->stats);
        e->cand = malloc((size_t)T * BN_STEP_MAX * BN_SAMPLER_CAP * sizeof *e->cand);
        e->ncand_off = calloc((size_t)T * BN_STEP_MAX, sizeof *e->ncand_off);
        e->u = malloc((size_t)T * BN_SAMPLER_CAP * sizeof *e->u);
    }
    if (!e->msg || (e->last_stage && !e->logits) ||
        (comm->rank == 0 && (!e->fifo || !e->own || !e->stats || !e->cand || !e->ncand_off || !e->u))) {
        bn_engine_destroy(&e);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the step buffers");
    }
    *out = e;
    return BN_OK;
}

void bn_engine_set_picker(bn_engine_t *e, const bn_picker_t *p)
{
    e->picker = *p;
}

void bn_engine_destroy(bn_engine_t **pe)
{
    if (!pe || !*pe)
        return;
    bn_engine_t *e = *pe;
    free(e->logits);
    free(e->msg);
    free(e->fifo);
    free(e->own);
    free(e->stats);
    free(e->cand);
    free(e->ncand_off);
    free(e->u);
    free(e);
    *pe = NULL;
}

static int count_wanted(const step_t *s)
{
    int k = 0;
    for (int i = 0; i < s->n; i++)
        k += s->e[i].want_logits != 0;
    return k;
}

/* The result message of a last-stage rank for the k wanting rows of its logits:
 * SAMPLE: k statistics, then each row's candidates; LOGITS: the rows. Returns its
 * size. */
static size_t make_result(bn_engine_t *e, const step_t *s, int k, uint8_t *msg)
{
    const uint32_t rows = e->m->w.head.n_out;
    if (s->want == BN_WANT_LOGITS) {
        memcpy(msg, e->logits, (size_t)k * rows * sizeof(float));
        return (size_t)k * rows * sizeof(float);
    }
    bn_slice_stats_t *st = (bn_slice_stats_t *)msg;
    bn_cand_t *cand = (bn_cand_t *)(st + k);
    size_t used = 0;
    for (int i = 0; i < k; i++) {
        bn_sampler_params_t p = params_of(&s->sp[i]);
        bn_sample_slice(&p, e->logits + (size_t)i * rows, rows, (int32_t)e->m->shard.vocab0, cand + used, &st[i]);
        used += st[i].n_cand;
    }
    return (size_t)k * sizeof *st + used * sizeof *cand;
}

/* a tail request: this slice's tokens for the rows it was asked about */
static void answer_tails(bn_engine_t *e, const step_t *s, int k, const tail_req_t *req, int32_t *tok)
{
    const uint32_t rows = e->m->w.head.n_out;
    for (int i = 0; i < k; i++) {
        tok[i] = -1;
        if (!req[i].asked)
            continue;
        bn_sampler_params_t p = params_of(&s->sp[i]);
        bn_slice_stats_t st;
        bn_cand_t tmp[BN_SAMPLER_CAP];
        const float *lg = e->logits + (size_t)i * rows;
        bn_sample_slice(&p, lg, rows, (int32_t)e->m->shard.vocab0, tmp, &st);
        tok[i] = bn_sample_tail(&p, lg, rows, (int32_t)e->m->shard.vocab0, &st, req[i].last, req[i].target);
    }
}

/* every rank of the replica: this rank's part of the step. The last stage's
 * ranks other than 0 send their results to rank 0 (without waiting for it to
 * take them, so the pipeline goes on) and answer tail draws. */
static int run_step(bn_engine_t *e, const step_t *s, char *err, size_t errlen)
{
    BN_DEBUG("step: %d entries from position %d, want %d", s->n, s->n ? s->e[0].pos : -1, s->want);
    /* copies first: a slot copied from may be given back in the same step */
    for (int i = 0; i < s->n_copy; i++)
        bn_kvcache_copy(e->st->kv, s->copy[i].src, s->copy[i].dst, s->copy[i].n);
    for (int i = 0; i < s->n_release; i++)
        bn_kvcache_release(e->st->kv, s->release[i]);
    int rc = bn_forward(e->m, e->st, s->e, s->n, e->last_stage ? e->logits : NULL, err, errlen);
    BN_DEBUG("step done");
    e->cur = *s;
    if (rc || !e->last_stage)
        return rc;
    const int k = count_wanted(s);
    const int me = e->c->rank;
    if (s->want == BN_WANT_NONE || k == 0) { /* the acknowledgement, from the last stage's first rank */
        if (me != 0 && me == bn_plan_rank(e->plan, s->replica, e->plan->P - 1, 0))
            return bn_comm_send_async(e->c, 0, TAG_RESULT, &s->n, sizeof s->n, err, errlen);
        return BN_OK;
    }
    if (me == 0) { /* rank 0 keeps its own slice's result for the poll */
        if (s->want == BN_WANT_SAMPLE)
            make_result(e, s, k, e->own);
        return BN_OK;
    }
    size_t len = make_result(e, s, k, e->msg);
    if (s->want == BN_WANT_LOGITS) /* an exclusive step: rank 0 waits for nothing else */
        return bn_comm_send(e->c, 0, TAG_RESULT, e->msg, len, err, errlen);
    if ((rc = bn_comm_send_async(e->c, 0, TAG_RESULT, e->msg, len, err, errlen)))
        return rc;
    if (s->tails) {
        tail_req_t req[BN_STEP_MAX];
        int32_t tok[BN_STEP_MAX];
        if ((rc = bn_comm_recv(e->c, 0, TAG_TAIL, req, (size_t)k * sizeof *req, err, errlen)))
            return rc;
        answer_tails(e, s, k, req, tok);
        rc = bn_comm_send(e->c, 0, TAG_TAIL_TOKEN, tok, (size_t)k * sizeof *tok, err, errlen);
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
        if (s.op != OP_FORWARD || s.n < 0 || s.n > BN_STEP_MAX || s.n_release < 0 || s.n_release > BN_STEP_MAX ||
            s.n_copy < 0 || s.n_copy > BN_STEP_COPY_MAX)
            return bn_err(err, errlen, BN_EINTERNAL, "rank %d: bad step descriptor (op %d, %d entries)",
                          e->c->rank, s.op, s.n);
        if ((rc = run_step(e, &s, err, errlen)))
            return rc;
        account(e, s.phase, &a, idle);
    }
}

int bn_engine_stop(bn_engine_t *e, char *err, size_t errlen)
{
    if (bn_engine_inflight(e, -1))
        return bn_err(err, errlen, BN_EINTERNAL, "stop with %d steps in flight", bn_engine_inflight(e, -1));
    step_t s = { .op = OP_STOP };
    for (int r = 0; r < e->plan->R; r++) {
        int rc = bn_comm_step_send(e->c, r, &s, sizeof s, err, errlen);
        if (rc)
            return rc;
    }
    return BN_OK;
}

int bn_engine_inflight(const bn_engine_t *e, int replica)
{
    if (replica >= 0)
        return replica < e->plan->R ? e->fifo[replica].count : 0;
    int n = 0;
    for (int r = 0; r < e->plan->R; r++)
        n += e->fifo[r].count;
    return n;
}

int bn_engine_room(const bn_engine_t *e, int replica)
{
    const fifo_t *f = &e->fifo[replica];
    for (int i = 0; i < f->count; i++)
        if (f->t[(f->head + i) % FIFO_CAP].exclusive)
            return 0;
    return e->cap - f->count;
}

int bn_engine_submit(bn_engine_t *e, int replica, const bn_step_t *in, uint64_t *ticket, char *err, size_t errlen)
{
    const bn_plan_t *p = e->plan;
    if (in->n < 0 || in->n > BN_STEP_MAX || replica < 0 || replica >= p->R || in->n_release < 0 ||
        in->n_release > BN_STEP_MAX || in->n_copy < 0 || in->n_copy > BN_STEP_COPY_MAX)
        return bn_err(err, errlen, BN_EINVAL, "a step of %d entries, %d releases and %d copies for replica %d (at "
                      "most %d, %d and %d; %d replicas)", in->n, in->n_release, in->n_copy, replica, BN_STEP_MAX,
                      BN_STEP_MAX, BN_STEP_COPY_MAX, p->R);
    step_t s = { .op = OP_FORWARD, .n = in->n, .want = in->want, .replica = replica, .phase = in->phase,
                 .n_release = in->n_release, .n_copy = in->n_copy };
    memcpy(s.e, in->e, (size_t)in->n * sizeof *in->e);
    memcpy(s.release, in->release, (size_t)in->n_release * sizeof *in->release);
    memcpy(s.copy, in->copy, (size_t)in->n_copy * sizeof *in->copy);
    const int k = count_wanted(&s);
    if (k == 0)
        s.want = BN_WANT_NONE;
    ticket_t t = { .id = ++e->next_id, .want = s.want, .k = k, .logits = in->logits,
                   .phase = in->phase >= 0 && in->phase < BN_PHASES ? in->phase : 0 };
    if (s.want == BN_WANT_SAMPLE) {
        for (int i = 0; i < k; i++) {
            if (!in->smp[i] || !e->picker.params)
                return bn_err(err, errlen, BN_EINVAL, "step entry %d wants a sample but has no sampler", i);
            const bn_sampler_params_t *sp = e->picker.params(in->smp[i]);
            s.sp[i] = (samp_t){ .temp = sp->temp, .top_p = sp->top_p, .min_p = sp->min_p, .top_k = sp->top_k };
            t.smp[i] = in->smp[i];
            t.tails |= bn_sampler_draws_tail(sp);
        }
    } else if (s.want == BN_WANT_LOGITS && !in->logits) {
        return bn_err(err, errlen, BN_EINVAL, "a step wanting logits without a buffer");
    }
    s.tails = t.tails;
    t.exclusive = t.tails || s.want == BN_WANT_LOGITS;
    fifo_t *f = &e->fifo[replica];
    if (bn_engine_room(e, replica) <= 0 || (t.exclusive && f->count))
        return bn_err(err, errlen, BN_EBUSY, "replica %d has no room for another step", replica);
    snap_t a = snap(e->c);
    int rc = bn_comm_step_send(e->c, replica, &s, sizeof s, err, errlen);
    if (rc == BN_OK && replica == 0)
        rc = run_step(e, &s, err, errlen);
    if (rc == BN_OK && replica == 0 && e->last_stage && s.want == BN_WANT_LOGITS) {
        /* rank 0's own slice of the logits, straight into the caller's rows */
        const uint32_t rows = e->m->w.head.n_out, V = e->m->cfg.n_vocab;
        for (int i = 0; i < k; i++)
            memcpy(in->logits + (size_t)i * V + e->m->shard.vocab0, e->logits + (size_t)i * rows, rows * sizeof(float));
    }
    account(e, s.phase, &a, 0.0);
    if (rc)
        return rc;
    f->t[(f->head + f->count) % FIFO_CAP] = t;
    f->count++;
    *ticket = t.id;
    return BN_OK;
}

/* rank 0: whether every result the head step of replica r sends has arrived */
static int results_ready(bn_engine_t *e, int r, const ticket_t *t, int *ready, char *err, size_t errlen)
{
    const bn_plan_t *p = e->plan;
    *ready = 1;
    const int slices = t->want == BN_WANT_NONE ? 1 : p->T;
    for (int i = 0; i < slices && *ready; i++) {
        const int src = bn_plan_rank(p, r, p->P - 1, i);
        if (src == 0)
            continue;
        int rc = bn_comm_probe(e->c, src, TAG_RESULT, ready, err, errlen);
        if (rc)
            return rc;
    }
    return BN_OK;
}

/* rank 0: file slice i's result message away for the picks */
static void take_result(bn_engine_t *e, int i, int k, const uint8_t *msg)
{
    const int T = e->plan->T;
    const bn_slice_stats_t *st = (const bn_slice_stats_t *)msg;
    const bn_cand_t *cand = (const bn_cand_t *)(st + k);
    size_t used = 0;
    for (int j = 0; j < k; j++) {
        e->stats[(size_t)j * T + i] = st[j];
        e->ncand_off[(size_t)j * T + i] = (int32_t)used;
        memcpy(e->cand + ((size_t)i * BN_STEP_MAX * BN_SAMPLER_CAP) + used, cand + used, st[j].n_cand * sizeof *cand);
        used += st[j].n_cand;
    }
}

/* rank 0: the head step of replica r has all its results: take them, draw */
static int finish(bn_engine_t *e, int r, const ticket_t *t, bn_step_done_t *done, char *err, size_t errlen)
{
    const bn_plan_t *p = e->plan;
    const int k = t->k;
    const uint32_t V = e->m->cfg.n_vocab;
    int rc;
    done->ticket = t->id;
    done->replica = r;
    done->k = k;
    if (t->want == BN_WANT_NONE) {
        const int src = bn_plan_rank(p, r, p->P - 1, 0);
        int32_t n;
        return src == 0 ? BN_OK : bn_comm_recv(e->c, src, TAG_RESULT, &n, sizeof n, err, errlen);
    }
    for (int i = 0; i < p->T; i++) { /* every vocabulary slice of the replica's last stage, in order */
        const int src = bn_plan_rank(p, r, p->P - 1, i);
        const bn_shard_t *sh = &p->rank[src];
        const uint32_t rows = sh->vocab1 - sh->vocab0;
        if (src == 0) {
            if (t->want == BN_WANT_SAMPLE)
                take_result(e, i, k, e->own);
            continue; /* logits: already in place (submit) */
        }
        size_t len = t->want == BN_WANT_LOGITS ? (size_t)k * rows * sizeof(float) : sample_msg_bytes(k);
        if ((rc = bn_comm_recv(e->c, src, TAG_RESULT, e->msg, len, err, errlen)))
            return rc;
        if (t->want == BN_WANT_LOGITS) {
            const float *lg = (const float *)e->msg;
            for (int j = 0; j < k; j++)
                memcpy(t->logits + (size_t)j * V + sh->vocab0, lg + (size_t)j * rows, rows * sizeof(float));
        } else {
            take_result(e, i, k, e->msg);
        }
    }
    if (t->want == BN_WANT_LOGITS)
        return BN_OK;
    /* the draws: from the union of the slices' candidates, or in one slice's tail */
    int any_tail = 0;
    for (int j = 0; j < k; j++) {
        bn_slice_stats_t *st = e->stats + (size_t)j * p->T;
        size_t used = 0;
        for (int i = 0; i < p->T; i++) {
            memcpy(e->u + used, e->cand + (size_t)i * BN_STEP_MAX * BN_SAMPLER_CAP + e->ncand_off[(size_t)j * p->T + i],
                   st[i].n_cand * sizeof *e->u);
            used += st[i].n_cand;
        }
        bn_pick_t pk = e->picker.pick(t->smp[j], st, p->T, e->u);
        done->tokens[j] = pk.token;
        e->req[j] = (tail_req_t){ .asked = pk.token < 0 && pk.slice >= 0 ? pk.slice + 1 : 0, .last = pk.last,
                                  .target = pk.target };
        any_tail |= e->req[j].asked != 0;
    }
    if (!t->tails)
        return any_tail ? bn_err(err, errlen, BN_EINTERNAL, "a tail draw without tail sampling") : BN_OK;
    /* tail draws: every slice hears which rows it must finish */
    for (int i = 0; i < p->T; i++) {
        const int dst = bn_plan_rank(p, r, p->P - 1, i);
        tail_req_t req[BN_STEP_MAX];
        for (int j = 0; j < k; j++) {
            req[j] = e->req[j];
            req[j].asked = e->req[j].asked == i + 1;
        }
        if (dst == 0) {
            answer_tails(e, &e->cur, k, req, e->tail_tok);
        } else if ((rc = bn_comm_send(e->c, dst, TAG_TAIL, req, (size_t)k * sizeof *req, err, errlen)) ||
                   (rc = bn_comm_recv(e->c, dst, TAG_TAIL_TOKEN, e->tail_tok, (size_t)k * sizeof *e->tail_tok, err,
                                      errlen))) {
            return rc;
        }
        for (int j = 0; j < k; j++)
            if (req[j].asked)
                done->tokens[j] = e->tail_tok[j] >= 0 ? e->tail_tok[j] : e->req[j].last.id;
    }
    return BN_OK;
}

int bn_engine_poll(bn_engine_t *e, double wait_s, bn_step_done_t *done, char *err, size_t errlen)
{
    const int R = e->plan->R;
    double t0 = bn_now_s();
    long ns = 0;
    for (int spin = 0;; spin++) {
        int any = 0;
        for (int i = 0; i < R; i++) {
            const int r = (e->rr + i) % R;
            fifo_t *f = &e->fifo[r];
            if (!f->count)
                continue;
            any = 1;
            const ticket_t *t = &f->t[f->head];
            int ready = 0;
            int rc = results_ready(e, r, t, &ready, err, errlen);
            if (rc)
                return rc;
            if (!ready)
                continue;
            /* the wait for results, and taking them, count to the step's phase */
            double w = bn_now_s() - t0;
            snap_t a = snap(e->c);
            rc = finish(e, r, t, done, err, errlen);
            bn_phase_stats_t *ps = &e->ps[t->phase];
            ps->t_wait += w + e->c->t_wait - a.t_wait;
            ps->t_comm += e->c->t_comm - a.t_comm;
            ps->bytes_sent += e->c->bytes_sent - a.bytes;
            ps->messages += e->c->messages - a.msgs;
            ps->t_step += bn_now_s() - t0;
            e->c->t_wait += w;
            f->head = (f->head + 1) % FIFO_CAP;
            f->count--;
            e->rr = (r + 1) % R;
            return rc ? rc : 1;
        }
        if (!any || bn_now_s() - t0 >= wait_s)
            return 0;
        if (spin < 100) /* results of a short step come within microseconds */
            continue;
        ns = ns ? ns * 2 : 20000;
        if (ns > 500000)
            ns = 500000;
        struct timespec ts = { 0, ns };
        nanosleep(&ts, NULL);
    }
}

int bn_engine_run(bn_engine_t *e, int replica, const bn_step_t *s, bn_step_done_t *done, char *err, size_t errlen)
{
    uint64_t id;
    int rc = bn_engine_submit(e, replica, s, &id, err, errlen);
    if (rc)
        return rc;
    rc = bn_engine_poll(e, 1e9, done, err, errlen);
    if (rc < 0)
        return rc;
    if (rc == 0 || done->ticket != id)
        return bn_err(err, errlen, BN_EINTERNAL, "step %llu did not come back", (unsigned long long)id);
    return BN_OK;
}
