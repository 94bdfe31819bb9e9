/* test_batchjob.c - bitnet-worker --batch IN --out OUT as a user runs it: every
 * line answered exactly once, greedy answers equal --prompt run alone (one
 * process and mpirun -n 2), bad lines become error lines and the rest goes on,
 * and a job resumed after a kill or a cut-short output line finishes with every
 * id answered exactly once. */
#include "test.h"

#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define I2S "tests/fixtures/tiny-b158-i2_s.gguf"
#define MPIRUN "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun --oversubscribe " \
               "--bind-to none --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo -n 2"

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

#define N_GOOD 12

static void write_input(const char *path, int long_run)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    for (int i = 0; i < N_GOOD; i++) {
        if (long_run)
            fprintf(f, "{\"id\": %d, \"prompt\": \"line %d\", \"max_tokens\": 2000, \"temperature\": 0.8, "
                    "\"seed\": %d}\n", i, i, i);
        else
            fprintf(f, "{\"id\": %d, \"prompt\": \"story number %d begins\", \"max_tokens\": %d, \"temperature\": 0}\n",
                    i, i, 4 + i);
        if (i == 3 && !long_run) { /* bad lines between good ones */
            fputs("this is not json\n", f);
            fputs("{\"prompt\": \"no id here\"}\n", f);
            fputs("{\"id\": 2, \"prompt\": \"a duplicate id\"}\n", f);
            fputs("{\"id\": \"bad-temp\", \"prompt\": \"x\", \"temperature\": -1}\n", f);
            fputs("\n", f);
        }
    }
    fclose(f);
}

/* how many output lines answer id i ({"id":i, ...}) */
static int count_id(const char *out, int i)
{
    char key[32];
    snprintf(key, sizeof key, "{\"id\":%d,", i);
    int n = 0;
    for (const char *p = out; (p = strstr(p, key)); p++)
        n++;
    return n;
}

static int lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void run_job(const char *mpi, const char *in, const char *out, const char *extra)
{
    char cmd[1024], *err = NULL;
    snprintf(cmd, sizeof cmd, "%s %s/bitnet-worker --log-level warn --model " I2S " --threads 1 --batch %s --out %s %s",
             mpi, bin_dir(), in, out, extra);
    int rc = bn_test_run(cmd, NULL, &err);
    if (rc)
        fprintf(stderr, "%s", err);
    CHECK_EQ_INT(rc, 0);
    const char *sum = strstr(err, "batch: ");
    fprintf(stderr, "  %s", sum ? sum : "(no summary)\n");
    free(err);
}

BN_TEST(batch_offline_answers_and_errors)
{
    char in[64], out[64];
    snprintf(in, sizeof in, "/tmp/bn-batch-%d.in", (int)getpid());
    snprintf(out, sizeof out, "/tmp/bn-batch-%d.out", (int)getpid());
    write_input(in, 0);
    for (int world = 1; world <= 2; world++) {
        unlink(out);
        run_job(world == 1 ? "" : MPIRUN, in, out, world == 1 ? "" : "--tp 2");
        char *o = bn_test_read_file(out, NULL);
        CHECK(o != NULL);
        CHECK_EQ_INT(lines(o), N_GOOD + 4);
        for (int i = 0; i < N_GOOD; i++) {
            CHECK_EQ_INT(count_id(o, i), 1);
            /* its tokens equal the same prompt run alone */
            char args[512], *want = NULL, key[32];
            snprintf(args, sizeof args, "%s/bitnet-worker --log-level warn --model " I2S
                     " --prompt 'story number %d begins' -n %d --temp 0 --print-ids", bin_dir(), i, 4 + i);
            CHECK_EQ_INT(bn_test_run(args, &want, NULL), 0);
            want[strcspn(want, "\n")] = 0;
            for (char *c = want; *c; c++)
                if (*c == ' ')
                    *c = ',';
            snprintf(key, sizeof key, "{\"id\":%d,", i);
            const char *t = strstr(strstr(o, key), "\"tokens\":[") + 10;
            if (strncmp(t, want, strlen(want)) != 0 || t[strlen(want)] != ']')
                BN_FAIL("id %d: tokens [%.*s] vs alone [%s]", i, (int)strcspn(t, "]"), t, want);
            free(want);
        }
        CHECK(strstr(o, "{\"id\":null,\"line\":5,\"error\":\"not JSON\"}") != NULL);
        CHECK(strstr(o, "{\"id\":null,\"line\":6,\"error\":\"no \\\"id\\\"") != NULL);
        CHECK(strstr(o, "{\"id\":null,\"line\":7,\"error\":\"duplicate id 2\"}") != NULL);
        CHECK(strstr(o, "{\"id\":\"bad-temp\",\"line\":8,\"error\":\"\\\"temperature\\\" must be") != NULL);
        fprintf(stderr, "  world of %d: %d ids answered once each, equal to --prompt alone; 4 error lines\n", world,
                N_GOOD);
        free(o);
    }
    /* resumed after a cut-short last line: the cut line is dropped and its id answered again, once */
    char *o = bn_test_read_file(out, NULL);
    const char *keep = o;
    for (int k = 0; k < 9; k++)
        keep = strchr(keep, '\n') + 1;
    FILE *f = fopen(out, "w");
    fwrite(o, 1, (size_t)(keep - o) + 25, f); /* 9 lines and the start of the 10th */
    fclose(f);
    free(o);
    run_job("", in, out, "");
    o = bn_test_read_file(out, NULL);
    CHECK_EQ_INT(lines(o), N_GOOD + 4);
    for (int i = 0; i < N_GOOD; i++)
        CHECK_EQ_INT(count_id(o, i), 1);
    free(o);
    unlink(in);
    unlink(out);
}

/* a job killed half way, then run again: every id answered exactly once */
BN_TEST(batch_offline_killed_and_resumed)
{
    char in[64], out[64], cmd[1024];
    snprintf(in, sizeof in, "/tmp/bn-batchk-%d.in", (int)getpid());
    snprintf(out, sizeof out, "/tmp/bn-batchk-%d.out", (int)getpid());
    write_input(in, 1);
    unlink(out);
    snprintf(cmd, sizeof cmd, "exec %s/bitnet-worker --log-level error --model " I2S
             " --threads 1 --ctx 4096 --max-seqs 1 --ignore-eos --batch %s --out %s", bin_dir(), in, out);
    /* kill it once some lines are out and some are not (again if it was too quick) */
    int before = 0;
    for (int attempt = 0; attempt < 5 && (before == 0 || before == N_GOOD); attempt++) {
        unlink(out);
        fflush(NULL);
        pid_t p = fork();
        if (p == 0) {
            execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
            _exit(127);
        }
        for (int i = 0; i < 4000 && before < 1; i++) {
            char *o = bn_test_read_file(out, NULL);
            before = o ? lines(o) : 0;
            free(o);
            usleep(5000);
        }
        kill(p, SIGKILL);
        waitpid(p, NULL, 0);
        char *o = bn_test_read_file(out, NULL);
        before = o ? lines(o) : 0;
        free(o);
    }
    fprintf(stderr, "  killed with %d of %d lines answered\n", before, N_GOOD);
    CHECK(before > 0 && before < N_GOOD);
    run_job("", in, out, "--ctx 4096 --max-seqs 1 --ignore-eos");
    char *o = bn_test_read_file(out, NULL);
    CHECK_EQ_INT(lines(o), N_GOOD);
    for (int i = 0; i < N_GOOD; i++)
        CHECK_EQ_INT(count_id(o, i), 1);
    CHECK(strstr(o, "\"error\"") == NULL); /* every line an answer, none refused */
    free(o);
    unlink(in);
    unlink(out);
}

/* The JSONL parser and the resume reader under libFuzzer for 10 s (make fuzz
 * builds bin-fuzz/fuzz-batch with clang). Its first find, a leak of the default
 * stop strings when a line gives its own, is the seed tests/fuzz/batch/prompt.jsonl. */
BN_TEST(batch_fuzz)
{
    const char *fz = getenv("BN_FUZZ_BATCH_BIN");
    if (!fz)
        fz = "bin-fuzz/fuzz-batch";
    if (access(fz, X_OK) != 0)
        BN_FAIL("%s missing: run make fuzz (make test builds it)", fz);
    char dir[64], cmd[1024], *out = NULL, *err = NULL;
    snprintf(dir, sizeof dir, "/tmp/bn-fuzz-batch-%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "mkdir -p %s/corpus && timeout 120 %s -max_total_time=10 -rss_limit_mb=2048 -timeout=10 "
             "-print_final_stats=1 -artifact_prefix=%s/ %s/corpus tests/fuzz/batch", dir, fz, dir, dir);
    int rc = bn_test_run(cmd, &out, &err);
    const char *runs = err ? strstr(err, "stat::number_of_executed_units:") : NULL;
    fprintf(stderr, "  %s", runs ? runs : "(no stats)\n");
    if (rc)
        BN_FAIL("%s exited with %d; the input is kept in %s; its output ends:\n%s", fz, rc, dir,
                err && strlen(err) > 3000 ? err + strlen(err) - 3000 : err);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK_EQ_INT(bn_test_run(cmd, NULL, NULL), 0);
    free(out);
    free(err);
}
