/* llama_driver.c - time llama.cpp on a GGUF file, as the benchmark peer of bitnet-worker.
 *
 * What it is: a small program linked to the libllama shipped in the npm package
 * node-llama-cpp (bench/run.sh installs it under bench/.peer/ and builds this file
 * against the llama.h of the same release). It measures what `bitnet-worker --stats`
 * measures: one prompt of PP fixed token ids decoded as one batch (prompt tokens/s),
 * then TG single-token decodes, each fed the greedy argmax of the previous logits
 * (generation tokens/s). Only the decode calls and the argmax are timed.
 * What it is not: part of bitnet-worker. Nothing in the engine links to llama.cpp.
 *
 * Each run starts from an empty KV cache; one untimed warm-up run comes first (it
 * pages the mapped weights in, as earlier runs of bitnet-worker do for later ones).
 * Output, one line per timed run on stdout, then a peak RSS line:
 *   llama: pp_tokens=N pp_tps=X tg_tokens=N tg_tps=X
 *   llama: peak_rss_mb=X threads=N
 * --print-ids adds the generated ids of the last run, --dump-logits FILE writes its
 * prompt's last logits (float32), so run.sh can check both engines run the same model.
 * --streams N (bench/serve.sh): llama.cpp's own server-style batching instead, N
 * sequences of one context (n_seq_max N, as llama-server's parallel slots): all N
 * prompts (ids FIRST+i.., one per stream) decoded in batches of up to 512 tokens,
 * then TG steps of one token of every sequence in one batch. One line per run:
 *   llama: streams=N gen_tokens=N wall_s=X agg_tps=X ttft_ms=X itl_p50_ms=X itl_p99_ms=X
 * (ttft: all prompts in, the first tokens drawn; itl: the steps' times).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>

#include "llama.h"
#include "ggml-backend.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int verbose;

static void log_cb(enum ggml_log_level level, const char *text, void *ud)
{
    (void)ud;
    /* quiet, but say which CPU backend variant (e.g. libggml-cpu-zen4.so) was picked */
    if (verbose || level >= GGML_LOG_LEVEL_ERROR || !strncmp(text, "load_backend:", 13))
        fputs(text, stderr);
}

static bool no_progress(float progress, void *ud)
{
    (void)progress;
    (void)ud;
    return true; /* keep loading, print no dots */
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* --streams: n sequences prefilled together, then decoded together, greedy */
static int streams_run(struct llama_context *ctx, int n_vocab, int first, int n, int pp, int tg, int report)
{
    llama_memory_clear(llama_get_memory(ctx), true);
    const int chunk = 512;
    struct llama_batch b = llama_batch_init(chunk, 0, 1);
    int *tok = calloc((size_t)n, sizeof *tok);
    double *itl = calloc((size_t)tg + 1, sizeof *itl);
    if (!tok || !itl)
        return -1;
    double t0 = now_s();
    int k = 0, rc = 0;
    for (int s = 0; s < n && rc == 0; s++)
        for (int i = 0; i < pp && rc == 0; i++) {
            b.token[k] = (first + s + i) % n_vocab;
            b.pos[k] = i;
            b.n_seq_id[k] = 1;
            b.seq_id[k][0] = s;
            b.logits[k] = i + 1 == pp;
            k++;
            if (k == chunk || (s + 1 == n && i + 1 == pp)) {
                b.n_tokens = k;
                rc = llama_decode(ctx, b);
                /* the logits of the sequences that ended in this chunk */
                for (int j = 0; j < k && rc == 0; j++)
                    if (b.logits[j])
                        tok[b.seq_id[j][0]] = argmax(llama_get_logits_ith(ctx, j), n_vocab);
                k = 0;
            }
        }
    double ttft = now_s() - t0;
    for (int step = 0; step < tg - 1 && rc == 0; step++) { /* the first token came from the prompt */
        double ts = now_s();
        for (int s = 0; s < n; s++) {
            b.token[s] = tok[s];
            b.pos[s] = pp + step;
            b.n_seq_id[s] = 1;
            b.seq_id[s][0] = s;
            b.logits[s] = 1;
        }
        b.n_tokens = n;
        if ((rc = llama_decode(ctx, b)) != 0)
            break;
        for (int s = 0; s < n; s++)
            tok[s] = argmax(llama_get_logits_ith(ctx, s), n_vocab);
        itl[step] = now_s() - ts;
    }
    double wall = now_s() - t0;
    llama_batch_free(b);
    if (rc != 0) {
        fprintf(stderr, "llama-driver: decode failed: %d\n", rc);
        return -1;
    }
    int m = tg > 1 ? tg - 1 : 0;
    qsort(itl, (size_t)m, sizeof *itl, cmp_d);
    if (report)
        printf("llama: streams=%d gen_tokens=%d wall_s=%.3f agg_tps=%.3f ttft_ms=%.1f itl_p50_ms=%.2f itl_p99_ms=%.2f\n", n,
           n * tg, wall, n * tg / wall, 1e3 * ttft, m ? 1e3 * itl[(m - 1) / 2] : 0.0,
           m ? 1e3 * itl[(int)((m - 1) * 0.99 + 0.5)] : 0.0);
    fflush(stdout);
    free(tok);
    free(itl);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: llama-driver --model FILE [--libdir DIR] [--threads N] [--pp N] [--tg N]\n"
            "                    [--runs N] [--first-token ID] [--print-ids] [--dump-logits FILE] [--verbose]\n"
            "  --libdir DIR       where the ggml CPU backends (libggml-cpu-*.so) are\n"
            "  --threads N        threads for prompt and generation (default 1)\n"
            "  --pp N, --tg N     prompt tokens (ids FIRST..FIRST+N-1) and generated tokens (128, 64)\n"
            "  --runs N           timed runs after one warm-up run (default 3)\n"
            "  --print-ids        print the generated ids (greedy) of the last run\n"
            "  --streams N        N sequences of one context, batched together (serve.sh)\n"
            "  --dump-logits FILE write the float32 logits of the prompt's last position\n");
}

/* One run: prompt batch, then tg single-token decodes. Returns 0 or -1. */
static int one_run(struct llama_context *ctx, int n_vocab, int first, int pp, int tg, double *t_pp,
                   double *t_tg, int *ids, const char *dump)
{
    llama_memory_clear(llama_get_memory(ctx), true);

    struct llama_batch b = llama_batch_init(pp, 0, 1);
    for (int i = 0; i < pp; i++) {
        b.token[i] = first + i;
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = i + 1 == pp;
    }
    b.n_tokens = pp;
    double t0 = now_s();
    int rc = llama_decode(ctx, b);
    llama_synchronize(ctx);
    *t_pp = now_s() - t0;
    llama_batch_free(b);
    if (rc != 0) {
        fprintf(stderr, "llama-driver: prompt decode failed: %d\n", rc);
        return -1;
    }

    const float *logits = llama_get_logits_ith(ctx, -1);
    if (dump) {
        FILE *f = fopen(dump, "wb");
        int ok = f && fwrite(logits, sizeof(float), (size_t)n_vocab, f) == (size_t)n_vocab;
        if (f && fclose(f) != 0)
            ok = 0;
        if (!ok) {
            fprintf(stderr, "llama-driver: cannot write %s\n", dump);
            return -1;
        }
    }
    int tok = argmax(logits, n_vocab);
    struct llama_batch g = llama_batch_init(1, 0, 1);
    t0 = now_s();
    for (int i = 0; i < tg; i++) {
        ids[i] = tok;
        g.token[0] = tok;
        g.pos[0] = pp + i;
        g.n_seq_id[0] = 1;
        g.seq_id[0][0] = 0;
        g.logits[0] = 1;
        g.n_tokens = 1;
        if ((rc = llama_decode(ctx, g)) != 0)
            break;
        tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    }
    *t_tg = now_s() - t0;
    llama_batch_free(g);
    if (rc != 0) {
        fprintf(stderr, "llama-driver: generation decode failed: %d\n", rc);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *libdir = NULL, *dump = NULL;
    int threads = 1, pp = 128, tg = 64, runs = 3, first = 1000, print_ids = 0, streams = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--verbose")) {
            verbose = 1;
            continue;
        }
        if (!strcmp(a, "--print-ids")) {
            print_ids = 1;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        i++;
        if (!strcmp(a, "--model"))
            model_path = v;
        else if (!strcmp(a, "--libdir"))
            libdir = v;
        else if (!strcmp(a, "--threads"))
            threads = atoi(v);
        else if (!strcmp(a, "--pp"))
            pp = atoi(v);
        else if (!strcmp(a, "--tg"))
            tg = atoi(v);
        else if (!strcmp(a, "--runs"))
            runs = atoi(v);
        else if (!strcmp(a, "--first-token"))
            first = atoi(v);
        else if (!strcmp(a, "--dump-logits"))
            dump = v;
        else if (!strcmp(a, "--streams"))
            streams = atoi(v);
        else {
            usage();
            return 2;
        }
    }
    if (!model_path || threads < 1 || pp < 1 || tg < 0 || runs < 1 || first < 0) {
        usage();
        return 2;
    }

    llama_log_set(log_cb, NULL);
    if (libdir)
        ggml_backend_load_all_from_path(libdir);
    else
        ggml_backend_load_all();
    llama_backend_init();
    fprintf(stderr, "llama-driver: %s\n", llama_print_system_info());

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    if (!verbose)
        mp.progress_callback = no_progress;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "llama-driver: llama.cpp could not load %s (run with --verbose for its log)\n",
                model_path);
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    if (first + pp > n_vocab) {
        fprintf(stderr, "llama-driver: token ids %d..%d exceed the vocabulary (%d)\n", first, first + pp - 1,
                n_vocab);
        return 2;
    }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)((pp + tg + 255) / 256 * 256);
    cp.n_batch = cp.n_ubatch = (uint32_t)pp;
    cp.n_seq_max = 1;
    if (streams > 0) { /* each sequence gets its own share of the context */
        cp.n_ctx *= (uint32_t)streams;
        cp.n_batch = cp.n_ubatch = 512;
        cp.n_seq_max = (uint32_t)streams;
    }
    cp.n_threads = cp.n_threads_batch = threads;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama-driver: cannot create a context\n");
        return 1;
    }

    if (streams > 0) {
        for (int r = -1; r < runs; r++) { /* the first run warms up, unreported */
            if (streams_run(ctx, n_vocab, first, r < 0 ? 1 : streams, pp, r < 0 ? 2 : tg, r >= 0))
                return 1;
        }
        llama_free(ctx);
        llama_model_free(model);
        llama_backend_free();
        return 0;
    }
    int *ids = calloc((size_t)tg + 1, sizeof *ids);
    if (!ids)
        return 1;
    for (int r = -1; r < runs; r++) {
        double t_pp, t_tg;
        if (one_run(ctx, n_vocab, first, pp, tg, &t_pp, &t_tg, ids, r + 1 == runs ? dump : NULL))
            return 1;
        if (r < 0)
            continue; /* warm-up */
        printf("llama: pp_tokens=%d pp_tps=%.3f tg_tokens=%d tg_tps=%.3f\n", pp, pp / t_pp, tg,
               tg > 0 ? tg / t_tg : 0.0);
        fflush(stdout);
    }
    if (print_ids) {
        printf("llama: ids=");
        for (int i = 0; i < tg; i++)
            printf(i ? ",%d" : "%d", ids[i]);
        printf("\n");
    }
    free(ids);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("llama: peak_rss_mb=%.1f threads=%d\n", ru.ru_maxrss / 1024.0, threads);

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
