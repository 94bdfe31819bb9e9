/* pool.h - a persistent pthread pool for the compute kernels: fork-join runs of
 * fn(arg, ith, nth) on nth threads, the caller being thread 0.
 *
 * What it is: threads created once per pool and reused for every operation of the
 * forward pass (several hundred runs per token), so a hand-off costs well under a
 * microsecond while the pool is busy. Between runs the workers spin briefly, then
 * sleep in the kernel: an idle pool uses no CPU.
 * What it is not: a task queue. There is no work stealing, no nesting, no priority;
 * the kernels split their rows themselves with bn_pool_split (DESIGN.md section 4:
 * split by output rows, one barrier per operation, none inside).
 * Invariants: one run at a time per pool; a run returns only when every thread has
 * returned from fn, and everything fn wrote on any thread is then visible to the
 * caller and to every thread of the next run. Linux only (futex, affinity mask). */
#ifndef BN_POOL_H
#define BN_POOL_H

#include <stddef.h>

typedef struct bn_pool bn_pool_t;

/* A job: called once per thread with ith in [0, nth). Must not call bn_pool_run. */
typedef void (*bn_pool_fn)(void *arg, int ith, int nth);

/* Creates a pool of n_threads threads counting the caller, so n_threads - 1 are
 * started (none for 1). n_threads 0 means bn_pool_default_threads(). The threads
 * block all signals, so signals go to the application's own threads.
 * Returns BN_OK and *out (the caller owns it, free with bn_pool_destroy),
 * BN_EINVAL for n_threads < 0 or > BN_POOL_MAX_THREADS, BN_ENOMEM when memory or a
 * thread cannot be had; `err` (may be NULL) then says which. */
#define BN_POOL_MAX_THREADS 1024
int bn_pool_new(int n_threads, bn_pool_t **out, char *err, size_t errlen);

/* Stops and joins the threads, frees the pool and sets *p to NULL. Accepts NULL
 * and a pointer to NULL. Must not race a bn_pool_run on the same pool. */
void bn_pool_destroy(bn_pool_t **p);

/* Number of threads, the caller included (1 for a NULL pool). */
int bn_pool_size(const bn_pool_t *p);

/* Runs fn(arg, ith, nth) once on each of the nth = bn_pool_size(p) threads, the
 * calling thread being ith 0, and returns when all have returned: a fork-join,
 * i.e. one barrier. A NULL pool, or a pool of 1, just calls fn(arg, 0, 1).
 * Memory: everything written before the call is visible to fn on every thread;
 * everything fn wrote is visible after the return, and so to the next run.
 * Thread safety: one caller at a time per pool (checked by assert); fn must not
 * call bn_pool_run on the same pool. */
void bn_pool_run(bn_pool_t *p, bn_pool_fn fn, void *arg);

/* The share of thread ith of nth in rows [0, n): sets [*r0, *r1). Boundaries are
 * multiples of `align` (values < 1 mean 1) except the end n; blocks of `align`
 * rows are spread evenly (shares differ by at most one block) and the last
 * thread's share ends at n, so it takes the partial last block. Shares are
 * disjoint and cover [0, n) exactly once; some are empty when n < nth * align.
 * n <= 0 or ith outside [0, nth) gives an empty range. Thread safe. */
void bn_pool_split(int n, int ith, int nth, int align, int *r0, int *r1);

/* Default thread count: the CPUs in this process's affinity mask (so `taskset`
 * and cpusets are honoured; a cgroup CPU quota is not), at least 1. Thread safe. */
int bn_pool_default_threads(void);

#endif
