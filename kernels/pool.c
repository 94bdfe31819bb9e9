/* pool.c - the persistent thread pool of pool.h: one job word, one countdown,
 * spin-then-futex waiting on both sides.
 *
 * What it is: a fork-join barrier per bn_pool_run. The caller publishes (fn, arg)
 * by bumping `gen`; each worker runs its share and decrements `pending`; the
 * caller runs share 0, then waits for `pending` to reach 0.
 * What it is not: portable beyond Linux, or a general executor (see pool.h).
 *
 * Waiting, and why a futex rather than a condition variable: a run must cost
 * little when the threads are busy (hundreds of runs per token, jobs of 10 us to
 * a few ms), and nothing when the pool is idle. So each waiter first spins on its
 * word for a bounded time with a pause instruction, and only then sleeps in the
 * kernel on that same word. With a futex the publisher needs no lock: it bumps
 * the word and makes the wake system call only when a sleeper has announced
 * itself (the `sleepers` count, or `caller_waits`), so the busy path is two
 * atomics and no syscall. The kernel re-reads the word before sleeping, which
 * closes the window between "I saw no change" and "I sleep" that a condition
 * variable would need its mutex (taken on every run) for.
 *
 * Memory order: the caller's writes (including fn, arg, pending) are released by
 * the bump of `gen`, acquired by the worker's load of it; each worker's writes are
 * released by its decrement of `pending` (the decrements form one release
 * sequence) and acquired by the caller's load of 0. So every write of run k
 * happens-before the return of run k and everything of run k+1. The sleep/wake
 * handshakes ("announce, then re-check" against "publish, then check for
 * sleepers") are seq_cst on both sides, so at least one side sees the other.
 *
 * Invariants: gen only grows (mod 2^32) and only the caller writes it; pending is
 * n-1 at publication and each worker decrements it once per run; a worker is
 * never more than one run behind, because the caller waits for all of them. */
#include "kernels/pool.h"

#include "base/status.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(atomic_uint) == 4 && ATOMIC_INT_LOCK_FREE == 2,
               "futex words must be lock-free 32-bit atomics");

/* Budgets, measured with the clock rather than in iterations because a pause
 * lasts from a few to ~140 cycles depending on the CPU. A worker that has
 * finished a run spins this long for the next one before sleeping: longer than
 * the gap between two operations of a forward pass, short enough that an idle
 * pool goes quiet at once. The caller, done with its share, spins this long for
 * the slowest worker (the imbalance of a split) before sleeping.
 * When threads outnumber CPUs, a spinner would take the CPU from a thread that
 * has work, so both sides only call sched_yield (which hands the CPU to a
 * runnable thread, or returns at once if there is none) for a short while, then
 * sleep. On 2 CPUs with 4 threads this made 20 us jobs 3x faster than sleeping
 * at once. */
enum {
    WORKER_SPIN_NS = 200 * 1000,
    CALLER_SPIN_NS = 500 * 1000,
    OVERSUB_YIELD_NS = 50 * 1000,
    CLOCK_EVERY = 64, /* spin iterations between two clock reads */
};

typedef struct {
    bn_pool_t *pool;
    int ith;
    pthread_t tid;
} worker_t;

struct bn_pool {
    /* Written by the caller once per run; workers spin on this line. */
    _Alignas(64) atomic_uint gen;  /* run number; the futex word workers sleep on */
    atomic_uint sleepers;          /* workers asleep, or about to sleep, on gen */
    atomic_int stop;               /* set with the last bump of gen, by destroy */
    bn_pool_fn fn;                 /* the current job, published by gen */
    void *arg;
    /* Written by each worker once per run; the caller spins on this line. */
    _Alignas(64) atomic_uint pending;  /* workers not done with this run; the caller's futex word */
    atomic_uint caller_waits;          /* the caller is asleep, or about to be, on pending */
    /* Fixed at creation. */
    _Alignas(64) int n;            /* threads, the caller included */
    int64_t worker_spin_ns, caller_spin_ns;
    int64_t worker_yield_ns, caller_yield_ns;
    worker_t *workers;             /* (n - 1) */
#ifndef NDEBUG
    atomic_int busy;               /* a run is in progress: catches nested or concurrent runs */
#endif
};

static void futex_wait(atomic_uint *word, unsigned expected)
{
    /* Returns on wake, on a signal, or at once when *word != expected: every
     * caller re-checks its condition in a loop. */
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(atomic_uint *word, int n)
{
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spins, then yields, until (*w == v) == want_eq or both budgets are spent.
 * Returns the last value read (an acquire load). */
static unsigned spin_until(atomic_uint *w, unsigned v, int want_eq, int64_t spin_ns, int64_t yield_ns)
{
    unsigned x = atomic_load_explicit(w, memory_order_acquire);
    if ((x == v) == want_eq)
        return x;
    if (spin_ns > 0) {
        int64_t end = now_ns() + spin_ns;
        for (unsigned i = 1;; i++) {
            cpu_relax();
            x = atomic_load_explicit(w, memory_order_acquire);
            if ((x == v) == want_eq)
                return x;
            if (i % CLOCK_EVERY == 0 && now_ns() >= end)
                break;
        }
    }
    if (yield_ns > 0) {
        int64_t end = now_ns() + yield_ns;
        for (;;) {
            sched_yield();
            x = atomic_load_explicit(w, memory_order_acquire);
            if ((x == v) == want_eq)
                return x;
            if (now_ns() >= end)
                break;
        }
    }
    return x;
}

/* A worker waits for the run after `seen`; returns its number. */
static unsigned wait_for_run(bn_pool_t *p, unsigned seen)
{
    unsigned g = spin_until(&p->gen, seen, 0, p->worker_spin_ns, p->worker_yield_ns);
    while (g == seen) {
        atomic_fetch_add_explicit(&p->sleepers, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&p->gen, memory_order_seq_cst) == seen)
            futex_wait(&p->gen, seen);
        atomic_fetch_sub_explicit(&p->sleepers, 1, memory_order_relaxed);
        g = atomic_load_explicit(&p->gen, memory_order_acquire);
    }
    return g;
}

/* The caller waits for every worker to finish the current run. */
static void wait_for_workers(bn_pool_t *p)
{
    unsigned left = spin_until(&p->pending, 0, 1, p->caller_spin_ns, p->caller_yield_ns);
    if (left == 0)
        return;
    atomic_store_explicit(&p->caller_waits, 1, memory_order_seq_cst);
    while ((left = atomic_load_explicit(&p->pending, memory_order_seq_cst)) != 0)
        futex_wait(&p->pending, left);
    atomic_store_explicit(&p->caller_waits, 0, memory_order_relaxed);
}

static void *worker_main(void *a)
{
    worker_t *w = a;
    bn_pool_t *p = w->pool;
    char name[16];
    snprintf(name, sizeof name, "bn-pool-%d", w->ith);
    pthread_setname_np(pthread_self(), name);
    /* gen is 0 until the first run, which cannot start before the pool exists;
     * starting from 0 rather than a fresh read means a late-starting thread
     * still sees run 1. */
    unsigned seen = 0;
    for (;;) {
        seen = wait_for_run(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_relaxed))
            break;
        p->fn(p->arg, w->ith, p->n);
        if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_seq_cst) == 1 &&
            atomic_load_explicit(&p->caller_waits, memory_order_seq_cst))
            futex_wake(&p->pending, 1);
    }
    return NULL;
}

int bn_pool_default_threads(void)
{
    /* The mask may be wider than a cpu_set_t on very large machines: grow. */
    for (int ncpu = CPU_SETSIZE; ncpu <= (1 << 20); ncpu *= 2) {
        cpu_set_t *set = CPU_ALLOC(ncpu);
        if (!set)
            break;
        size_t sz = CPU_ALLOC_SIZE(ncpu);
        if (sched_getaffinity(0, sz, set) == 0) {
            int c = CPU_COUNT_S(sz, set);
            CPU_FREE(set);
            return c < 1 ? 1 : c > BN_POOL_MAX_THREADS ? BN_POOL_MAX_THREADS : c;
        }
        CPU_FREE(set);
        if (errno != EINVAL)
            break;
    }
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c < 1 ? 1 : c > BN_POOL_MAX_THREADS ? BN_POOL_MAX_THREADS : (int)c;
}

/* Stops and joins the first n_started workers. */
static void stop_workers(bn_pool_t *p, int n_started)
{
    atomic_store_explicit(&p->stop, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_seq_cst);
    futex_wake(&p->gen, INT_MAX);
    for (int i = 0; i < n_started; i++)
        pthread_join(p->workers[i].tid, NULL);
}

int bn_pool_new(int n_threads, bn_pool_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n_threads < 0 || n_threads > BN_POOL_MAX_THREADS)
        return bn_err(err, errlen, BN_EINVAL, "pool: %d threads (want 0 for the default, or 1..%d)",
                      n_threads, BN_POOL_MAX_THREADS);
    int n = n_threads ? n_threads : bn_pool_default_threads();
    size_t size = (sizeof(bn_pool_t) + 63) / 64 * 64;
    bn_pool_t *p = aligned_alloc(64, size);
    if (!p)
        return bn_err(err, errlen, BN_ENOMEM, "pool: no memory for %d threads", n);
    memset(p, 0, size);
    atomic_init(&p->gen, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->caller_waits, 0);
#ifndef NDEBUG
    atomic_init(&p->busy, 0);
#endif
    p->n = n;
    int oversub = n > bn_pool_default_threads();
    p->worker_spin_ns = oversub ? 0 : WORKER_SPIN_NS;
    p->caller_spin_ns = oversub ? 0 : CALLER_SPIN_NS;
    p->worker_yield_ns = oversub ? OVERSUB_YIELD_NS : 0;
    p->caller_yield_ns = oversub ? OVERSUB_YIELD_NS : 0;
    if (n == 1) {
        *out = p;
        return BN_OK;
    }
    p->workers = calloc((size_t)n - 1, sizeof *p->workers);
    if (!p->workers) {
        free(p);
        return bn_err(err, errlen, BN_ENOMEM, "pool: no memory for %d threads", n);
    }
    /* Workers inherit a mask blocking the asynchronous signals (the synchronous
     * ones stay open so a fault in a kernel still reports normally). */
    sigset_t all, old;
    sigfillset(&all);
    int sync_sigs[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT };
    for (size_t i = 0; i < sizeof sync_sigs / sizeof sync_sigs[0]; i++)
        sigdelset(&all, sync_sigs[i]);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = 0, started = 0;
    for (; started < n - 1; started++) {
        worker_t *w = &p->workers[started];
        w->pool = p;
        w->ith = started + 1;
        if ((rc = pthread_create(&w->tid, NULL, worker_main, w)) != 0)
            break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        stop_workers(p, started);
        free(p->workers);
        free(p);
        return bn_err(err, errlen, BN_ENOMEM, "pool: starting thread %d of %d: %s", started + 1, n,
                      strerror(rc));
    }
    *out = p;
    return BN_OK;
}

void bn_pool_destroy(bn_pool_t **pp)
{
    if (!pp || !*pp)
        return;
    bn_pool_t *p = *pp;
    if (p->n > 1)
        stop_workers(p, p->n - 1);
    free(p->workers);
    free(p);
    *pp = NULL;
}

int bn_pool_size(const bn_pool_t *p)
{
    return p ? p->n : 1;
}

void bn_pool_run(bn_pool_t *p, bn_pool_fn fn, void *arg)
{
    if (!p || p->n == 1) {
        fn(arg, 0, 1);
        return;
    }
#ifndef NDEBUG
    /* A plain load and store, not an exchange: no locked instruction per run. A
     * nested run is always caught, concurrent callers most of the time. */
    assert(!atomic_load_explicit(&p->busy, memory_order_relaxed) &&
           "bn_pool_run: concurrent or nested run on one pool");
    atomic_store_explicit(&p->busy, 1, memory_order_relaxed);
#endif
    p->fn = fn;
    p->arg = arg;
    atomic_store_explicit(&p->pending, (unsigned)(p->n - 1), memory_order_relaxed);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&p->sleepers, memory_order_seq_cst) > 0)
        futex_wake(&p->gen, INT_MAX);
    fn(arg, 0, p->n);
    wait_for_workers(p);
#ifndef NDEBUG
    atomic_store_explicit(&p->busy, 0, memory_order_relaxed);
#endif
}

void bn_pool_split(int n, int ith, int nth, int align, int *r0, int *r1)
{
    *r0 = *r1 = 0;
    if (n <= 0 || nth < 1 || ith < 0 || ith >= nth)
        return;
    if (align < 1)
        align = 1;
    int64_t blocks = ((int64_t)n + align - 1) / align;
    int64_t b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    int64_t e0 = b0 * align, e1 = b1 * align;
    *r0 = (int)(e0 < n ? e0 : n);
    *r1 = (int)(e1 < n ? e1 : n);
}
