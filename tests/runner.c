/* runner.c - the one test runner: runs every test of tests/list.h, each in its own
 * process with a timeout, and ends with the line "N passed, N failed, N skipped"
 * (a test that exits with BN_SKIP_STATUS is skipped; the run fails only on failures). 
 *
 *   bin/bitnet-tests              run all tests
 *   bin/bitnet-tests NAME...      run the named tests (make test T=NAME)
 *   bin/bitnet-tests --list       print the names
 * Environment: BN_TEST_TIMEOUT (seconds per test, default 300), BN_SEED (random
 * tests), BN_BIN (folder of the binaries under test, default bin). */

#include "test.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BN_T(name) void test_##name(void);
#include "list.h"
BN_TEST_LIST(BN_T)
#undef BN_T

static const struct { const char *name; void (*fn)(void); } tests[] = {
#define BN_T(name) { #name, test_##name },
    BN_TEST_LIST(BN_T)
#undef BN_T
};
#define N_TESTS (sizeof tests / sizeof tests[0])

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint64_t bn_test_seed(void)
{
    const char *s = getenv("BN_SEED");
    uint64_t seed = s ? strtoull(s, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 16);
    fprintf(stderr, "  seed %" PRIu64 " (rerun with BN_SEED=%" PRIu64 ")\n", seed, seed);
    return seed;
}

char *bn_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb) { free(buf); buf = NULL; break; }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf)
        return NULL;
    buf[n] = 0;
    if (len)
        *len = n;
    return buf;
}

int bn_test_run(const char *cmd, char **out, char **err)
{
    char outp[] = "/tmp/bn-test-out-XXXXXX", errp[] = "/tmp/bn-test-err-XXXXXX";
    int fo = mkstemp(outp), fe = mkstemp(errp);
    if (fo < 0 || fe < 0)
        BN_FAIL("mkstemp: %s", strerror(errno));
    close(fo);
    close(fe);
    size_t len = strlen(cmd) + 2 * sizeof outp + 64;
    char *full = malloc(len);
    snprintf(full, len, "( %s ) >%s 2>%s", cmd, outp, errp);
    int st = system(full);
    free(full);
    if (out)
        *out = bn_test_read_file(outp, NULL);
    char *e = bn_test_read_file(errp, NULL);
    if (err)
        *err = e;
    else {
        if (e && *e && (!WIFEXITED(st) || WEXITSTATUS(st) != 0))
            fprintf(stderr, "  [stderr of: %s]\n%s", cmd, e);
        free(e);
    }
    unlink(outp);
    unlink(errp);
    if (st == -1)
        return -1;
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return WEXITSTATUS(st);
}

/* 1 passed, 0 failed, 2 skipped */
static int run_one(size_t i, int timeout)
{
    double t0 = now();
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 0;
    }
    if (pid == 0) {
        setpgid(0, 0); /* own group, so a timeout also ends what the test started */
        tests[i].fn();
        exit(0); /* not _exit: atexit handlers run, so LeakSanitizer checks the test */
    }
    setpgid(pid, pid);
    int st = 0, timed_out = 0;
    double deadline = t0 + timeout;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            perror("waitpid");
            return 0;
        }
        if (now() > deadline) {
            timed_out = 1;
            kill(-pid, SIGKILL);
            waitpid(pid, &st, 0);
            break;
        }
        usleep(10000);
    }
    kill(-pid, SIGKILL); /* leftovers of the test's own children, if any */
    double dt = now() - t0;
    int ok = !timed_out && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    if (!timed_out && WIFEXITED(st) && WEXITSTATUS(st) == BN_SKIP_STATUS) {
        printf("SKIP   %-36s %7.2f s (why: above)\n", tests[i].name, dt);
        fflush(stdout);
        return 2;
    }
    if (ok)
        printf("ok     %-36s %7.2f s\n", tests[i].name, dt);
    else if (timed_out)
        printf("FAIL   %-36s timed out after %d s\n", tests[i].name, timeout);
    else if (WIFSIGNALED(st))
        printf("FAIL   %-36s killed by signal %d\n", tests[i].name, WTERMSIG(st));
    else
        printf("FAIL   %-36s exit %d\n", tests[i].name, WEXITSTATUS(st));
    fflush(stdout);
    return ok;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *ts = getenv("BN_TEST_TIMEOUT");
    int timeout = ts ? atoi(ts) : 300;
    if (timeout <= 0)
        timeout = 300;
    if (argc > 1 && strcmp(argv[1], "--list") == 0) {
        for (size_t i = 0; i < N_TESTS; i++)
            puts(tests[i].name);
        return 0;
    }
    int n[3] = { 0 }; /* failed, passed, skipped: run_one's answers */
    if (argc > 1) {
        for (int a = 1; a < argc; a++) {
            size_t i;
            for (i = 0; i < N_TESTS; i++)
                if (strcmp(argv[a], tests[i].name) == 0)
                    break;
            if (i == N_TESTS) {
                fprintf(stderr, "bitnet-tests: no test named '%s' (see --list)\n", argv[a]);
                n[0]++;
                continue;
            }
            n[run_one(i, timeout)]++;
        }
    } else {
        for (size_t i = 0; i < N_TESTS; i++)
            n[run_one(i, timeout)]++;
    }
    printf("%d passed, %d failed, %d skipped\n", n[1], n[0], n[2]);
    return n[0] ? 1 : 0;
}
