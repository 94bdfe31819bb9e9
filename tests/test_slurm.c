/* test_slurm.c - deploy/slurm/ on a real Slurm: a single-node cluster
 * (slurmctld, slurmd, munge from Debian's packages) started for the test by
 * tests/slurm/cluster.sh and stopped at the end, whatever happens.
 *
 * batch.sbatch with 4 tasks answers every line once, greedy answers equal to
 * bitnet-worker --prompt; a job cancelled half way (scancel) and submitted
 * again finishes with every id once; a job told its time is near (SIGUSR1, as
 * --signal sends it) stops, requeues itself and finishes. serve.sbatch writes
 * its endpoint file, bitnet-client answers through it (one prompt and a batch),
 * and scancel removes it. Skipped (not passed) only where Slurm cannot be
 * installed or started. */
#include "test.h"

#include "tests/jobs.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_dir[128];   /* the cluster's state, logs and the jobs' files */
static char g_cwd[1024];
static int g_passed;           /* the folder is kept after a failure, for its logs */

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

static void cluster_stop(void)
{
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "%s/tests/slurm/cluster.sh stop %s", g_cwd, g_dir);
    if (bn_test_run(cmd, NULL, NULL) != 0)
        fprintf(stderr, "  cluster.sh stop failed (state in %s)\n", g_dir);
}

static void remove_dir(void)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (g_passed)
        bn_test_run(cmd, NULL, NULL);
    else
        fprintf(stderr, "  the cluster's logs and the jobs' files are kept in %s\n", g_dir);
}

/* run a shell command under the cluster; its stdout (malloc'd) */
static char *sh(const char *cmd)
{
    char *out = NULL, *err = NULL;
    int rc = bn_test_run(cmd, &out, &err);
    if (rc)
        BN_FAIL("'%s' exited with %d:\n%s%s", cmd, rc, out ? out : "", err ? err : "");
    free(err);
    return out;
}

static long submit(const char *args)
{
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "sbatch --parsable -O -o %s/job-%%j.log %s", g_dir, args);
    char *out = sh(cmd);
    long id = strtol(out, NULL, 10);
    free(out);
    CHECK(id > 0);
    return id;
}

/* "PENDING", "RUNNING", "COMPLETED", ... ("" when Slurm forgot the job) */
static void job_state(long id, char *state, size_t n)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "scontrol show job %ld 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true", id);
    char *out = sh(cmd);
    snprintf(state, n, "%s", strncmp(out, "JobState=", 9) ? "" : out + 9);
    state[strcspn(state, "\n")] = 0;
    free(out);
}

/* wait (up to 120 s) until the job is in one of the states (space-separated) */
static void wait_state(long id, const char *states)
{
    char st[64] = "";
    for (int i = 0; i < 1200; i++) {
        job_state(id, st, sizeof st);
        char key[72];
        snprintf(key, sizeof key, " %s ", st);
        char want[256];
        snprintf(want, sizeof want, " %s ", states);
        if (*st && strstr(want, key))
            return;
        usleep(100000);
    }
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "cat %s/job-%ld.log", g_dir, id);
    char *log = sh(cmd);
    BN_FAIL("job %ld is %s, not %s, after 120 s; its log:\n%s", id, st, states, log);
}

static void expect_exit(long id, const char *code)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "scontrol show job %ld | grep -o 'ExitCode=[0-9:]*'", id);
    char *out = sh(cmd);
    out[strcspn(out, "\n")] = 0;
    if (strcmp(out + 9, code)) {
        snprintf(cmd, sizeof cmd, "cat %s/job-%ld.log", g_dir, id);
        BN_FAIL("job %ld: %s, not ExitCode=%s; its log:\n%s", id, out, code, sh(cmd));
    }
    free(out);
}

BN_TEST(slurm_batch_requeue_serve)
{
    CHECK(getcwd(g_cwd, sizeof g_cwd) != NULL);
    snprintf(g_dir, sizeof g_dir, "/tmp/bn-slurm-%d", (int)getpid());
    char cmd[8192], *err = NULL;
    snprintf(cmd, sizeof cmd, "WATCH_PID=%d %s/tests/slurm/cluster.sh start %s", (int)getpid(), g_cwd, g_dir);
    int rc = bn_test_run(cmd, NULL, &err);
    if (rc == BN_SKIP_STATUS)
        BN_SKIP("no Slurm here: %s", err && strstr(err, "skip: ") ? strstr(err, "skip: ") + 6 : err);
    atexit(remove_dir);
    atexit(cluster_stop); /* also after a failed check; before remove_dir */
    if (rc)
        BN_FAIL("cluster.sh start exited with %d:\n%s", rc, err);
    free(err);
    snprintf(cmd, sizeof cmd, "%s/slurm.conf", g_dir);
    setenv("SLURM_CONF", cmd, 1);
    char bin[1400], model[1400], in[256], out[256];
    snprintf(bin, sizeof bin, "%s/%s", g_cwd, bin_dir());
    setenv("BITNET_BIN", bin_dir()[0] == '/' ? bin_dir() : bin, 1);
    snprintf(model, sizeof model, "%s/" I2S, g_cwd);

    /* 1: the short job with 4 tasks (4 tensor ranks): every line once, greedy = alone */
    snprintf(in, sizeof in, "%s/short.jsonl", g_dir);
    snprintf(out, sizeof out, "%s/short.out", g_dir);
    write_input(in, 0);
    snprintf(cmd, sizeof cmd, "-n 4 deploy/slurm/batch.sbatch %s %s %s --log-level warn", model, in, out);
    long id = submit(cmd);
    wait_state(id, "COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY");
    expect_exit(id, "0:0");
    check_short_job(out, "batch.sbatch, 4 tasks");

    /* 2: the long job cancelled half way, then submitted again */
    snprintf(in, sizeof in, "%s/long.jsonl", g_dir);
    snprintf(out, sizeof out, "%s/long.out", g_dir);
    write_input(in, 1);
    char args[4096];
    snprintf(args, sizeof args, "-n 4 deploy/slurm/batch.sbatch %s %s %s --log-level warn --replicas 4 --ctx 4096 "
             "--max-seqs 1 --ignore-eos", model, in, out);
    id = submit(args);
    int n1 = wait_lines(out, 1, 0);
    snprintf(cmd, sizeof cmd, "scancel %ld", id);
    free(sh(cmd));
    wait_state(id, "CANCELLED COMPLETED");
    n1 = out_lines(out);
    fprintf(stderr, "  job %ld cancelled with %d of %d lines answered\n", id, n1, N_GOOD);
    CHECK(n1 > 0 && n1 < N_GOOD);
    id = submit(args);
    wait_state(id, "COMPLETED FAILED CANCELLED");
    expect_exit(id, "0:0");
    check_long_job(out);

    /* 3: the time limit near (SIGUSR1 to the batch shell): it stops, requeues itself, finishes */
    snprintf(out, sizeof out, "%s/long2.out", g_dir);
    snprintf(args, sizeof args, "-n 4 deploy/slurm/batch.sbatch %s %s %s --log-level warn --replicas 4 --ctx 4096 "
             "--max-seqs 1 --ignore-eos --drain-s 0", model, in, out);
    id = submit(args);
    wait_lines(out, 1, 0);
    snprintf(cmd, sizeof cmd, "scancel --signal=USR1 --batch %ld", id);
    free(sh(cmd));
    wait_state(id, "PENDING COMPLETED FAILED");
    int n2 = out_lines(out);
    fprintf(stderr, "  job %ld stopped by SIGUSR1 with %d of %d lines answered\n", id, n2, N_GOOD);
    CHECK(n2 > 0 && n2 < N_GOOD);
    char st[64];
    job_state(id, st, sizeof st);
    CHECK_STR_EQ(st, "PENDING"); /* requeued by the script */
    snprintf(cmd, sizeof cmd, "scontrol update JobId=%ld StartTime=now", id); /* skip Slurm's requeue delay */
    free(sh(cmd));
    wait_state(id, "COMPLETED FAILED CANCELLED");
    expect_exit(id, "0:0");
    snprintf(cmd, sizeof cmd, "scontrol show job %ld | grep -o 'Restarts=[0-9]*'", id);
    char *r = sh(cmd);
    CHECK(strncmp(r, "Restarts=1", 10) == 0);
    free(r);
    check_long_job(out);

    /* 4: serve.sbatch: the endpoint file, a client through it, gone after scancel */
    char epf[256];
    snprintf(epf, sizeof epf, "%s/endpoint", g_dir);
    snprintf(cmd, sizeof cmd, "-n 2 deploy/slurm/serve.sbatch %s %s --log-level warn", model, epf);
    id = submit(cmd);
    for (int i = 0; i < 600 && access(epf, R_OK) != 0; i++)
        usleep(100000);
    CHECK(access(epf, R_OK) == 0);
    char *ep = bn_test_read_file(epf, NULL);
    CHECK(ep && strstr(ep, "endpoint=tcp://") && strstr(ep, "server_key="));
    const char *e = strstr(ep, "endpoint=");
    fprintf(stderr, "  serve job %ld: %.*s\n", id, (int)strcspn(e, "\n"), e);
    free(ep);
    char *want = NULL, *got = NULL;
    snprintf(cmd, sizeof cmd, "%s/bitnet-worker --log-level warn --model %s --temp 0 -n 12 --prompt 'the endpoint file'",
             bin_dir(), model);
    CHECK_EQ_INT(bn_test_run(cmd, &want, NULL), 0);
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --timeout 60 --endpoint-file %s --temp 0 -n 12 'the endpoint file'",
             bin_dir(), epf);
    CHECK_EQ_INT(bn_test_run(cmd, &got, NULL), 0);
    CHECK_STR_EQ(got, want);
    free(want);
    free(got);
    snprintf(in, sizeof in, "%s/short.jsonl", g_dir);
    snprintf(out, sizeof out, "%s/served.out", g_dir);
    snprintf(cmd, sizeof cmd, "%s/bitnet-client --timeout 60 --endpoint-file %s batch %s %s --concurrency 8", bin_dir(),
             epf, in, out);
    CHECK_EQ_INT(bn_test_run(cmd, NULL, NULL), 0);
    check_short_job(out, "bitnet-client batch through serve.sbatch's endpoint file");
    snprintf(cmd, sizeof cmd, "scancel %ld", id);
    free(sh(cmd));
    wait_state(id, "CANCELLED COMPLETED FAILED");
    for (int i = 0; i < 100 && access(epf, F_OK) == 0; i++)
        usleep(100000);
    CHECK(access(epf, F_OK) != 0); /* the stopped server took its endpoint with it */
    g_passed = 1;
}
