/* main.c - bitnet-worker's command line: load a model, then tokenize, dump logits
 * or generate text. The only place that calls exit (by returning from main).
 *
 *   bitnet-worker --model M.gguf --prompt "text" -n 64
 *   bitnet-worker --model M.gguf --tokens 496,39,68 --dump-logits out.f32
 *   bitnet-worker --model M.gguf --prompt "text" --tokenize
 * Exit status: 0 done, 1 runtime error (bad model file, context exceeded...),
 * 2 bad command line. stdout carries only the generated text (or the ids). */
#include "coordinator/sampler.h"
#include "coordinator/tokenizer.h"
#include "coordinator/vocab.h"
#include "proto/status.h"
#include "worker/comm.h"
#include "worker/forward.h"
#include "worker/log.h"
#include "worker/model.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct {
    const char *model, *prompt, *prompt_file, *tokens, *dump_logits;
    int n_predict, tokenize, chat, stats, print_ids, ctx, threads, lm_head;
    int log_level;
    int seed_given;
    bn_sampler_params_t sp;
} options_t;

static void usage(FILE *f)
{
    fputs(
        "usage: bitnet-worker --model FILE [input] [options]\n"
        "\n"
        "input (one of):\n"
        "  --prompt TEXT        prompt text (BOS added when the model asks for it)\n"
        "  --prompt-file FILE   prompt text read from FILE\n"
        "  --tokens IDS         prompt as comma-separated token ids, exactly those\n"
        "\n"
        "what to do (default: generate text to stdout):\n"
        "  --tokenize           print the ids of the prompt text exactly as written\n"
        "                       (no BOS added, special tokens recognised) and exit\n"
        "  --dump-logits FILE   evaluate the prompt once; write little-endian float32\n"
        "                       logits, one row of n_vocab per position; no generation\n"
        "  -n, --n-predict N    tokens to generate (default 64)\n"
        "  --chat               wrap the prompt in the model's chat form\n"
        "  --print-ids          print generated token ids instead of text\n"
        "\n"
        "sampling:\n"
        "  --temp T             temperature, 0 = greedy (default 0.8)\n"
        "  --top-k K            keep the K most likely tokens, 0 = all (default 40)\n"
        "  --top-p P            keep the smallest set with probability >= P (default 0.95)\n"
        "  --min-p P            drop tokens below P x the best probability (default 0.05)\n"
        "  --seed N             random seed (default: from the clock, logged)\n"
        "\n"
        "run:\n"
        "  --threads N          compute threads (default: the CPUs this process may use)\n"
        "  --lm-head T          LM head format: f16, q8, q6 or q4 (default q6; f16 is\n"
        "                       exact, and an F16 embedding is then used in place)\n"
        "  --ctx N              context length (default: the model's, at most 4096)\n"
        "  --stats              print speed and memory; last line on stderr is\n"
        "                       'stats: prompt_tokens=N prompt_tps=X gen_tokens=N gen_tps=X peak_rss_mb=X'\n"
        "  --log-level L        error, warn, info or debug (default info)\n"
        "  -h, --help           this text\n",
        f);
}

static int parse_int(const char *flag, const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "bitnet-worker: %s: '%s' is not an integer in [%ld, %ld]\n", flag, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_float(const char *flag, const char *s, float lo, float hi, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "bitnet-worker: %s: '%s' is not a number in [%g, %g]\n", flag, s, (double)lo, (double)hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, options_t *o)
{
    memset(o, 0, sizeof *o);
    o->n_predict = 64;
    o->lm_head = -1;
    o->log_level = BN_LOG_INFO;
    o->sp = (bn_sampler_params_t){ .temp = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        }
        int is_flag = !strcmp(a, "--tokenize") || !strcmp(a, "--chat") || !strcmp(a, "--stats") ||
                      !strcmp(a, "--print-ids");
        if (is_flag) {
            if (!strcmp(a, "--tokenize")) o->tokenize = 1;
            else if (!strcmp(a, "--chat")) o->chat = 1;
            else if (!strcmp(a, "--stats")) o->stats = 1;
            else o->print_ids = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "bitnet-worker: %s needs a value (or is unknown; see --help)\n", a);
            return -1;
        }
        const char *v = argv[++i];
        int rc = 0;
        if (!strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--prompt-file")) o->prompt_file = v;
        else if (!strcmp(a, "--tokens")) o->tokens = v;
        else if (!strcmp(a, "--dump-logits")) o->dump_logits = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) rc = parse_int(a, v, 0, 1 << 24, &o->n_predict);
        else if (!strcmp(a, "--ctx")) rc = parse_int(a, v, 1, 1 << 24, &o->ctx);
        else if (!strcmp(a, "--threads")) rc = parse_int(a, v, 1, 1024, &o->threads);
        else if (!strcmp(a, "--lm-head")) {
            o->lm_head = bn_head_type_parse(v);
            if (o->lm_head < 0) {
                fprintf(stderr, "bitnet-worker: --lm-head: '%s' is not f16, q8, q6 or q4\n", v);
                rc = -1;
            }
        }
        else if (!strcmp(a, "--temp")) rc = parse_float(a, v, 0.0f, 100.0f, &o->sp.temp);
        else if (!strcmp(a, "--top-k")) rc = parse_int(a, v, 0, INT_MAX, &o->sp.top_k);
        else if (!strcmp(a, "--top-p")) {
            rc = parse_float(a, v, 0.0f, 1.0f, &o->sp.top_p);
            if (!rc && o->sp.top_p == 0.0f) {
                fprintf(stderr, "bitnet-worker: --top-p: must be above 0\n");
                rc = -1;
            }
        }
        else if (!strcmp(a, "--min-p")) {
            rc = parse_float(a, v, 0.0f, 1.0f, &o->sp.min_p);
            if (!rc && o->sp.min_p >= 1.0f) {
                fprintf(stderr, "bitnet-worker: --min-p: must be below 1\n");
                rc = -1;
            }
        }
        else if (!strcmp(a, "--seed")) {
            char *end;
            errno = 0;
            unsigned long long s = strtoull(v, &end, 10);
            if (errno || end == v || *end || v[0] == '-') {
                fprintf(stderr, "bitnet-worker: --seed: '%s' is not a non-negative integer\n", v);
                rc = -1;
            }
            o->sp.seed = s;
            o->seed_given = 1;
        }
        else if (!strcmp(a, "--log-level")) {
            o->log_level = bn_log_parse_level(v);
            if (o->log_level < 0) {
                fprintf(stderr, "bitnet-worker: --log-level: '%s' is not error, warn, info or debug\n", v);
                rc = -1;
            }
        }
        else {
            fprintf(stderr, "bitnet-worker: unknown option '%s' (see --help)\n", a);
            return -1;
        }
        if (rc)
            return -1;
    }
    if (!o->model) {
        fprintf(stderr, "bitnet-worker: --model FILE is required (see --help)\n");
        return -1;
    }
    int inputs = !!o->prompt + !!o->prompt_file + !!o->tokens;
    if (inputs != 1) {
        fprintf(stderr, "bitnet-worker: give exactly one of --prompt, --prompt-file, --tokens\n");
        return -1;
    }
    if (o->tokenize && o->tokens) {
        fprintf(stderr, "bitnet-worker: --tokenize needs --prompt or --prompt-file\n");
        return -1;
    }
    if (o->chat && o->tokens) {
        fprintf(stderr, "bitnet-worker: --chat needs --prompt or --prompt-file\n");
        return -1;
    }
    return 0;
}

/* Parse "1,2,3" into ids; every id must be a token of the vocabulary. */
static int parse_tokens(const char *s, uint32_t n_vocab, int32_t **ids, size_t *n, char *err, size_t errlen)
{
    size_t cap = 16, k = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ',')) {
            free(v);
            return bn_err(err, errlen, BN_EINVAL, "--tokens: '%s' is not a comma-separated list of ids", s);
        }
        if (x < 0 || x >= (long)n_vocab) {
            free(v);
            return bn_err(err, errlen, BN_EINVAL, "--tokens: unknown token id %ld (vocabulary has %u tokens)", x, n_vocab);
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (cap *= 2) * sizeof *v);
            if (!nv) {
                free(v);
                return bn_err(err, errlen, BN_ENOMEM, "out of memory");
            }
            v = nv;
        }
        v[k++] = (int32_t)x;
        p = *end ? end + 1 : end;
    }
    if (k == 0) {
        free(v);
        return bn_err(err, errlen, BN_EINVAL, "--tokens: no ids given");
    }
    *ids = v;
    *n = k;
    return BN_OK;
}

static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        bn_err(err, errlen, BN_EIO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0, r;
    char *buf = malloc(cap);
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                buf = NULL;
            }
            buf = nb;
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        free(buf);
        bn_err(err, errlen, BN_EIO, "%s: cannot read", path);
        return NULL;
    }
    *len = n;
    return buf;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double peak_rss_mb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;
}

typedef struct {
    int n_prompt, n_gen;
    double t_prompt, t_gen;
} run_stats_t;

static int dump_logits(const bn_model_t *m, bn_state_t *st, const int32_t *ids, size_t n, const char *path,
                       run_stats_t *rs, char *err, size_t errlen)
{
    uint32_t V = m->cfg.n_vocab;
    bn_batch_entry_t *b = malloc(n * sizeof *b);
    float *logits = malloc(n * V * sizeof(float));
    if (!b || !logits) {
        free(b);
        free(logits);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for %zu rows of logits", n);
    }
    for (size_t i = 0; i < n; i++)
        b[i] = (bn_batch_entry_t){ .seq = 0, .pos = (int32_t)i, .token = ids[i], .want_logits = 1 };
    double t0 = now_s();
    int rc = bn_forward(m, st, b, (int)n, logits, err, errlen);
    rs->t_prompt = now_s() - t0;
    rs->n_prompt = (int)n;
    if (rc == BN_OK) {
        FILE *f = fopen(path, "wb");
        if (!f)
            rc = bn_err(err, errlen, BN_EIO, "%s: cannot create: %s", path, strerror(errno));
        else {
            size_t w = fwrite(logits, sizeof(float), n * V, f);
            if (fclose(f) != 0 || w != n * V)
                rc = bn_err(err, errlen, BN_EIO, "%s: write failed", path);
        }
    }
    free(b);
    free(logits);
    return rc;
}

static int generate(const bn_model_t *m, bn_state_t *st, const bn_tokenizer_t *tok, const int32_t *ids,
                    size_t n, const options_t *o, run_stats_t *rs, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    uint32_t V = c->n_vocab;
    bn_sampler_t *smp = NULL;
    int rc = bn_sampler_new(&o->sp, V, &smp, err, errlen);
    if (rc)
        return rc;
    bn_batch_entry_t *b = malloc(n * sizeof *b);
    float *logits = malloc(V * sizeof(float));
    if (!b || !logits) {
        rc = bn_err(err, errlen, BN_ENOMEM, "out of memory");
        goto done;
    }
    /* prefill: the whole prompt in one batch, logits for the last position only */
    for (size_t i = 0; i < n; i++)
        b[i] = (bn_batch_entry_t){ .seq = 0, .pos = (int32_t)i, .token = ids[i], .want_logits = i + 1 == n };
    double t0 = now_s();
    if ((rc = bn_forward(m, st, b, (int)n, logits, err, errlen)))
        goto done;
    rs->t_prompt = now_s() - t0;
    rs->n_prompt = (int)n;

    bn_detok_t dt = { 0 };
    char out[256];
    int pos = (int)n;
    const char *finish = "length";
    t0 = now_s();
    for (int g = 0; g < o->n_predict; g++) {
        int32_t next = bn_sampler_sample(smp, logits);
        if (next == c->eos_id || next == c->eot_id) {
            finish = "stop";
            break;
        }
        rs->n_gen++;
        if (o->print_ids) {
            printf(g ? " %d" : "%d", next);
        } else {
            size_t k = bn_detok_push(tok, &dt, next, out, sizeof out);
            fwrite(out, 1, k, stdout);
        }
        fflush(stdout);
        if (g + 1 == o->n_predict)
            break;
        if ((uint32_t)pos >= st->n_ctx) {
            BN_WARN("context of %u tokens is full: generation stopped after %d tokens", st->n_ctx, rs->n_gen);
            finish = "context";
            break;
        }
        bn_batch_entry_t e = { .seq = 0, .pos = pos++, .token = next, .want_logits = 1 };
        if ((rc = bn_forward(m, st, &e, 1, logits, err, errlen)))
            goto done;
    }
    rs->t_gen = now_s() - t0;
    if (!o->print_ids) {
        size_t k = bn_detok_flush(&dt, out, sizeof out);
        fwrite(out, 1, k, stdout);
    }
    putchar('\n');
    fflush(stdout);
    BN_INFO("finished: %s, %d prompt tokens, %d generated", finish, rs->n_prompt, rs->n_gen);
done:
    free(b);
    free(logits);
    bn_sampler_destroy(&smp);
    return rc;
}

static int run(const options_t *o, char *err, size_t errlen)
{
    bn_model_t *m = NULL;
    bn_tokenizer_t *tok = NULL;
    bn_state_t *st = NULL;
    bn_pool_t *pool = NULL;
    int32_t *ids = NULL;
    char *text = NULL, *chat = NULL;
    size_t n_ids = 0, text_len = 0;
    run_stats_t rs = { 0 };

    int n_threads = o->threads ? o->threads : bn_pool_default_threads();
    int rc = bn_pool_new(n_threads, &pool, err, errlen);
    if (rc)
        goto done;
    double t_load = now_s();
    bn_model_opts_t mo = { .head_type = o->lm_head, .pool = pool };
    if ((rc = bn_model_load(o->model, &mo, &m, err, errlen)))
        goto done;
    const bn_config_t *c = &m->cfg;
    BN_INFO("model %s: %s, %u layers, width %u, ffn %u, heads %u/%u, vocab %u, weights %s, embedding %s, "
            "LM head %s; loaded in %.2f s",
            o->model, c->arch, c->n_layer, c->n_embd, c->n_ff, c->n_head, c->n_head_kv, c->n_vocab,
            bn_type_name(m->w.wtype), bn_type_name(m->w.embd_type), bn_head_type_name(m->w.head.type),
            now_s() - t_load);
    BN_INFO("%s, %d thread%s", bn_kernels_choice(), n_threads, n_threads == 1 ? "" : "s");
    if ((rc = bn_vocab_load(m->gguf, &tok, err, errlen)))
        goto done;
    if (bn_tokenizer_warning(tok))
        BN_WARN("%s: %s", o->model, bn_tokenizer_warning(tok));
    m->cfg.eot_id = m->cfg.eot_id >= 0 ? m->cfg.eot_id : bn_tokenizer_find(tok, "<|eot_id|>");
    BN_INFO("stop tokens: eos %d, eot %d", c->eos_id, c->eot_id);

    if (o->tokens) {
        if ((rc = parse_tokens(o->tokens, c->n_vocab, &ids, &n_ids, err, errlen)))
            goto done;
    } else {
        if (o->prompt) {
            text_len = strlen(o->prompt);
            text = strdup(o->prompt);
        } else {
            text = read_file(o->prompt_file, &text_len, err, errlen);
            if (!text) {
                rc = BN_EIO;
                goto done;
            }
        }
        const char *src = text;
        size_t src_len = text_len;
        if (o->chat) {
            if ((rc = bn_vocab_chat_wrap(m->gguf, text, text_len, &chat, &src_len, err, errlen)))
                goto done;
            src = chat;
        }
        if ((rc = bn_tokenizer_encode(tok, src, src_len, 1, &ids, &n_ids, err, errlen)))
            goto done;
        if (o->tokenize) {
            for (size_t i = 0; i < n_ids; i++)
                printf(i ? " %d" : "%d", ids[i]);
            putchar('\n');
            goto done;
        }
        /* BOS as the model asks, unless the text (e.g. a chat form) already starts with it */
        if (c->add_bos && c->bos_id >= 0 && (n_ids == 0 || ids[0] != c->bos_id)) {
            int32_t *nids = realloc(ids, (n_ids + 1) * sizeof *ids);
            if (!nids) {
                rc = bn_err(err, errlen, BN_ENOMEM, "out of memory");
                goto done;
            }
            ids = nids;
            memmove(ids + 1, ids, n_ids * sizeof *ids);
            ids[0] = c->bos_id;
            n_ids++;
        }
    }
    if (n_ids == 0) {
        rc = bn_err(err, errlen, BN_EINVAL, "the prompt is empty");
        goto done;
    }
    uint32_t n_ctx = o->ctx ? (uint32_t)o->ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
    if (n_ids > n_ctx) {
        rc = bn_err(err, errlen, BN_ECONTEXT, "the prompt has %zu tokens, more than the context of %u (see --ctx)",
                    n_ids, n_ctx);
        goto done;
    }
    if ((rc = bn_state_new(m, n_ctx, 1, pool, &st, err, errlen)))
        goto done;
    if (o->dump_logits)
        rc = dump_logits(m, st, ids, n_ids, o->dump_logits, &rs, err, errlen);
    else
        rc = generate(m, st, tok, ids, n_ids, o, &rs, err, errlen);
    if (rc == BN_OK && o->stats) {
        double ptps = rs.t_prompt > 0 ? rs.n_prompt / rs.t_prompt : 0;
        /* the first generated token comes from the prompt's logits and the last is
         * never evaluated: the timed loop holds n_gen - 1 forward passes */
        double gtps = rs.t_gen > 0 && rs.n_gen > 1 ? (rs.n_gen - 1) / rs.t_gen : 0;
        fprintf(stderr, "prompt: %d tokens in %.3f s (%.2f tokens/s)\n", rs.n_prompt, rs.t_prompt, ptps);
        fprintf(stderr, "generation: %d tokens in %.3f s (%.2f tokens/s)\n", rs.n_gen, rs.t_gen, gtps);
        fprintf(stderr, "kernels: %s, %d threads, LM head %s; peak memory %.1f MB\n", bn_kernels_get()->name,
                bn_pool_size(pool), bn_head_type_name(m->w.head.type), peak_rss_mb());
        double wmb = bn_model_bytes_per_token(m) / 1e6;
        fprintf(stderr, "weights read per generated token: %.1f MB (%.2f GB/s at this speed)\n", wmb, wmb * gtps / 1e3);
        fprintf(stderr, "stats: prompt_tokens=%d prompt_tps=%.3f gen_tokens=%d gen_tps=%.3f peak_rss_mb=%.1f "
                "threads=%d kernels=%s lm_head=%s weight_mb_per_token=%.1f\n",
                rs.n_prompt, ptps, rs.n_gen, gtps, peak_rss_mb(), bn_pool_size(pool), bn_kernels_get()->name,
                bn_head_type_name(m->w.head.type), wmb);
    }
done:
    free(ids);
    free(text);
    free(chat);
    bn_state_destroy(&st);
    bn_pool_destroy(&pool);
    bn_tokenizer_destroy(&tok);
    bn_model_destroy(&m);
    return rc;
}

int main(int argc, char **argv)
{
    options_t o;
    int prc = parse_args(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    bn_comm_t comm = { 0 };
    char err[1024] = "";
    if (bn_comm_init(&argc, &argv, &comm, err, sizeof err) != BN_OK) {
        fprintf(stderr, "bitnet-worker: %s\n", err);
        return 1;
    }
    bn_log_setup((bn_log_level_t)o.log_level, comm.rank);
    if (comm.size > 1) {
        if (comm.rank == 0)
            BN_ERROR("this build runs on one rank; sharding over %d ranks is not implemented yet", comm.size);
        bn_comm_finalize(&comm);
        return 1;
    }
    if (!o.seed_given) {
        o.sp.seed = (uint64_t)time(NULL);
        BN_INFO("seed %llu", (unsigned long long)o.sp.seed);
    }
    int rc = run(&o, err, sizeof err);
    if (rc != BN_OK)
        BN_ERROR("%s", err);
    bn_comm_finalize(&comm);
    return rc == BN_OK ? 0 : (rc == BN_EINVAL ? 2 : 1);
}
