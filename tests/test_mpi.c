/* test_mpi.c - bitnet-worker under mpirun on loopback, as a user runs it: the
 * same logits and tokens as one process over every kind of plan, plan errors,
 * a killed rank, a rank that cannot load its part, srun without MPI wiring, and
 * an idle rank's CPU.
 *
 * Tolerance: none. Every plan gives one process's bits, by construction
 * (forward.c: the sub-norms sum squares per block in double and the row-parallel
 * matrices add integer partial dots, so no sum depends on how the width is split;
 * the ring allreduce gives every rank the same bits). The one documented
 * exception, TQ files whose blocks carry different scales, is not among the
 * fixtures. */
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FIX "tests/fixtures/"

static const char *const models[] = {
    FIX "tiny-b158-i2_s.gguf", FIX "tiny-b158-tq2_0.gguf", FIX "tiny-b158-tq1_0.gguf", FIX "tiny-bitnet-tq2_0.gguf",
};

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

/* mpirun on loopback, as root too, oversubscribed (this machine has 2 cores) */
#define MPIRUN "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun --oversubscribe " \
               "--bind-to none --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"

/* Above 8 ranks on 2 cores, LeakSanitizer's stop-the-world tracer itself crashes
 * at exit (signal 11 in the tracer, seen in `make test SAN=1`), so those runs
 * (the same code as the smaller worlds, which are leak-checked) skip it. */
static int mpi(int n, const char *args, char **out, char **err)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s" MPIRUN " -n %d %s/bitnet-worker --log-level warn --threads 1 %s",
             n > 8 ? "ASAN_OPTIONS=detect_leaks=0 " : "", n, bin_dir(), args);
    return bn_test_run(cmd, out, err);
}

static int single(const char *args, char **out, char **err)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s/bitnet-worker --log-level warn %s", bin_dir(), args);
    return bn_test_run(cmd, out, err);
}

static float *read_f32(const char *path, size_t *n)
{
    size_t len = 0;
    char *b = bn_test_read_file(path, &len);
    *n = len / sizeof(float);
    return (float *)b;
}

/* The plans: world size and pins. TP-only, PP-only, TP x PP, replicas (run on a
 * replica other than rank 0's), and the planner's own choice, uneven splits
 * included (3, 5, 6, 7 tensor ranks over 8 heads, 2 KV heads, 5 FFN blocks; 11
 * and 16 tensor ranks: ranks without heads or FFN rows). */
static const struct { int n; const char *pins; } plans[] = {
    { 1, "" },
    { 2, "--tp 2" }, { 2, "--pp 2" }, { 2, "--replicas 2 --replica 1" },
    { 3, "--tp 3" }, { 3, "--pp 3" },
    { 4, "--tp 4" }, { 4, "--pp 4" }, { 4, "--tp 2 --pp 2" }, { 4, "--replicas 2 --tp 2 --replica 1" },
    { 5, "--tp 5" }, { 5, "" },
    { 6, "--tp 3 --pp 2" }, { 6, "--tp 2 --pp 3" }, { 6, "--replicas 3 --tp 2 --replica 2" },
    { 7, "--tp 7" }, { 7, "" },
    { 8, "--tp 8" }, { 8, "--tp 4 --pp 2" }, { 8, "--tp 2 --pp 2 --replicas 2 --replica 1" }, { 8, "" },
    { 11, "" }, { 12, "--tp 3 --pp 4" }, { 16, "" },
};
#define N_PLANS (sizeof plans / sizeof plans[0])

/* --dump-logits of a 9-token prompt (two steps would need > 64; the prompt's
 * positions all want logits) equals one process's, bit for bit, on every model
 * and plan. */
BN_TEST(mpi_same_logits)
{
    char ref[64], got[64], args[1024];
    snprintf(ref, sizeof ref, "/tmp/bn-mpi-ref-%d.f32", (int)getpid());
    snprintf(got, sizeof got, "/tmp/bn-mpi-got-%d.f32", (int)getpid());
    for (size_t mi = 0; mi < sizeof models / sizeof models[0]; mi++) {
        char *out = NULL, *err = NULL;
        snprintf(args, sizeof args, "--model %s --prompt 'The quick brown fox jumps over' --lm-head f16 "
                 "--dump-logits %s", models[mi], ref);
        int rc = single(args, &out, &err);
        if (rc)
            fprintf(stderr, "%s", err);
        CHECK_EQ_INT(rc, 0);
        free(out);
        free(err);
        size_t nr = 0;
        float *r = read_f32(ref, &nr);
        CHECK(r && nr > 0 && nr % 512 == 0);
        for (size_t pi = 0; pi < N_PLANS; pi++) {
            snprintf(args, sizeof args, "--model %s --prompt 'The quick brown fox jumps over' --lm-head f16 "
                     "--dump-logits %s %s", models[mi], got, plans[pi].pins);
            remove(got);
            rc = mpi(plans[pi].n, args, &out, &err);
            if (rc)
                fprintf(stderr, "%s", err);
            CHECK_EQ_INT(rc, 0);
            size_t ng = 0;
            float *g = read_f32(got, &ng);
            CHECK(g != NULL);
            CHECK_EQ_INT(ng, nr);
            size_t diff = 0;
            for (size_t i = 0; i < nr; i++)
                diff += memcmp(&r[i], &g[i], sizeof(float)) != 0;
            fprintf(stderr, "  %s, -n %d %s: %zu logits, %zu differ\n", models[mi] + strlen(FIX), plans[pi].n,
                    plans[pi].pins, nr, diff);
            CHECK_EQ_INT(diff, 0);
            free(g);
            free(out);
            free(err);
        }
        free(r);
    }
    remove(ref);
    remove(got);
}

/* Greedy continuations (a prompt of 70 tokens: two prefill steps) and seeded
 * sampling (top-k/top-p/min-p, and plain temperature whose draws reach the
 * slices' tails) give the same tokens as one process. */
BN_TEST(mpi_same_tokens)
{
    char args[1024];
    static const char *const samplings[] = {
        "--temp 0", "--temp 0.9 --seed 11", "--temp 1.2 --top-k 0 --top-p 1 --min-p 0 --seed 12",
        "--temp 1 --top-k 0 --top-p 0.9 --min-p 0 --seed 13",
    };
    static const struct { int n; const char *pins; } some[] = {
        { 2, "--tp 2" }, { 3, "--tp 3" }, { 3, "--pp 3" }, { 4, "--tp 2 --pp 2" }, { 4, "--replicas 2 --tp 2 --replica 1" },
        { 7, "--tp 7" }, { 8, "--tp 4 --pp 2" },
    };
    char prompt[600] = "";
    for (int i = 0; i < 14; i++)
        strcat(prompt, "one two three four five ");
    for (size_t mi = 0; mi < sizeof models / sizeof models[0]; mi += 3) {
        for (size_t si = 0; si < sizeof samplings / sizeof samplings[0]; si++) {
            char *want = NULL, *err = NULL;
            snprintf(args, sizeof args, "--model %s --prompt '%s' -n 24 --print-ids --ignore-eos %s", models[mi],
                     prompt, samplings[si]);
            CHECK_EQ_INT(single(args, &want, &err), 0);
            CHECK(strlen(want) > 24);
            free(err);
            for (size_t pi = 0; pi < sizeof some / sizeof some[0]; pi++) {
                char a2[1200], *out = NULL;
                snprintf(a2, sizeof a2, "%s %s", args, some[pi].pins);
                int rc = mpi(some[pi].n, a2, &out, &err);
                if (rc || strcmp(out, want))
                    fprintf(stderr, "  %s -n %d %s:\n  want %s  got  %s%s", samplings[si], some[pi].n, some[pi].pins,
                            want, out, err);
                CHECK_EQ_INT(rc, 0);
                CHECK_STR_EQ(out, want);
                free(out);
                free(err);
            }
            fprintf(stderr, "  %s, %s: the same %zu-byte id line on %zu plans\n", models[mi] + strlen(FIX),
                    samplings[si], strlen(want), sizeof some / sizeof some[0]);
            free(want);
        }
    }
}

/* The plan is printed at start, one line per rank. Pins that cannot work are
 * refused with the constraint named, exit status 2, and nothing hangs. */
BN_TEST(mpi_plan_and_bad_pins)
{
    char *out = NULL, *err = NULL;
    int rc = mpi(3, "--model " FIX "tiny-b158-i2_s.gguf --prompt hi -n 2 --log-level info --tp 3", &out, &err);
    CHECK_EQ_INT(rc, 0);
    CHECK(strstr(err, "plan: 3 ranks = 1 replica x 1 stage x 3 tensor ranks") != NULL);
    CHECK(strstr(err, "rank 1: replica 0 stage 0 tp 1: layers 0-3, heads 2-4 (kv 0-1)") != NULL);
    free(out);
    free(err);
    static const struct { int n; const char *args, *says; } bad[] = {
        { 4, "--tp 3", "does not divide" },
        { 4, "--pp 5", "layers" },
        { 4, "--replicas 3", "does not divide" },
        { 2, "--replica 2", "--replica 2" },
        { 2, "--tp 2 --pp 2 --replicas 2", "world" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char args[512];
        snprintf(args, sizeof args, "--model " FIX "tiny-b158-i2_s.gguf --prompt hi -n 2 %s", bad[i].args);
        rc = mpi(bad[i].n, args, &out, &err);
        fprintf(stderr, "  -n %d %s -> %d: %s", bad[i].n, bad[i].args, rc, err);
        CHECK(rc == 2 || rc == 1);
        CHECK(strstr(err, bad[i].says) != NULL);
        free(out);
        free(err);
    }
}

/* A rank killed by a signal in the middle of a run ends the whole job within
 * seconds, and mpirun names the rank and the signal. */
BN_TEST(mpi_rank_killed)
{
    char cmd[4096], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd,
             "log=/tmp/bn-kill-$$.log; "
             "(" MPIRUN " -n 3 %s/bitnet-worker --log-level info --threads 1 --model " FIX "tiny-b158-i2_s.gguf "
             "--prompt hi -n 1000000 --ctx 4096 --ignore-eos --tp 3 >/dev/null 2>$log; echo \"mpirun-exit $?\" >>$log) & "
             "for i in $(seq 200); do pid=$(sed -n 's/.*\\[rank 1\\] info  model .*(pid \\([0-9]*\\)).*/\\1/p' $log); "
             "[ -n \"$pid\" ] && grep -q 'rank 0\\] info  stop tokens' $log && break; sleep 0.05; done; "
             "sleep 0.3; t0=$(date +%%s.%%N); kill -9 $pid; wait; t1=$(date +%%s.%%N); "
             "el=$(awk \"BEGIN{print $t1 - $t0}\"); "
             "echo \"killed $pid after start, job ended in $el s\"; cat $log; rm -f $log",
             bin_dir());
    int rc = bn_test_run(cmd, &out, &err);
    CHECK_EQ_INT(rc, 0);
    fprintf(stderr, "%s", out);
    double secs = -1;
    const char *k = strstr(out, "job ended in ");
    CHECK(k != NULL);
    secs = atof(k + strlen("job ended in "));
    CHECK(secs >= 0 && secs < 15);
    CHECK(strstr(out, "mpirun-exit 0") == NULL);
    CHECK(strstr(out, "mpirun-exit") != NULL);
    CHECK(strstr(out, "rank 1") != NULL);
    CHECK(strstr(out, "signal 9") != NULL || strstr(out, "Killed") != NULL);
    free(out);
    free(err);
}

/* A rank that cannot load its part (here: its copy of the file is truncated)
 * says so, naming itself and the cause, and every rank ends cleanly. */
BN_TEST(mpi_rank_fails_to_load)
{
    char cmd[4096], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd,
             "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 60 mpirun --oversubscribe --bind-to none "
             "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo "
             "-n 1 %s/bitnet-worker --log-level warn --model " FIX "tiny-b158-i2_s.gguf --prompt hi --tp 2 : "
             "-n 1 %s/bitnet-worker --log-level warn --model " FIX "bad-truncated-data.gguf --prompt hi --tp 2",
             bin_dir(), bin_dir());
    double t0 = 0;
    {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        t0 = ts.tv_sec + ts.tv_nsec * 1e-9;
    }
    int rc = bn_test_run(cmd, &out, &err);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double secs = ts.tv_sec + ts.tv_nsec * 1e-9 - t0;
    fprintf(stderr, "  exit %d after %.1f s:\n%s", rc, secs, err);
    CHECK(rc != 0 && rc != 124); /* 124: timeout, i.e. a hang */
    CHECK(secs < 30);
    CHECK(strstr(err, "[rank 1] error") != NULL);
    CHECK(strstr(err, "bad-truncated-data.gguf") != NULL);
    free(out);
    free(err);
}

/* Started by srun without MPI wiring, each copy is a world of one: refused with
 * a message that says how to launch. */
BN_TEST(mpi_slurm_singletons_refused)
{
    char cmd[1024], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "SLURM_NTASKS=4 SLURM_PROCID=2 %s/bitnet-worker --model " FIX "tiny-b158-i2_s.gguf "
             "--prompt hi -n 2", bin_dir());
    int rc = bn_test_run(cmd, &out, &err);
    fprintf(stderr, "  exit %d: %s", rc, err);
    CHECK_EQ_INT(rc, 2);
    CHECK(strstr(err, "Slurm started 4 tasks") != NULL);
    CHECK(strstr(err, "srun --mpi=pmix") != NULL);
    CHECK(strcmp(out, "") == 0);
    free(out);
    free(err);
    /* one task is a single process on purpose: it runs */
    snprintf(cmd, sizeof cmd, "SLURM_NTASKS=1 %s/bitnet-worker --log-level warn --model " FIX "tiny-b158-i2_s.gguf "
             "--prompt hi -n 2", bin_dir());
    CHECK_EQ_INT(bn_test_run(cmd, &out, &err), 0);
    free(out);
    free(err);
}

/* A rank with no step in flight sleeps: the ranks of a replica that gets no
 * work use under 5 % of a core while another replica generates. */
BN_TEST(mpi_idle_rank_sleeps)
{
    char *out = NULL, *err = NULL;
    int rc = mpi(3, "--model " FIX "tiny-b158-i2_s.gguf --prompt hi -n 4000 --ctx 4096 --ignore-eos --temp 0 "
                 "--replicas 3 --replica 2 --stats", &out, &err);
    CHECK_EQ_INT(rc, 0);
    const char *r1 = strstr(err, "rank 1: ");
    CHECK(r1 != NULL);
    const char *p = strstr(r1, "CPU ");
    CHECK(p != NULL);
    double pct = atof(p + 4);
    const char *w = strstr(p, "while serving ");
    CHECK(w != NULL);
    double secs = atof(w + strlen("while serving "));
    fprintf(stderr, "  idle rank 1: %.1f%% of a core over %.2f s\n", pct, secs);
    CHECK(secs > 0.2);
    CHECK(pct < 5.0);
    free(out);
    free(err);
}

/* The 2B4T shape (width 2560, 20 query heads, 5 KV heads, head_dim 128, FFN
 * 6912; 2 layers and a 4096-token vocabulary to keep it small): every world size
 * from 1 to 16 with the planner's choice (all ranks on one node: tensor ranks
 * only, so KV heads are replicated above 5 ranks and some ranks hold one head)
 * gives one process's logits; seeded plain-temperature sampling over 3 tensor
 * ranks (vocabulary slices larger than the candidate cap, so draws reach the
 * slices' tails through rank 0) gives one process's tokens. */
BN_TEST(mpi_2b4t_shape_worlds)
{
    char model[64], ref[64], got[64], cmd[1024], args[1024], *out = NULL, *err = NULL;
    snprintf(model, sizeof model, "/tmp/bn-mpi-2b4t-%d.gguf", (int)getpid());
    snprintf(ref, sizeof ref, "/tmp/bn-mpi-2b4t-ref-%d.f32", (int)getpid());
    snprintf(got, sizeof got, "/tmp/bn-mpi-2b4t-got-%d.f32", (int)getpid());
    snprintf(cmd, sizeof cmd, "%s/bitnet-mkmodel --preset 2b4t --n-layer 2 --n-vocab 4096 --seed 5 -o %s",
             bin_dir(), model);
    CHECK_EQ_INT(bn_test_run(cmd, &out, &err), 0);
    free(out);
    free(err);
    snprintf(args, sizeof args, "--model %s --tokens 100,2000,3000,4000 --lm-head f16 --dump-logits %s", model, ref);
    CHECK_EQ_INT(single(args, &out, &err), 0);
    free(out);
    free(err);
    size_t nr = 0;
    float *r = read_f32(ref, &nr);
    CHECK(r && nr == 4 * 4096);
    for (int n = 1; n <= 16; n++) {
        snprintf(args, sizeof args, "--model %s --tokens 100,2000,3000,4000 --lm-head f16 --dump-logits %s",
                 model, got);
        remove(got);
        int rc = mpi(n, args, &out, &err);
        if (rc)
            fprintf(stderr, "%s", err);
        CHECK_EQ_INT(rc, 0);
        size_t ng = 0;
        float *g = read_f32(got, &ng);
        CHECK(g && ng == nr);
        size_t diff = 0;
        for (size_t i = 0; i < nr; i++)
            diff += memcmp(&r[i], &g[i], sizeof(float)) != 0;
        fprintf(stderr, "  -n %2d: %zu logits, %zu differ\n", n, nr, diff);
        CHECK_EQ_INT(diff, 0);
        free(g);
        free(out);
        free(err);
    }
    free(r);
    char *want = NULL;
    snprintf(args, sizeof args, "--model %s --tokens 100,2000 -n 16 --print-ids --ignore-eos --temp 1.5 --top-k 0 "
             "--top-p 1 --min-p 0 --seed 9", model);
    CHECK_EQ_INT(single(args, &want, &err), 0);
    free(err);
    char a2[1200];
    snprintf(a2, sizeof a2, "%s --tp 3", args);
    CHECK_EQ_INT(mpi(3, a2, &out, &err), 0);
    fprintf(stderr, "  sampled: %s  over 3 tensor ranks: %s", want, out);
    CHECK_STR_EQ(out, want);
    free(out);
    free(err);
    free(want);
    remove(model);
    remove(ref);
    remove(got);
}

/* A rank that runs out of memory says so, naming itself and the cause, and
 * every rank ends within seconds. The memory runs out for real: rank 1 asks for
 * a KV cache of 16M positions (98 GB; --mem-per-rank lets the plan through),
 * which the kernel refuses (its default overcommit heuristic refuses a mapping
 * larger than RAM + swap). (Capping one rank with ulimit -v instead made Open
 * MPI's own start-up fail at random and hang; and AddressSanitizer needs
 * terabytes of address space.) */
BN_TEST(mpi_rank_out_of_memory)
{
    char model[64], cmd[2048], *out = NULL, *err = NULL;
    snprintf(model, sizeof model, "/tmp/bn-mpi-oom-%d.gguf", (int)getpid());
    snprintf(cmd, sizeof cmd, "%s/bitnet-mkmodel --preset 2b4t --n-layer 2 --n-vocab 4096 -o %s", bin_dir(), model);
    CHECK_EQ_INT(bn_test_run(cmd, &out, &err), 0);
    free(out);
    free(err);
    snprintf(cmd, sizeof cmd,
             "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 60 mpirun --oversubscribe --bind-to none "
             "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo "
             "-n 1 %s/bitnet-worker --log-level warn --threads 1 --model %s --prompt hi --tp 2 --mem-per-rank 100000000 : "
             "-n 1 %s/bitnet-worker --log-level warn --threads 1 --model %s --prompt hi --tp 2 --mem-per-rank 100000000 "
             "--ctx 16777216", bin_dir(), model, bin_dir(), model);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    int rc = bn_test_run(cmd, &out, &err);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    fprintf(stderr, "  exit %d after %.1f s:\n%s", rc, secs, err);
    CHECK(rc != 0 && rc != 124);
    CHECK(secs < 30);
    CHECK(strstr(err, "[rank 1] error") != NULL);
    CHECK(strstr(err, "allocate memory") != NULL || strstr(err, "out of memory") != NULL);
    free(out);
    free(err);
    remove(model);
}
