/* test_pool.c - the thread pool: every share run once per run with its writes
 * visible afterwards, the row split, no CPU when idle or while waiting for a slow
 * worker, hand-off time (printed, not asserted), and creation/destruction. */
#include "test.h"

#include "kernels/pool.h"
#include "base/status.h"

#include <stdatomic.h>
#include <string.h>
#include <time.h>

enum { MAX_T = 8 };

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_seconds(double s)
{
    struct timespec ts = { (time_t)s, (long)((s - (time_t)s) * 1e9) };
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static bn_pool_t *new_pool(int n)
{
    bn_pool_t *p = NULL;
    char err[128] = "";
    int rc = bn_pool_new(n, &p, err, sizeof err);
    if (rc != BN_OK)
        BN_FAIL("bn_pool_new(%d): %s: %s", n, bn_status_name(rc), err);
    CHECK(p != NULL);
    return p;
}

/* Each thread counts its calls in plain (non-atomic) memory and checks what its
 * neighbour wrote in the previous run: both need the pool's ordering. */
typedef struct {
    int run, nth;
    long hits[MAX_T];        /* written only by thread ith */
    int last_run[2][MAX_T];  /* [run % 2][ith] written by ith, read by ith-1 in the next run */
    atomic_int bad;       /* failures seen on a worker (which must not exit) */
} every_t;

static void every_job(void *arg, int ith, int nth)
{
    every_t *e = arg;
    if (nth != e->nth || ith < 0 || ith >= nth) {
        atomic_fetch_add(&e->bad, 1);
        return;
    }
    int next = (ith + 1) % nth;
    if (e->run > 0 && e->last_run[(e->run - 1) % 2][next] != e->run - 1)
        atomic_fetch_add(&e->bad, 1);
    e->hits[ith]++;
    e->last_run[e->run % 2][ith] = e->run;
}

BN_TEST(pool_runs_every_thread)
{
    enum { RUNS = 10000 };
    for (int nth = 1; nth <= MAX_T; nth++) {
        double t0 = wall_seconds();
        bn_pool_t *p = new_pool(nth);
        CHECK_EQ_INT(bn_pool_size(p), nth);
        every_t e;
        memset(&e, 0, sizeof e);
        atomic_init(&e.bad, 0);
        e.nth = nth;
        for (e.run = 0; e.run < RUNS; e.run++) {
            bn_pool_run(p, every_job, &e);
            for (int i = 0; i < nth; i++) {
                if (e.hits[i] != e.run + 1 || e.last_run[e.run % 2][i] != e.run)
                    BN_FAIL("nth %d run %d: thread %d ran %ld times, last in run %d", nth, e.run, i,
                            e.hits[i], e.last_run[e.run % 2][i]);
            }
        }
        CHECK_EQ_INT(atomic_load(&e.bad), 0);
        bn_pool_destroy(&p);
        CHECK(p == NULL);
        fprintf(stderr, "  %d threads: %d runs in %.3f s\n", nth, RUNS, wall_seconds() - t0);
    }
    /* A NULL pool runs the job on the caller alone. */
    every_t e;
    memset(&e, 0, sizeof e);
    atomic_init(&e.bad, 0);
    e.nth = 1;
    CHECK_EQ_INT(bn_pool_size(NULL), 1);
    bn_pool_run(NULL, every_job, &e);
    CHECK_EQ_INT(e.hits[0], 1);
    CHECK_EQ_INT(atomic_load(&e.bad), 0);
}

BN_TEST(pool_split)
{
    static const int aligns[] = { 1, 2, 3, 4, 8, 16, 32, 128 };
    static unsigned char seen[4096];
    int cases = 0;
    for (int n = 0; n <= 600; n += (n < 300 ? 1 : 37)) {
        for (int nth = 1; nth <= 12; nth++) {
            for (size_t a = 0; a < sizeof aligns / sizeof aligns[0]; a++) {
                int align = aligns[a];
                memset(seen, 0, (size_t)n);
                int prev_end = 0;
                for (int ith = 0; ith < nth; ith++) {
                    int r0 = -1, r1 = -1;
                    bn_pool_split(n, ith, nth, align, &r0, &r1);
                    if (r0 < 0 || r1 < r0 || r1 > n)
                        BN_FAIL("n %d nth %d align %d ith %d: bad range [%d, %d)", n, nth, align, ith, r0, r1);
                    if (r0 != r1 && r0 != prev_end)
                        BN_FAIL("n %d nth %d align %d ith %d: starts at %d, previous share ended at %d",
                                n, nth, align, ith, r0, prev_end);
                    if (r0 % align != 0 || (r1 != n && r1 % align != 0))
                        BN_FAIL("n %d nth %d align %d ith %d: unaligned [%d, %d)", n, nth, align, ith, r0, r1);
                    for (int r = r0; r < r1; r++)
                        seen[r]++;
                    if (r0 != r1)
                        prev_end = r1;
                    /* balanced: at most one block more than an even share */
                    int blocks = (n + align - 1) / align;
                    if (r1 - r0 > (blocks / nth + 1) * align)
                        BN_FAIL("n %d nth %d align %d ith %d: share of %d rows", n, nth, align, ith, r1 - r0);
                }
                for (int r = 0; r < n; r++)
                    if (seen[r] != 1)
                        BN_FAIL("n %d nth %d align %d: row %d covered %d times", n, nth, align, r, seen[r]);
                cases++;
            }
        }
    }
    /* the last thread ends at n, taking the partial block */
    int r0, r1;
    bn_pool_split(10, 2, 3, 4, &r0, &r1);
    CHECK_EQ_INT(r0, 8);
    CHECK_EQ_INT(r1, 10);
    /* fewer blocks than threads: some shares are empty */
    bn_pool_split(5, 0, 4, 4, &r0, &r1);
    CHECK_EQ_INT(r1 - r0, 0);
    bn_pool_split(5, 3, 4, 4, &r0, &r1);
    CHECK_EQ_INT(r0, 4);
    CHECK_EQ_INT(r1, 5);
    /* out-of-range arguments give empty shares, not a crash */
    bn_pool_split(10, 3, 3, 1, &r0, &r1);
    CHECK_EQ_INT(r1 - r0, 0);
    bn_pool_split(-5, 0, 1, 1, &r0, &r1);
    CHECK_EQ_INT(r1 - r0, 0);
    bn_pool_split(10, 0, 1, 0, &r0, &r1);
    CHECK_EQ_INT(r0, 0);
    CHECK_EQ_INT(r1, 10);
    fprintf(stderr, "  %d splits checked\n", cases);
}

static void touch_job(void *arg, int ith, int nth)
{
    atomic_fetch_add((atomic_long *)arg, 1);
}

BN_TEST(pool_idle_no_cpu)
{
    static const int sizes[] = { 2, 4 };
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        bn_pool_t *p = new_pool(sizes[s]);
        atomic_long calls;
        atomic_init(&calls, 0);
        for (int i = 0; i < 100; i++)
            bn_pool_run(p, touch_job, &calls);
        CHECK_EQ_INT(atomic_load(&calls), 100L * sizes[s]);
        double c0 = cpu_seconds(), w0 = wall_seconds();
        sleep_seconds(1.0);
        double cpu = cpu_seconds() - c0, wall = wall_seconds() - w0;
        fprintf(stderr, "  %d threads idle: %.4f s CPU over %.3f s\n", sizes[s], cpu, wall);
        CHECK(cpu < 0.05);
        /* still works after sleeping */
        bn_pool_run(p, touch_job, &calls);
        CHECK_EQ_INT(atomic_load(&calls), 101L * sizes[s]);
        bn_pool_destroy(&p);
    }
}

/* Thread 1 sleeps; the caller, done at once, must wait without burning a CPU. */
static void slow_job(void *arg, int ith, int nth)
{
    if (ith == 1)
        sleep_seconds(0.5);
}

BN_TEST(pool_slow_worker_no_spin)
{
    bn_pool_t *p = new_pool(2);
    double c0 = cpu_seconds(), w0 = wall_seconds();
    bn_pool_run(p, slow_job, NULL);
    double cpu = cpu_seconds() - c0, wall = wall_seconds() - w0;
    fprintf(stderr, "  caller waited %.3f s using %.4f s CPU\n", wall, cpu);
    CHECK(wall >= 0.5);
    CHECK(cpu < 0.05);
    bn_pool_destroy(&p);
}

static void tiny_job(void *arg, int ith, int nth)
{
    ((long *)arg)[ith * 16]++; /* one cache line per thread */
}

BN_TEST(pool_many_short_jobs)
{
    enum { RUNS = 100000 };
    static const int sizes[] = { 2, 4 };
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int n = sizes[s];
        bn_pool_t *p = new_pool(n);
        static long counts[MAX_T * 16];
        memset(counts, 0, sizeof counts);
        double c0 = cpu_seconds(), w0 = wall_seconds();
        for (int i = 0; i < RUNS; i++)
            bn_pool_run(p, tiny_job, counts);
        double wall = wall_seconds() - w0, cpu = cpu_seconds() - c0;
        for (int i = 0; i < n; i++)
            CHECK_EQ_INT(counts[i * 16], RUNS);
        fprintf(stderr, "  %d threads%s: %d runs, mean hand-off %.2f us (wall %.3f s, CPU %.3f s)\n", n,
                n > 2 ? " (may exceed the CPUs)" : "", RUNS, wall / RUNS * 1e6, wall, cpu);
        bn_pool_destroy(&p);
    }
}

BN_TEST(pool_destroy_while_idle)
{
    bn_pool_destroy(NULL);
    bn_pool_t *p = NULL;
    bn_pool_destroy(&p);
    CHECK(p == NULL);
    atomic_long calls;
    atomic_init(&calls, 0);
    long want = 0;
    for (int i = 0; i < 100; i++) {
        int n = 1 + i % MAX_T;
        p = new_pool(n);
        /* a third destroyed before the threads may even have started, a third
         * right after a run (workers spinning), a third after they slept */
        if (i % 3 >= 1) {
            bn_pool_run(p, touch_job, &calls);
            want += n;
        }
        if (i % 3 == 2)
            sleep_seconds(0.002);
        bn_pool_destroy(&p);
        CHECK(p == NULL);
    }
    CHECK_EQ_INT(atomic_load(&calls), want);
    /* bad counts; 0 means the CPUs of the affinity mask */
    char err[128] = "";
    CHECK_EQ_INT(bn_pool_new(-1, &p, err, sizeof err), BN_EINVAL);
    CHECK(p == NULL);
    CHECK(strstr(err, "-1") != NULL);
    CHECK_EQ_INT(bn_pool_new(BN_POOL_MAX_THREADS + 1, &p, NULL, 0), BN_EINVAL);
    CHECK(bn_pool_default_threads() >= 1);
    p = new_pool(0);
    CHECK_EQ_INT(bn_pool_size(p), bn_pool_default_threads());
    bn_pool_destroy(&p);
}
