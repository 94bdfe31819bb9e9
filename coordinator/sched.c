/* sched.c - rank 0's scheduler; see sched.h. */
#include "coordinator/sched.h"

#include "coordinator/vocab.h"
#include "base/status.h"
#include "base/log.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ST_QUEUED, ST_PREFILL, ST_DECODE };
enum { REC_CAP = 8, LAT_RING = 4096 };

typedef struct req {
    uint64_t id;
    void *user;
    bn_gen_params_t p;
    int32_t *ids;            /* the prompt's tokens */
    uint32_t n_prompt;
    bn_sampler_t *smp;
    int state, replica, slot;
    uint32_t fed;            /* prompt tokens submitted */
    uint32_t pos;            /* the next position to evaluate */
    int32_t next;            /* the token to evaluate there (decode) */
    int inflight;            /* steps in flight with entries of this request */
    int waiting;             /* a step that samples its next token is in flight */
    uint32_t n_gen;          /* tokens handed out */
    int cancel;
    char why[160];
    bn_detok_t dt;
    char *pend;              /* text held back: it may be the start of a stop string */
    size_t pend_len, pend_cap;
    double t_arrive, t_admit, t_first, t_last, deadline;
    uint64_t reserved;       /* KV bytes admitted for */
    uint64_t seed;
    int wait_slot;           /* >= 0: its first wait_len tokens are the start of the prompt */
    uint32_t wait_len;       /*   that slot's request (wait_id, admitted earlier: no cycles) */
    uint64_t wait_id;        /*   is being given: copied once it has been */
} req_t;

/* a step in flight: which request each entry and each sample belongs to */
typedef struct {
    uint64_t ticket;
    int n, k;
    req_t *ent[BN_STEP_MAX];
    req_t *want[BN_STEP_MAX];
} rec_t;

/* What a slot's KV memory holds: the keys and values of toks[0..n-1], given to
 * steps already submitted (so computed before any later step runs) */
typedef struct {
    int32_t *toks;           /* (n_ctx); NULL without prefix reuse */
    uint32_t n;
    int cached;              /* no request: kept for a later one that starts the same way */
    double used;             /* when it became cached (the least recently used goes first) */
} slotkv_t;

enum { PREFIX_MIN = 4 };     /* shorter common starts are computed, not copied */

typedef struct {
    req_t **slot;            /* (max_seqs) */
    slotkv_t *kv;            /* (max_seqs) */
    int running;
    uint64_t reserved;
    uint64_t cached;         /* KV bytes of cached slots */
    bn_kv_copy_t copy[BN_STEP_COPY_MAX]; /* prefixes to copy with the next step */
    int n_copy;
    int32_t *release;        /* slots whose KV memory goes back with the next step */
    int n_release;
    rec_t rec[REC_CAP];
    int rec_head, rec_count;
} replica_t;

typedef struct {
    double v[LAT_RING];
    uint64_t n;
} lat_t;

struct bn_sched {
    bn_engine_t *eng;
    const bn_plan_t *plan;
    const bn_model_t *m;
    const bn_tokenizer_t *tok;
    bn_sched_opts_t o;
    bn_sched_sink_t sink;
    replica_t *rep;
    req_t **queue;           /* (max_queue) FIFO */
    int q_head, q_count;
    uint64_t next_id, seed_mix;
    bn_sched_stats_t st;
    lat_t ttft, itl;
    double busy_since;
    char *piece;             /* one detokenized piece */
    size_t piece_cap;
};

static void lat_add(lat_t *l, double ms)
{
    l->v[l->n++ % LAT_RING] = ms;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* p50 and p99 of the last LAT_RING samples (0 when none) */
static void lat_pct(const lat_t *l, double *p50, double *p99)
{
    size_t n = l->n < LAT_RING ? (size_t)l->n : LAT_RING;
    *p50 = *p99 = 0;
    if (!n)
        return;
    double *tmp = malloc(n * sizeof *tmp);
    if (!tmp)
        return;
    memcpy(tmp, l->v, n * sizeof *tmp);
    qsort(tmp, n, sizeof *tmp, cmp_d);
    *p50 = tmp[(n - 1) / 2];
    *p99 = tmp[(size_t)((n - 1) * 0.99 + 0.5)];
    free(tmp);
}

/* the engine draws with the requests' samplers through these */
static const bn_sampler_params_t *pick_params(const void *smp)
{
    return bn_sampler_params(smp);
}

static bn_pick_t pick(void *smp, const bn_slice_stats_t *st, int n_slices, const bn_cand_t *cand)
{
    return bn_sampler_pick(smp, st, n_slices, cand);
}

int bn_sched_new(bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m, const bn_tokenizer_t *tok,
                 const bn_sched_opts_t *o, const bn_sched_sink_t *sink, bn_sched_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (o->max_seqs < 1 || o->max_queue < 1 || o->step_tokens < 1 || o->step_tokens > BN_STEP_MAX || !o->n_ctx)
        return bn_err(err, errlen, BN_EINVAL, "scheduler: %d sequences, queue %d, %d tokens a step", o->max_seqs,
                      o->max_queue, o->step_tokens);
    bn_sched_t *s = calloc(1, sizeof *s);
    if (!s)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    s->eng = eng;
    bn_engine_set_picker(eng, &(bn_picker_t){ .params = pick_params, .pick = pick });
    s->plan = plan;
    s->m = m;
    s->tok = tok;
    s->o = *o;
    s->sink = *sink;
    s->seed_mix = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull;
    s->piece_cap = 256;
    s->piece = malloc(s->piece_cap);
    s->rep = calloc((size_t)plan->R, sizeof *s->rep);
    s->queue = calloc((size_t)(o->max_queue ? o->max_queue : 1), sizeof *s->queue);
    int ok = s->piece && s->rep && s->queue;
    for (int r = 0; ok && r < plan->R; r++) {
        s->rep[r].slot = calloc((size_t)o->max_seqs, sizeof *s->rep[r].slot);
        s->rep[r].release = calloc((size_t)o->max_seqs, sizeof *s->rep[r].release);
        s->rep[r].kv = calloc((size_t)o->max_seqs, sizeof *s->rep[r].kv);
        ok = s->rep[r].slot && s->rep[r].release && s->rep[r].kv;
        for (int i = 0; ok && o->prefix_cache && i < o->max_seqs; i++)
            ok = (s->rep[r].kv[i].toks = malloc((size_t)o->n_ctx * sizeof(int32_t))) != NULL;
    }
    if (!ok) {
        bn_sched_destroy(&s);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the scheduler");
    }
    *out = s;
    return BN_OK;
}

static void req_free(req_t *r)
{
    if (!r)
        return;
    bn_gen_params_free(&r->p);
    free(r->ids);
    free(r->pend);
    bn_sampler_destroy(&r->smp);
    free(r);
}

static int has_tail(const req_t *r)
{
    return bn_sampler_draws_tail(&r->p.sp);
}

/* hand text to the sink, holding back what may still become a stop string */
static int emit(bn_sched_t *s, req_t *r, const char *text, size_t len, const int32_t *ids, int n_ids, int final)
{
    if (!r->pend || r->pend_len + len > r->pend_cap) { /* (never NULL below) */
        size_t cap = (r->pend_len + len) * 2 + 64;
        char *np = realloc(r->pend, cap);
        if (!np)
            return BN_ENOMEM;
        r->pend = np;
        r->pend_cap = cap;
    }
    memcpy(r->pend + r->pend_len, text, len);
    r->pend_len += len;
    /* the earliest stop string in the pending text ends the request before it */
    size_t cut = r->pend_len, hold = 0;
    int stopped = 0;
    for (int i = 0; i < r->p.n_stop; i++) {
        const char *st = r->p.stop[i];
        size_t sl = r->p.stop_len[i];
        for (size_t at = 0; at + sl <= r->pend_len && at < cut; at++)
            if (memcmp(r->pend + at, st, sl) == 0) {
                cut = at;
                stopped = 1;
                break;
            }
    }
    if (!stopped && !final) /* the longest end of the text that begins a stop string */
        for (int i = 0; i < r->p.n_stop; i++) {
            size_t sl = r->p.stop_len[i];
            for (size_t h = sl - 1 < r->pend_len ? sl - 1 : r->pend_len; h > hold; h--)
                if (memcmp(r->pend + r->pend_len - h, r->p.stop[i], h) == 0) {
                    hold = h;
                    break;
                }
        }
    size_t out = stopped ? cut : r->pend_len - hold;
    if ((out || n_ids) && s->sink.on_text)
        s->sink.on_text(s->sink.ctx, r->user, r->pend, out, ids, n_ids);
    memmove(r->pend, r->pend + out, r->pend_len - out);
    r->pend_len -= out;
    if (stopped)
        r->pend_len = 0;
    return stopped;
}

/* slot's KV memory goes back with the next step */
static void give_back(replica_t *rp, int slot)
{
    rp->kv[slot].n = 0;
    rp->kv[slot].cached = 0;
    rp->release[rp->n_release++] = slot;
}

/* the least recently used cached slot of rp (-1: none) */
static int lru(const bn_sched_t *s, const replica_t *rp)
{
    int best = -1;
    for (int i = 0; i < s->o.max_seqs; i++)
        if (rp->kv[i].cached && (best < 0 || rp->kv[i].used < rp->kv[best].used))
            best = i;
    return best;
}

static void uncache(const bn_sched_t *s, replica_t *rp, int slot)
{
    rp->cached -= (uint64_t)rp->kv[slot].n * s->o.kv_pos_bytes;
    rp->kv[slot].cached = 0;
}

/* cached prefixes out, least recently used first, until they fit prefix_cache
 * and, with the running sequences' reservations, the KV budget */
static void trim(bn_sched_t *s, replica_t *rp)
{
    while (rp->cached > s->o.prefix_cache || (s->o.kv_budget && rp->reserved + rp->cached > s->o.kv_budget)) {
        int i = lru(s, rp);
        if (i < 0)
            return;
        uncache(s, rp, i);
        give_back(rp, i);
    }
}

/* a slot whose request ended: kept as a cached prefix, or given back */
static void retire(bn_sched_t *s, replica_t *rp, int slot)
{
    slotkv_t *kv = &rp->kv[slot];
    if (!s->o.prefix_cache || !kv->toks || !kv->n) {
        give_back(rp, slot);
        return;
    }
    kv->cached = 1;
    kv->used = bn_now_s();
    rp->cached += (uint64_t)kv->n * s->o.kv_pos_bytes;
    trim(s, rp);
}

/* The request's last event; it leaves the scheduler (nothing of it may be in flight). */
static void finish(bn_sched_t *s, req_t *r, int reason, const char *detail)
{
    double t = bn_now_s();
    if (reason != BN_FINISH_STOP && r->state != ST_QUEUED) { /* what was held back is text after all */
        char tail[8];
        size_t k = bn_detok_flush(&r->dt, tail, sizeof tail);
        emit(s, r, tail, k, NULL, 0, 1);
    }
    bn_usage_t u = { .prompt_tokens = r->n_prompt, .completion_tokens = r->n_gen, .seed = r->seed };
    u.total_ms = 1e3 * (t - r->t_arrive);
    u.queue_ms = 1e3 * ((r->t_admit > 0 ? r->t_admit : t) - r->t_arrive);
    if (r->t_first > 0) {
        u.ttft_ms = 1e3 * (r->t_first - r->t_arrive);
        u.gen_s = r->t_last - r->t_first;
        u.tokens_per_s = u.gen_s > 0 && r->n_gen > 1 ? (r->n_gen - 1) / u.gen_s : 0;
    }
    if (reason == BN_FINISH_CANCELLED)
        s->st.cancelled++;
    else
        s->st.served++;
    s->st.prompt_tokens += r->n_prompt;
    s->st.completion_tokens += r->n_gen;
    BN_INFO("request %llu%s%s%s: %s%s%s%s, %u prompt tokens, %u generated, queue %.1f ms, first token %.1f ms, "
            "%.2f tokens/s, total %.1f ms", (unsigned long long)r->id, r->p.label[0] ? " '" : "", r->p.label,
            r->p.label[0] ? "'" : "", bn_finish_name(reason), detail ? " (" : "",
            detail ? detail : "", detail ? ")" : "", r->n_prompt, r->n_gen, u.queue_ms, u.ttft_ms, u.tokens_per_s,
            u.total_ms);
    if (s->sink.on_final)
        s->sink.on_final(s->sink.ctx, r->user, reason, &u, detail);
    if (r->state != ST_QUEUED) {
        replica_t *rp = &s->rep[r->replica];
        rp->slot[r->slot] = NULL;
        rp->running--;
        rp->reserved -= r->reserved;
        retire(s, rp, r->slot);
        s->st.running--;
        if (s->st.running == 0)
            s->st.busy_s += t - s->busy_since;
    }
    req_free(r);
}

void bn_sched_destroy(bn_sched_t **ps)
{
    if (!ps || !*ps)
        return;
    bn_sched_t *s = *ps;
    for (int i = 0; s->queue && i < s->q_count; i++)
        finish(s, s->queue[(s->q_head + i) % (s->o.max_queue ? s->o.max_queue : 1)], BN_FINISH_CANCELLED,
               "server stopped");
    for (int r = 0; s->rep && r < s->plan->R; r++) {
        for (int i = 0; s->rep[r].slot && i < s->o.max_seqs; i++)
            if (s->rep[r].slot[i])
                finish(s, s->rep[r].slot[i], BN_FINISH_CANCELLED, "server stopped");
        free(s->rep[r].slot);
        free(s->rep[r].release);
        for (int i = 0; s->rep[r].kv && i < s->o.max_seqs; i++)
            free(s->rep[r].kv[i].toks);
        free(s->rep[r].kv);
    }
    free(s->rep);
    free(s->queue);
    free(s->piece);
    free(s);
    *ps = NULL;
}

/* the prompt's ids: text (chat form, specials recognised, BOS as the model asks) or ids */
static int encode(bn_sched_t *s, req_t *r, char *err, size_t errlen)
{
    const bn_config_t *c = &s->m->cfg;
    bn_gen_params_t *p = &r->p;
    if (p->tokens) {
        for (size_t i = 0; i < p->n_tokens; i++)
            if (p->tokens[i] < 0 || (uint32_t)p->tokens[i] >= c->n_vocab)
                return bn_err(err, errlen, BN_EINVAL, "token %zu: id %d is not in the vocabulary (0..%u)", i,
                              p->tokens[i], c->n_vocab - 1);
        r->ids = malloc((p->n_tokens ? p->n_tokens : 1) * sizeof *r->ids);
        if (!r->ids)
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        memcpy(r->ids, p->tokens, p->n_tokens * sizeof *r->ids);
        r->n_prompt = (uint32_t)p->n_tokens;
        return BN_OK;
    }
    size_t n = 0;
    int rc = bn_prompt_encode(s->m, s->tok, p->prompt, p->prompt_len, p->chat, &r->ids, &n, err, errlen);
    r->n_prompt = (uint32_t)n;
    return rc;
}

int bn_prompt_encode(const bn_model_t *m, const bn_tokenizer_t *tok, const char *text, size_t len, int chat,
                     int32_t **out, size_t *n_out, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    const char *src = text;
    char *wrapped = NULL;
    int rc;
    *out = NULL;
    *n_out = 0;
    if (chat && (rc = bn_vocab_chat_wrap(m->gguf, text, len, &wrapped, &len, err, errlen)))
        return rc;
    if (wrapped)
        src = wrapped;
    size_t n = 0;
    int32_t *ids = NULL;
    rc = bn_tokenizer_encode(tok, src, len, 1, &ids, &n, err, errlen);
    free(wrapped);
    if (rc)
        return rc;
    if (c->add_bos && c->bos_id >= 0 && (n == 0 || ids[0] != c->bos_id)) {
        int32_t *nids = realloc(ids, (n + 1) * sizeof *ids);
        if (!nids) {
            free(ids);
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        }
        ids = nids;
        memmove(ids + 1, ids, n * sizeof *ids);
        ids[0] = c->bos_id;
        n++;
    }
    *out = ids;
    *n_out = n;
    return BN_OK;
}

static uint64_t need_bytes(const bn_sched_t *s, const req_t *r)
{
    uint64_t len = (uint64_t)r->n_prompt + (r->p.dump_logits ? 0 : r->p.max_tokens);
    if (len > s->o.n_ctx)
        len = s->o.n_ctx;
    return len * s->o.kv_pos_bytes;
}

static void admit(bn_sched_t *s);

int bn_sched_submit(bn_sched_t *s, bn_gen_params_t *p, void *user, uint64_t *id, char *err, size_t errlen)
{
    int rc = BN_OK;
    req_t *r = NULL;
    admit(s); /* slots freed since the last step take the queue's head first */
    if (s->q_count >= s->o.max_queue) {
        rc = bn_err(err, errlen, BN_EBUSY, "the queue is full (%d requests waiting, %d running); try again later",
                    s->q_count, s->st.running);
        goto fail;
    }
    if (!!p->prompt == !!p->tokens) {
        rc = bn_err(err, errlen, BN_EINVAL, "give either a prompt text or prompt tokens");
        goto fail;
    }
    if (p->chat && !p->prompt) {
        rc = bn_err(err, errlen, BN_EINVAL, "chat needs a prompt text");
        goto fail;
    }
    if (p->max_tokens > BN_MAX_TOKENS_LIMIT) {
        rc = bn_err(err, errlen, BN_ERANGE, "max_tokens %u is above %u", p->max_tokens, BN_MAX_TOKENS_LIMIT);
        goto fail;
    }
    if (p->n_stop < 0 || p->n_stop > BN_MAX_STOPS) {
        rc = bn_err(err, errlen, BN_ERANGE, "%d stop strings, at most %d", p->n_stop, BN_MAX_STOPS);
        goto fail;
    }
    for (int i = 0; i < p->n_stop; i++)
        if (p->stop_len[i] == 0 || p->stop_len[i] > BN_MAX_STOP_LEN) {
            rc = bn_err(err, errlen, BN_ERANGE, "stop string %d has %zu bytes (1..%d)", i, p->stop_len[i],
                        BN_MAX_STOP_LEN);
            goto fail;
        }
    if ((rc = bn_sampler_check(&p->sp, err, errlen)))
        goto fail;
    if (!(r = calloc(1, sizeof *r))) {
        rc = bn_err(err, errlen, BN_ENOMEM, "out of memory");
        goto fail;
    }
    r->p = *p;
    memset(p, 0, sizeof *p); /* taken over */
    if ((rc = encode(s, r, err, errlen)))
        goto fail;
    if (r->n_prompt == 0) {
        rc = bn_err(err, errlen, BN_EINVAL, "the prompt is empty");
        goto fail;
    }
    if (r->n_prompt > s->o.n_ctx) {
        rc = bn_err(err, errlen, BN_ECONTEXT, "the prompt has %u tokens, more than the context of %u", r->n_prompt,
                    s->o.n_ctx);
        goto fail;
    }
    r->reserved = need_bytes(s, r);
    if (s->o.kv_budget && r->reserved > s->o.kv_budget) {
        rc = bn_err(err, errlen, BN_ERANGE, "the request needs %.1f MB of KV memory (prompt %u + %u tokens), more "
                    "than a replica's budget of %.1f MB", r->reserved / 1e6, r->n_prompt, r->p.max_tokens,
                    s->o.kv_budget / 1e6);
        goto fail;
    }
    r->seed = r->p.seed_given ? r->p.sp.seed : (s->seed_mix += 0x9E3779B97F4A7C15ull) ^ ((uint64_t)bn_now_s() << 20);
    r->p.sp.seed = r->seed;
    if ((rc = bn_sampler_new(&r->p.sp, s->m->cfg.n_vocab, &r->smp, err, errlen)))
        goto fail;
    r->id = ++s->next_id;
    r->user = user;
    r->state = ST_QUEUED;
    r->t_arrive = bn_now_s();
    r->deadline = r->p.deadline_ms ? r->t_arrive + r->p.deadline_ms / 1e3 : 0;
    s->queue[(s->q_head + s->q_count) % s->o.max_queue] = r;
    s->q_count++;
    *id = r->id;
    admit(s); /* a free slot takes it now: the queue holds only what must wait */
    return BN_OK;
fail:
    if (r)
        req_free(r);
    else
        bn_gen_params_free(p);
    s->st.rejected++;
    return rc;
}

static req_t *find(bn_sched_t *s, uint64_t id)
{
    for (int i = 0; i < s->q_count; i++) {
        req_t *r = s->queue[(s->q_head + i) % s->o.max_queue];
        if (r->id == id)
            return r;
    }
    for (int k = 0; k < s->plan->R; k++)
        for (int i = 0; i < s->o.max_seqs; i++)
            if (s->rep[k].slot[i] && s->rep[k].slot[i]->id == id)
                return s->rep[k].slot[i];
    return NULL;
}

static void mark(req_t *r, const char *why)
{
    if (r->cancel)
        return;
    r->cancel = 1;
    snprintf(r->why, sizeof r->why, "%s", why ? why : "cancelled");
}

void bn_sched_cancel(bn_sched_t *s, uint64_t id, const char *why)
{
    req_t *r = find(s, id);
    if (r)
        mark(r, why);
}

void bn_sched_cancel_all(bn_sched_t *s, const char *why)
{
    for (int i = 0; i < s->q_count; i++)
        mark(s->queue[(s->q_head + i) % s->o.max_queue], why);
    for (int k = 0; k < s->plan->R; k++)
        for (int i = 0; i < s->o.max_seqs; i++)
            if (s->rep[k].slot[i])
                mark(s->rep[k].slot[i], why);
}

/* deadlines, cancelled requests that nothing in flight still refers to, and
 * cached prefixes unused for prefix_ttl_s */
static void reap(bn_sched_t *s)
{
    double t = bn_now_s();
    for (int k = 0; s->o.prefix_ttl_s > 0 && k < s->plan->R; k++)
        for (int i = 0; i < s->o.max_seqs; i++)
            if (s->rep[k].kv[i].cached && t - s->rep[k].kv[i].used > s->o.prefix_ttl_s) {
                uncache(s, &s->rep[k], i);
                give_back(&s->rep[k], i);
            }
    int kept = 0;
    const int Q = s->o.max_queue;
    for (int i = 0; i < s->q_count; i++) {
        req_t *r = s->queue[(s->q_head + i) % Q];
        if (r->deadline && t > r->deadline)
            mark(r, "deadline passed while queued");
        if (r->cancel)
            finish(s, r, BN_FINISH_CANCELLED, r->why);
        else
            s->queue[(s->q_head + kept++) % Q] = r;
    }
    s->q_count = kept;
    for (int k = 0; k < s->plan->R; k++)
        for (int i = 0; i < s->o.max_seqs; i++) {
            req_t *r = s->rep[k].slot[i];
            if (!r)
                continue;
            if (r->deadline && t > r->deadline)
                mark(r, "deadline passed");
            if (r->cancel && !r->inflight)
                finish(s, r, BN_FINISH_CANCELLED, r->why);
        }
}

/* The tokens slot i of rp holds or will hold: those given to steps (toks,
 * kv->n of them), then, while its request is still being given its prompt,
 * the rest of that prompt */
static uint32_t common_start(const replica_t *rp, int i, const req_t *r, uint32_t lim)
{
    const slotkv_t *kv = &rp->kv[i];
    uint32_t l = 0;
    while (l < lim && l < kv->n && kv->toks[l] == r->ids[l])
        l++;
    const req_t *o = rp->slot[i];
    if (l == kv->n && o && o->state == ST_PREFILL && !o->p.dump_logits)
        while (l < lim && l < o->n_prompt && o->ids[l] == r->ids[l])
            l++;
    return l;
}

/* The slot of rp whose keys and values share the longest start with r's
 * prompt (-1: none of at least PREFIX_MIN tokens), and that length in *len;
 * at most n_prompt - 1, so the last prompt token is computed. A cached slot
 * wins a tie (it is taken over, not copied). A running slot may match with
 * tokens it has not been given yet (a request arriving with others that share
 * its system prompt): the copy then waits for them. */
static int match(const bn_sched_t *s, const replica_t *rp, const req_t *r, uint32_t *len)
{
    int best = -1;
    *len = 0;
    if (!s->o.prefix_cache || r->p.dump_logits || r->n_prompt < 2)
        return -1;
    for (int i = 0; i < s->o.max_seqs; i++) {
        const slotkv_t *kv = &rp->kv[i];
        if (!kv->toks || (!kv->cached && !rp->slot[i]))
            continue;
        const uint32_t l = common_start(rp, i, r, r->n_prompt - 1);
        if (l >= PREFIX_MIN && (l > *len || (l == *len && kv->cached && !rp->kv[best].cached))) {
            best = i;
            *len = l;
        }
    }
    return best;
}

/* request r's slot starts from positions 0..len-1 of slot src: a copy with the next step */
static void take_prefix(bn_sched_t *s, replica_t *rp, req_t *r, int src, uint32_t len)
{
    const int dst = r->slot;
    rp->copy[rp->n_copy++] = (bn_kv_copy_t){ .src = src, .dst = dst, .n = len };
    memcpy(rp->kv[dst].toks, rp->kv[src].toks, len * sizeof(int32_t));
    rp->kv[dst].n = len;
    /* a release still to be sent would come after the copy: not needed, the copy overwrites */
    for (int i = 0; i < rp->n_release; i++)
        if (rp->release[i] == dst) {
            memmove(rp->release + i, rp->release + i + 1, (size_t)(rp->n_release - i - 1) * sizeof *rp->release);
            rp->n_release--;
            break;
        }
    r->fed = r->pos = len;
    s->st.prefix_hits++;
    s->st.prefix_tokens += len;
    BN_DEBUG("request %llu: %u prompt tokens copied from slot %d", (unsigned long long)r->id, len, src);
}

/* A request waiting for another's prompt start (wait_slot): 1 when that start
 * has been given to steps already sent (it is copied now), -1 when the wait is
 * over without it (the other ended, or its slot now holds something else: the
 * request computes its prompt), 0 to go on waiting */
static int wait_state(const bn_sched_t *s, const replica_t *rp, const req_t *r)
{
    const slotkv_t *kv = &rp->kv[r->wait_slot];
    const uint32_t have = kv->n < r->wait_len ? kv->n : r->wait_len;
    for (uint32_t i = 0; i < have; i++)
        if (kv->toks[i] != r->ids[i])
            return -1;
    if (kv->n >= r->wait_len)
        return rp->n_copy < BN_STEP_COPY_MAX ? 1 : 0;
    const req_t *o = rp->slot[r->wait_slot];
    return o && o->id == r->wait_id && o->state == ST_PREFILL && !o->cancel ? 0 : -1;
}

/* queued requests into free slots, first come first served; each to the
 * replica holding the longest start of its prompt, else the least loaded */
static void admit(bn_sched_t *s)
{
    while (s->q_count) {
        req_t *r = s->queue[s->q_head];
        int best = -1, from = -1;
        uint32_t blen = 0;
        for (int k = 0; k < s->plan->R; k++) {
            replica_t *rp = &s->rep[k];
            if ((r->p.replica >= 0 && k != r->p.replica) || rp->running >= s->o.max_seqs || (s->o.kv_budget && rp->reserved + r->reserved > s->o.kv_budget))
                continue;
            uint32_t len;
            int m = match(s, rp, r, &len);
            if (best < 0 || len > blen || (len == blen && rp->running < s->rep[best].running)) {
                best = k;
                from = m;
                blen = len;
            }
        }
        if (best < 0)
            return;
        replica_t *rp = &s->rep[best];
        int slot = -1;
        if (from >= 0 && rp->kv[from].cached) { /* a cached prefix: taken over as it is */
            slot = from;
            uncache(s, rp, slot);
        } else {
            for (int i = 0; i < s->o.max_seqs && slot < 0; i++)
                if (!rp->slot[i] && !rp->kv[i].cached)
                    slot = i;
            if (slot < 0) { /* every free slot holds a cached prefix: the oldest goes */
                slot = lru(s, rp);
                uncache(s, rp, slot);
                give_back(rp, slot);
            }
        }
        rp->slot[slot] = r;
        rp->running++;
        rp->reserved += r->reserved;
        r->replica = best;
        r->slot = slot;
        r->state = ST_PREFILL;
        r->wait_slot = -1;
        r->fed = r->pos = 0;
        rp->kv[slot].n = 0;
        if (slot == from) { /* a cached prefix: taken over as it is */
            rp->kv[slot].n = blen;
            r->fed = r->pos = blen;
            s->st.prefix_hits++;
            s->st.prefix_tokens += blen;
            BN_DEBUG("request %llu: %u prompt tokens of cached slot %d", (unsigned long long)r->id, blen, slot);
        } else if (from >= 0) { /* a running sequence's start: copied once it has been given it */
            r->wait_slot = from;
            r->wait_len = blen;
            r->wait_id = rp->slot[from]->id;
            if (wait_state(s, rp, r) == 1) {
                take_prefix(s, rp, r, from, blen);
                r->wait_slot = -1;
            }
        }
        r->t_admit = bn_now_s();
        if (s->st.running++ == 0)
            s->busy_since = r->t_admit;
        s->q_head = (s->q_head + 1) % s->o.max_queue;
        s->q_count--;
        trim(s, rp); /* the budget now holds one more reservation */
    }
}

/* the slot's memory gets token tok at position pos with the step being built */
static void note(replica_t *rp, int slot, uint32_t pos, int32_t tok)
{
    slotkv_t *kv = &rp->kv[slot];
    if (kv->toks) {
        kv->toks[pos] = tok;
        kv->n = pos + 1;
    }
}

/* The next step for replica k: decode tokens first, then prompt chunks, under
 * the token budget. Returns its entry count (0: nothing to run). */
static int build(bn_sched_t *s, int k, bn_step_t *st, rec_t *rec)
{
    replica_t *rp = &s->rep[k];
    const int idle = bn_engine_inflight(s->eng, k) == 0;
    const int budget = s->o.step_tokens;
    memset(rec, 0, sizeof *rec);
    st->n = 0;
    st->want = BN_WANT_NONE;
    st->phase = BN_PHASE_PROMPT;
    st->logits = NULL;
    st->n_release = 0;
    st->n_copy = 0;
    int n = 0, kk = 0;
    /* requests waiting for another's prompt start: copied now if it has been
     * given to steps already sent (the copy runs before this step's entries) */
    for (int i = 0; i < s->o.max_seqs; i++) {
        req_t *r = rp->slot[i];
        if (!r || r->wait_slot < 0)
            continue;
        const int w = wait_state(s, rp, r);
        if (w == 1)
            take_prefix(s, rp, r, r->wait_slot, r->wait_len);
        if (w != 0)
            r->wait_slot = -1;
    }
    /* with several pipeline stages, the decoding sequences are spread over the
     * steps in flight, so every stage has work */
    int decoding = 0;
    for (int i = 0; i < s->o.max_seqs; i++)
        decoding += rp->slot[i] && rp->slot[i]->state == ST_DECODE;
    const int cap = bn_engine_room(s->eng, k) + bn_engine_inflight(s->eng, k);
    const int max_dec = cap > 1 ? (decoding + cap - 1) / cap : budget;
    int dec = 0;
    for (int i = 0; i < s->o.max_seqs && n < budget && dec < max_dec; i++) {
        req_t *r = rp->slot[i];
        if (!r || r->state != ST_DECODE || r->waiting || r->cancel || (has_tail(r) && !idle))
            continue;
        st->e[n] = (bn_batch_entry_t){ .seq = r->slot, .pos = (int32_t)r->pos, .token = r->next, .want_logits = 1 };
        note(rp, r->slot, r->pos, r->next);
        rec->ent[n++] = r;
        st->smp[kk] = r->smp;
        rec->want[kk++] = r;
        r->waiting = 1;
        r->pos++;
        r->inflight++;
        dec++;
        st->phase = BN_PHASE_GEN;
    }
    for (int i = 0; i < s->o.max_seqs && n < budget; i++) {
        req_t *r = rp->slot[i];
        if (!r || r->state != ST_PREFILL || r->fed >= r->n_prompt || r->cancel || r->wait_slot >= 0)
            continue;
        uint32_t c = r->n_prompt - r->fed;
        if (c > (uint32_t)(budget - n))
            c = (uint32_t)(budget - n);
        const int last = r->fed + c == r->n_prompt;
        if (r->p.dump_logits) { /* every position's logits: a step of its own, on an idle replica */
            if (n || !idle)
                continue;
            st->logits = r->p.dump_logits + (size_t)r->fed * s->m->cfg.n_vocab;
            st->want = BN_WANT_LOGITS;
        } else if (last && has_tail(r) && !idle) {
            if (c == 1)
                continue;
            c--; /* the sampled end waits for an idle replica */
        }
        for (uint32_t j = 0; j < c; j++) {
            const uint32_t pos = r->fed + j;
            const int want = r->p.dump_logits || pos + 1 == r->n_prompt;
            st->e[n] = (bn_batch_entry_t){ .seq = r->slot, .pos = (int32_t)pos, .token = r->ids[pos],
                                           .want_logits = want };
            note(rp, r->slot, pos, r->ids[pos]);
            rec->ent[n++] = r;
            if (want && !r->p.dump_logits) {
                st->smp[kk] = r->smp;
                rec->want[kk++] = r;
                r->waiting = 1;
            } else if (want) {
                rec->want[kk++] = r;
            }
        }
        r->fed += c;
        r->pos = r->fed;
        r->inflight++;
        if (st->want == BN_WANT_LOGITS)
            break;
    }
    if (kk && st->want != BN_WANT_LOGITS)
        st->want = BN_WANT_SAMPLE;
    st->n = n;
    rec->n = n;
    rec->k = kk;
    /* prefixes are copied, then the KV memory of ended sequences goes back, first */
    st->n_copy = rp->n_copy;
    memcpy(st->copy, rp->copy, (size_t)rp->n_copy * sizeof *rp->copy);
    for (int i = 0; i < rp->n_release && st->n_release < BN_STEP_MAX; i++)
        st->release[st->n_release++] = rp->release[i];
    return n;
}

/* a request's entries in a step counted once, however many it had */
static void unmark_inflight(rec_t *rec)
{
    for (int i = 0; i < rec->n; i++)
        if (rec->ent[i] && (i == 0 || rec->ent[i] != rec->ent[i - 1]))
            rec->ent[i]->inflight--;
}

static int submit_ready(bn_sched_t *s, int *submitted, char *err, size_t errlen)
{
    for (int k = 0; k < s->plan->R; k++) {
        replica_t *rp = &s->rep[k];
        while (bn_engine_room(s->eng, k) > 0 && rp->rec_count < REC_CAP) {
            bn_step_t st;
            rec_t *rec = &rp->rec[(rp->rec_head + rp->rec_count) % REC_CAP];
            int n = build(s, k, &st, rec);
            if (n == 0 && ((st.n_release == 0 && st.n_copy == 0) || bn_engine_inflight(s->eng, k))) {
                unmark_inflight(rec);
                break;
            }
            int rc = bn_engine_submit(s->eng, k, &st, &rec->ticket, err, errlen);
            if (rc)
                return rc;
            memmove(rp->release, rp->release + st.n_release, (size_t)(rp->n_release - st.n_release) * sizeof *rp->release);
            rp->n_release -= st.n_release;
            rp->n_copy = 0;
            rp->rec_count++;
            s->st.steps++;
            (*submitted)++;
        }
    }
    return BN_OK;
}

/* a sampled token of request r */
static void take_token(bn_sched_t *s, req_t *r, int32_t tok)
{
    const bn_config_t *c = &s->m->cfg;
    double t = bn_now_s();
    if (r->cancel)
        return;
    if (r->t_first == 0) {
        r->t_first = t;
        lat_add(&s->ttft, 1e3 * (t - r->t_arrive));
    } else {
        lat_add(&s->itl, 1e3 * (t - r->t_last));
    }
    r->t_last = t;
    if (r->p.max_tokens == 0) {
        finish(s, r, BN_FINISH_LENGTH, NULL);
        return;
    }
    if (!r->p.ignore_eos && tok >= 0 && (tok == c->eos_id || tok == c->eot_id)) {
        finish(s, r, BN_FINISH_EOS, NULL);
        return;
    }
    r->n_gen++;
    size_t need = bn_detok_push(s->tok, &r->dt, tok, s->piece, s->piece_cap);
    if (need > s->piece_cap) {
        char *np = realloc(s->piece, need);
        if (!np) {
            mark(r, "out of memory");
            finish(s, r, BN_FINISH_ERROR, "out of memory");
            return;
        }
        s->piece = np;
        s->piece_cap = need;
        need = bn_detok_push(s->tok, &r->dt, tok, s->piece, s->piece_cap);
    }
    int stopped = emit(s, r, s->piece, need, &tok, 1, 0);
    if (stopped < 0) {
        finish(s, r, BN_FINISH_ERROR, "out of memory");
    } else if (stopped) {
        finish(s, r, BN_FINISH_STOP, NULL);
    } else if (r->n_gen >= r->p.max_tokens) {
        finish(s, r, BN_FINISH_LENGTH, NULL);
    } else if (r->pos >= s->o.n_ctx) {
        BN_WARN("request %llu: the context of %u tokens is full after %u generated tokens", (unsigned long long)r->id,
                s->o.n_ctx, r->n_gen);
        finish(s, r, BN_FINISH_LENGTH, "the context is full");
    } else {
        r->next = tok;
        r->state = ST_DECODE;
    }
}

static int collect(bn_sched_t *s, double wait_s, int *got, char *err, size_t errlen)
{
    for (;;) {
        bn_step_done_t d;
        int rc = bn_engine_poll(s->eng, wait_s, &d, err, errlen);
        if (rc <= 0)
            return rc;
        wait_s = 0;
        (*got)++;
        replica_t *rp = &s->rep[d.replica];
        rec_t *rec = &rp->rec[rp->rec_head];
        if (!rp->rec_count || rec->ticket != d.ticket)
            return bn_err(err, errlen, BN_EINTERNAL, "step %llu came back out of order", (unsigned long long)d.ticket);
        rp->rec_head = (rp->rec_head + 1) % REC_CAP;
        rp->rec_count--;
        unmark_inflight(rec);
        for (int j = 0; j < rec->k; j++) {
            req_t *r = rec->want[j];
            if (r->p.dump_logits) {
                if (j + 1 == rec->k && r->fed == r->n_prompt && !r->inflight)
                    finish(s, r, BN_FINISH_LENGTH, NULL);
                continue;
            }
            r->waiting = 0;
            take_token(s, r, d.tokens[j]);
        }
    }
}

int bn_sched_pump(bn_sched_t *s, double wait_s, char *err, size_t errlen)
{
    reap(s);
    admit(s);
    int submitted = 0, got = 0;
    int rc = submit_ready(s, &submitted, err, errlen);
    if (rc)
        return rc;
    rc = collect(s, 0, &got, err, errlen);
    if (rc == BN_OK && !got && wait_s > 0 && bn_engine_inflight(s->eng, -1))
        rc = collect(s, wait_s, &got, err, errlen);
    return rc < 0 ? rc : BN_OK;
}

int bn_sched_inflight(const bn_sched_t *s)
{
    return bn_engine_inflight(s->eng, -1);
}

int bn_sched_pending(const bn_sched_t *s)
{
    return s->q_count + s->st.running;
}

int bn_sched_ready(const bn_sched_t *s)
{
    for (int k = 0; k < s->plan->R; k++) {
        if (bn_engine_room(s->eng, k) <= 0)
            continue;
        const replica_t *rp = &s->rep[k];
        if ((rp->n_release || rp->n_copy) && !bn_engine_inflight(s->eng, k))
            return 1;
        for (int i = 0; i < s->o.max_seqs; i++) {
            const req_t *r = rp->slot[i];
            if (r && (r->cancel ? !r->inflight
                                : (r->state == ST_DECODE && !r->waiting) ||
                                  (r->state == ST_PREFILL && r->fed < r->n_prompt &&
                                   (r->wait_slot < 0 || wait_state(s, rp, r) != 0))))
                return 1;
        }
    }
    return 0;
}

void bn_sched_stats(const bn_sched_t *s, bn_sched_stats_t *st)
{
    *st = s->st;
    st->queued = s->q_count;
    if (s->st.running)
        st->busy_s += bn_now_s() - s->busy_since;
    lat_pct(&s->ttft, &st->ttft_p50_ms, &st->ttft_p99_ms);
    lat_pct(&s->itl, &st->itl_p50_ms, &st->itl_p99_ms);
    uint64_t used = 0, reserved = 0;
    st->kv_bytes_cached = 0;
    for (int k = 0; k < s->plan->R; k++) {
        reserved += s->rep[k].reserved;
        st->kv_bytes_cached += s->rep[k].cached;
        for (int i = 0; i < s->o.max_seqs; i++)
            if (s->rep[k].slot[i])
                used += (uint64_t)s->rep[k].slot[i]->pos * s->o.kv_pos_bytes;
    }
    st->kv_bytes_in_use = used;
    st->kv_bytes_reserved = reserved;
}
