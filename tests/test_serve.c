/* test_serve.c - bitnet-worker --serve as users meet it: real servers (one
 * process and under mpirun on loopback), real bitnet-client processes on an
 * ephemeral port, and a raw ZeroMQ client for bytes no well-behaved client
 * sends. Each test starts its own server and ends it with SIGTERM.
 *
 * What is compared: a served answer with `bitnet-worker --prompt` run alone on
 * the same flags, byte for byte (greedy and seeded): the scheduler batches
 * sequences together, and the forward pass is batch-invariant (test_batch.c),
 * so load must not change any token. */
#include "test.h"

#ifndef BN_NO_NET
#include "tests/server.h"
#include "coordinator/net/wire.h"
#include "proto/bitnet.pb-c.h"
#include "base/status.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define I2S "tests/fixtures/tiny-b158-i2_s.gguf"

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int client(const server_t *s, const char *args, char **out, char **err)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --server %s --timeout 60 %s", bin_dir(), s->ep, args);
    return bn_test_run(cmd, out, err);
}

/* the same request run alone by bitnet-worker --prompt */
static char *alone(const char *args)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s/bitnet-worker --model " I2S " --log-level warn %s", bin_dir(), args);
    if (bn_test_run(cmd, &out, NULL) != 0)
        BN_FAIL("bitnet-worker %s failed", args);
    return out;
}

/* 32 clients at once, half greedy, half seeded; each gets the answer it gets alone */
static void concurrent(const server_t *s, int n_clients)
{
    static char args[64][256];
    static char *want[64]; /* the answers alone, made once for every server */
    for (int i = 0; i < n_clients && !want[i]; i++) {
        if (i % 2)
            snprintf(args[i], sizeof args[i], "-n 24 --temp 0.9 --seed %d --prompt 'stream %d of the test, seeded'",
                     100 + i, i);
        else
            snprintf(args[i], sizeof args[i], "-n %d --temp 0 --prompt 'A system prompt that every even stream shares, "
                     "so the server computes it once: be brief, be kind, be exact. Stream %d: the quick brown fox'",
                     8 + i, i);
        want[i] = alone(args[i]);
    }
    char dir[64], cmd[8192];
    snprintf(dir, sizeof dir, "/tmp/bn-cc-%d", (int)getpid());
    mkdir(dir, 0755);
    size_t l = 0;
    for (int i = 0; i < n_clients; i++) /* all at once, as separate processes */
        l += (size_t)snprintf(cmd + l, sizeof cmd - l, "%s/bitnet-client --server %s --timeout 120 %s >%s/%d.out 2>%s/%d.err & ",
                              bin_dir(), s->ep, args[i], dir, i, dir, i);
    snprintf(cmd + l, sizeof cmd - l, "wait");
    CHECK_EQ_INT(bn_test_run(cmd, NULL, NULL), 0);
    int same = 0;
    for (int i = 0; i < n_clients; i++) {
        char p[128];
        snprintf(p, sizeof p, "%s/%d.out", dir, i);
        char *got = bn_test_read_file(p, NULL);
        if (got && !strcmp(got, want[i]))
            same++;
        else
            fprintf(stderr, "  stream %d: served \"%s\" vs alone \"%s\"\n", i, got ? got : "(none)", want[i]);
        free(got);
        unlink(p);
        snprintf(p, sizeof p, "%s/%d.err", dir, i);
        unlink(p);
    }
    rmdir(dir);
    fprintf(stderr, "  %d of %d concurrent streams equal their answers alone\n", same, n_clients);
    CHECK_EQ_INT(same, n_clients);
}

/* 32 streams at once on 1 rank, --tp 2, --pp 2 and --replicas 3; the even
 * ones share a long start (prefix reuse while they run) */
BN_TEST(serve_concurrent_streams)
{
    static const struct { int n; const char *pins; } cfg[] = {
        { 1, "" }, { 2, "--tp 2" }, { 2, "--pp 2" }, { 3, "--replicas 3" },
    };
    for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++) {
        server_t s;
        char args[256];
        snprintf(args, sizeof args, "--model " I2S " %s", cfg[i].pins);
        server_start(&s, cfg[i].n, args);
        concurrent(&s, 32);
        char *out = NULL;
        CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
        CHECK(strstr(out, "requests_served: 32") != NULL);
        /* the even streams' shared start was computed once per replica and reused */
        const char *h = strstr(out, "prefix_hits: "), *t = strstr(out, "prefix_tokens: ");
        fprintf(stderr, "  %s: %lld requests reused a prefix, %lld prompt tokens not computed\n", cfg[i].pins,
                h ? atoll(h + 13) : -1, t ? atoll(t + 15) : -1);
        CHECK(h && atoll(h + 13) > 0 && t && atoll(t + 15) > 0);
        free(out);
        CHECK_EQ_INT(server_stop(&s), 0);
        unlink(s.errp);
    }
}

/* a raw DEALER: send these frames, return the first reply (unpacked) or NULL after timeout_ms */
static Bitnet__Reply *raw(const server_t *s, const void *const *frames, const size_t *lens, int n, int timeout_ms)
{
    void *ctx = zmq_ctx_new(), *d = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(d, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    CHECK(zmq_connect(d, s->ep) == 0);
    for (int i = 0; i < n; i++)
        CHECK(zmq_send(d, frames[i], lens[i], i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
    zmq_msg_t m;
    zmq_msg_init(&m);
    Bitnet__Reply *r = NULL;
    if (zmq_msg_recv(&m, d, 0) >= 0)
        r = bitnet__reply__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    zmq_msg_close(&m);
    zmq_close(d);
    zmq_ctx_term(ctx);
    return r;
}

static uint8_t *pack_req(Bitnet__Request *rq, size_t *len)
{
    *len = bitnet__request__get_packed_size(rq);
    uint8_t *b = malloc(*len + 1);
    bitnet__request__pack(rq, b);
    return b;
}

/* expect an error reply with this status whose message contains `word` */
static void expect_error(const server_t *s, const void *buf, size_t len, int status, const char *word, const char *what)
{
    const void *f[1] = { buf };
    size_t l[1] = { len };
    Bitnet__Reply *r = raw(s, f, l, 1, 10000);
    if (!r)
        BN_FAIL("%s: no reply", what);
    CHECK_EQ_INT(r->body_case, BITNET__REPLY__BODY_ERROR);
    fprintf(stderr, "  %s -> %s: %s\n", what, r->error->status, r->error->message);
    CHECK_EQ_INT(r->error->code, status);
    CHECK(strstr(r->error->message, word) != NULL);
    bitnet__reply__free_unpacked(r, NULL);
}

BN_TEST(serve_bad_messages)
{
    server_t s;
    server_start(&s, 1, "--model " I2S " --ctx 256 --max-msg-bytes 65536");
    /* a good stream runs while the bad messages arrive */
    char cmd[1024], outp[64];
    snprintf(outp, sizeof outp, "/tmp/bn-good-%d.out", (int)getpid());
    const char *good = "-n 200 --temp 0 --ignore-eos --prompt 'a good client among bad ones'";
    char *want = NULL;
    {
        char a[512];
        snprintf(a, sizeof a, "--ctx 256 %s", good);
        want = alone(a);
    }
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --server %s %s >%s 2>&1", bin_dir(), s.ep, good, outp);
    fflush(NULL);
    pid_t gp = fork();
    if (gp == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    uint8_t junk[300];
    uint64_t seed = bn_test_seed();
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)((seed >> (i % 56)) * 2654435761u + i * 97);
    junk[0] = 0xff;
    expect_error(&s, junk, sizeof junk, BN_EPROTO, "not a valid", "random bytes");
    Bitnet__Request rq = BITNET__REQUEST__INIT;
    Bitnet__Generate g = BITNET__GENERATE__INIT;
    Bitnet__Sampling sp = BITNET__SAMPLING__INIT;
    rq.has_version = 1;
    rq.version = 1;
    rq.request_id = "bad-1";
    rq.body_case = BITNET__REQUEST__BODY_GENERATE;
    rq.generate = &g;
    g.prompt = "hello there";
    size_t len;
    uint8_t *b = pack_req(&rq, &len);
    expect_error(&s, b, len - 3, BN_EPROTO, "not a valid", "a truncated message");
    free(b);
    rq.version = 7;
    b = pack_req(&rq, &len);
    expect_error(&s, b, len, BN_EUNSUPPORTED, "version 7", "protocol version 7");
    free(b);
    rq.has_version = 0;
    b = pack_req(&rq, &len);
    expect_error(&s, b, len, BN_EPROTO, "version", "no protocol version");
    free(b);
    rq.has_version = 1;
    rq.version = 1;
    rq.body_case = BITNET__REQUEST__BODY__NOT_SET;
    b = pack_req(&rq, &len);
    expect_error(&s, b, len, BN_EPROTO, "no body", "an empty request");
    free(b);
    rq.body_case = BITNET__REQUEST__BODY_GENERATE;
    g.sampling = &sp;
    sp.has_temperature = 1;
    sp.temperature = 500;
    b = pack_req(&rq, &len);
    expect_error(&s, b, len, BN_ERANGE, "temperature", "temperature 500");
    free(b);
    sp.has_temperature = 0;
    sp.has_top_p = 1;
    sp.top_p = 0;
    b = pack_req(&rq, &len);
    expect_error(&s, b, len, BN_ERANGE, "top_p", "top_p 0");
    free(b);
    sp.has_top_p = 0;
    char *longp = malloc(40000);
    for (int i = 0; i < 39999; i++)
        longp[i] = "abcdefgh "[i % 9];
    longp[39999] = 0;
    g.prompt = longp;
    b = pack_req(&rq, &len);
    expect_error(&s, b, len, BN_ECONTEXT, "context", "a prompt longer than the context");
    free(b);
    uint8_t *big = calloc(1, 100000);
    expect_error(&s, big, 100000, BN_ERANGE, "limit", "a message over the limit");
    free(big);
    free(longp);
    g.prompt = "two frames";
    b = pack_req(&rq, &len);
    const void *f2[2] = { b, b };
    size_t l2[2] = { len, len };
    Bitnet__Reply *r = raw(&s, f2, l2, 2, 10000);
    CHECK(r != NULL);
    CHECK_EQ_INT(r->body_case, BITNET__REPLY__BODY_ERROR);
    CHECK_EQ_INT(r->error->code, BN_EPROTO);
    fprintf(stderr, "  two frames -> %s: %s\n", r->error->status, r->error->message);
    bitnet__reply__free_unpacked(r, NULL);
    free(b);
    int st;
    waitpid(gp, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char *got = bn_test_read_file(outp, NULL);
    CHECK(got != NULL);
    CHECK_STR_EQ(got, want);
    fprintf(stderr, "  the good stream (%zu bytes) was served as if nothing happened\n", strlen(got));
    free(got);
    free(want);
    unlink(outp);
    char *out = NULL;
    CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
    CHECK(strstr(out, "bad_messages: 9\n") != NULL);     /* the wire's refusals */
    CHECK(strstr(out, "requests_rejected: 1\n") != NULL); /* the scheduler's: the long prompt */
    free(out);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
}

/* poll stats until they contain `what` */
static void wait_for(const server_t *s, const char *what)
{
    for (int i = 0; i < 200; i++) {
        char *out = NULL;
        CHECK_EQ_INT(client(s, "stats", &out, NULL), 0);
        int ok = strstr(out, what) != NULL;
        free(out);
        if (ok)
            return;
        usleep(50000);
    }
    BN_FAIL("stats never showed '%s'", what);
}

/* poll stats until nothing runs or waits */
static void wait_idle(const server_t *s)
{
    wait_for(s, "queued: 0\n");
    wait_for(s, "running: 0\n");
}

static pid_t spawn(const char *cmd)
{
    fflush(NULL);
    pid_t p = fork();
    if (p == 0) {
        int nul = open("/dev/null", O_RDWR);
        dup2(nul, 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return p;
}

#define LONG "-n 1000000 --ignore-eos --temp 0.8 --seed 1 --prompt 'a long story'"

BN_TEST(serve_cancel_deadline_killed_client)
{
    server_t s;
    server_start(&s, 1, "--model " I2S " --threads 1 --ctx 65536");
    char cmd[1024];
    /* Ctrl-C: the client cancels on the server */
    snprintf(cmd, sizeof cmd, "exec %s/bitnet-client --server %s " LONG, bin_dir(), s.ep);
    pid_t p = spawn(cmd);
    usleep(700000);
    kill(p, SIGINT);
    int st;
    waitpid(p, &st, 0);
    CHECK(WIFEXITED(st));
    CHECK_EQ_INT(WEXITSTATUS(st), 130);
    wait_idle(&s);
    char *out = NULL, *err = NULL;
    CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
    CHECK(strstr(out, "requests_cancelled: 1\n") != NULL);
    free(out);
    /* a deadline */
    CHECK_EQ_INT(client(&s, "--deadline-ms 300 " LONG, &out, &err), 1);
    fprintf(stderr, "  deadline: %s", err);
    CHECK(strstr(err, "deadline") != NULL);
    free(out);
    free(err);
    /* a client killed mid-stream: its sequence is freed when a send to it fails */
    p = spawn(cmd);
    usleep(700000);
    kill(p, SIGKILL);
    waitpid(p, &st, 0);
    wait_idle(&s);
    CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
    CHECK(strstr(out, "requests_cancelled: 3\n") != NULL);
    free(out);
    char *log = server_log(&s);
    CHECK(strstr(log, "cancelled by the client") != NULL);
    CHECK(strstr(log, "the client vanished") != NULL);
    free(log);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
}

BN_TEST(serve_full_queue)
{
    server_t s;
    server_start(&s, 1, "--model " I2S " --threads 1 --ctx 65536 --max-seqs 1 --max-queue 1");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "exec %s/bitnet-client --server %s " LONG, bin_dir(), s.ep);
    pid_t a = spawn(cmd); /* one runs, */
    wait_for(&s, "running: 1\n");
    pid_t b = spawn(cmd); /* one waits */
    wait_for(&s, "queued: 1\n");
    char *out = NULL, *err = NULL;
    double t0 = now();
    CHECK_EQ_INT(client(&s, "-n 4 --prompt 'one too many'", &out, &err), 1);
    fprintf(stderr, "  third request (%.2f s): %s", now() - t0, err);
    CHECK(strstr(err, "BN_EBUSY") != NULL);
    free(out);
    free(err);
    kill(a, SIGINT);
    kill(b, SIGINT);
    waitpid(a, NULL, 0);
    waitpid(b, NULL, 0);
    wait_idle(&s);
    CHECK_EQ_INT(client(&s, "-n 4 --temp 0 --prompt 'served again'", &out, NULL), 0);
    free(out);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
}

BN_TEST(serve_curve)
{
    char key[64], other[64], args[512];
    snprintf(key, sizeof key, "/tmp/bn-key-%d", (int)getpid());
    snprintf(other, sizeof other, "/tmp/bn-other-%d", (int)getpid());
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s/bitnet-client keygen %s && %s/bitnet-client keygen %s", bin_dir(), key, bin_dir(), other);
    CHECK_EQ_INT(bn_test_run(cmd, NULL, NULL), 0);
    struct stat st;
    CHECK(stat(key, &st) == 0);
    CHECK_EQ_INT(st.st_mode & 0777, 0600);
    /* a key file readable by others is refused */
    chmod(key, 0644);
    snprintf(cmd, sizeof cmd, "%s/bitnet-worker --model " I2S " --serve --bind 'tcp://127.0.0.1:*' --curve-secret-file %s",
             bin_dir(), key);
    char *err = NULL, *out = NULL;
    CHECK_EQ_INT(bn_test_run(cmd, NULL, &err), 1);
    fprintf(stderr, "  key mode 0644: %s", err);
    CHECK(strstr(err, "readable by others") != NULL);
    free(err);
    chmod(key, 0600);
    server_t s;
    snprintf(args, sizeof args, "--model " I2S " --curve-secret-file %s", key);
    server_start(&s, 1, args);
    snprintf(args, sizeof args, "--server-key %s.pub -n 8 --temp 0 --prompt 'with the key'", key);
    CHECK_EQ_INT(client(&s, args, &out, NULL), 0);
    char *want = alone("-n 8 --temp 0 --prompt 'with the key'");
    CHECK_STR_EQ(out, want);
    free(want);
    free(out);
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --server %s --timeout 3 --server-key %s.pub -n 8 --prompt 'wrong key'",
             bin_dir(), s.ep, other);
    CHECK_EQ_INT(bn_test_run(cmd, &out, &err), 1);
    CHECK_STR_EQ(out, "");
    fprintf(stderr, "  wrong key: %s", err);
    free(out);
    free(err);
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --server %s --timeout 3 -n 8 --prompt 'no key'", bin_dir(), s.ep);
    CHECK_EQ_INT(bn_test_run(cmd, &out, &err), 1);
    CHECK_STR_EQ(out, "");
    fprintf(stderr, "  no key: %s", err);
    free(out);
    free(err);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
    /* beyond loopback without CURVE: a warning (the last --bind counts) */
    server_start(&s, 1, "--model " I2S " --bind 'tcp://0.0.0.0:*'");
    char *log = server_log(&s);
    CHECK(strstr(log, "is beyond loopback, without CURVE") != NULL);
    free(log);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
    unlink(key);
    unlink(other);
    strcat(key, ".pub");
    strcat(other, ".pub");
    unlink(key);
    unlink(other);
}

/* SIGTERM while streams run: every client gets its final reply, all ranks end cleanly */
BN_TEST(serve_sigterm_drains)
{
    for (int ranks = 1; ranks <= 2; ranks++) {
        server_t s;
        server_start(&s, ranks, "--model " I2S " --threads 1 --ctx 65536 --drain-s 1");
        char cmd[4096], dir[64];
        snprintf(dir, sizeof dir, "/tmp/bn-term-%d", (int)getpid());
        mkdir(dir, 0755);
        size_t l = 0;
        for (int i = 0; i < 4; i++)
            l += (size_t)snprintf(cmd + l, sizeof cmd - l, "%s/bitnet-client --server %s " LONG " >/dev/null 2>%s/%d.err & ",
                                  bin_dir(), s.ep, dir, i);
        snprintf(cmd + l, sizeof cmd - l, "wait");
        pid_t p = spawn(cmd);
        usleep(1500000);
        CHECK_EQ_INT(server_stop(&s), 0);
        waitpid(p, NULL, 0);
        for (int i = 0; i < 4; i++) {
            char path[128];
            snprintf(path, sizeof path, "%s/%d.err", dir, i);
            char *e = bn_test_read_file(path, NULL);
            CHECK(e && strstr(e, "shutting down") != NULL);
            if (i == 0)
                fprintf(stderr, "  -n %d: a client at shutdown: %s", ranks, e);
            free(e);
            unlink(path);
        }
        rmdir(dir);
        char *log = server_log(&s);
        CHECK(strstr(log, "stopped: every client answered") != NULL);
        free(log);
        unlink(s.errp);
    }
}

/* Stop strings are matched across token boundaries and never sent: for stop
 * strings cut from the text the prompt gets alone (3 to 9 bytes, most of them
 * spanning two or more tokens of this model's short pieces), the served text is
 * exactly the text alone up to the first occurrence, and nothing of the stop
 * string; a stop string that never occurs changes nothing. */
BN_TEST(serve_stop_strings)
{
    server_t s;
    server_start(&s, 1, "--model " I2S);
    const char *q = "-n 48 --temp 0 --ignore-eos --prompt 'Once upon a time'"; /* (no NUL bytes in its text) */
    char *full = alone(q); /* the text, then a newline */
    size_t n = strlen(full);
    CHECK(n > 30);
    n--; /* without the newline */
    int checked = 0;
    for (size_t k = 3; k + 9 < n && checked < 12; k += 5) {
        size_t m = 3 + k % 7;
        char stop[16];
        memcpy(stop, full + k, m);
        stop[m] = 0;
        if (strchr(stop, '\'') || memchr(stop, 0, m) || strchr(stop, '\n'))
            continue;
        const char *at = memmem(full, n, stop, m);
        char args[512], *out = NULL;
        snprintf(args, sizeof args, "--stop '%s' %s", stop, q);
        CHECK_EQ_INT(client(&s, args, &out, NULL), 0);
        size_t want = (size_t)(at - full);
        size_t got = strlen(out);
        if (got != want + 1 || memcmp(out, full, want) != 0 || out[want] != '\n')
            BN_FAIL("stop '%s' (at byte %zu): served %zu bytes \"%s\", want the first %zu of \"%s\"", stop, want, got, out,
                    want, full);
        free(out);
        checked++;
    }
    fprintf(stderr, "  %d stop strings: each cut the text exactly before its first occurrence\n", checked);
    CHECK(checked >= 5);
    char *out = NULL;
    CHECK_EQ_INT(client(&s, "--stop 'no such text here' -n 48 --temp 0 --ignore-eos --prompt 'Once upon a time'", &out, NULL), 0);
    CHECK_STR_EQ(out, full);
    free(out);
    free(full);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
}

/* CPU seconds (user + system) of a process so far, from /proc */
static double proc_cpu_s(int pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    char *st = bn_test_read_file(path, NULL);
    if (!st)
        BN_FAIL("cannot read %s", path);
    const char *p = strrchr(st, ')'); /* the fields after the command name */
    unsigned long ut = 0, stm = 0;
    CHECK(p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &stm) == 2);
    free(st);
    return (double)(ut + stm) / (double)sysconf(_SC_CLK_TCK);
}

/* An idle service costs almost nothing: rank 0 sleeps in zmq_poll, the others
 * wait for a step with MPI_Test and a growing sleep; each stays under 5 % of a
 * core. Then a request's KV pages are resident while it runs and go back to
 * the system when it ends. */
BN_TEST(serve_idle_cpu_and_kv_memory)
{
    server_t s;
    server_start(&s, 2, "--model " I2S " --tp 2 --ctx 65536 --prefix-cache-s 2");
    char *log = server_log(&s);
    int pids[2] = { 0, 0 }, n = 0;
    for (const char *p = log; n < 2 && (p = strstr(p, "part loaded in ")); p++) {
        const char *q = strstr(p, "(pid ");
        if (q)
            pids[n++] = atoi(q + 5);
    }
    free(log);
    CHECK_EQ_INT(n, 2);
    usleep(1000000); /* the ranks reach their idle waits */
    double c0[2], c1[2];
    for (int i = 0; i < 2; i++)
        c0[i] = proc_cpu_s(pids[i]);
    double t0 = now();
    usleep(3000000);
    double dt = now() - t0;
    for (int i = 0; i < 2; i++) {
        c1[i] = proc_cpu_s(pids[i]);
        double pct = 100 * (c1[i] - c0[i]) / dt;
        fprintf(stderr, "  idle rank (pid %d): %.1f%% of a core over %.1f s\n", pids[i], pct, dt);
        CHECK(pct < 5.0);
    }
    /* KV memory: resident while a long request runs, given back when it ends */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "exec %s/bitnet-client --server %s " LONG, bin_dir(), s.ep);
    pid_t p = spawn(cmd);
    wait_for(&s, "running: 1\n");
    usleep(500000);
    char *out = NULL;
    CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
    const char *r = strstr(out, "kv_bytes_resident: ");
    CHECK(r != NULL);
    long long busy = atoll(r + 19);
    free(out);
    kill(p, SIGINT);
    waitpid(p, NULL, 0);
    wait_idle(&s);
    /* kept a while as a cached prefix (--prefix-cache-s 2), then given back */
    CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
    const char *c = strstr(out, "kv_bytes_cached: ");
    const long long cached = c ? atoll(c + 17) : -1;
    free(out);
    long long after = -1;
    for (int i = 0; i < 200 && after != 0; i++) { /* the TTL, then the release travels with the next step */
        usleep(50000);
        CHECK_EQ_INT(client(&s, "stats", &out, NULL), 0);
        after = atoll(strstr(out, "kv_bytes_resident: ") + 19);
        free(out);
    }
    fprintf(stderr, "  rank 0's resident KV: %lld bytes while a request ran, %lld cached as its prefix after it "
            "ended, %lld resident after the prefix cache's 2 s\n", busy, cached, after);
    CHECK(busy > 0);
    CHECK(cached > 0);
    CHECK_EQ_INT(after, 0);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
}

#else /* the cross build has no ZeroMQ */
#define NO_NET(name) BN_TEST(name) { BN_FAIL("not built with ZeroMQ (cross build)"); }
NO_NET(serve_concurrent_streams)
NO_NET(serve_bad_messages)
NO_NET(serve_cancel_deadline_killed_client)
NO_NET(serve_full_queue)
NO_NET(serve_curve)
NO_NET(serve_sigterm_drains)
NO_NET(serve_idle_cpu_and_kv_memory)
NO_NET(serve_stop_strings)
#endif
