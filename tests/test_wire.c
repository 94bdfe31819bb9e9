/* test_wire.c - the wire codec (coordinator/net/wire.c) on its own, without a
 * socket: every refusal a client can provoke (status and a message naming the
 * field), random and truncated bytes, a full request decoded to the right
 * values, every reply packed and unpacked again; and the libFuzzer target
 * (tests/fuzz_wire.c): its seeds and saved crashes replayed in this build, and
 * bin-fuzz/fuzz-wire run for 20 s.
 * What it is not: the server's framing or its answers (test_serve.c). */
#include "test.h"

#ifndef BN_NO_NET
#include "coordinator/net/wire.h"
#include "proto/bitnet.pb-c.h"
#include "base/status.h"

#include <dirent.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size); /* tests/fuzz_wire.c */

#define FUZZ_SEEDS "tests/fuzz/wire"
#define FUZZ_CRASHES "tests/fuzz/crashes"

/* A valid generate request built in place (it points into itself): id "req-1",
 * prompt "Hello", an empty sampling message. Tests change fields, then pack. */
typedef struct {
    Bitnet__Request r;
    Bitnet__Generate g;
    Bitnet__Sampling s;
} gen_req_t;

static void gen_req_init(gen_req_t *q)
{
    *q = (gen_req_t){ BITNET__REQUEST__INIT, BITNET__GENERATE__INIT, BITNET__SAMPLING__INIT };
    q->r.has_version = 1;
    q->r.version = BN_PROTOCOL_VERSION;
    q->r.request_id = "req-1";
    q->r.body_case = BITNET__REQUEST__BODY_GENERATE;
    q->r.generate = &q->g;
    q->g.prompt = "Hello";
    q->g.sampling = &q->s;
}

static uint8_t *pack_req(const Bitnet__Request *r, size_t *n)
{
    *n = bitnet__request__get_packed_size(r);
    uint8_t *b = malloc(*n + 1);
    CHECK(b != NULL);
    CHECK_EQ_INT(bitnet__request__pack(r, b), *n);
    return b;
}

/* Pack r, decode it; the status (err filled) with out to be freed by the caller. */
static int decode_req(const Bitnet__Request *r, bn_wire_req_t *out, char *err, size_t errlen)
{
    size_t n;
    uint8_t *b = pack_req(r, &n);
    err[0] = 0;
    int rc = bn_wire_decode(b, n, out, err, errlen);
    free(b);
    return rc;
}

/* What every decode promises, whatever the bytes: a status of wire.h's list; on
 * a refusal a message; an id that is a string within its limit. */
static void check_contract(int line, int rc, const char *err, const bn_wire_req_t *out)
{
    if (rc != BN_OK && rc != BN_EPROTO && rc != BN_EUNSUPPORTED && rc != BN_EINVAL && rc != BN_ERANGE)
        BN_FAIL("line %d: status %d (%s) is not one bn_wire_decode gives", line, rc, bn_status_name(rc));
    if (rc != BN_OK && !err[0])
        BN_FAIL("line %d: %s without a message", line, bn_status_name(rc));
    if (rc == BN_OK && (out->kind < BN_MSG_GENERATE || out->kind > BN_MSG_STATS))
        BN_FAIL("line %d: BN_OK with kind %d", line, out->kind);
    if (!memchr(out->id, 0, sizeof out->id))
        BN_FAIL("line %d: the id is not NUL-terminated", line);
}

/* r is refused with `want` and a message that names `field` */
static void expect_refused(int line, const Bitnet__Request *r, int want, const char *field)
{
    bn_wire_req_t out;
    char err[256];
    int rc = decode_req(r, &out, err, sizeof err);
    check_contract(line, rc, err, &out);
    if (rc != want)
        BN_FAIL("line %d: status %s vs %s (message \"%s\")", line, bn_status_name(rc), bn_status_name(want), err);
    if (!strstr(err, field))
        BN_FAIL("line %d: message \"%s\" does not name \"%s\"", line, err, field);
    fprintf(stderr, "  refused: %s: %s\n", bn_status_name(rc), err);
    bn_wire_req_free(&out);
}
#define EXPECT_REFUSED(r, want, field) expect_refused(__LINE__, (r), (want), (field))

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void decode_bytes(int line, const uint8_t *b, size_t n, int *n_ok)
{
    bn_wire_req_t out;
    char err[256] = "";
    int rc = bn_wire_decode(b, n, &out, err, sizeof err);
    check_contract(line, rc, err, &out);
    *n_ok += rc == BN_OK;
    bn_wire_req_free(&out);
}

BN_TEST(wire_decode_bad_input)
{
    char s200[201], id129[130];
    memset(s200, 's', 200);
    s200[200] = 0;
    memset(id129, 'i', 129);
    id129[129] = 0;

    /* random bytes, and random changes to a valid request */
    uint64_t seed = bn_test_seed(), st = seed;
    gen_req_t full;
    gen_req_init(&full);
    char *stops[2] = { "\n\n", "END" };
    full.g.n_stop = 2;
    full.g.stop = stops;
    full.g.has_max_tokens = full.g.has_deadline_ms = full.g.has_ignore_eos = 1;
    full.g.max_tokens = 100;
    full.g.deadline_ms = 2000;
    full.g.ignore_eos = 1;
    full.s.has_temperature = full.s.has_top_k = full.s.has_top_p = full.s.has_min_p = full.s.has_seed = 1;
    full.s.temperature = 0.5f;
    full.s.top_k = 7;
    full.s.top_p = 0.9f;
    full.s.min_p = 0.1f;
    full.s.seed = 42;
    size_t n_full;
    uint8_t *packed = pack_req(&full.r, &n_full);
    uint8_t buf[512];
    int n_ok = 0, n_mut_ok = 0;
    for (int it = 0; it < 20000; it++) {
        size_t n = rng_next(&st) % 300;
        for (size_t i = 0; i < n; i++)
            buf[i] = (uint8_t)rng_next(&st);
        decode_bytes(__LINE__, buf, n, &n_ok);
    }
    for (int it = 0; it < 20000; it++) {
        memcpy(buf, packed, n_full);
        for (int k = 1 + (int)(rng_next(&st) % 4); k > 0; k--)
            buf[rng_next(&st) % n_full] = (uint8_t)rng_next(&st);
        decode_bytes(__LINE__, buf, n_full, &n_mut_ok);
    }
    fprintf(stderr, "  random bytes: %d of 20000 decoded; changed requests: %d of 20000 decoded\n", n_ok, n_mut_ok);

    /* every truncation: a field cut short does not unpack, and the body comes
     * last, so each prefix is refused */
    for (size_t n = 0; n < n_full; n++) {
        bn_wire_req_t out;
        char err[256] = "";
        int rc = bn_wire_decode(packed, n, &out, err, sizeof err);
        check_contract(__LINE__, rc, err, &out);
        if (rc != BN_EPROTO)
            BN_FAIL("prefix of %zu of %zu bytes: %s vs BN_EPROTO (\"%s\")", n, n_full, bn_status_name(rc), err);
        bn_wire_req_free(&out);
    }
    free(packed);

    /* the empty message: no version */
    {
        bn_wire_req_t out;
        char err[256] = "";
        CHECK_EQ_INT(bn_wire_decode("", 0, &out, err, sizeof err), BN_EPROTO);
        CHECK(strstr(err, "version") != NULL);
        bn_wire_req_free(&out);
    }
    /* lengths that claim more bytes than the frame has */
    {
        static const uint8_t long_id[] = { 0x08, 0x01, 0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 'a' };
        static const uint8_t long_tokens[] = { 0x08, 0x01, 0x12, 0x01, 'a', 0x1a, 0x06,
                                               0x12, 0xff, 0xff, 0xff, 0xff, 0x07 };
        static const uint8_t version_as_bytes[] = { 0x0a, 0x01, 0x01, 0x2a, 0x00 };
        int dummy = 0;
        bn_wire_req_t out;
        char err[256] = "";
        CHECK_EQ_INT(bn_wire_decode(long_id, sizeof long_id, &out, err, sizeof err), BN_EPROTO);
        CHECK(strstr(err, "9 bytes") != NULL);
        bn_wire_req_free(&out);
        CHECK_EQ_INT(bn_wire_decode(long_tokens, sizeof long_tokens, &out, err, sizeof err), BN_EPROTO);
        bn_wire_req_free(&out);
        CHECK_EQ_INT(bn_wire_decode(version_as_bytes, sizeof version_as_bytes, &out, err, sizeof err), BN_EPROTO);
        bn_wire_req_free(&out);
        decode_bytes(__LINE__, long_tokens, sizeof long_tokens, &dummy);
    }

    gen_req_t q;
    /* protocol version: another one, none */
    gen_req_init(&q);
    q.r.version = 2;
    EXPECT_REFUSED(&q.r, BN_EUNSUPPORTED, "version 2");
    {
        bn_wire_req_t out;
        char err[256];
        decode_req(&q.r, &out, err, sizeof err);
        CHECK_STR_EQ(out.id, "req-1"); /* the error reply can still name the request */
        bn_wire_req_free(&out);
    }
    gen_req_init(&q);
    q.r.has_version = 0;
    EXPECT_REFUSED(&q.r, BN_EPROTO, "version");
    /* no body */
    gen_req_init(&q);
    q.r.body_case = BITNET__REQUEST__BODY__NOT_SET;
    EXPECT_REFUSED(&q.r, BN_EPROTO, "body");
    /* prompt and tokens: both, neither; chat over tokens */
    int32_t toks[3] = { 1, 2, 3 };
    gen_req_init(&q);
    q.g.n_tokens = 3;
    q.g.tokens = toks;
    EXPECT_REFUSED(&q.r, BN_EINVAL, "prompt or tokens");
    gen_req_init(&q);
    q.g.prompt = NULL;
    EXPECT_REFUSED(&q.r, BN_EINVAL, "prompt or tokens");
    gen_req_init(&q);
    q.g.prompt = NULL;
    q.g.n_tokens = 3;
    q.g.tokens = toks;
    q.g.has_chat = q.g.chat = 1;
    EXPECT_REFUSED(&q.r, BN_EINVAL, "chat");
    /* generate and cancel need an id */
    gen_req_init(&q);
    q.r.request_id = NULL;
    EXPECT_REFUSED(&q.r, BN_EINVAL, "request_id");
    gen_req_init(&q);
    Bitnet__Cancel cancel = BITNET__CANCEL__INIT;
    q.r.body_case = BITNET__REQUEST__BODY_CANCEL;
    q.r.cancel = &cancel;
    q.r.request_id = "";
    EXPECT_REFUSED(&q.r, BN_EINVAL, "request_id");

    /* sampling out of range */
    const float bad_temps[] = { -1.0f, NAN, INFINITY, 100.5f };
    for (size_t i = 0; i < sizeof bad_temps / sizeof bad_temps[0]; i++) {
        gen_req_init(&q);
        q.s.has_temperature = 1;
        q.s.temperature = bad_temps[i];
        EXPECT_REFUSED(&q.r, BN_ERANGE, "temperature");
    }
    const float bad_top_p[] = { 0.0f, 1.5f, -0.5f, NAN };
    for (size_t i = 0; i < sizeof bad_top_p / sizeof bad_top_p[0]; i++) {
        gen_req_init(&q);
        q.s.has_top_p = 1;
        q.s.top_p = bad_top_p[i];
        EXPECT_REFUSED(&q.r, BN_ERANGE, "top_p");
    }
    const float bad_min_p[] = { 1.0f, -0.1f, NAN };
    for (size_t i = 0; i < sizeof bad_min_p / sizeof bad_min_p[0]; i++) {
        gen_req_init(&q);
        q.s.has_min_p = 1;
        q.s.min_p = bad_min_p[i];
        EXPECT_REFUSED(&q.r, BN_ERANGE, "min_p");
    }
    gen_req_init(&q);
    q.s.has_top_k = 1;
    q.s.top_k = -1;
    EXPECT_REFUSED(&q.r, BN_ERANGE, "top_k");

    /* stop strings: too many, too long, empty; the ones copied before a bad one
     * are freed (LeakSanitizer in make test SAN=1) */
    char *nine[9] = { "a", "b", "c", "d", "e", "f", "g", "h", "i" };
    gen_req_init(&q);
    q.g.n_stop = 9;
    q.g.stop = nine;
    EXPECT_REFUSED(&q.r, BN_ERANGE, "stop");
    char *long_stop[2] = { "ok", s200 };
    gen_req_init(&q);
    q.g.n_stop = 2;
    q.g.stop = long_stop;
    EXPECT_REFUSED(&q.r, BN_ERANGE, "stop string 1 has 200 bytes");
    char *empty_stop[1] = { "" };
    gen_req_init(&q);
    q.g.n_stop = 1;
    q.g.stop = empty_stop;
    EXPECT_REFUSED(&q.r, BN_ERANGE, "stop string 0");

    /* request_id over 128 bytes; max_tokens over 2^24 */
    gen_req_init(&q);
    q.r.request_id = id129;
    EXPECT_REFUSED(&q.r, BN_ERANGE, "request_id has 129 bytes");
    gen_req_init(&q);
    q.g.has_max_tokens = 1;
    q.g.max_tokens = (1u << 24) + 1;
    EXPECT_REFUSED(&q.r, BN_ERANGE, "max_tokens 16777217");
}

BN_TEST(wire_decode_good)
{
    bn_wire_req_t out;
    char err[256];

    /* every field of a prompt request */
    gen_req_t q;
    gen_req_init(&q);
    char *stops[2] = { "\n\n", "END" };
    q.g.prompt = "Hello, world";
    q.g.has_chat = q.g.chat = 1;
    q.g.n_stop = 2;
    q.g.stop = stops;
    q.g.has_max_tokens = q.g.has_deadline_ms = q.g.has_ignore_eos = 1;
    q.g.max_tokens = 100;
    q.g.deadline_ms = 1500;
    q.g.ignore_eos = 1;
    q.s.has_temperature = q.s.has_top_k = q.s.has_top_p = q.s.has_min_p = q.s.has_seed = 1;
    q.s.temperature = 0.5f;
    q.s.top_k = 7;
    q.s.top_p = 0.9f;
    q.s.min_p = 0.1f;
    q.s.seed = 0xfedcba9876543210ull;
    CHECK_EQ_INT(decode_req(&q.r, &out, err, sizeof err), BN_OK);
    CHECK_EQ_INT(out.kind, BN_MSG_GENERATE);
    CHECK_STR_EQ(out.id, "req-1");
    const bn_gen_params_t *p = &out.gen;
    CHECK(p->prompt != NULL);
    CHECK_STR_EQ(p->prompt, "Hello, world");
    CHECK_EQ_INT(p->prompt_len, 12);
    CHECK(p->tokens == NULL);
    CHECK_EQ_INT(p->n_tokens, 0);
    CHECK_EQ_INT(p->chat, 1);
    CHECK_EQ_INT(p->ignore_eos, 1);
    CHECK_NEAR(p->sp.temp, 0.5f, 0);
    CHECK_EQ_INT(p->sp.top_k, 7);
    CHECK_NEAR(p->sp.top_p, 0.9f, 0);
    CHECK_NEAR(p->sp.min_p, 0.1f, 0);
    CHECK(p->sp.seed == 0xfedcba9876543210ull);
    CHECK_EQ_INT(p->seed_given, 1);
    CHECK_EQ_INT(p->max_tokens, 100);
    CHECK_EQ_INT(p->deadline_ms, 1500);
    CHECK_EQ_INT(p->n_stop, 2);
    CHECK_STR_EQ(p->stop[0], "\n\n");
    CHECK_EQ_INT(p->stop_len[0], 2);
    CHECK_STR_EQ(p->stop[1], "END");
    CHECK_EQ_INT(p->stop_len[1], 3);
    CHECK_EQ_INT(p->replica, -1);
    CHECK(p->dump_logits == NULL);
    bn_wire_req_free(&out);

    /* tokens and nothing else: the defaults of bn_gen_params_init */
    int32_t toks[4] = { 128000, 0, -1, 2147483647 };
    gen_req_init(&q);
    q.g.prompt = NULL;
    q.g.n_tokens = 4;
    q.g.tokens = toks;
    q.g.sampling = NULL;
    CHECK_EQ_INT(decode_req(&q.r, &out, err, sizeof err), BN_OK);
    bn_gen_params_t def;
    bn_gen_params_init(&def);
    p = &out.gen;
    CHECK(p->prompt == NULL);
    CHECK_EQ_INT(p->n_tokens, 4);
    for (int i = 0; i < 4; i++)
        CHECK_EQ_INT(p->tokens[i], toks[i]);
    CHECK_EQ_INT(p->chat, 0);
    CHECK_EQ_INT(p->ignore_eos, 0);
    CHECK_NEAR(p->sp.temp, def.sp.temp, 0);
    CHECK_EQ_INT(p->sp.top_k, def.sp.top_k);
    CHECK_NEAR(p->sp.top_p, def.sp.top_p, 0);
    CHECK_NEAR(p->sp.min_p, def.sp.min_p, 0);
    CHECK_EQ_INT(p->seed_given, 0);
    CHECK_EQ_INT(p->max_tokens, def.max_tokens);
    CHECK_EQ_INT(p->deadline_ms, 0);
    CHECK_EQ_INT(p->n_stop, 0);
    bn_wire_req_free(&out);

    /* the edges that are still in range */
    char id128[129], s128[129];
    memset(id128, 'i', 128);
    id128[128] = 0;
    memset(s128, 's', 128);
    s128[128] = 0;
    char *eight[8] = { s128, s128, s128, s128, s128, s128, s128, "x" };
    gen_req_init(&q);
    q.r.request_id = id128;
    q.g.prompt = "";
    q.g.n_stop = 8;
    q.g.stop = eight;
    q.g.has_max_tokens = 1;
    q.g.max_tokens = 1u << 24;
    q.s.has_temperature = q.s.has_top_k = q.s.has_top_p = q.s.has_min_p = 1;
    q.s.temperature = 0;
    q.s.top_k = 0;
    q.s.top_p = 1;
    q.s.min_p = 0;
    int rc = decode_req(&q.r, &out, err, sizeof err);
    if (rc != BN_OK)
        BN_FAIL("edges: %s: %s", bn_status_name(rc), err);
    CHECK_EQ_INT(strlen(out.id), 128);
    CHECK_STR_EQ(out.gen.prompt, "");
    CHECK_EQ_INT(out.gen.n_stop, 8);
    CHECK_EQ_INT(out.gen.stop_len[0], 128);
    CHECK_EQ_INT(out.gen.max_tokens, 1u << 24);
    CHECK_NEAR(out.gen.sp.temp, 0, 0);
    CHECK_NEAR(out.gen.sp.top_p, 1, 0);
    bn_wire_req_free(&out);

    /* the other kinds; info, health and stats need no id */
    Bitnet__Request r = BITNET__REQUEST__INIT;
    Bitnet__Cancel c = BITNET__CANCEL__INIT;
    Bitnet__InfoRequest in = BITNET__INFO_REQUEST__INIT;
    Bitnet__HealthRequest h = BITNET__HEALTH_REQUEST__INIT;
    Bitnet__StatsRequest s = BITNET__STATS_REQUEST__INIT;
    r.has_version = 1;
    r.version = BN_PROTOCOL_VERSION;
    r.request_id = "c-7";
    r.body_case = BITNET__REQUEST__BODY_CANCEL;
    r.cancel = &c;
    CHECK_EQ_INT(decode_req(&r, &out, err, sizeof err), BN_OK);
    CHECK_EQ_INT(out.kind, BN_MSG_CANCEL);
    CHECK_STR_EQ(out.id, "c-7");
    bn_wire_req_free(&out);
    r.request_id = NULL;
    r.body_case = BITNET__REQUEST__BODY_INFO;
    r.info = &in;
    CHECK_EQ_INT(decode_req(&r, &out, err, sizeof err), BN_OK);
    CHECK_EQ_INT(out.kind, BN_MSG_INFO);
    CHECK_STR_EQ(out.id, "");
    bn_wire_req_free(&out);
    r.body_case = BITNET__REQUEST__BODY_HEALTH;
    r.health = &h;
    CHECK_EQ_INT(decode_req(&r, &out, err, sizeof err), BN_OK);
    CHECK_EQ_INT(out.kind, BN_MSG_HEALTH);
    bn_wire_req_free(&out);
    r.request_id = "s";
    r.body_case = BITNET__REQUEST__BODY_STATS;
    r.stats = &s;
    CHECK_EQ_INT(decode_req(&r, &out, err, sizeof err), BN_OK);
    CHECK_EQ_INT(out.kind, BN_MSG_STATS);
    CHECK_STR_EQ(out.id, "s");
    bn_wire_req_free(&out);

    /* a field this server does not know (a newer client) is skipped; of two
     * bodies the last one counts, as protobuf says for a oneof */
    {
        size_t n;
        gen_req_init(&q);
        uint8_t *b = pack_req(&q.r, &n);
        uint8_t *b2 = malloc(n + 8);
        memcpy(b2, b, n);
        static const uint8_t unknown[3] = { 0xf8, 0x06, 0x05 }; /* field 111, varint 5 */
        memcpy(b2 + n, unknown, 3);
        CHECK_EQ_INT(bn_wire_decode(b2, n + 3, &out, err, sizeof err), BN_OK);
        CHECK_EQ_INT(out.kind, BN_MSG_GENERATE);
        CHECK_STR_EQ(out.gen.prompt, "Hello");
        bn_wire_req_free(&out);
        static const uint8_t cancel_body[2] = { 0x22, 0x00 }; /* field 4 (cancel), empty */
        memcpy(b2 + n, cancel_body, 2);
        CHECK_EQ_INT(bn_wire_decode(b2, n + 2, &out, err, sizeof err), BN_OK);
        CHECK_EQ_INT(out.kind, BN_MSG_CANCEL);
        CHECK(out.gen.prompt == NULL);
        bn_wire_req_free(&out);
        free(b);
        free(b2);
    }

    /* replies, unpacked again */
    uint8_t *buf;
    size_t blen;
    Bitnet__Reply *y;
    const char text[4] = { 'h', 0, (char)0xc3, (char)0xa9 }; /* bytes: a NUL and a 2-byte character */
    const int32_t ids[3] = { 5, -2, 128009 };
    CHECK_EQ_INT(bn_wire_chunk("req-1", 7, text, sizeof text, ids, 3, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK(y->has_version);
    CHECK_EQ_INT(y->version, BN_PROTOCOL_VERSION);
    CHECK_STR_EQ(y->request_id, "req-1");
    CHECK_EQ_INT(y->body_case, BITNET__REPLY__BODY_CHUNK);
    CHECK(y->chunk->has_seq);
    CHECK_EQ_INT(y->chunk->seq, 7);
    CHECK(y->chunk->has_text);
    CHECK_EQ_INT(y->chunk->text.len, 4);
    CHECK(memcmp(y->chunk->text.data, text, 4) == 0);
    CHECK_EQ_INT(y->chunk->n_tokens, 3);
    for (int i = 0; i < 3; i++)
        CHECK_EQ_INT(y->chunk->tokens[i], ids[i]);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);
    CHECK_EQ_INT(bn_wire_chunk(NULL, 0, "", 0, NULL, 0, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_STR_EQ(y->request_id, "");
    CHECK_EQ_INT(y->chunk->text.len, 0);
    CHECK_EQ_INT(y->chunk->n_tokens, 0);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    bn_usage_t u = { .prompt_tokens = 11, .completion_tokens = 22, .ttft_ms = 1.25, .tokens_per_s = 33.5,
                     .total_ms = 444.75, .queue_ms = 0.5, .gen_s = 9, .seed = 0x123456789abcdefull };
    CHECK_EQ_INT(bn_wire_final("req-1", BN_FINISH_STOP, &u, "stop string 1", &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_EQ_INT(y->body_case, BITNET__REPLY__BODY_FINAL);
    CHECK_STR_EQ(y->request_id, "req-1");
    CHECK(y->final->has_finish_reason);
    CHECK_EQ_INT(y->final->finish_reason, BITNET__FINISH_REASON__FINISH_STOP);
    CHECK_STR_EQ(y->final->detail, "stop string 1");
    CHECK(y->final->has_seed && y->final->seed == u.seed);
    const Bitnet__Usage *us = y->final->usage;
    CHECK(us != NULL);
    CHECK_EQ_INT(us->prompt_tokens, 11);
    CHECK_EQ_INT(us->completion_tokens, 22);
    CHECK_NEAR(us->time_to_first_token_ms, 1.25, 0);
    CHECK_NEAR(us->tokens_per_s, 33.5, 0);
    CHECK_NEAR(us->total_ms, 444.75, 0);
    CHECK_NEAR(us->queue_ms, 0.5, 0);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);
    CHECK_EQ_INT(bn_wire_final("x", BN_FINISH_EOS, &u, NULL, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_EQ_INT(y->final->finish_reason, BITNET__FINISH_REASON__FINISH_EOS);
    CHECK_STR_EQ(y->final->detail, "");
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    CHECK_EQ_INT(bn_wire_error(id128, BN_ERANGE, "top_k -1 is negative", &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_EQ_INT(y->body_case, BITNET__REPLY__BODY_ERROR);
    CHECK_STR_EQ(y->request_id, id128);
    CHECK(y->error->has_code);
    CHECK_EQ_INT(y->error->code, BN_ERANGE);
    CHECK_STR_EQ(y->error->status, "BN_ERANGE");
    CHECK_STR_EQ(y->error->message, "top_k -1 is negative");
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);
    CHECK_EQ_INT(bn_wire_error(NULL, BN_EBUSY, NULL, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_STR_EQ(y->request_id, "");
    CHECK_EQ_INT(y->error->code, BN_EBUSY);
    CHECK_STR_EQ(y->error->status, "BN_EBUSY");
    CHECK_STR_EQ(y->error->message, bn_status_msg(BN_EBUSY));
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    bn_wire_info_t info = {
        .model = "m.gguf", .arch = "bitnet-b1.58", .plan = "tp 2 x pp 1", .kernels = "avx2", .lm_head = "q6",
        .kv_type = "f16", .n_layer = 1, .n_embd = 2, .n_vocab = 3, .n_ctx = 4, .ranks = 5, .replicas = 6,
        .stages = 7, .tensor_ranks = 8, .threads = 9, .max_seqs = 10, .max_queue = 11, .max_tokens = 12,
        .max_message_bytes = 13, .step_tokens = 14, .kv_budget_bytes = 1ull << 40,
    };
    CHECK_EQ_INT(bn_wire_info("i", &info, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_EQ_INT(y->body_case, BITNET__REPLY__BODY_INFO);
    const Bitnet__Info *yi = y->info;
    CHECK_EQ_INT(yi->protocol_version, BN_PROTOCOL_VERSION);
    CHECK_STR_EQ(yi->model, "m.gguf");
    CHECK_STR_EQ(yi->arch, "bitnet-b1.58");
    CHECK_STR_EQ(yi->plan, "tp 2 x pp 1");
    CHECK_STR_EQ(yi->kernels, "avx2");
    CHECK_STR_EQ(yi->lm_head, "q6");
    CHECK_STR_EQ(yi->kv_type, "f16");
    const uint32_t want_u[14] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14 };
    const uint32_t got_u[14] = { yi->n_layer, yi->n_embd, yi->n_vocab, yi->n_ctx, yi->ranks, yi->replicas,
                                 yi->stages, yi->tensor_ranks, yi->threads, yi->max_seqs, yi->max_queue,
                                 yi->max_tokens, yi->max_message_bytes, yi->step_tokens };
    for (int i = 0; i < 14; i++)
        CHECK_EQ_INT(got_u[i], want_u[i]);
    CHECK(yi->has_n_layer && yi->has_step_tokens && yi->has_kv_budget_bytes);
    CHECK(yi->kv_budget_bytes == 1ull << 40);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    CHECK_EQ_INT(bn_wire_health("h", 1, 0, 12.5, 3, 4, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_EQ_INT(y->body_case, BITNET__REPLY__BODY_HEALTH);
    CHECK(y->health->has_ok && y->health->has_draining);
    CHECK_EQ_INT(y->health->ok, 1);
    CHECK_EQ_INT(y->health->draining, 0);
    CHECK_NEAR(y->health->uptime_s, 12.5, 0);
    CHECK_EQ_INT(y->health->running, 3);
    CHECK_EQ_INT(y->health->queued, 4);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);

    bn_sched_stats_t st = { .served = 100, .rejected = 3, .cancelled = 2, .prompt_tokens = 5000,
                            .completion_tokens = 800, .steps = 900, .running = 4, .queued = 1, .busy_s = 16,
                            .ttft_p50_ms = 10, .ttft_p99_ms = 90, .itl_p50_ms = 20, .itl_p99_ms = 40,
                            .kv_bytes_in_use = 1u << 20, .kv_bytes_reserved = 1u << 21 };
    CHECK_EQ_INT(bn_wire_stats("s", &st, 60.5, 7, 1ull << 33, 12288, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_EQ_INT(y->body_case, BITNET__REPLY__BODY_STATS);
    const Bitnet__Stats *ys = y->stats;
    CHECK_EQ_INT(ys->requests_served, 100);
    CHECK_EQ_INT(ys->requests_rejected, 3);
    CHECK_EQ_INT(ys->requests_cancelled, 2);
    CHECK_EQ_INT(ys->running, 4);
    CHECK_EQ_INT(ys->queued, 1);
    CHECK_EQ_INT(ys->prompt_tokens, 5000);
    CHECK_EQ_INT(ys->completion_tokens, 800);
    CHECK(ys->has_kv_bytes_resident);
    CHECK_EQ_INT(ys->kv_bytes_resident, 12288);
    CHECK_NEAR(ys->tokens_per_s, 50, 0);
    CHECK_NEAR(ys->ttft_p50_ms, 10, 0);
    CHECK_NEAR(ys->ttft_p99_ms, 90, 0);
    CHECK_NEAR(ys->itl_p50_ms, 20, 0);
    CHECK_NEAR(ys->itl_p99_ms, 40, 0);
    CHECK_EQ_INT(ys->kv_bytes_in_use, 1u << 20);
    CHECK(ys->kv_bytes_budget == 1ull << 33);
    CHECK_EQ_INT(ys->steps, 900);
    CHECK_NEAR(ys->uptime_s, 60.5, 0);
    CHECK_EQ_INT(ys->bad_messages, 7);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);
    st.busy_s = 0; /* nothing ran yet: no division by zero */
    CHECK_EQ_INT(bn_wire_stats("s", &st, 0, 0, 0, 0, &buf, &blen), BN_OK);
    CHECK((y = bitnet__reply__unpack(NULL, blen, buf)) != NULL);
    CHECK_NEAR(y->stats->tokens_per_s, 0, 0);
    bitnet__reply__free_unpacked(y, NULL);
    free(buf);
}

/* every file of a folder through the fuzz target; the number of files */
static int replay_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "README.md") == 0)
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        size_t len = 0;
        char *b = bn_test_read_file(path, &len);
        if (!b)
            BN_FAIL("cannot read %s", path);
        fprintf(stderr, "  %s (%zu bytes)\n", path, len);
        LLVMFuzzerTestOneInput((const uint8_t *)b, len); /* aborts on a broken promise */
        free(b);
        n++;
    }
    closedir(d);
    return n;
}

/* The fuzz target's checks in this build (gcc; ASan and UBSan under SAN=1), no
 * clang needed: the seeds and every saved crash must pass. */
BN_TEST(wire_fuzz_replay)
{
    int n = replay_dir(FUZZ_SEEDS);
    if (n < 5)
        BN_FAIL("%d seeds in " FUZZ_SEEDS ", expected the 8 committed ones", n);
    int c = replay_dir(FUZZ_CRASHES);
    fprintf(stderr, "  %d seeds and %d saved crashes replayed\n", n, c);
}

/* bin-fuzz/fuzz-wire (make fuzz; BN_FUZZ_BIN overrides) for 20 s. New corpus
 * entries go to a temporary folder (libFuzzer writes only to the first corpus
 * folder it is given), so the tree stays clean; a crash is left there. */
BN_TEST(wire_fuzz)
{
    const char *fz = getenv("BN_FUZZ_BIN");
    if (!fz)
        fz = "bin-fuzz/fuzz-wire";
    if (access(fz, X_OK) != 0)
        BN_FAIL("%s missing: run make fuzz", fz);
    char dir[] = "/tmp/bn-fuzz-XXXXXX";
    if (!mkdtemp(dir))
        BN_FAIL("mkdtemp failed");
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "mkdir %s/corpus && timeout 200 %s -max_total_time=20 -rss_limit_mb=2048 -timeout=10 "
             "-print_final_stats=1 -dict=tests/fuzz/wire.dict -artifact_prefix=%s/ %s/corpus " FUZZ_SEEDS "%s",
             dir, fz, dir, dir, access(FUZZ_CRASHES, R_OK) == 0 ? " " FUZZ_CRASHES : "");
    fprintf(stderr, "  %s\n", cmd);
    char *out = NULL, *err = NULL;
    int rc = bn_test_run(cmd, &out, &err);
    const char *log = err ? err : "";
    if (rc != 0) {
        size_t len = strlen(log), lines = 0;
        const char *tail = log + len;
        while (tail > log && lines <= 60)
            if (*--tail == '\n')
                lines++;
        BN_FAIL("%s exited with %d; the input and corpus are kept in %s; the end of its output:\n%s", fz, rc, dir,
                tail);
    }
    const char *done = strstr(log, "DONE");
    const char *runs = strstr(log, "stat::number_of_executed_units:");
    fprintf(stderr, "  %.*s\n  %.*s\n", done ? (int)strcspn(done, "\n") : 0, done ? done : "",
            runs ? (int)strcspn(runs, "\n") : 0, runs ? runs : "");
    free(out);
    free(err);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    bn_test_run(cmd, NULL, NULL);
}
#else /* the cross build has no protobuf-c */
#define NO_NET(name) BN_TEST(name) { BN_FAIL("not built with protobuf-c (cross build)"); }
NO_NET(wire_decode_bad_input)
NO_NET(wire_decode_good)
NO_NET(wire_fuzz_replay)
NO_NET(wire_fuzz)
#endif
