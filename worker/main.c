/* main.c - bitnet-worker's command line: load a model, then tokenize, dump logits
 * or generate text. The only place that calls exit (by returning from main).
 *
 *   bitnet-worker --model M.gguf --prompt "text" -n 64
 *   bitnet-worker --model M.gguf --tokens 496,39,68 --dump-logits out.f32
 *   bitnet-worker --model M.gguf --prompt "text" --tokenize
 * Exit status: 0 done, 1 runtime error (bad model file, context exceeded...),
 * 2 bad command line. stdout carries only the generated text (or the ids). */
#include "coordinator/batch_job.h"
#include "coordinator/cli.h"
#include "coordinator/net/server.h"
#include "coordinator/plan.h"
#include "coordinator/sampler.h"
#include "coordinator/tokenizer.h"
#include "coordinator/vocab.h"
#include "base/status.h"
#include "worker/comm.h"
#include "worker/engine.h"
#include "worker/forward.h"
#include "base/log.h"
#include "worker/model.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    const char *model, *prompt, *prompt_file, *tokens, *dump_logits;
    int n_predict, tokenize, chat, stats, print_ids, ctx, threads, lm_head, kv_type;
    int tp, pp, replicas, replica, mem_mb, ignore_eos;
    int log_level;
    int seed_given;
    /* --serve */
    int serve, max_seqs, max_queue, step_tokens, kv_budget_mb, max_msg_bytes, prefix_cache_mb, window;
    float prefix_cache_s;
    float drain_s;
    const char *endpoint_file;
    const char *bind, *curve_secret_file;
    const char *batch, *batch_out;   /* --batch IN --out OUT */
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
        "  --ignore-eos         do not stop at end-of-text tokens (fixed-length runs)\n"
        "\n"
        "sampling:\n"
        "  --temp T             temperature, 0 = greedy (default 0.8)\n"
        "  --top-k K            keep the K most likely tokens, 0 = all (default 40)\n"
        "  --top-p P            keep the smallest set with probability >= P (default 0.95)\n"
        "  --min-p P            drop tokens below P x the best probability (default 0.05)\n"
        "  --seed N             random seed (default: from the clock, logged)\n"
        "\n"
        "run:\n"
        "  --threads N          compute threads (default: the CPUs this process may use,\n"
        "                       shared out among the ranks on the node when unbound)\n"
        "  --lm-head T          LM head format: f16, q8, q6 or q4 (default q6; f16 is\n"
        "                       exact, and an F16 embedding is then used in place)\n"
        "  --ctx N              context length (default: the model's, at most 4096)\n"
        "  --kv-type T          KV cache values: f16 (default: half the memory and the\n"
        "                       bytes attention reads of f32), f32 (exact), q8 or q4\n"
        "                       (blocks of 32 with one scale: about 1/1.9 and 1/3.6 of\n"
        "                       f16; bench/RESULTS.md has their logit differences)\n"
        "  --window N           sliding-window attention: each position attends to the\n"
        "                       last N only. CHANGES THE MODEL'S OUTPUT (BitNet was\n"
        "                       trained with full attention); the memory of positions\n"
        "                       that fall out of the window is given back\n"
        "\n"
        "ranks (under mpirun or srun --mpi=pmix; the plan is printed at start):\n"
        "  --tp N               tensor ranks per stage (default: chosen, see below)\n"
        "  --pp N               pipeline stages (default: chosen)\n"
        "  --replicas N         independent copies of the model (default: chosen)\n"
        "                       unpinned: tensor ranks within a node, replicas when the\n"
        "                       model fits a rank's memory, stages when it does not\n"
        "  --replica N          the replica that runs this prompt (default 0)\n"
        "  --mem-per-rank MB    memory a rank may use (default: available memory over\n"
        "                       the ranks on the node)\n"
        "\n"
        "batch (a JSONL file of prompts in, a JSONL file of answers out; resumable):\n"
        "  --batch IN --out OUT run every line of IN not yet answered in OUT: lines\n"
        "                       {\"id\": ..., \"prompt\": \"...\"} or {\"id\": ..., \"tokens\": [...]},\n"
        "                       optional max_tokens, temperature, top_k, top_p, min_p,\n"
        "                       seed, stop, chat (the sampling flags are the defaults);\n"
        "                       --max-seqs of them run at once. SIGTERM, SIGINT or\n"
        "                       SIGUSR1 stop it: running lines get --drain-s to finish,\n"
        "                       the rest is left for the next run (exit status 3)\n"
        "\n"
        "serving (rank 0 answers bitnet-client over ZeroMQ; see README, Serving):\n"
        "  --serve              serve requests until SIGINT, SIGTERM or SIGUSR1 (no prompt\n"
        "                       flags)\n"
        "  --bind EP            ZeroMQ endpoint (default tcp://127.0.0.1:5555; port *\n"
        "                       takes any free one, logged)\n"
        "  --curve-secret-file F  CURVE: only clients with this server's public key\n"
        "                       get service (bitnet-client keygen F writes F, F.pub)\n"
        "  --max-seqs N         sequences running at once per replica (default 16)\n"
        "  --max-queue N        requests waiting for a slot; more get 'busy' (default 64)\n"
        "  --kv-budget-mb MB    KV memory the sequences of one replica may reserve\n"
        "                       (prompt + max_tokens each; default 0: the slots bound it)\n"
        "  --prefix-cache-mb MB KV memory that ended requests keep per replica so later\n"
        "                       ones starting with the same tokens (a system prompt)\n"
        "                       skip computing them (default: up to the KV budget, or\n"
        "                       the free slots; 0: off; off with --window). Requests\n"
        "                       running at once share a prefix by copying it\n"
        "  --prefix-cache-s S   a cached prefix unused for S seconds goes back to the\n"
        "                       system (default 300; 0: kept until room is needed)\n"
        "  --step-tokens N      token budget of one step, 1..64 (default 64)\n"
        "  --max-msg-bytes N    largest request accepted (default 1048576)\n"
        "  --drain-s S          after a signal, time for running requests (default 30)\n"
        "  --endpoint-file F    write 'endpoint=tcp://HOST:PORT' (and 'server_key=KEY'\n"
        "                       with CURVE) to F once bound, for bitnet-client\n"
        "                       --endpoint-file F; removed at a clean stop\n"
        "\n"
        "output:\n"
        "  --stats              print speed and memory; last line on stderr is\n"
        "                       'stats: prompt_tokens=N prompt_tps=X gen_tokens=N gen_tps=X peak_rss_mb=X'\n"
        "  --log-level L        error, warn, info or debug (default info)\n"
        "  -h, --help           this text\n",
        f);
}

/* KV bytes one position of context costs a replica: K and V of every layer's KV heads */
static uint64_t kv_pos_bytes(const bn_config_t *c, int kv_type)
{
    return 2ull * c->n_layer * c->n_head_kv * bn_kv_row_bytes(kv_type, c->head_dim);
}

/* the scheduler's prefix_cache bytes: off with a sliding window (a window's
 * early positions are given back, so a prefix would not be whole) */
static uint64_t prefix_cache(const options_t *o)
{
    if (o->window || o->prefix_cache_mb == 0)
        return 0;
    return o->prefix_cache_mb < 0 ? UINT64_MAX : (uint64_t)o->prefix_cache_mb * 1000000u;
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
    o->kv_type = BN_KV_DEFAULT;
    o->log_level = BN_LOG_INFO;
    o->max_seqs = 16;
    o->prefix_cache_mb = -1;
    o->prefix_cache_s = 300;
    o->max_queue = 64;
    o->step_tokens = 64;
    o->max_msg_bytes = 1 << 20;
    o->drain_s = 30;
    o->bind = "tcp://127.0.0.1:5555";
    o->sp = (bn_sampler_params_t){ .temp = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        }
        int is_flag = !strcmp(a, "--tokenize") || !strcmp(a, "--chat") || !strcmp(a, "--stats") ||
                      !strcmp(a, "--print-ids") || !strcmp(a, "--ignore-eos") || !strcmp(a, "--serve");
        if (is_flag) {
            if (!strcmp(a, "--tokenize")) o->tokenize = 1;
            else if (!strcmp(a, "--chat")) o->chat = 1;
            else if (!strcmp(a, "--stats")) o->stats = 1;
            else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = 1;
            else if (!strcmp(a, "--serve")) o->serve = 1;
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
        else if (!strcmp(a, "--tp")) rc = parse_int(a, v, 1, 4096, &o->tp);
        else if (!strcmp(a, "--pp")) rc = parse_int(a, v, 1, 4096, &o->pp);
        else if (!strcmp(a, "--replicas")) rc = parse_int(a, v, 1, 4096, &o->replicas);
        else if (!strcmp(a, "--replica")) rc = parse_int(a, v, 0, 4095, &o->replica);
        else if (!strcmp(a, "--mem-per-rank")) rc = parse_int(a, v, 1, INT_MAX, &o->mem_mb);
        else if (!strcmp(a, "--bind")) o->bind = v;
        else if (!strcmp(a, "--batch")) o->batch = v;
        else if (!strcmp(a, "--out")) o->batch_out = v;
        else if (!strcmp(a, "--curve-secret-file")) o->curve_secret_file = v;
        else if (!strcmp(a, "--max-seqs")) rc = parse_int(a, v, 1, 4096, &o->max_seqs);
        else if (!strcmp(a, "--max-queue")) rc = parse_int(a, v, 1, 1 << 20, &o->max_queue);
        else if (!strcmp(a, "--step-tokens")) rc = parse_int(a, v, 1, 64, &o->step_tokens);
        else if (!strcmp(a, "--kv-budget-mb")) rc = parse_int(a, v, 0, INT_MAX, &o->kv_budget_mb);
        else if (!strcmp(a, "--prefix-cache-mb")) rc = parse_int(a, v, 0, INT_MAX, &o->prefix_cache_mb);
        else if (!strcmp(a, "--window")) rc = parse_int(a, v, 1, 1 << 24, &o->window);
        else if (!strcmp(a, "--prefix-cache-s")) rc = parse_float(a, v, 0.0f, 1e9f, &o->prefix_cache_s);
        else if (!strcmp(a, "--max-msg-bytes")) rc = parse_int(a, v, 64, 1 << 28, &o->max_msg_bytes);
        else if (!strcmp(a, "--drain-s")) rc = parse_float(a, v, 0.0f, 1e6f, &o->drain_s);
        else if (!strcmp(a, "--endpoint-file")) o->endpoint_file = v;
        else if (!strcmp(a, "--lm-head")) {
            o->lm_head = bn_head_type_parse(v);
            if (o->lm_head < 0) {
                fprintf(stderr, "bitnet-worker: --lm-head: '%s' is not f16, q8, q6 or q4\n", v);
                rc = -1;
            }
        }
        else if (!strcmp(a, "--kv-type")) {
            o->kv_type = bn_kv_type_parse(v);
            if (o->kv_type < 0) {
                fprintf(stderr, "bitnet-worker: --kv-type: '%s' is not f32, f16, q8 or q4\n", v);
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
    if (!!o->batch != !!o->batch_out) {
        fprintf(stderr, "bitnet-worker: --batch IN and --out OUT go together\n");
        return -1;
    }
    if (o->batch && (o->serve || inputs || o->tokenize || o->dump_logits)) {
        fprintf(stderr, "bitnet-worker: --batch takes its prompts from IN: no --serve, --prompt, --prompt-file, "
                "--tokens, --tokenize or --dump-logits\n");
        return -1;
    }
    if (o->serve && (inputs || o->tokenize || o->dump_logits)) {
        fprintf(stderr, "bitnet-worker: --serve takes its prompts from clients: no --prompt, --prompt-file, "
                "--tokens, --tokenize or --dump-logits\n");
        return -1;
    }
    if (o->endpoint_file && !o->serve) {
        fprintf(stderr, "bitnet-worker: --endpoint-file goes with --serve\n");
        return -1;
    }
    if (!o->serve && !o->batch && inputs != 1) {
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

static double peak_rss_mb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;
}

/* What one rank holds for a run. */
typedef struct {
    bn_comm_t *comm;
    bn_plan_t plan;
    bn_pool_t *pool;
    bn_model_t *m;
    bn_state_t *st;
    bn_dist_t dist;
    bn_engine_t *eng;
} rank_t;

/* Rank 0's part of a command-line run: the tokenizer, then the prompt through
 * the scheduler (coordinator/cli.c). */
static volatile sig_atomic_t g_batch_stop;
static void on_batch_signal(int sig)
{
    (void)sig;
    g_batch_stop = g_batch_stop >= 2 ? 2 : g_batch_stop + 1;
}

static int drive(rank_t *rk, const options_t *o, bn_cli_result_t *rs, uint32_t n_ctx, int *exit_code, char *err,
                 size_t errlen)
{
    bn_model_t *m = rk->m;
    bn_tokenizer_t *tok = NULL;
    int rc = bn_vocab_load(m->gguf, &tok, err, errlen);
    if (rc)
        return rc;
    if (bn_tokenizer_warning(tok))
        BN_WARN("%s: %s", o->model, bn_tokenizer_warning(tok));
    m->cfg.eot_id = m->cfg.eot_id >= 0 ? m->cfg.eot_id : bn_tokenizer_find(tok, "<|eot_id|>");
    BN_INFO("stop tokens: eos %d, eot %d", m->cfg.eos_id, m->cfg.eot_id);
    /* KV bytes one position costs a replica: every layer's KV heads once */
    const bn_config_t *c = &m->cfg;
    const uint64_t pos_bytes = kv_pos_bytes(c, rk->st->kv_type);
    if (o->serve) {
        char *plan = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&plan, &len);
        if (f) {
            bn_plan_print(&rk->plan, f, "");
            fclose(f);
        }
        bn_server_opts_t so = { .bind = o->bind, .curve_secret_file = o->curve_secret_file, .drain_s = o->drain_s,
                                .endpoint_file = o->endpoint_file,
                                .max_msg_bytes = (uint32_t)o->max_msg_bytes, .model_path = o->model,
                                .plan_text = plan ? plan : "", .kernels = bn_kernels_get()->name,
                                .lm_head = bn_head_type_name(m->w.head.type), .kv_type = bn_kv_type_name(rk->st->kv_type),
                                .threads = bn_pool_size(rk->pool), .kv = rk->st->kv,
                                .sched = { .max_seqs = o->max_seqs, .max_queue = o->max_queue,
                                           .step_tokens = o->step_tokens, .n_ctx = n_ctx,
                                           .kv_budget = (uint64_t)o->kv_budget_mb * 1000000u, .kv_pos_bytes = pos_bytes,
                                           .prefix_cache = prefix_cache(o), .prefix_ttl_s = o->prefix_cache_s } };
        rc = bn_server_run(&so, rk->eng, &rk->plan, m, tok, err, errlen);
        free(plan);
        bn_tokenizer_destroy(&tok);
        return rc;
    }
    if (o->batch) {
        bn_batch_job_t jb = { .in = o->batch, .out = o->batch_out, .max_seqs = o->max_seqs, .n_ctx = n_ctx,
                              .prefix_cache = prefix_cache(o), .kv_pos_bytes = pos_bytes };
        bn_gen_params_init(&jb.defaults);
        jb.defaults.sp = o->sp;
        jb.defaults.seed_given = o->seed_given;
        jb.defaults.max_tokens = (uint32_t)o->n_predict;
        jb.defaults.chat = o->chat;
        jb.defaults.ignore_eos = o->ignore_eos;
        jb.stop = &g_batch_stop;
        jb.drain_s = o->drain_s;
        struct sigaction sa = { .sa_handler = on_batch_signal };
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGUSR1, &sa, NULL);
        bn_batch_summary_t sum;
        int stopped = 0;
        rc = bn_batch_job_run(&jb, rk->eng, &rk->plan, m, tok, &sum, &stopped, err, errlen);
        size_t left = sum.total - sum.answered - sum.skipped - sum.errors;
        fprintf(stderr, "batch: %zu answered, %zu skipped (already in %s), %zu error lines, %zu left; %llu prompt "
                "(%llu reused) and %llu generated tokens in %.1f s (%.2f generated tokens/s)\n", sum.answered,
                sum.skipped, o->batch_out, sum.errors, left, (unsigned long long)sum.prompt_tokens,
                (unsigned long long)sum.reused_tokens, (unsigned long long)sum.completion_tokens, sum.seconds,
                sum.seconds > 0 ? sum.completion_tokens / sum.seconds : 0.0);
        if (rc == BN_OK && stopped && left)
            *exit_code = 3;
        bn_tokenizer_destroy(&tok);
        return rc;
    }
    bn_cli_opts_t co = { .prompt = o->prompt, .prompt_file = o->prompt_file, .tokens = o->tokens,
                         .dump_logits = o->dump_logits, .tokenize = o->tokenize, .print_ids = o->print_ids,
                         .replica = o->replica };
    bn_gen_params_init(&co.gen);
    co.gen.sp = o->sp;
    co.gen.seed_given = 1;
    co.gen.max_tokens = (uint32_t)o->n_predict;
    co.gen.chat = o->chat;
    co.gen.ignore_eos = o->ignore_eos;
    rc = bn_cli_run(&co, rk->eng, &rk->plan, m, tok, n_ctx, rs, err, errlen);
    bn_tokenizer_destroy(&tok);
    return rc;
}

/* Memory this rank may use: --mem-per-rank, else MemAvailable over the ranks on
 * the node; 0 when unknown. */
static uint64_t mem_per_rank(const options_t *o, int node_ranks)
{
    if (o->mem_mb)
        return (uint64_t)o->mem_mb * 1000000u;
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            break;
    fclose(f);
    return (uint64_t)kb * 1024u / (uint64_t)(node_ranks > 0 ? node_ranks : 1);
}

/* --threads unset: the CPUs this rank may use; when it may use the whole node
 * (mpirun --bind-to none), its share of them, so ranks on a node do not
 * oversubscribe its cores. */
static int default_threads(const bn_comm_t *comm)
{
    int n = bn_pool_default_threads();
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (comm->local_ranks > 1 && online > 0 && n >= online) {
        n /= comm->local_ranks;
        if (n < 1)
            n = 1;
    }
    return n;
}

/* One rank's summary for --stats, gathered at rank 0. */
typedef struct {
    bn_phase_stats_t ps[BN_PHASES];
    double peak_rss_mb;
    double weight_mb;
    double serve_s, serve_cpu_s;  /* wall and CPU time (all threads) in bn_engine_serve */
    double kv_mb;                 /* KV cache pages resident at the end */
} rank_stats_t;

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static void print_stats(const rank_t *rk, const bn_cli_result_t *rs, const rank_stats_t *all)
{
    const bn_plan_t *p = &rk->plan;
    const bn_model_t *m = rk->m;
    double ptps = rs->t_prompt > 0 ? rs->n_prompt / rs->t_prompt : 0;
    /* the first generated token comes from the prompt's logits and the last is
     * never evaluated: the timed loop holds n_gen - 1 forward passes */
    double gtps = rs->t_gen > 0 && rs->n_gen > 1 ? (rs->n_gen - 1) / rs->t_gen : 0;
    fprintf(stderr, "prompt: %d tokens in %.3f s (%.2f tokens/s)\n", rs->n_prompt, rs->t_prompt, ptps);
    fprintf(stderr, "generation: %d tokens in %.3f s (%.2f tokens/s)\n", rs->n_gen, rs->t_gen, gtps);
    fprintf(stderr, "kernels: %s, %d threads per rank, LM head %s\n", bn_kernels_get()->name, bn_pool_size(rk->pool),
            bn_head_type_name(m->w.head.type));
    /* per rank: memory, and per generated token (the generation phase's steps) */
    double wmb = 0, rss_max = 0, bytes = 0, coll = 0, comp = 0, comm = 0, wait = 0;
    uint64_t steps = all[0].ps[BN_PHASE_GEN].steps;
    for (int r = 0; r < p->world; r++) {
        const bn_phase_stats_t *g = &all[r].ps[BN_PHASE_GEN];
        double ns = g->steps ? (double)g->steps : 1.0;
        double c = g->t_step - g->t_comm - g->t_wait;
        if (p->world > 1)
            fprintf(stderr, "rank %d: peak memory %.1f MB, weights %.1f MB read per token; per generated token: "
                    "%.0f bytes sent, %.1f collectives, %.2f ms compute, %.2f ms communication, %.2f ms waiting; "
                    "CPU %.1f%% of a core while serving %.2f s\n",
                    r, all[r].peak_rss_mb, all[r].weight_mb, g->bytes_sent / ns, g->collectives / ns,
                    1e3 * (c > 0 ? c : 0) / ns, 1e3 * g->t_comm / ns, 1e3 * g->t_wait / ns,
                    all[r].serve_s > 0 ? 100 * all[r].serve_cpu_s / all[r].serve_s : 0.0, all[r].serve_s);
        wmb += all[r].weight_mb;
        rss_max = all[r].peak_rss_mb > rss_max ? all[r].peak_rss_mb : rss_max;
        bytes += g->bytes_sent / ns;
        coll = g->collectives / ns > coll ? g->collectives / ns : coll;
        comp += (c > 0 ? c : 0) / ns;
        comm += g->t_comm / ns;
        wait += g->t_wait / ns;
    }
    double tot = comp + comm + wait > 0 ? comp + comm + wait : 1;
    fprintf(stderr, "weights read per generated token: %.1f MB over %d rank%s (%.2f GB/s at this speed)\n", wmb,
            p->world, p->world == 1 ? "" : "s", wmb * gtps / 1e3);
    double kv_mb = 0;
    for (int r = 0; r < p->world; r++)
        kv_mb += all[r].kv_mb;
    fprintf(stderr, "KV cache (%s): %.2f MB in use over %d rank%s for %d positions\n", bn_kv_type_name(rk->st->kv_type),
            kv_mb, p->world, p->world == 1 ? "" : "s", rs->n_prompt + (rs->n_gen > 0 ? rs->n_gen - 1 : 0));
    fprintf(stderr, "stats: prompt_tokens=%d prompt_tps=%.3f gen_tokens=%d gen_tps=%.3f peak_rss_mb=%.1f "
            "threads=%d kernels=%s lm_head=%s kv_type=%s weight_mb_per_token=%.1f ranks=%d plan=%dx%dx%d "
            "peak_rss_mb_max=%.1f bytes_per_token=%.0f collectives_per_token=%.1f compute_pct=%.1f comm_pct=%.1f "
            "wait_pct=%.1f gen_steps=%llu kv_mb=%.2f\n",
            rs->n_prompt, ptps, rs->n_gen, gtps, all[0].peak_rss_mb, bn_pool_size(rk->pool), bn_kernels_get()->name,
            bn_head_type_name(m->w.head.type), bn_kv_type_name(rk->st->kv_type), wmb, p->world, p->R, p->P, p->T, rss_max, bytes, coll,
            100 * comp / tot, 100 * comm / tot, 100 * wait / tot, (unsigned long long)steps, kv_mb);
}

/* Every rank learns whether every rank got this far: a failure of one rank
 * (its own file access, its memory) becomes a failure of all, so all end
 * cleanly (MPI_Finalize while others still wait would hang). *quiet is set on
 * the ranks that only echo another's error (the failing rank logs its own). */
static int agree(bn_comm_t *comm, int rc, int *quiet, char *err, size_t errlen)
{
    uint64_t ok = rc == BN_OK, failed = rc != BN_OK;
    char e2[256];
    int crc = bn_comm_min_u64(comm, &ok, e2, sizeof e2);
    if (crc == BN_OK)
        crc = bn_comm_min_u64(comm, &failed, e2, sizeof e2);
    if (crc) {
        if (rc == BN_OK)
            snprintf(err, errlen, "%s", e2);
        return rc ? rc : crc;
    }
    if (failed) /* every rank failed, the same way as a rule (same file, same plan): rank 0 says it */
        *quiet = comm->rank != 0;
    else if (rc == BN_OK && !ok) {
        *quiet = comm->rank != 0;
        return bn_err(err, errlen, BN_EINTERNAL, "another rank failed (its error is above); nothing was run");
    }
    return rc;
}

/* Every rank: plan, load this rank's part, then drive (rank 0) or serve. A
 * failure before the steps start is agreed on by every rank (agree); a failure
 * inside a step leaves the others waiting, so that rank ends the job
 * (MPI_Abort: mpirun then names it). */
static int run(bn_comm_t *comm, const options_t *o, int *quiet, int *exit_code, char *err, size_t errlen)
{
    rank_t rk = { .comm = comm };
    bn_cli_result_t rs = { 0 };
    bn_config_t cfg = { 0 };
    /* the same inputs on every rank, so the same plan */
    uint64_t mem = mem_per_rank(o, comm->node_ranks);
    int rc = bn_comm_min_u64(comm, &mem, err, errlen);
    if (rc)
        return rc;
    rc = bn_model_peek(o->model, &cfg, err, errlen);
    uint32_t n_ctx = 0;
    if (rc == BN_OK) {
        n_ctx = o->ctx ? (uint32_t)o->ctx : (cfg.n_ctx_train < 4096 ? cfg.n_ctx_train : 4096);
        int head = o->lm_head >= 0 ? o->lm_head : BN_HEAD_DEFAULT;
        bn_plan_model_t pm = { .n_layer = cfg.n_layer, .n_embd = cfg.n_embd, .n_ff = cfg.n_ff,
                               .n_head = cfg.n_head, .n_head_kv = cfg.n_head_kv, .head_dim = cfg.head_dim,
                               .n_vocab = cfg.n_vocab, .head_row_bytes = bn_head_row_bytes(head, cfg.n_embd),
                               .kv_bytes_per_pos = 2ull * cfg.n_head_kv * bn_kv_row_bytes(o->kv_type, cfg.head_dim) };
        bn_plan_in_t in = { .world = comm->size, .ranks_per_node = comm->node_ranks,
                            .mem_per_rank = o->mem_mb || comm->size > 1 ? mem : 0, /* one rank has no other plan */
                            .n_ctx = n_ctx, .n_seq = o->serve || o->batch ? (uint32_t)o->max_seqs : 1, .tp = o->tp, .pp = o->pp, .replicas = o->replicas };
        rc = bn_plan_make(&pm, &in, &rk.plan, err, errlen);
    }
    if ((rc = agree(comm, rc, quiet, err, errlen))) {
        bn_plan_free(&rk.plan);
        return rc;
    }
    if (comm->rank == 0 && comm->size > 1) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (f) {
            bn_plan_print(&rk.plan, f, "");
            fclose(f);
            for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
                BN_INFO("%s", line);
            free(buf);
        }
    }
    if (comm->rank == 0 && rc == BN_OK) { /* what a position of context costs, for the chosen KV type */
        const uint64_t row = bn_kv_row_bytes(o->kv_type, cfg.head_dim), pos = kv_pos_bytes(&cfg, o->kv_type);
        const uint32_t slots = o->serve || o->batch ? (uint32_t)o->max_seqs : 1;
        BN_INFO("kv: %s, %llu bytes per position of context per replica (%llu per layer and KV head for K and V), "
                "%.1f MB per %u-position sequence; %u slot%s of %u positions", bn_kv_type_name(o->kv_type),
                (unsigned long long)pos, (unsigned long long)(2 * row), pos * n_ctx / 1e6, n_ctx, slots,
                slots == 1 ? "" : "s", n_ctx);
    }
    const bn_shard_t *me = &rk.plan.rank[comm->rank];
    /* this rank's part: errors here may be one rank's own (memory), so every rank
     * says how it went before any goes on */
    int n_threads = o->threads ? o->threads : default_threads(comm);
    double t_load = bn_now_s();
    bn_model_opts_t mo = { .head_type = o->lm_head, .shard = me };
    if ((rc = bn_comm_grid(comm, rk.plan.R, rk.plan.P, rk.plan.T, err, errlen)) == BN_OK &&
        (rc = bn_pool_new(n_threads, &rk.pool, err, errlen)) == BN_OK &&
        (mo.pool = rk.pool, rc = bn_model_load(o->model, &mo, &rk.m, err, errlen)) == BN_OK &&
        (rc = bn_state_new(rk.m, n_ctx, o->serve || o->batch ? (uint32_t)o->max_seqs : 1, o->kv_type, rk.pool, &rk.st, err, errlen)) == BN_OK) {
        rk.st->window = (uint32_t)o->window;
        bn_comm_dist(comm, &rk.dist);
        if ((rc = bn_state_set_dist(rk.st, &rk.dist, err, errlen)) == BN_OK)
            rc = bn_engine_new(comm, &rk.plan, rk.m, rk.st, &rk.eng, err, errlen);
    }
    rc = agree(comm, rc, quiet, err, errlen);
    double serve_wall = 0, serve_cpu = 0;
    if (rc == BN_OK) {
        const bn_config_t *c = &rk.m->cfg;
        BN_INFO("model %s: %s, %u layers, width %u, ffn %u, heads %u/%u, vocab %u, weights %s, embedding %s, "
                "LM head %s; this rank's part loaded in %.2f s (pid %d)",
                o->model, c->arch, c->n_layer, c->n_embd, c->n_ff, c->n_head, c->n_head_kv, c->n_vocab,
                bn_type_name(rk.m->w.wtype), bn_type_name(rk.m->w.embd_type), bn_head_type_name(rk.m->w.head.type),
                bn_now_s() - t_load, (int)getpid());
        if (comm->rank == 0)
            BN_INFO("%s, %d thread%s per rank", bn_kernels_choice(), n_threads, n_threads == 1 ? "" : "s");
        if (comm->rank == 0) {
            rc = drive(&rk, o, &rs, n_ctx, exit_code, err, errlen);
            /* the others wait for this whatever happened to the prompt */
            char e2[256];
            int src = bn_engine_stop(rk.eng, e2, sizeof e2);
            if (src) { /* the others were not told to stop: they would wait forever */
                BN_ERROR("%s", e2);
                bn_comm_abort(comm, 1);
                if (rc == BN_OK) { /* (no MPI: nobody waits) */
                    rc = src;
                    snprintf(err, errlen, "%s", e2);
                }
            }
        } else {
            if (o->serve || o->batch) { /* srun/mpirun signal every rank: rank 0 drains, then stops the others */
                signal(SIGINT, SIG_IGN);
                signal(SIGTERM, SIG_IGN);
                signal(SIGUSR1, SIG_IGN);
            }
            serve_wall = bn_now_s();
            serve_cpu = cpu_s();
            rc = bn_engine_serve(rk.eng, err, errlen);
            serve_wall = bn_now_s() - serve_wall;
            serve_cpu = cpu_s() - serve_cpu;
        }
        if (rc == BN_ECOMM || (rc && comm->rank != 0)) { /* a step failed half way: nothing can be trusted */
            BN_ERROR("%s", err);
            bn_comm_abort(comm, 1);
        }
        rank_stats_t mine = { .peak_rss_mb = peak_rss_mb(), .weight_mb = bn_model_bytes_per_token(rk.m) / 1e6,
                              .serve_s = serve_wall, .serve_cpu_s = serve_cpu,
                              .kv_mb = bn_kvcache_resident(rk.st->kv) / 1e6 };
        for (int ph = 0; ph < BN_PHASES; ph++)
            mine.ps[ph] = *bn_engine_stats(rk.eng, ph);
        rank_stats_t *all = comm->rank == 0 ? calloc((size_t)comm->size, sizeof *all) : NULL;
        char e3[256];
        if (bn_comm_gather(comm, &mine, sizeof mine, all, e3, sizeof e3) == BN_OK && rc == BN_OK && o->stats &&
            comm->rank == 0 && all && !o->tokenize)
            print_stats(&rk, &rs, all);
        free(all);
    }
    bn_engine_destroy(&rk.eng);
    bn_state_destroy(&rk.st);
    bn_model_destroy(&rk.m);
    bn_pool_destroy(&rk.pool);
    bn_plan_free(&rk.plan);
    return rc;
}

/* Started by Slurm's srun without MPI wiring, N copies would each be a world of
 * one and compute the whole model N times: refuse. */
static int slurm_singleton(const bn_comm_t *comm, char *err, size_t errlen)
{
    const char *s = getenv("SLURM_STEP_NUM_TASKS");
    if (!s)
        s = getenv("SLURM_NTASKS");
    long n = s ? strtol(s, NULL, 10) : 0;
    if (comm->size == 1 && n > 1)
        return bn_err(err, errlen, BN_EINVAL, "Slurm started %ld tasks, but this process is an MPI world of one: "
                      "srun without MPI wiring starts %ld separate copies. Launch with 'srun --mpi=pmix "
                      "bitnet-worker ...' or 'mpirun bitnet-worker ...' inside the allocation (or ask Slurm for "
                      "one task to run a single process)", n, n);
    return BN_OK;
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
    int quiet = 0, exit_code = 0; /* 3: a stopped batch job left lines for the next run */
    int rc = slurm_singleton(&comm, err, sizeof err);
    if (rc == BN_OK) {
        if (!o.seed_given) {
            o.sp.seed = (uint64_t)time(NULL);
            if (comm.rank == 0)
                BN_INFO("seed %llu", (unsigned long long)o.sp.seed);
        }
        rc = run(&comm, &o, &quiet, &exit_code, err, sizeof err);
    }
    if (rc != BN_OK && !quiet)
        BN_ERROR("%s", err);
    bn_comm_finalize(&comm);
    return rc == BN_OK ? exit_code : (rc == BN_EINVAL ? 2 : 1);
}
