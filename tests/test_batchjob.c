/* test_batchjob.c - batch jobs as a user runs them: bitnet-worker --batch IN
 * --out OUT (one process and mpirun -n 2) and bitnet-client batch against a real
 * server. Every line answered exactly once, greedy answers equal --prompt run
 * alone, bad lines become error lines and the rest goes on, and a job resumed
 * after a kill, a stop signal, a cut-short output line or a stopped server
 * finishes with every id answered exactly once. Under Slurm: test_slurm.c. */
#include "test.h"

#include "tests/jobs.h"
#include "tests/server.h"

#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#define MPIRUN "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 mpirun --oversubscribe " \
               "--bind-to none --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo -n 2"

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
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
        check_short_job(out, world == 1 ? "one process" : "mpirun -n 2 --tp 2");
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

/* a job killed half way (SIGKILL), then stopped by SIGTERM (its running lines
 * dropped, exit status 3), then run again: every id answered exactly once */
BN_TEST(batch_offline_killed_and_resumed)
{
    char in[64], out[64], errp[64], cmd[1024];
    snprintf(in, sizeof in, "/tmp/bn-batchk-%d.in", (int)getpid());
    snprintf(out, sizeof out, "/tmp/bn-batchk-%d.out", (int)getpid());
    snprintf(errp, sizeof errp, "/tmp/bn-batchk-%d.err", (int)getpid());
    write_input(in, 1);
    unlink(out);
    snprintf(cmd, sizeof cmd, "exec %s/bitnet-worker --log-level warn --model " I2S
             " --threads 1 --ctx 4096 --max-seqs 1 --ignore-eos --drain-s 0 --batch %s --out %s", bin_dir(), in, out);
    pid_t p = job_start(cmd, NULL);
    int before = wait_lines(out, 1, p);
    kill(p, SIGKILL);
    job_reap(p);
    before = out_lines(out);
    fprintf(stderr, "  killed with %d of %d lines answered\n", before, N_GOOD);
    CHECK(before > 0 && before < N_GOOD - 1);
    p = job_start(cmd, errp);
    wait_lines(out, before + 1, p);
    kill(p, SIGTERM);
    int st = job_reap(p);
    int mid = out_lines(out);
    char *e = bn_test_read_file(errp, NULL);
    fprintf(stderr, "  stopped by SIGTERM with %d lines answered (exit %d): %s", mid, st,
            e && strstr(e, "batch: ") ? strstr(e, "batch: ") : "(no summary)\n");
    CHECK_EQ_INT(st, 3);
    CHECK(mid > before && mid < N_GOOD);
    CHECK(e && strstr(e, "left for the next run"));
    free(e);
    run_job("", in, out, "--ctx 4096 --max-seqs 1 --ignore-eos");
    check_long_job(out);
    unlink(in);
    unlink(out);
    unlink(errp);
}

#ifndef BN_NO_NET
static int client_job(const char *ep_file, const char *args, char **err)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --timeout 60 --endpoint-file %s batch %s", bin_dir(), ep_file, args);
    return bn_test_run(cmd, NULL, err);
}

/* bitnet-client batch against a real server whose queue is smaller than the
 * concurrency (busy replies are sent again): the same OUT as the offline job;
 * a rerun skips everything; a locked OUT is refused; the endpoint file goes
 * with the server */
BN_TEST(batch_client_answers_and_errors)
{
    char in[64], out[64], epf[64], args[512], *err = NULL;
    snprintf(in, sizeof in, "/tmp/bn-cbatch-%d.in", (int)getpid());
    snprintf(out, sizeof out, "/tmp/bn-cbatch-%d.out", (int)getpid());
    snprintf(epf, sizeof epf, "/tmp/bn-cbatch-%d.ep", (int)getpid());
    write_input(in, 0);
    unlink(out);
    server_t s;
    snprintf(args, sizeof args, "--model " I2S " --threads 1 --max-seqs 2 --max-queue 2 --endpoint-file %s", epf);
    server_start(&s, 1, args);
    char *ep = bn_test_read_file(epf, NULL);
    CHECK(ep && strstr(ep, "endpoint=tcp://127.0.0.1:"));
    free(ep);
    snprintf(args, sizeof args, "%s %s --concurrency 8", in, out);
    int rc = client_job(epf, args, &err);
    fprintf(stderr, "  %s", err && strstr(err, "batch: ") ? strstr(err, "batch: ") : err);
    CHECK_EQ_INT(rc, 0);
    CHECK(strstr(err, "the server is busy") != NULL); /* 8 in flight, room for 4: retried, not error lines */
    CHECK(strstr(err, "line 5: not JSON") != NULL);   /* bad lines named with their numbers */
    free(err);
    check_short_job(out, "bitnet-client batch --concurrency 8");
    /* rerun: nothing to do, OUT unchanged */
    char *o1 = bn_test_read_file(out, NULL);
    CHECK_EQ_INT(client_job(epf, args, &err), 0);
    CHECK(strstr(err, "0 answered, 16 skipped") != NULL);
    free(err);
    char *o2 = bn_test_read_file(out, NULL);
    CHECK_STR_EQ(o1, o2);
    free(o1);
    free(o2);
    /* OUT locked by another job: refused, OUT untouched */
    int fd = open(out, O_RDONLY);
    CHECK(fd >= 0 && flock(fd, LOCK_EX) == 0);
    CHECK_EQ_INT(client_job(epf, args, &err), 1);
    CHECK(strstr(err, "being written by another batch job") != NULL);
    free(err);
    close(fd);
    CHECK_EQ_INT(server_stop(&s), 0);
    CHECK(access(epf, F_OK) != 0); /* a stopped server leaves no endpoint behind */
    CHECK_EQ_INT(client_job(epf, args, &err), 2);
    CHECK(strstr(err, "is it up yet?") != NULL);
    free(err);
    unlink(s.errp);
    unlink(in);
    unlink(out);
}

/* bitnet-client batch killed (SIGKILL), interrupted (SIGINT: exit 130), and
 * left by a server that stops (exit 3), then rerun against a new server: every
 * id answered exactly once, none refused */
BN_TEST(batch_client_killed_and_resumed)
{
    char in[64], out[64], epf[64], errp[64], args[512], cmd[1024];
    snprintf(in, sizeof in, "/tmp/bn-cbatchk-%d.in", (int)getpid());
    snprintf(out, sizeof out, "/tmp/bn-cbatchk-%d.out", (int)getpid());
    snprintf(epf, sizeof epf, "/tmp/bn-cbatchk-%d.ep", (int)getpid());
    snprintf(errp, sizeof errp, "/tmp/bn-cbatchk-%d.err", (int)getpid());
    write_input(in, 1);
    unlink(out);
    server_t s;
    snprintf(args, sizeof args, "--model " I2S " --threads 1 --ctx 4096 --max-seqs 1 --drain-s 0 --endpoint-file %s",
             epf);
    server_start(&s, 1, args);
    snprintf(cmd, sizeof cmd, "exec %s/bitnet-client --timeout 60 --endpoint-file %s --ignore-eos batch %s %s "
             "--concurrency 2", bin_dir(), epf, in, out);
    pid_t p = job_start(cmd, NULL);
    wait_lines(out, 1, p);
    kill(p, SIGKILL);
    job_reap(p);
    int n1 = out_lines(out);
    p = job_start(cmd, errp);
    wait_lines(out, n1 + 1, p);
    kill(p, SIGINT);
    int st = job_reap(p);
    int n2 = out_lines(out);
    char *e = bn_test_read_file(errp, NULL);
    CHECK_EQ_INT(st, 130);
    CHECK(e && strstr(e, "interrupted: cancelling"));
    free(e);
    p = job_start(cmd, errp);
    wait_lines(out, n2 + 1, p);
    CHECK_EQ_INT(server_stop(&s), 0); /* --drain-s 0: what runs is cancelled */
    st = job_reap(p);
    int n3 = out_lines(out);
    e = bn_test_read_file(errp, NULL);
    fprintf(stderr, "  killed at %d lines, interrupted at %d, server stopped at %d (client exit %d) of %d\n", n1, n2, n3,
            st, N_GOOD);
    CHECK_EQ_INT(st, 3);
    CHECK(e && strstr(e, "run the same command again"));
    free(e);
    CHECK(n1 > 0 && n1 < n2 && n2 < n3 && n3 < N_GOOD);
    unlink(s.errp);
    server_start(&s, 1, args);
    p = job_start(cmd, errp);
    CHECK_EQ_INT(job_reap(p), 0);
    check_long_job(out);
    CHECK_EQ_INT(server_stop(&s), 0);
    unlink(s.errp);
    unlink(in);
    unlink(out);
    unlink(errp);
}
#else
BN_TEST(batch_client_answers_and_errors) { BN_FAIL("not built with ZeroMQ (cross build)"); }
BN_TEST(batch_client_killed_and_resumed) { BN_FAIL("not built with ZeroMQ (cross build)"); }
#endif

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

/* Prefix reuse end to end: lines sharing a 200-token start (and a few that do
 * not), greedy, through the offline scheduler with the prefix cache on (the
 * default) and off, in one process and over MPI (2 tensor ranks; 2 pipeline
 * stages, where a copy must follow the steps in flight on each stage; 2 replicas):
 * the same tokens for every id, and the summary counts reused tokens only
 * when on. */
static long reused(const char *err)
{
    const char *p = err ? strstr(err, "prompt (") : NULL;
    return p ? atol(p + 8) : -1;
}

BN_TEST(batch_prefix_reuse)
{
    char in[64], out[2][64];
    snprintf(in, sizeof in, "/tmp/bn-pfx-%d.in", (int)getpid());
    FILE *f = fopen(in, "w");
    CHECK(f != NULL);
    uint64_t r = 12345;
    int pre[200];
    for (int i = 0; i < 200; i++)
        pre[i] = (int)((r = r * 6364136223846793005ull + 1442695040888963407ull) >> 33) % 500 + 1;
    for (int l = 0; l < 10; l++) {
        fprintf(f, "{\"id\": %d, \"max_tokens\": 8, \"temperature\": 0, \"tokens\": [", l);
        const int own = l % 5 == 4 ? 0 : 200; /* every fifth line shares nothing */
        for (int i = 0; i < own; i++)
            fprintf(f, "%d, ", pre[i]);
        for (int i = 0; i < 3 + l; i++)
            fprintf(f, "%s%d", i ? ", " : "", (int)((r = r * 6364136223846793005ull + 1) >> 33) % 500 + 1);
        fprintf(f, "]}\n");
    }
    fclose(f);
    static const char *const mpi[4] = { "", MPIRUN, MPIRUN, MPIRUN };
    static const char *const plan[4] = { "", "--tp 2", "--pp 2", "--replicas 2" };
    for (int w = 0; w < 4; w++) {
        char *tok[2] = { 0 };
        for (int on = 0; on < 2; on++) {
            snprintf(out[on], sizeof out[on], "/tmp/bn-pfx-%d-%d.out", (int)getpid(), on);
            unlink(out[on]);
            char cmd[1024], *err = NULL;
            snprintf(cmd, sizeof cmd, "%s %s/bitnet-worker --log-level warn --model " I2S " --threads 1 --batch %s "
                     "--out %s --max-seqs 4 --kv-type q8 %s %s", mpi[w], bin_dir(), in, out[on], plan[w],
                     on ? "" : "--prefix-cache-mb 0");
            int rc = bn_test_run(cmd, NULL, &err);
            if (rc)
                fprintf(stderr, "%s", err);
            CHECK_EQ_INT(rc, 0);
            const long n = reused(err);
            fprintf(stderr, "  %s%s prefix cache %s: %ld prompt tokens reused\n", w ? "mpirun -n 2 " : "one process",
                    plan[w], on ? "on " : "off", n);
            CHECK(on ? n >= 200 * 4 : n == 0);
            free(err);
            /* each id's tokens, in id order */
            char *txt = bn_test_read_file(out[on], NULL);
            CHECK(txt != NULL);
            size_t cap = 1 << 16, len = 0;
            tok[on] = calloc(cap, 1);
            for (int id = 0; id < 10; id++) {
                char key[32];
                snprintf(key, sizeof key, "{\"id\":%d,", id);
                const char *ln = strstr(txt, key), *t = ln ? strstr(ln, "\"tokens\":[") : NULL;
                CHECK(t != NULL);
                const char *e = strchr(t, ']');
                len += (size_t)snprintf(tok[on] + len, cap - len, "%d:%.*s;", id, (int)(e - t), t);
            }
            free(txt);
            unlink(out[on]);
        }
        CHECK_STR_EQ(tok[1], tok[0]);
        free(tok[0]);
        free(tok[1]);
    }
    unlink(in);
}
