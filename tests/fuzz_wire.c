/* fuzz_wire.c - a libFuzzer target for the wire decoder (coordinator/net/wire.c).
 *
 * What it is: each input is decoded twice. First as the bytes of a frame:
 * bn_wire_decode's promises (wire.h) are checked against protobuf-c's own
 * unpacking of the same bytes. Then as a recipe for a request (which fields,
 * which values, how long each string), packed and decoded knowing whether
 * wire.c's limits must accept or refuse it; random bytes alone seldom make a
 * 129-byte id with its length in front. Each decode also packs error, chunk and
 * final replies with the decoded id and the input bytes and unpacks them again.
 * A broken promise prints which one and aborts, so libFuzzer keeps the input.
 * `make fuzz` builds it with clang, ASan and UBSan into bin-fuzz/fuzz-wire; gcc
 * also links it into bin/bitnet-tests, where wire_fuzz_replay runs the seed
 * corpus (tests/fuzz/wire/) and saved crashes (tests/fuzz/crashes/) through it.
 * What it is not: a test of the server's socket (test_serve.c), nor of
 * protobuf-c's parser, the system library, which is not instrumented (neither
 * its coverage nor its reads are seen, only its faults).
 * Invariant: no state is kept between inputs. */
#ifndef BN_NO_NET
#include "coordinator/net/wire.h"
#include "proto/bitnet.pb-c.h"
#include "base/status.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void broken(int line, const char *what)
{
    fprintf(stderr, "fuzz_wire.c:%d: broken promise: %s\n", line, what);
    abort();
}
#define REQUIRE(cond) do { if (!(cond)) broken(__LINE__, #cond); } while (0)

static int same_str(const char *a, const char *b)
{
    return strcmp(a ? a : "", b ? b : "") == 0;
}

/* What BN_OK promises: a known kind, fields within wire.c's limits, and the
 * values protobuf-c read from the same bytes (or the defaults when not sent). */
static void check_ok(const bn_wire_req_t *r, const Bitnet__Request *rq)
{
    REQUIRE(rq != NULL);
    REQUIRE(rq->has_version && rq->version == BN_PROTOCOL_VERSION);
    REQUIRE(memchr(r->id, 0, sizeof r->id) != NULL && strlen(r->id) <= BN_WIRE_ID_MAX);
    REQUIRE(same_str(r->id, rq->request_id));
    static const int body_of[] = {
        [BN_MSG_GENERATE] = BITNET__REQUEST__BODY_GENERATE, [BN_MSG_CANCEL] = BITNET__REQUEST__BODY_CANCEL,
        [BN_MSG_INFO] = BITNET__REQUEST__BODY_INFO, [BN_MSG_HEALTH] = BITNET__REQUEST__BODY_HEALTH,
        [BN_MSG_STATS] = BITNET__REQUEST__BODY_STATS,
    };
    REQUIRE(r->kind >= BN_MSG_GENERATE && r->kind <= BN_MSG_STATS);
    REQUIRE((int)rq->body_case == body_of[r->kind]);
    if (r->kind == BN_MSG_GENERATE || r->kind == BN_MSG_CANCEL)
        REQUIRE(r->id[0] != 0);
    const bn_gen_params_t *p = &r->gen;
    if (r->kind != BN_MSG_GENERATE) {
        REQUIRE(p->prompt == NULL && p->tokens == NULL && p->n_tokens == 0 && p->n_stop == 0);
        return;
    }
    const Bitnet__Generate *g = rq->generate;
    REQUIRE(g != NULL);
    REQUIRE((p->prompt != NULL) != (p->n_tokens > 0));
    if (p->prompt) {
        REQUIRE(p->prompt_len == strlen(p->prompt));
        REQUIRE(same_str(p->prompt, g->prompt));
    } else {
        REQUIRE(p->tokens != NULL && p->n_tokens <= BN_WIRE_MAX_TOKENS);
        REQUIRE(p->n_tokens == g->n_tokens && memcmp(p->tokens, g->tokens, p->n_tokens * sizeof *p->tokens) == 0);
    }
    REQUIRE(p->chat == (g->has_chat && g->chat));
    REQUIRE(!p->chat || p->prompt != NULL);
    REQUIRE(p->ignore_eos == (g->has_ignore_eos && g->ignore_eos));
    REQUIRE(p->max_tokens <= BN_MAX_TOKENS_LIMIT);
    REQUIRE(p->max_tokens == (g->has_max_tokens ? g->max_tokens : 64));
    REQUIRE(p->deadline_ms == (g->has_deadline_ms ? g->deadline_ms : 0));
    REQUIRE(p->n_stop >= 0 && p->n_stop <= BN_MAX_STOPS && (size_t)p->n_stop == g->n_stop);
    for (int i = 0; i < p->n_stop; i++) {
        REQUIRE(p->stop[i] != NULL && p->stop_len[i] == strlen(p->stop[i]));
        REQUIRE(p->stop_len[i] >= 1 && p->stop_len[i] <= BN_MAX_STOP_LEN);
        REQUIRE(same_str(p->stop[i], g->stop[i]));
    }
    REQUIRE(isfinite(p->sp.temp) && p->sp.temp >= 0 && p->sp.temp <= 100);
    REQUIRE(p->sp.top_k >= 0);
    REQUIRE(p->sp.top_p > 0 && p->sp.top_p <= 1);
    REQUIRE(p->sp.min_p >= 0 && p->sp.min_p < 1);
    const Bitnet__Sampling *s = g->sampling;
    REQUIRE(p->seed_given == (s && s->has_seed));
    if (s && s->has_temperature)
        REQUIRE(p->sp.temp == s->temperature);
    if (s && s->has_top_k)
        REQUIRE(p->sp.top_k == s->top_k);
    if (s && s->has_top_p)
        REQUIRE(p->sp.top_p == s->top_p);
    if (s && s->has_min_p)
        REQUIRE(p->sp.min_p == s->min_p);
    if (s && s->has_seed)
        REQUIRE(p->sp.seed == s->seed);
}

/* What a refusal promises: a status of wire.h's list, a message, an id that
 * is a string within its limit. */
static void check_refused(int rc, const char *err, size_t errlen, const bn_wire_req_t *r, const Bitnet__Request *rq)
{
    REQUIRE(rc == BN_EPROTO || rc == BN_EUNSUPPORTED || rc == BN_EINVAL || rc == BN_ERANGE || rc == BN_ENOMEM);
    REQUIRE(memchr(err, 0, errlen) != NULL && err[0] != 0);
    REQUIRE(memchr(r->id, 0, sizeof r->id) != NULL && strlen(r->id) <= BN_WIRE_ID_MAX);
    if (!rq)
        REQUIRE(rc == BN_EPROTO);
}

static Bitnet__Reply *unpack_reply(const uint8_t *buf, size_t len, const char *id, int body)
{
    Bitnet__Reply *y = bitnet__reply__unpack(NULL, len, buf);
    REQUIRE(y != NULL);
    REQUIRE(y->has_version && y->version == BN_PROTOCOL_VERSION);
    REQUIRE(same_str(y->request_id, id));
    REQUIRE((int)y->body_case == body);
    return y;
}

/* error, chunk and final replies with the decoded id and the input's bytes */
static void check_replies(const bn_wire_req_t *r, int rc, const char *err, const uint8_t *data, size_t size)
{
    uint8_t *buf = NULL;
    size_t blen = 0;
    const char *msg = rc ? err : NULL;
    REQUIRE(bn_wire_error(r->id, rc, msg, &buf, &blen) == BN_OK);
    Bitnet__Reply *y = unpack_reply(buf, blen, r->id, BITNET__REPLY__BODY_ERROR);
    REQUIRE(y->error->has_code && y->error->code == rc);
    REQUIRE(same_str(y->error->status, bn_status_name(rc)));
    REQUIRE(same_str(y->error->message, msg ? msg : bn_status_msg(rc)));
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    const int32_t *ids = r->gen.tokens;
    int n_ids = (int)r->gen.n_tokens;
    REQUIRE(bn_wire_chunk(r->id, (uint32_t)size, (const char *)data, size, ids, n_ids, &buf, &blen) == BN_OK);
    y = unpack_reply(buf, blen, r->id, BITNET__REPLY__BODY_CHUNK);
    const Bitnet__TokenChunk *c = y->chunk;
    REQUIRE(c->has_seq && c->seq == (uint32_t)size);
    REQUIRE(c->has_text && c->text.len == size && (size == 0 || memcmp(c->text.data, data, size) == 0));
    REQUIRE(c->n_tokens == (size_t)n_ids && (n_ids == 0 || memcmp(c->tokens, ids, (size_t)n_ids * sizeof *ids) == 0));
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    /* the input as a detail string: up to its first NUL */
    char *detail = malloc(size + 1);
    REQUIRE(detail != NULL);
    if (size)
        memcpy(detail, data, size);
    detail[size] = 0;
    bn_usage_t u = { .prompt_tokens = (uint32_t)r->gen.n_tokens, .completion_tokens = (uint32_t)size,
                     .ttft_ms = 1.5, .tokens_per_s = 2.5, .total_ms = 3.5, .queue_ms = 0.5, .seed = r->gen.sp.seed };
    int finish = size ? data[0] % 6 : BN_FINISH_NONE;
    REQUIRE(bn_wire_final(r->id, finish, &u, detail, &buf, &blen) == BN_OK);
    y = unpack_reply(buf, blen, r->id, BITNET__REPLY__BODY_FINAL);
    const Bitnet__Final *f = y->final;
    REQUIRE(f->has_finish_reason && (int)f->finish_reason == finish);
    REQUIRE(f->has_seed && f->seed == u.seed);
    REQUIRE(same_str(f->detail, detail));
    REQUIRE(f->usage && f->usage->prompt_tokens == u.prompt_tokens && f->usage->completion_tokens == u.completion_tokens);
    REQUIRE(f->usage->total_ms == u.total_ms && f->usage->queue_ms == u.queue_ms);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);
    free(detail);
}

/* Decode bytes and check every promise; `valid` is 1 or 0 when the caller knows
 * whether the request must be accepted, -1 when not. */
static void decode_and_check(const uint8_t *data, size_t size, int valid)
{
    bn_wire_req_t r;
    char err[256];
    memset(err, 'x', sizeof err); /* so a message without its NUL shows */
    int rc = bn_wire_decode(data, size, &r, err, sizeof err);
    Bitnet__Request *rq = bitnet__request__unpack(NULL, size, data);
    if (rc == BN_OK)
        check_ok(&r, rq);
    else
        check_refused(rc, err, sizeof err, &r, rq);
    if (valid >= 0 && (rc == BN_OK) != valid) {
        fprintf(stderr, "fuzz_wire.c: a request %s was %s (%s: %s)\n", valid ? "within every limit" : "over a limit",
                rc == BN_OK ? "accepted" : "refused", bn_status_name(rc), rc == BN_OK ? "" : err);
        abort();
    }
    check_replies(&r, rc, err, data, size);
    if (rq)
        bitnet__request__free_unpacked(rq, NULL);
    bn_wire_req_free(&r);
}

/* The input read as a recipe for a request: flags, then values, each picked by
 * one byte from the values at wire.c's limits or taken raw. Bytes past the end
 * read as 0. */
typedef struct {
    const uint8_t *p;
    size_t n;
} src_t;

static unsigned next8(src_t *s)
{
    if (!s->n)
        return 0;
    s->n--;
    return *s->p++;
}

static uint32_t next32(src_t *s)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = v << 8 | next8(s);
    return v;
}

static float pick_float(src_t *s)
{
    static const float edge[] = { 0.0f, 1.0f, 0.5f, 1.5f, -1.0f, 100.0f, 100.5f, -0.0f, 1e-30f, NAN, INFINITY, -INFINITY };
    unsigned k = next8(s);
    if (k < sizeof edge / sizeof edge[0])
        return edge[k];
    uint32_t b = next32(s);
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static uint32_t pick_u32(src_t *s)
{
    static const uint32_t edge[] = { 1, 0, 2, 64, 1u << 24, (1u << 24) + 1, UINT32_MAX, 1u << 31 };
    unsigned k = next8(s);
    return k < sizeof edge / sizeof edge[0] ? edge[k] : next32(s);
}

static size_t pick_len(src_t *s)
{
    static const size_t edge[] = { 1, 0, 127, 128, 129, 200, 1000 };
    unsigned k = next8(s);
    return k < sizeof edge / sizeof edge[0] ? edge[k] : k;
}

/* a string of n bytes, none of them NUL */
static char *make_str(size_t n, char c)
{
    char *t = malloc(n + 1);
    REQUIRE(t != NULL);
    memset(t, c, n);
    t[n] = 0;
    return t;
}

enum { F_VERSION = 1 << 0, F_ID = 1 << 1, F_PROMPT = 1 << 2, F_CHAT = 1 << 3, F_SAMPLING = 1 << 4,
       F_MAX_TOKENS = 1 << 5, F_DEADLINE = 1 << 6, F_IGNORE_EOS = 1 << 7, F_TEMP = 1 << 8, F_TOP_K = 1 << 9,
       F_TOP_P = 1 << 10, F_MIN_P = 1 << 11, F_SEED = 1 << 12, F_CHAT_ON = 1 << 13 };

/* Build the request the recipe says, pack it, and decode it knowing whether
 * wire.h's limits accept it. */
static void recipe(const uint8_t *data, size_t size)
{
    src_t s = { data, size };
    unsigned f = next8(&s);
    f = ~(f | next8(&s) << 8); /* no input: every field present */
    Bitnet__Request rq = BITNET__REQUEST__INIT;
    Bitnet__Generate g = BITNET__GENERATE__INIT;
    Bitnet__Sampling sp = BITNET__SAMPLING__INIT;
    Bitnet__Cancel c = BITNET__CANCEL__INIT;
    Bitnet__InfoRequest in = BITNET__INFO_REQUEST__INIT;
    Bitnet__HealthRequest h = BITNET__HEALTH_REQUEST__INIT;
    Bitnet__StatsRequest st = BITNET__STATS_REQUEST__INIT;
    rq.has_version = !!(f & F_VERSION);
    rq.version = pick_u32(&s);
    size_t id_len = pick_len(&s);
    if (f & F_ID)
        rq.request_id = make_str(id_len, 'i');
    int valid = rq.has_version && rq.version == BN_PROTOCOL_VERSION && (!rq.request_id || id_len <= BN_WIRE_ID_MAX);
    const int has_id = rq.request_id && id_len > 0;
    char *stop[12] = { 0 };
    int32_t toks[4] = { 0, 128000, -1, INT32_MAX };
    switch (next8(&s) % 6) {
    case 0:
        rq.body_case = BITNET__REQUEST__BODY_GENERATE;
        rq.generate = &g;
        valid = valid && has_id;
        if (f & F_PROMPT)
            g.prompt = make_str(pick_len(&s), 'p');
        g.n_tokens = next8(&s) % 5;
        g.tokens = toks;
        valid = valid && (g.prompt != NULL) != (g.n_tokens > 0);
        g.has_chat = !!(f & F_CHAT);
        g.chat = !!(f & F_CHAT_ON);
        valid = valid && !(g.has_chat && g.chat && !g.prompt);
        g.has_max_tokens = !!(f & F_MAX_TOKENS);
        g.max_tokens = pick_u32(&s);
        valid = valid && (!g.has_max_tokens || g.max_tokens <= BN_MAX_TOKENS_LIMIT);
        g.has_deadline_ms = !!(f & F_DEADLINE);
        g.deadline_ms = pick_u32(&s);
        g.has_ignore_eos = g.ignore_eos = !!(f & F_IGNORE_EOS);
        g.n_stop = next8(&s) % 12;
        g.stop = stop;
        valid = valid && g.n_stop <= BN_MAX_STOPS;
        for (size_t i = 0; i < g.n_stop; i++) {
            size_t l = pick_len(&s);
            stop[i] = make_str(l, (char)('a' + i));
            valid = valid && l >= 1 && l <= BN_MAX_STOP_LEN;
        }
        if (f & F_SAMPLING) {
            g.sampling = &sp;
            sp.has_temperature = !!(f & F_TEMP);
            sp.temperature = pick_float(&s);
            valid = valid && (!sp.has_temperature || (sp.temperature >= 0 && sp.temperature <= 100));
            sp.has_top_k = !!(f & F_TOP_K);
            sp.top_k = (int32_t)pick_u32(&s);
            valid = valid && (!sp.has_top_k || sp.top_k >= 0);
            sp.has_top_p = !!(f & F_TOP_P);
            sp.top_p = pick_float(&s);
            valid = valid && (!sp.has_top_p || (sp.top_p > 0 && sp.top_p <= 1));
            sp.has_min_p = !!(f & F_MIN_P);
            sp.min_p = pick_float(&s);
            valid = valid && (!sp.has_min_p || (sp.min_p >= 0 && sp.min_p < 1));
            sp.has_seed = !!(f & F_SEED);
            sp.seed = next32(&s);
            sp.seed = sp.seed << 32 | next32(&s);
        }
        break;
    case 1: rq.body_case = BITNET__REQUEST__BODY_CANCEL; rq.cancel = &c; valid = valid && has_id; break;
    case 2: rq.body_case = BITNET__REQUEST__BODY_INFO; rq.info = &in; break;
    case 3: rq.body_case = BITNET__REQUEST__BODY_HEALTH; rq.health = &h; break;
    case 4: rq.body_case = BITNET__REQUEST__BODY_STATS; rq.stats = &st; break;
    default: valid = 0; /* no body */
    }
    size_t n = bitnet__request__get_packed_size(&rq);
    uint8_t *buf = malloc(n ? n : 1);
    REQUIRE(buf != NULL);
    REQUIRE(bitnet__request__pack(&rq, buf) == n);
    decode_and_check(buf, n, valid);
    free(buf);
    free(rq.request_id);
    free(g.prompt);
    for (size_t i = 0; i < g.n_stop; i++)
        free(stop[i]);
}

/* Every input twice: as the bytes of a frame, and as a recipe. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    decode_and_check(data, size, -1);
    recipe(data, size);
    return 0;
}
#else
typedef int bn_fuzz_wire_not_built; /* the cross build has no protobuf-c */
#endif
