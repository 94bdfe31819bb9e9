/* client.c - bitnet-client: a ZeroMQ DEALER that sends one request to a
 * `bitnet-worker --serve` (a ROUTER) and prints what comes back: the generated text
 * as it streams, or the fields of info, health and stats. `keygen` writes a CURVE
 * key pair for the server; `batch IN OUT` is client/batch.c.
 *
 * It is not part of the server: it links libzmq, libprotobuf-c, the schema's
 * generated C (proto/bitnet.proto) and, for batch jobs, the JSONL line formats
 * that bitnet-worker --batch uses (coordinator/batch*.c, request.c, base/),
 * never the engine. Protocol version 1.
 * Invariants: stdout carries exactly what `bitnet-worker --prompt` prints (the text
 * as it streams, then one '\n'; or the ids), or the `key: value` lines of
 * info/health/stats; everything else goes to stderr. Only main exits.
 * Exit status: 0 done; 1 runtime error (an error reply, finish error or cancelled,
 * no answer); 2 bad command line; 3 batch lines left; 130 interrupted (SIGINT or
 * SIGTERM). */
#include "client/client.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define DEFAULT_SERVER "tcp://127.0.0.1:5555"
#define TICK_MS 100                        /* longest wait between looks at the signal flag */
#define CANCEL_GRACE_MS 5000.0             /* after Ctrl-C, how long the final may take */
#define MAX_REPLY_BYTES (64 << 20)         /* a larger frame drops the connection */
#define MAX_PROMPT_FILE_BYTES (256u << 20)
#define MORE (-1)                          /* "keep going": not an exit status */

/* One request's progress on stdout. */
typedef struct {
    const options_t *o;
    size_t n_ids;                          /* ids printed (--print-ids) */
    uint32_t next_seq;                     /* the chunk expected next */
    int line_open;                         /* stdout has output not yet ended by '\n' */
    int interrupted;                       /* a signal came and Cancel was sent */
} stream_t;

volatile sig_atomic_t g_signals;
int g_verbose;

static void usage(FILE *f)
{
    fputs(
        "usage: bitnet-client [options] \"prompt\"             generate; the text streams to stdout\n"
        "       bitnet-client [options] --tokens 1,2,3       the prompt as token ids\n"
        "       bitnet-client [options] --prompt-file FILE   the prompt read from FILE (- = stdin)\n"
        "       bitnet-client [--server EP] [--server-key KEY] info | health | stats\n"
        "       bitnet-client [options] batch IN.jsonl OUT.jsonl  a JSONL job (see README, Batch jobs)\n"
        "       bitnet-client keygen FILE                    CURVE key pair: FILE (secret), FILE.pub\n"
        "\n"
        "connection:\n"
        "  --server EP          the server (default: $BITNET_SERVER, else " DEFAULT_SERVER ")\n"
        "  --server-key KEY     encrypt with CURVE: the server's public key (40 Z85 characters)\n"
        "                       or a file whose first line is that key (keygen's FILE.pub)\n"
        "  --endpoint-file F    the server and its key from F (bitnet-worker --serve\n"
        "                       --endpoint-file F writes it once it listens)\n"
        "  --timeout S          give up when no reply comes for S seconds (default 600)\n"
        "  --id ID              the request's id (default: made from the pid and the clock)\n"
        "\n"
        "generation (the defaults are bitnet-worker's):\n"
        "  --prompt TEXT        the prompt text, as the positional argument (for text that\n"
        "                       starts with '-' or is info, health, stats or keygen)\n"
        "  -n, --n-predict N    tokens to generate (default 64)\n"
        "  --chat               wrap the prompt in the model's chat form\n"
        "  --temp T             temperature, 0 = greedy (default 0.8)\n"
        "  --top-k K            keep the K most likely tokens, 0 = all (default 40)\n"
        "  --top-p P            keep the smallest set with probability >= P (default 0.95)\n"
        "  --min-p P            drop tokens below P x the best probability (default 0.05)\n"
        "  --seed N             random seed (default: chosen by the server, see --usage)\n"
        "  --stop STR           stop where the text contains STR, not printed (repeatable)\n"
        "  --ignore-eos         do not stop at end-of-text tokens\n"
        "  --deadline-ms MS     the server gives up MS ms after the request arrives\n"
        "\n"
        "batch (IN: lines {\"id\": ..., \"prompt\": \"...\"} or {\"id\": ..., \"tokens\": [...]},\n"
        "optional max_tokens, temperature, top_k, top_p, min_p, seed, stop, chat; the\n"
        "generation flags are their defaults. OUT gets one line per id in completion\n"
        "order; ids already in OUT are skipped, so the same command after a kill finishes\n"
        "the job):\n"
        "  --concurrency N      requests in flight at once (default 8)\n"
        "\n"
        "output:\n"
        "  --print-ids          print the generated token ids instead of the text\n"
        "  --usage              at the end, one line on stderr: 'usage: prompt_tokens=N\n"
        "                       completion_tokens=N ttft_ms=X tokens_per_s=X total_ms=X\n"
        "                       queue_ms=X finish=eos|length|stop|cancelled|error seed=N'\n"
        "  -v, --verbose        debug lines on stderr (e.g. replies to other requests)\n"
        "  -h, --help           this text\n"
        "\n"
        "Exit status: 0 done, 1 runtime error (error reply, cancelled, no answer), 2 bad\n"
        "command line, 3 batch lines left for a rerun (the server stopped them), 130\n"
        "interrupted (Ctrl-C cancels on the server what is running; twice quits at once).\n",
        f);
}

int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("bitnet-client: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

int zfail(const char *what)
{
    fail("%s: %s", what, zmq_strerror(errno));
    return 1;
}

double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void on_signal(int sig)
{
    (void)sig;
    g_signals = g_signals + 1;
}

void catch_signals(void)
{
    struct sigaction sa = { .sa_handler = on_signal };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* ---- command line ---- */

static int parse_int(const char *flag, const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return fail("%s: '%s' is not an integer in [%lld, %lld]", flag, s, lo, hi);
    *out = v;
    return 0;
}

static int parse_number(const char *flag, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return fail("%s: '%s' is not a number in [%.10g, %.10g]", flag, s, lo, hi);
    *out = v;
    return 0;
}

static int parse_seed(const char *s, options_t *o)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || s[0] == '+')
        return fail("--seed: '%s' is not a non-negative integer", s);
    o->seed = v;
    o->seed_given = 1;
    return 0;
}

/* "1,2,3" into ids (the server checks them against its vocabulary). */
static int parse_tokens(const char *s, options_t *o)
{
    size_t n = 1;
    for (const char *p = s; *p; p++)
        n += *p == ',';
    if (!(o->tokens = malloc(n * sizeof *o->tokens)))
        return fail("out of memory");
    const char *p = s;
    for (o->n_tokens = 0; o->n_tokens < n; o->n_tokens++) {
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end != ',' && *end))
            return fail("--tokens: '%s' is not a comma-separated list of ids", s);
        o->tokens[o->n_tokens] = (int32_t)v;
        p = end + 1;
    }
    return 0;
}

/* A CURVE key: 40 characters that decode as Z85 (libzmq checks the alphabet). */
static int is_z85_key(const char *s)
{
    uint8_t raw[32];
    return strlen(s) == KEY_LEN && zmq_z85_decode(raw, s) != NULL;
}

/* --server-key: the key itself, or a file whose first line is the key. */
static int parse_server_key(const char *arg, char out[KEY_LEN + 1])
{
    char line[256] = "", pub[PATH_MAX];
    if (is_z85_key(arg)) {
        memcpy(out, arg, KEY_LEN + 1);
        return 0;
    }
    FILE *f = fopen(arg, "r");
    if (!f && strlen(arg) == KEY_LEN)
        return fail("--server-key: '%s' is not a Z85 key (40 characters of the Z85 alphabet)", arg);
    if (!f)
        return fail("--server-key: '%s' is neither a 40-character Z85 key nor a readable file (%s)", arg,
                    strerror(errno));
    if (!fgets(line, sizeof line, f))
        line[0] = '\0';
    fclose(f);
    line[strcspn(line, " \t\r\n")] = '\0';
    if (!is_z85_key(line))
        return fail("--server-key: the first line of %s is not a 40-character Z85 key", arg);
    /* keygen's FILE beside FILE.pub holds a secret key: the handshake would never complete */
    if (snprintf(pub, sizeof pub, "%s.pub", arg) < (int)sizeof pub && access(pub, F_OK) == 0)
        fprintf(stderr, "bitnet-client: warning: --server-key %s looks like a secret key (%s is beside it)\n",
                arg, pub);
    memcpy(out, line, KEY_LEN + 1);
    return 0;
}

/* --endpoint-file FILE: the lines endpoint=EP and server_key=KEY (optional)
 * that `bitnet-worker --serve --endpoint-file FILE` writes once it listens. */
static int parse_endpoint_file(const char *path, options_t *o)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return fail("--endpoint-file %s: %s%s", path, strerror(errno),
                    errno == ENOENT ? " (the server writes it once it listens: is it up yet?)" : "");
    char line[1024];
    int rc = 0;
    while (!rc && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!strncmp(line, "endpoint=", 9)) {
            free(o->endpoint_buf);
            if (!(o->endpoint_buf = strdup(line + 9)))
                rc = fail("out of memory");
            o->server = o->endpoint_buf;
        } else if (!strncmp(line, "server_key=", 11)) {
            if (!is_z85_key(line + 11))
                rc = fail("--endpoint-file %s: server_key is not a 40-character Z85 key", path);
            else
                memcpy(o->server_key, line + 11, KEY_LEN + 1);
        }
    }
    fclose(f);
    if (!rc && !o->endpoint_buf)
        rc = fail("--endpoint-file %s: no 'endpoint=' line", path);
    return rc;
}

/* Positional arguments: a command, keygen FILE, batch IN OUT, or the prompt text. */
static int parse_positionals(char **pos, int n_pos, options_t *o)
{
    static const char *const names[] = { [CMD_INFO] = "info", [CMD_HEALTH] = "health", [CMD_STATS] = "stats" };
    if (n_pos == 0)
        return 0;
    for (int c = CMD_INFO; c <= CMD_STATS; c++)
        if (n_pos == 1 && !strcmp(pos[0], names[c])) {
            o->cmd = (cmd_t)c;
            return 0;
        }
    if (!strcmp(pos[0], "batch")) {
        if (n_pos != 3)
            return fail("batch needs IN.jsonl and OUT.jsonl (see --help)");
        o->cmd = CMD_BATCH;
        o->batch_in = pos[1];
        o->batch_out = pos[2];
        return 0;
    }
    if (!strcmp(pos[0], "keygen")) {
        if (n_pos != 2)
            return fail("keygen needs one FILE (see --help)");
        o->cmd = CMD_KEYGEN;
        o->keygen_file = pos[1];
        return 0;
    }
    if (n_pos > 1 || o->prompt)
        return fail("one prompt only (quote it; got '%s' and '%s')", o->prompt ? o->prompt : pos[0],
                    n_pos > 1 ? pos[1] : pos[0]);
    o->prompt = pos[0];
    return 0;
}

/* A generation flag without a value: 0, or 1 when `a` is not one. */
static int parse_gen_switch(const char *a, options_t *o)
{
    if (!strcmp(a, "--chat")) o->chat = 1;
    else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = 1;
    else if (!strcmp(a, "--print-ids")) o->print_ids = 1;
    else if (!strcmp(a, "--usage")) o->usage = 1;
    else return 1;
    return 0;
}

/* A generation flag and its value: 0, -1 after a message, or 1 when `a` is not one. */
static int parse_gen_flag(const char *a, char *v, options_t *o)
{
    int rc = 0;
    if (!strcmp(a, "--prompt")) o->prompt = v;
    else if (!strcmp(a, "--prompt-file")) o->prompt_file = v;
    else if (!strcmp(a, "--tokens")) rc = o->tokens ? fail("--tokens given twice") : parse_tokens(v, o);
    else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) rc = parse_int(a, v, 0, 1 << 24, &o->n_predict);
    else if (!strcmp(a, "--temp")) rc = parse_number(a, v, 0, 100, &o->temp);
    else if (!strcmp(a, "--top-k")) rc = parse_int(a, v, 0, INT_MAX, &o->top_k);
    else if (!strcmp(a, "--top-p")) rc = parse_number(a, v, 0, 1, &o->top_p);
    else if (!strcmp(a, "--min-p")) rc = parse_number(a, v, 0, 1, &o->min_p);
    else if (!strcmp(a, "--seed")) rc = parse_seed(v, o);
    else if (!strcmp(a, "--stop")) o->stop[o->n_stop++] = v;
    else if (!strcmp(a, "--deadline-ms")) rc = parse_int(a, v, 0, UINT32_MAX, &o->deadline_ms);
    else return 1;
    return rc;
}

/* A connection flag and its value: 0, -1 after a message, or 1 when `a` is not one. */
static int parse_net_flag(const char *a, char *v, options_t *o)
{
    int rc = 0;
    if ((!strcmp(a, "--server") || !strcmp(a, "--endpoint-file")) && o->server_set)
        return fail("give one of --server and --endpoint-file, once");
    if (!strcmp(a, "--server")) o->server = v, o->server_set = 1;
    else if (!strcmp(a, "--server-key")) rc = parse_server_key(v, o->server_key);
    else if (!strcmp(a, "--id")) o->id = v;
    else if (!strcmp(a, "--timeout")) rc = parse_number(a, v, 0, 1e7, &o->timeout_s);
    else if (!strcmp(a, "--endpoint-file")) rc = parse_endpoint_file(v, o), o->server_set = 1;
    else if (!strcmp(a, "--concurrency")) rc = parse_int(a, v, 1, 4096, &o->concurrency);
    else return 1;
    return rc;
}

/* What single flags cannot check: open bounds, empty strings, flags that do not fit
 * the command, one prompt. `pos0` is the first positional argument. 0 or -1. */
static int check_options(const options_t *o, const char *gen_flag, const char *net_flag, const char *pos0)
{
    if (o->top_p == 0)
        return fail("--top-p: must be above 0");
    if (o->min_p >= 1)
        return fail("--min-p: must be below 1");
    if (o->timeout_s == 0)
        return fail("--timeout: must be above 0");
    if (o->id && !*o->id)
        return fail("--id: the id is empty");
    for (size_t i = 0; i < o->n_stop; i++)
        if (!*o->stop[i])
            return fail("--stop: the string is empty");
    if (o->n_stop > BN_MAX_STOPS)
        return fail("--stop: at most %d strings", BN_MAX_STOPS);
    if (o->cmd == CMD_BATCH && (o->prompt || o->prompt_file || o->tokens || o->print_ids || o->usage || o->id ||
                                o->deadline_ms >= 0))
        return fail("batch takes its prompts from IN and writes OUT: no prompt, --prompt-file, --tokens, "
                    "--print-ids, --usage, --id or --deadline-ms");
    if (o->concurrency && o->cmd != CMD_BATCH)
        return fail("--concurrency is for batch");
    if (o->cmd == CMD_KEYGEN && (gen_flag || net_flag))
        return fail("keygen takes only FILE, not %s", gen_flag ? gen_flag : net_flag);
    if (o->cmd != CMD_GENERATE && o->cmd != CMD_KEYGEN && o->cmd != CMD_BATCH && gen_flag)
        return fail("%s is for generation, not for %s", gen_flag, pos0);
    if (o->cmd == CMD_GENERATE && !!o->prompt + !!o->prompt_file + !!o->tokens != 1)
        return fail("give exactly one prompt: text, --prompt-file or --tokens (see --help)");
    if (o->chat && o->tokens)
        return fail("--chat needs a prompt text, not --tokens");
    return 0;
}

/* Fills *o (pos: room for argc pointers). Returns MORE to go on, or the exit
 * status: 0 after --help, 1, EXIT_USAGE. */
static int parse_args(int argc, char **argv, options_t *o, char **pos)
{
    const char *env = getenv("BITNET_SERVER");
    *o = (options_t){ .server = env && *env ? env : DEFAULT_SERVER, .n_predict = 64, .temp = 0.8, .top_k = 40,
                      .top_p = 0.95, .min_p = 0.05, .deadline_ms = -1, .timeout_s = 600 };
    if (!(o->stop = malloc(argc * sizeof *o->stop)))
        return fail("out of memory"), 1;
    const char *gen_flag = NULL, *net_flag = NULL;
    int n_pos = 0, flags_done = 0;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (flags_done || a[0] != '-' || !a[1]) {
            pos[n_pos++] = a;
        } else if (!strcmp(a, "--")) {
            flags_done = 1;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            g_verbose = 1;
        } else if (parse_gen_switch(a, o) == 0) {
            gen_flag = a;
        } else if (i + 1 >= argc) {
            fail("%s needs a value (or is unknown; see --help)", a);
            return EXIT_USAGE;
        } else {
            char *v = argv[++i];
            int rc = parse_gen_flag(a, v, o);
            if (rc == 0)
                gen_flag = a;
            else if (rc == 1 && (rc = parse_net_flag(a, v, o)) == 0)
                net_flag = a;
            else if (rc == 1)
                rc = fail("unknown option '%s' (see --help)", a);
            if (rc)
                return EXIT_USAGE;
        }
    }
    if (parse_positionals(pos, n_pos, o) || check_options(o, gen_flag, net_flag, pos[0]))
        return EXIT_USAGE;
    return MORE;
}

/* ---- requests ---- */

/* The whole of FILE ("-" = stdin) as a string; NULL after a message. */
static char *read_prompt_file(const char *path)
{
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f)
        return fail("%s: %s", path, strerror(errno)), NULL;
    const char *err = NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0, k;
    do {
        if (len + 1 >= cap) {
            char *nb = cap < MAX_PROMPT_FILE_BYTES ? realloc(buf, cap ? 2 * cap : 65536) : NULL;
            if (!nb) {
                err = cap < MAX_PROMPT_FILE_BYTES ? "out of memory" : "larger than 256 MB";
                break;
            }
            buf = nb;
            cap = cap ? 2 * cap : 65536;
        }
        k = fread(buf + len, 1, cap - len - 1, f);
        len += k;
    } while (k > 0);
    if (!err && ferror(f))
        err = strerror(errno);
    if (!err && memchr(buf, '\0', len))
        err = "has a NUL byte (a prompt is text)";
    if (f != stdin)
        fclose(f);
    if (err) {
        fail("%s: %s", path, err);
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    return buf;
}

static Bitnet__Request request_for(const char *id)
{
    Bitnet__Request req = BITNET__REQUEST__INIT;
    req.has_version = 1;
    req.version = PROTOCOL_VERSION;
    req.request_id = (char *)id;
    return req;
}

/* Pack and queue one request; 0 or exit status 1. */
static int send_request(void *sock, const Bitnet__Request *req)
{
    size_t len = bitnet__request__get_packed_size(req);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        fail("out of memory (a request of %zu bytes)", len);
        return 1;
    }
    bitnet__request__pack(req, buf);
    int rc = zmq_send(sock, buf, len, ZMQ_DONTWAIT) < 0 ? zfail("zmq_send") : 0;
    if (!rc)
        debug("sent request '%s' (%zu bytes)", req->request_id, len);
    free(buf);
    return rc;
}

void gen_defaults(const options_t *o, bn_gen_params_t *g)
{
    bn_gen_params_init(g);
    g->prompt = o->prompt;
    g->prompt_len = o->prompt ? strlen(o->prompt) : 0;
    g->tokens = o->tokens;
    g->n_tokens = o->n_tokens;
    g->chat = o->chat;
    g->ignore_eos = o->ignore_eos;
    g->sp.temp = (float)o->temp;
    g->sp.top_k = (int32_t)o->top_k;
    g->sp.top_p = (float)o->top_p;
    g->sp.min_p = (float)o->min_p;
    g->sp.seed = o->seed;
    g->seed_given = o->seed_given;
    g->max_tokens = (uint32_t)o->n_predict;
    for (size_t i = 0; i < o->n_stop && i < BN_MAX_STOPS; i++) {
        g->stop[i] = o->stop[i];
        g->stop_len[i] = strlen(o->stop[i]);
        g->n_stop = (int)i + 1;
    }
    g->deadline_ms = o->deadline_ms >= 0 ? (uint32_t)o->deadline_ms : 0;
}

/* The generate request of g, pointing into g and the parts given. Every
 * sampling field is sent, so the server uses the client's defaults; the seed
 * only when given. */
static void fill_generate(Bitnet__Request *req, Bitnet__Generate *gen, Bitnet__Sampling *smp, const char *id,
                          const bn_gen_params_t *g)
{
    *req = request_for(id);
    bitnet__generate__init(gen);
    bitnet__sampling__init(smp);
    smp->has_temperature = smp->has_top_k = smp->has_top_p = smp->has_min_p = 1;
    smp->temperature = g->sp.temp;
    smp->top_k = g->sp.top_k;
    smp->top_p = g->sp.top_p;
    smp->min_p = g->sp.min_p;
    smp->has_seed = g->seed_given;
    smp->seed = g->sp.seed;
    gen->prompt = g->prompt;
    gen->n_tokens = g->n_tokens;
    gen->tokens = g->tokens;
    gen->has_chat = gen->has_ignore_eos = gen->has_max_tokens = 1;
    gen->chat = g->chat;
    gen->ignore_eos = g->ignore_eos;
    gen->max_tokens = g->max_tokens;
    gen->sampling = smp;
    gen->n_stop = (size_t)g->n_stop;
    gen->stop = (char **)g->stop;
    gen->has_deadline_ms = g->deadline_ms > 0;
    gen->deadline_ms = g->deadline_ms;
    req->body_case = BITNET__REQUEST__BODY_GENERATE;
    req->generate = gen;
}

int send_generate(void *sock, const char *id, const bn_gen_params_t *g)
{
    Bitnet__Request req;
    Bitnet__Generate gen;
    Bitnet__Sampling smp;
    fill_generate(&req, &gen, &smp, id, g);
    return send_request(sock, &req);
}

size_t generate_size(const char *id, const bn_gen_params_t *g)
{
    Bitnet__Request req;
    Bitnet__Generate gen;
    Bitnet__Sampling smp;
    fill_generate(&req, &gen, &smp, id, g);
    return bitnet__request__get_packed_size(&req);
}

int send_empty(void *sock, const char *id, Bitnet__Request__BodyCase body)
{
    Bitnet__Request req = request_for(id);
    Bitnet__InfoRequest info = BITNET__INFO_REQUEST__INIT;
    Bitnet__HealthRequest health = BITNET__HEALTH_REQUEST__INIT;
    Bitnet__StatsRequest stats = BITNET__STATS_REQUEST__INIT;
    Bitnet__Cancel cancel = BITNET__CANCEL__INIT;
    req.body_case = body;
    if (body == BITNET__REQUEST__BODY_INFO) req.info = &info;
    else if (body == BITNET__REQUEST__BODY_HEALTH) req.health = &health;
    else if (body == BITNET__REQUEST__BODY_STATS) req.stats = &stats;
    else req.cancel = &cancel;
    return send_request(sock, &req);
}

/* ---- replies ---- */

static void end_line(stream_t *st)
{
    if (st->line_open) {
        putchar('\n');
        fflush(stdout);
        st->line_open = 0;
    }
}

static void print_error(const Bitnet__Error *e)
{
    const char *msg = e->message ? e->message : "(no message)";
    if (e->status)
        fail("%s: %s", e->status, msg);
    else
        fail("error %d: %s", e->has_code ? e->code : 0, msg);
}

static const char *finish_name(const Bitnet__Final *f)
{
    static const char *const names[] = { "unspecified", "eos", "length", "stop", "cancelled", "error" };
    int r = f->has_finish_reason ? (int)f->finish_reason : 0;
    return r >= 0 && r <= BITNET__FINISH_REASON__FINISH_ERROR ? names[r] : "unknown";
}

/* --usage; a number the server did not send shows as 0. */
static void print_usage_line(const Bitnet__Final *f)
{
    static const Bitnet__Usage none = BITNET__USAGE__INIT;
    const Bitnet__Usage *u = f->usage ? f->usage : &none;
    fprintf(stderr,
            "usage: prompt_tokens=%" PRIu32 " completion_tokens=%" PRIu32 " ttft_ms=%.1f tokens_per_s=%.1f"
            " total_ms=%.1f queue_ms=%.1f finish=%s seed=%" PRIu64 "\n",
            u->prompt_tokens, u->completion_tokens, u->time_to_first_token_ms, u->tokens_per_s, u->total_ms,
            u->queue_ms, finish_name(f), f->seed);
}

static void print_chunk(stream_t *st, const Bitnet__TokenChunk *c)
{
    if (c->has_seq && c->seq != st->next_seq)
        debug("chunk %" PRIu32 " arrived, %" PRIu32 " was expected", c->seq, st->next_seq);
    st->next_seq = (c->has_seq ? c->seq : st->next_seq) + 1;
    if (st->o->print_ids) {
        for (size_t i = 0; i < c->n_tokens; i++, st->n_ids++)
            printf(st->n_ids ? " %" PRId32 : "%" PRId32, c->tokens[i]);
        st->line_open |= c->n_tokens > 0;
    } else if (c->has_text && c->text.len) {
        fwrite(c->text.data, 1, c->text.len, stdout);
        st->line_open = 1;
    }
    fflush(stdout);
}

/* The final reply of a generate request: its exit status. */
static int on_final(stream_t *st, const Bitnet__Final *f)
{
    int reason = f->has_finish_reason ? (int)f->finish_reason : 0, rc = 1;
    if (st->interrupted) {
        rc = EXIT_INTERRUPTED;
    } else if (reason == BITNET__FINISH_REASON__FINISH_EOS || reason == BITNET__FINISH_REASON__FINISH_LENGTH ||
               reason == BITNET__FINISH_REASON__FINISH_STOP) {
        rc = 0;
        st->line_open = 1;   /* as bitnet-worker: the '\n' even after no text */
    } else if (reason == BITNET__FINISH_REASON__FINISH_CANCELLED || reason == BITNET__FINISH_REASON__FINISH_ERROR) {
        end_line(st);
        fail("%s: %s", finish_name(f), f->detail ? f->detail : "(no detail)");
    } else {
        end_line(st);
        fail("the final reply has no known finish reason (%d)", reason);
    }
    end_line(st);
    if (st->o->usage)
        print_usage_line(f);
    return rc;
}

/* A scalar field of info/health/stats as `name: value`. */
static void print_scalar(const ProtobufCFieldDescriptor *f, const void *p)
{
    printf("%s: ", f->name);
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_ENUM:
        printf("%" PRId32 "\n", *(const int32_t *)p); break;
    case PROTOBUF_C_TYPE_UINT32: printf("%" PRIu32 "\n", *(const uint32_t *)p); break;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: printf("%" PRId64 "\n", *(const int64_t *)p); break;
    case PROTOBUF_C_TYPE_UINT64: printf("%" PRIu64 "\n", *(const uint64_t *)p); break;
    case PROTOBUF_C_TYPE_FLOAT: printf("%.3f\n", *(const float *)p); break;
    case PROTOBUF_C_TYPE_DOUBLE: printf("%.3f\n", *(const double *)p); break;
    case PROTOBUF_C_TYPE_BOOL: puts(*(const protobuf_c_boolean *)p ? "true" : "false"); break;
    default: puts("(a type this client does not show)");
    }
}

/* Every field the message has, one `name: value` line each, in the schema's order
 * (walked through the descriptor, so a field added to the schema shows without a
 * change here); text of several lines (the plan) comes last, as `name:` and its
 * lines indented two spaces. */
static void print_fields(const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (int multiline = 0; multiline < 2; multiline++)
        for (unsigned i = 0; i < d->n_fields; i++) {
            const ProtobufCFieldDescriptor *f = &d->fields[i];
            const char *p = (const char *)m + f->offset;
            const protobuf_c_boolean *has = (const void *)((const char *)m + f->quantifier_offset);
            if (f->label == PROTOBUF_C_LABEL_REPEATED)
                continue;
            if (f->type != PROTOBUF_C_TYPE_STRING) {
                if (!multiline && (!f->quantifier_offset || *has))
                    print_scalar(f, p);
                continue;
            }
            const char *s = *(char *const *)p;
            if (!s || (strchr(s, '\n') != NULL) != multiline)
                continue;
            if (!multiline) {
                printf("%s: %s\n", f->name, s);
                continue;
            }
            printf("%s:\n", f->name);
            for (size_t n; *s; s += n + (s[n] == '\n')) {
                n = strcspn(s, "\n");
                printf("  %.*s\n", (int)n, s);
            }
        }
    fflush(stdout);
}

/* One reply to our request: MORE, or the exit status. */
static int on_reply(stream_t *st, const Bitnet__Reply *r)
{
    cmd_t cmd = st->o->cmd;
    Bitnet__Reply__BodyCase body = r->body_case;
    if (body == BITNET__REPLY__BODY_ERROR) {
        end_line(st);
        print_error(r->error);
        return st->interrupted ? EXIT_INTERRUPTED : 1;
    }
    if (cmd == CMD_GENERATE && body == BITNET__REPLY__BODY_CHUNK) {
        print_chunk(st, r->chunk);
        return MORE;
    }
    if (cmd == CMD_GENERATE && body == BITNET__REPLY__BODY_FINAL)
        return on_final(st, r->final);
    const ProtobufCMessage *m = cmd == CMD_INFO && body == BITNET__REPLY__BODY_INFO ? &r->info->base
                              : cmd == CMD_HEALTH && body == BITNET__REPLY__BODY_HEALTH ? &r->health->base
                              : cmd == CMD_STATS && body == BITNET__REPLY__BODY_STATS ? &r->stats->base
                              : NULL;
    if (m) {
        print_fields(m);
        return 0;
    }
    end_line(st);
    fail("a reply of an unexpected kind (body %d) to this request", (int)body);
    return 1;
}

/* One frame from the server: MORE, or the exit status. */
static int on_frame(stream_t *st, const uint8_t *data, size_t len)
{
    Bitnet__Reply *r = bitnet__reply__unpack(NULL, len, data);
    if (!r) {
        end_line(st);
        fail("a reply of %zu bytes is not a valid message", len);
        return 1;
    }
    /* An error without an id answers a message the server could not read (too
     * large, or undecodable): on this connection, only ours. */
    int unread = (!r->request_id || !*r->request_id) && r->body_case == BITNET__REPLY__BODY_ERROR;
    int rc = MORE;
    if (unread || (r->request_id && !strcmp(r->request_id, st->o->id)))
        rc = on_reply(st, r);
    else
        debug("ignored a reply to request '%s' (not ours)", r->request_id ? r->request_id : "");
    bitnet__reply__free_unpacked(r, NULL);
    return rc;
}

/* Every frame waiting on the socket, counted in *n_frames: MORE, or the exit status. */
static int read_frames(void *sock, stream_t *st, size_t *n_frames)
{
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, sock, ZMQ_DONTWAIT) < 0) {
            int err = errno;
            zmq_msg_close(&msg);
            errno = err;
            return err == EAGAIN || err == EINTR ? MORE : zfail("zmq_msg_recv");
        }
        ++*n_frames;
        int rc = on_frame(st, zmq_msg_data(&msg), zmq_msg_size(&msg));
        zmq_msg_close(&msg);
        if (rc != MORE)
            return rc;
    }
}

static int report_timeout(const options_t *o, size_t n_frames)
{
    const char *why = n_frames ? "did the server stop?"
                    : o->server_key[0] ? "is the server running, and is --server-key its public key?"
                                       : "is the server running?";
    fail("no answer from %s for %g s (%s)", o->server, o->timeout_s, why);
    return 1;
}

/* Wait for the answers in ticks, watching for signals and the timeout. The first
 * signal during a generate sends Cancel and allows CANCEL_GRACE_MS for the final;
 * a second signal, or one during another request, ends the wait at once. */
static int wait_replies(void *sock, const options_t *o, stream_t *st)
{
    double last = now_ms(), grace_end = 0;
    size_t n_frames = 0;
    for (;;) {
        if (g_signals && (o->cmd != CMD_GENERATE || g_signals > 1))
            return EXIT_INTERRUPTED;
        if (g_signals && !st->interrupted) {
            debug("interrupted: cancelling request '%s'", o->id);
            st->interrupted = 1;
            if (send_empty(sock, o->id, BITNET__REQUEST__BODY_CANCEL))
                return EXIT_INTERRUPTED;
            grace_end = now_ms() + CANCEL_GRACE_MS;
        }
        double t = now_ms(), left = st->interrupted ? grace_end - t : last + o->timeout_s * 1e3 - t;
        if (left <= 0) {
            end_line(st);
            return st->interrupted ? EXIT_INTERRUPTED : report_timeout(o, n_frames);
        }
        zmq_pollitem_t item = { .socket = sock, .events = ZMQ_POLLIN };
        int n = zmq_poll(&item, 1, left < TICK_MS ? (long)left + 1 : TICK_MS);
        if (n < 0 && errno != EINTR)
            return zfail("zmq_poll");
        if (n <= 0)
            continue;
        size_t before = n_frames;
        int rc = read_frames(sock, st, &n_frames);
        if (rc != MORE)
            return rc;
        if (n_frames > before)
            last = now_ms();
    }
}

/* ---- sockets, and the two things bitnet-client does ---- */

/* CURVE with an ephemeral client key pair; returns 0 or exit status 1. */
static int set_curve(void *sock, const char *server_key)
{
    char pub[KEY_LEN + 1], sec[KEY_LEN + 1];
    if (zmq_curve_keypair(pub, sec))
        return zfail("zmq_curve_keypair (is libzmq built with CURVE?)");
    int rc = 0;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key, KEY_LEN) ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, pub, KEY_LEN) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, sec, KEY_LEN))
        rc = zfail("zmq_setsockopt (CURVE keys)");
    explicit_bzero(sec, sizeof sec);
    return rc;
}

/* A DEALER (in *sock_out, even on failure) connected to o->server; returns 0, or
 * an exit status after a message. */
int open_socket(const options_t *o, void *ctx, void **sock_out)
{
    int linger = 0;
    int64_t max_msg = MAX_REPLY_BYTES;
    void *sock = *sock_out = zmq_socket(ctx, ZMQ_DEALER);
    if (!sock)
        return zfail("zmq_socket");
    if (zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger) ||
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg))
        return zfail("zmq_setsockopt");
    if (o->server_key[0] && set_curve(sock, o->server_key))
        return 1;
    if (zmq_connect(sock, o->server)) {
        int bad_endpoint = errno == EINVAL || errno == EPROTONOSUPPORT;
        fail("--server '%s': %s", o->server, zmq_strerror(errno));
        return bad_endpoint ? EXIT_USAGE : 1;
    }
    debug("connecting to %s%s", o->server, o->server_key[0] ? " (CURVE)" : "");
    return 0;
}

/* A generate, info, health or stats request from start to end: the exit status. */
static int run(options_t *o)
{
    static const Bitnet__Request__BodyCase bodies[] = {
        [CMD_INFO] = BITNET__REQUEST__BODY_INFO, [CMD_HEALTH] = BITNET__REQUEST__BODY_HEALTH,
        [CMD_STATS] = BITNET__REQUEST__BODY_STATS };
    char id[64], *prompt = o->prompt;
    if (!o->id) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(id, sizeof id, "bitnet-client-%ld-%llx", (long)getpid(),
                 (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec);
        o->id = id;
    }
    if (o->prompt_file && !(prompt = read_prompt_file(o->prompt_file)))
        return 1;
    catch_signals();

    stream_t st = { .o = o };
    void *sock = NULL, *ctx = zmq_ctx_new();
    int rc = ctx ? open_socket(o, ctx, &sock) : zfail("zmq_ctx_new");
    bn_gen_params_t g;
    gen_defaults(o, &g);
    g.prompt = prompt;
    g.prompt_len = prompt ? strlen(prompt) : 0;
    if (!rc)
        rc = o->cmd == CMD_GENERATE ? send_generate(sock, o->id, &g) : send_empty(sock, o->id, bodies[o->cmd]);
    if (!rc)
        rc = wait_replies(sock, o, &st);
    end_line(&st);
    if (fflush(stdout) || ferror(stdout)) {
        fail("writing stdout: %s", strerror(errno));
        rc = rc ? rc : 1;
    }
    if (sock)
        zmq_close(sock);
    while (ctx && zmq_ctx_term(ctx) && errno == EINTR)
        ;
    if (prompt != o->prompt)
        free(prompt);
    return rc;
}

/* Create path (never over an existing file) holding key and '\n', with exactly
 * `mode` whatever the umask. 0, or -1 after a message with nothing left behind. */
static int write_key_file(const char *path, const char *key, mode_t mode)
{
    char line[KEY_LEN + 1];
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode);
    if (fd < 0)
        return fail("keygen: %s: %s%s", path, strerror(errno), errno == EEXIST ? " (not overwritten)" : "");
    memcpy(line, key, KEY_LEN);
    line[KEY_LEN] = '\n';
    int ok = fchmod(fd, mode) == 0 && write(fd, line, sizeof line) == (ssize_t)sizeof line;
    int err = errno;
    ok = close(fd) == 0 && ok;
    explicit_bzero(line, sizeof line);
    if (!ok) {
        fail("keygen: %s: %s", path, strerror(err ? err : errno));
        unlink(path);
        return -1;
    }
    return 0;
}

/* keygen FILE: the secret key to FILE (0600), the public key to FILE.pub (0644)
 * and stdout. Neither file is left behind when the other cannot be written. */
static int keygen(const char *file)
{
    char pub[KEY_LEN + 1], sec[KEY_LEN + 1], pub_path[PATH_MAX];
    if (snprintf(pub_path, sizeof pub_path, "%s.pub", file) >= (int)sizeof pub_path) {
        fail("keygen: %s: the name is too long", file);
        return 1;
    }
    if (zmq_curve_keypair(pub, sec))
        return zfail("zmq_curve_keypair (is libzmq built with CURVE?)");
    int rc = 1;
    if (write_key_file(file, sec, 0600) == 0) {
        if (write_key_file(pub_path, pub, 0644) == 0)
            rc = 0;
        else
            unlink(file);
    }
    explicit_bzero(sec, sizeof sec);
    if (rc == 0) {
        fprintf(stderr, "bitnet-client: the secret key is in %s (mode 0600, for the server), the public key in %s\n",
                file, pub_path);
        printf("%s\n", pub);
    }
    return rc;
}

int main(int argc, char **argv)
{
    options_t o = { 0 };
    char **pos = calloc(argc, sizeof *pos);
    int rc = pos ? parse_args(argc, argv, &o, pos) : (fail("out of memory"), 1);
    if (rc == MORE)
        rc = o.cmd == CMD_KEYGEN ? keygen(o.keygen_file) : o.cmd == CMD_BATCH ? run_batch(&o) : run(&o);
    free(o.stop);
    free(o.endpoint_buf);
    free(o.tokens);
    free(pos);
    return rc;
}
