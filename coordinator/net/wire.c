/* wire.c - protobuf-c to plain C and back, with every field checked; see wire.h. */
#include "coordinator/net/wire.h"

#include "proto/bitnet.pb-c.h"
#include "base/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void bn_wire_req_free(bn_wire_req_t *r)
{
    if (r)
        bn_gen_params_free(&r->gen);
}

static int decode_generate(const Bitnet__Generate *g, bn_gen_params_t *p, char *err, size_t errlen)
{
    const int has_text = g->prompt != NULL;
    if (has_text == (g->n_tokens > 0))
        return bn_err(err, errlen, BN_EINVAL, "generate: give either prompt or tokens (%s)",
                      has_text ? "both were given" : "neither was given");
    if (g->n_tokens > BN_WIRE_MAX_TOKENS)
        return bn_err(err, errlen, BN_ERANGE, "generate: %zu prompt tokens, at most %d", g->n_tokens, BN_WIRE_MAX_TOKENS);
    if (has_text) {
        p->prompt_len = strlen(g->prompt);
        if (!(p->prompt = malloc(p->prompt_len + 1)))
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        memcpy(p->prompt, g->prompt, p->prompt_len + 1);
    } else {
        if (!(p->tokens = malloc(g->n_tokens * sizeof *p->tokens)))
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        memcpy(p->tokens, g->tokens, g->n_tokens * sizeof *p->tokens);
        p->n_tokens = g->n_tokens;
    }
    p->chat = g->has_chat && g->chat;
    if (p->chat && !has_text)
        return bn_err(err, errlen, BN_EINVAL, "generate: chat needs a prompt text, not tokens");
    p->ignore_eos = g->has_ignore_eos && g->ignore_eos;
    if (g->has_max_tokens) {
        if (g->max_tokens > BN_MAX_TOKENS_LIMIT)
            return bn_err(err, errlen, BN_ERANGE, "generate: max_tokens %u is above %u", g->max_tokens,
                          BN_MAX_TOKENS_LIMIT);
        p->max_tokens = g->max_tokens;
    }
    if (g->has_deadline_ms)
        p->deadline_ms = g->deadline_ms;
    if (g->n_stop > BN_MAX_STOPS)
        return bn_err(err, errlen, BN_ERANGE, "generate: %zu stop strings, at most %d", g->n_stop, BN_MAX_STOPS);
    for (size_t i = 0; i < g->n_stop; i++) {
        size_t l = strlen(g->stop[i]);
        if (l == 0 || l > BN_MAX_STOP_LEN)
            return bn_err(err, errlen, BN_ERANGE, "generate: stop string %zu has %zu bytes (1..%d)", i, l,
                          BN_MAX_STOP_LEN);
        if (!(p->stop[i] = malloc(l + 1)))
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        memcpy(p->stop[i], g->stop[i], l + 1);
        p->stop_len[i] = l;
        p->n_stop = (int)i + 1;
    }
    const Bitnet__Sampling *s = g->sampling;
    if (s) {
        if (s->has_temperature) {
            if (!isfinite(s->temperature) || s->temperature < 0 || s->temperature > 100)
                return bn_err(err, errlen, BN_ERANGE, "sampling: temperature %g is not in [0, 100]", (double)s->temperature);
            p->sp.temp = s->temperature;
        }
        if (s->has_top_k) {
            if (s->top_k < 0)
                return bn_err(err, errlen, BN_ERANGE, "sampling: top_k %d is negative", s->top_k);
            p->sp.top_k = s->top_k;
        }
        if (s->has_top_p) {
            if (!(s->top_p > 0 && s->top_p <= 1))
                return bn_err(err, errlen, BN_ERANGE, "sampling: top_p %g is not in (0, 1]", (double)s->top_p);
            p->sp.top_p = s->top_p;
        }
        if (s->has_min_p) {
            if (!(s->min_p >= 0 && s->min_p < 1))
                return bn_err(err, errlen, BN_ERANGE, "sampling: min_p %g is not in [0, 1)", (double)s->min_p);
            p->sp.min_p = s->min_p;
        }
        if (s->has_seed) {
            p->sp.seed = s->seed;
            p->seed_given = 1;
        }
    }
    return BN_OK;
}

int bn_wire_decode(const void *buf, size_t len, bn_wire_req_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    bn_gen_params_init(&out->gen);
    Bitnet__Request *rq = bitnet__request__unpack(NULL, len, buf);
    if (!rq)
        return bn_err(err, errlen, BN_EPROTO, "a request of %zu bytes is not a valid bitnet.Request message", len);
    int rc = BN_OK;
    if (rq->request_id) {
        size_t l = strlen(rq->request_id);
        if (l > BN_WIRE_ID_MAX) {
            rc = bn_err(err, errlen, BN_ERANGE, "request_id has %zu bytes, at most %d", l, BN_WIRE_ID_MAX);
            goto done;
        }
        memcpy(out->id, rq->request_id, l + 1);
    }
    if (!rq->has_version) {
        rc = bn_err(err, errlen, BN_EPROTO, "the request has no protocol version (this server speaks %d)",
                    BN_PROTOCOL_VERSION);
        goto done;
    }
    if (rq->version != BN_PROTOCOL_VERSION) {
        rc = bn_err(err, errlen, BN_EUNSUPPORTED, "protocol version %u is not supported (this server speaks %d)",
                    rq->version, BN_PROTOCOL_VERSION);
        goto done;
    }
    switch (rq->body_case) {
    case BITNET__REQUEST__BODY_GENERATE:
        out->kind = BN_MSG_GENERATE;
        rc = decode_generate(rq->generate, &out->gen, err, errlen);
        break;
    case BITNET__REQUEST__BODY_CANCEL: out->kind = BN_MSG_CANCEL; break;
    case BITNET__REQUEST__BODY_INFO: out->kind = BN_MSG_INFO; break;
    case BITNET__REQUEST__BODY_HEALTH: out->kind = BN_MSG_HEALTH; break;
    case BITNET__REQUEST__BODY_STATS: out->kind = BN_MSG_STATS; break;
    default:
        rc = bn_err(err, errlen, BN_EPROTO, "the request has no body (generate, cancel, info, health or stats)");
    }
    if (rc == BN_OK && (out->kind == BN_MSG_GENERATE || out->kind == BN_MSG_CANCEL) && !out->id[0])
        rc = bn_err(err, errlen, BN_EINVAL, "%s needs a request_id", out->kind == BN_MSG_CANCEL ? "cancel" : "generate");
done:
    bitnet__request__free_unpacked(rq, NULL);
    return rc;
}

/* pack a reply with id and the version */
static int pack(Bitnet__Reply *r, const char *id, uint8_t **buf, size_t *blen)
{
    r->has_version = 1;
    r->version = BN_PROTOCOL_VERSION;
    r->request_id = (char *)(id ? id : "");
    size_t n = bitnet__reply__get_packed_size(r);
    *buf = malloc(n ? n : 1);
    if (!*buf)
        return BN_ENOMEM;
    *blen = bitnet__reply__pack(r, *buf);
    return BN_OK;
}

int bn_wire_chunk(const char *id, uint32_t seq, const char *text, size_t len, const int32_t *ids, int n_ids,
                  uint8_t **buf, size_t *blen)
{
    Bitnet__Reply r = BITNET__REPLY__INIT;
    Bitnet__TokenChunk c = BITNET__TOKEN_CHUNK__INIT;
    c.has_text = 1;
    c.text.data = (uint8_t *)text;
    c.text.len = len;
    c.n_tokens = (size_t)n_ids;
    c.tokens = (int32_t *)ids;
    c.has_seq = 1;
    c.seq = seq;
    r.body_case = BITNET__REPLY__BODY_CHUNK;
    r.chunk = &c;
    return pack(&r, id, buf, blen);
}

int bn_wire_final(const char *id, int finish, const bn_usage_t *u, const char *detail, uint8_t **buf, size_t *blen)
{
    Bitnet__Reply r = BITNET__REPLY__INIT;
    Bitnet__Final f = BITNET__FINAL__INIT;
    Bitnet__Usage us = BITNET__USAGE__INIT;
    us.has_prompt_tokens = us.has_completion_tokens = us.has_time_to_first_token_ms = 1;
    us.has_tokens_per_s = us.has_total_ms = us.has_queue_ms = 1;
    us.prompt_tokens = u->prompt_tokens;
    us.completion_tokens = u->completion_tokens;
    us.time_to_first_token_ms = u->ttft_ms;
    us.tokens_per_s = u->tokens_per_s;
    us.total_ms = u->total_ms;
    us.queue_ms = u->queue_ms;
    f.has_finish_reason = 1;
    f.finish_reason = (Bitnet__FinishReason)finish;
    f.usage = &us;
    f.has_seed = 1;
    f.seed = u->seed;
    f.detail = (char *)(detail ? detail : "");
    r.body_case = BITNET__REPLY__BODY_FINAL;
    r.final = &f;
    return pack(&r, id, buf, blen);
}

int bn_wire_error(const char *id, int status, const char *msg, uint8_t **buf, size_t *blen)
{
    Bitnet__Reply r = BITNET__REPLY__INIT;
    Bitnet__Error e = BITNET__ERROR__INIT;
    e.has_code = 1;
    e.code = status;
    e.status = (char *)bn_status_name(status);
    e.message = (char *)(msg ? msg : bn_status_msg(status));
    r.body_case = BITNET__REPLY__BODY_ERROR;
    r.error = &e;
    return pack(&r, id, buf, blen);
}

int bn_wire_info(const char *id, const bn_wire_info_t *in, uint8_t **buf, size_t *blen)
{
    Bitnet__Reply r = BITNET__REPLY__INIT;
    Bitnet__Info i = BITNET__INFO__INIT;
#define U(f, v) (i.has_##f = 1, i.f = (v))
    U(protocol_version, BN_PROTOCOL_VERSION);
    i.model = (char *)in->model;
    i.arch = (char *)in->arch;
    i.plan = (char *)in->plan;
    i.kernels = (char *)in->kernels;
    i.lm_head = (char *)in->lm_head;
    i.kv_type = (char *)in->kv_type;
    U(n_layer, in->n_layer);
    U(n_embd, in->n_embd);
    U(n_vocab, in->n_vocab);
    U(n_ctx, in->n_ctx);
    U(ranks, in->ranks);
    U(replicas, in->replicas);
    U(stages, in->stages);
    U(tensor_ranks, in->tensor_ranks);
    U(threads, in->threads);
    U(max_seqs, in->max_seqs);
    U(max_queue, in->max_queue);
    U(max_tokens, in->max_tokens);
    U(max_message_bytes, in->max_message_bytes);
    U(kv_budget_bytes, in->kv_budget_bytes);
    U(step_tokens, in->step_tokens);
#undef U
    r.body_case = BITNET__REPLY__BODY_INFO;
    r.info = &i;
    return pack(&r, id, buf, blen);
}

int bn_wire_health(const char *id, int ok, int draining, double uptime_s, uint32_t running, uint32_t queued,
                   uint8_t **buf, size_t *blen)
{
    Bitnet__Reply r = BITNET__REPLY__INIT;
    Bitnet__Health h = BITNET__HEALTH__INIT;
    h.has_ok = h.has_draining = h.has_uptime_s = h.has_running = h.has_queued = 1;
    h.ok = ok;
    h.draining = draining;
    h.uptime_s = uptime_s;
    h.running = running;
    h.queued = queued;
    r.body_case = BITNET__REPLY__BODY_HEALTH;
    r.health = &h;
    return pack(&r, id, buf, blen);
}

int bn_wire_stats(const char *id, const bn_sched_stats_t *st, double uptime_s, uint64_t bad_messages, uint64_t budget,
                  uint64_t kv_resident, uint8_t **buf, size_t *blen)
{
    Bitnet__Reply r = BITNET__REPLY__INIT;
    Bitnet__Stats s = BITNET__STATS__INIT;
#define S(f, v) (s.has_##f = 1, s.f = (v))
    S(requests_served, st->served);
    S(requests_rejected, st->rejected);
    S(requests_cancelled, st->cancelled);
    S(running, (uint32_t)st->running);
    S(queued, (uint32_t)st->queued);
    S(prompt_tokens, st->prompt_tokens);
    S(completion_tokens, st->completion_tokens);
    S(tokens_per_s, st->busy_s > 0 ? st->completion_tokens / st->busy_s : 0);
    S(ttft_p50_ms, st->ttft_p50_ms);
    S(ttft_p99_ms, st->ttft_p99_ms);
    S(itl_p50_ms, st->itl_p50_ms);
    S(itl_p99_ms, st->itl_p99_ms);
    S(kv_bytes_in_use, st->kv_bytes_in_use);
    S(kv_bytes_budget, budget);
    S(steps, st->steps);
    S(uptime_s, uptime_s);
    S(bad_messages, bad_messages);
    S(kv_bytes_resident, kv_resident);
    S(kv_bytes_cached, st->kv_bytes_cached);
    S(prefix_hits, st->prefix_hits);
    S(prefix_tokens, st->prefix_tokens);
#undef S
    r.body_case = BITNET__REPLY__BODY_STATS;
    r.stats = &s;
    return pack(&r, id, buf, blen);
}
