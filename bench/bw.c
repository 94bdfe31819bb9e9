/* bw.c - memory read bandwidth probe for `make bench`.
 *
 * What it is: the yardstick for "generation at >= 85 % of the read bandwidth". It
 * reads a buffer much larger than the caches (default 1 GiB) with wide loads, split
 * into one contiguous slice per thread, and keeps the best of several passes: the
 * rate a well-behaved streaming kernel can reach on this machine, at each thread count.
 * What it is not: a STREAM clone (no writes, no copy/triad), nor a latency test.
 *
 * Loads are AVX2 (32 bytes) when the CPU has it, checked at run time; otherwise a
 * plain C loop over 64-bit words with four accumulators. The buffer asks for
 * transparent huge pages (MADV_HUGEPAGE), as bitnet-worker's weights do: with
 * 4 KB pages the same loop reads about 10% less, and a yardstick slower than the
 * engine's own memory would flatter it. The sum of what was read is
 * printed so the compiler cannot drop the loads.
 *
 *   bw [--size-mb N] [--passes N] [--threads "1 2"]
 * Output, one line per thread count, GB = 1e9 bytes:
 *   bw: threads=N gbps=X
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <immintrin.h>

#define MAX_THREADS 256

typedef struct {
    const uint8_t *p;
    size_t n; /* bytes, a multiple of 128 */
    uint64_t sum;
    double t0, t1; /* this thread's start and end of reading */
    pthread_barrier_t *start;
} slice_t;

static int have_avx2;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, size_t n)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 128) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, a0);
    return v[0] + v[1] + v[2] + v[3];
}

static uint64_t read_c(const uint8_t *p, size_t n)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n / 8; i += 4) {
        s0 += w[i];
        s1 += w[i + 1];
        s2 += w[i + 2];
        s3 += w[i + 3];
    }
    return s0 + s1 + s2 + s3;
}

static void *reader(void *arg)
{
    slice_t *s = arg;
    pthread_barrier_wait(s->start);
    s->t0 = now_s();
    s->sum = have_avx2 ? read_avx2(s->p, s->n) : read_c(s->p, s->n);
    s->t1 = now_s();
    return NULL;
}

/* One pass over the buffer with nth threads; returns seconds from the first thread's start to
 * the last thread's end. Timed by the readers themselves: with as many readers as cores, the
 * main thread may not run again until they are done. */
static double pass(const uint8_t *buf, size_t size, int nth, uint64_t *sum)
{
    pthread_t th[MAX_THREADS];
    slice_t sl[MAX_THREADS];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, (unsigned)nth + 1);
    size_t per = size / (size_t)nth / 128 * 128;
    for (int t = 0; t < nth; t++) {
        sl[t] = (slice_t){ .p = buf + (size_t)t * per, .n = per, .start = &start };
        pthread_create(&th[t], NULL, reader, &sl[t]);
    }
    pthread_barrier_wait(&start);
    double t0 = 1e300, t1 = 0;
    for (int t = 0; t < nth; t++) {
        pthread_join(th[t], NULL);
        *sum += sl[t].sum;
        t0 = sl[t].t0 < t0 ? sl[t].t0 : t0;
        t1 = sl[t].t1 > t1 ? sl[t].t1 : t1;
    }
    pthread_barrier_destroy(&start);
    return t1 - t0;
}

int main(int argc, char **argv)
{
    size_t size_mb = 1024;
    int passes = 5;
    const char *threads = "1 2";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--size-mb"))
            size_mb = strtoul(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--passes"))
            passes = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = argv[i + 1];
        else {
            fprintf(stderr, "usage: bw [--size-mb N] [--passes N] [--threads \"1 2\"]\n");
            return 2;
        }
    }
    if (argc % 2 == 0 || size_mb < 1 || passes < 1) {
        fprintf(stderr, "usage: bw [--size-mb N] [--passes N] [--threads \"1 2\"]\n");
        return 2;
    }
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");

    size_t size = size_mb << 20;
    uint8_t *buf = aligned_alloc(2u << 20, size);
    if (!buf) {
        fprintf(stderr, "bw: cannot allocate %zu MB\n", size_mb);
        return 1;
    }
    int thp = madvise(buf, size, MADV_HUGEPAGE) == 0;
    for (size_t i = 0; i < size; i++) /* touch every page; values vary so the sum is not trivially 0 */
        buf[i] = (uint8_t)(i * 2654435761u >> 24);

    fprintf(stderr, "bw: %zu MB buffer%s, best of %d passes, %s loads\n", size_mb,
            thp ? " (huge pages asked)" : "", passes, have_avx2 ? "AVX2" : "64-bit");
    uint64_t sum = 0;
    const char *s = threads;
    while (*s) {
        char *end;
        long nth = strtol(s, &end, 10);
        if (end == s)
            break;
        s = end;
        if (nth < 1 || nth > MAX_THREADS) {
            fprintf(stderr, "bw: threads must be 1..%d\n", MAX_THREADS);
            return 2;
        }
        double best = 1e30;
        pass(buf, size, (int)nth, &sum); /* warm-up: page tables, thread start-up */
        for (int p = 0; p < passes; p++) {
            double dt = pass(buf, size, (int)nth, &sum);
            if (dt < best)
                best = dt;
        }
        size_t read = size / (size_t)nth / 128 * 128 * (size_t)nth;
        printf("bw: threads=%ld gbps=%.2f\n", nth, read / best / 1e9);
        fflush(stdout);
    }
    fprintf(stderr, "bw: checksum %llx\n", (unsigned long long)sum);
    free(buf);
    return 0;
}
