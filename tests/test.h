/* test.h - the tiny test framework: checks that print both values.
 *
 * Each test is `void test_NAME(void)` listed in tests/list.h; the runner
 * (tests/runner.c) runs each in its own process with a timeout. A failed check
 * prints file:line, the expression and both values, then ends the test process
 * with status 1 (exit is allowed here: this is a test process, not a service). */
#ifndef BN_TEST_H
#define BN_TEST_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define BN_TEST(name) void test_##name(void)

#define BN_FAIL(...) do { fprintf(stderr, "%s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)

/* A test that cannot run here: says why on stderr and ends with status
 * BN_SKIP_STATUS, which the runner counts as skipped, never as passed. */
#define BN_SKIP_STATUS 77
#define BN_SKIP(...) do { fprintf(stderr, "  skipped: "); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); \
    exit(BN_SKIP_STATUS); } while (0)

#define CHECK(cond) do { if (!(cond)) BN_FAIL("check failed: %s", #cond); } while (0)

#define CHECK_EQ_INT(a, b) do { long long a_ = (long long)(a), b_ = (long long)(b); \
    if (a_ != b_) BN_FAIL("%s == %s failed: %lld vs %lld", #a, #b, a_, b_); } while (0)

#define CHECK_NEAR(a, b, tol) do { double a_ = (double)(a), b_ = (double)(b); \
    if (!(a_ - b_ <= (tol) && b_ - a_ <= (tol))) \
        BN_FAIL("|%s - %s| <= %g failed: %.9g vs %.9g (diff %.3g)", #a, #b, (double)(tol), a_, b_, a_ - b_); } while (0)

#define CHECK_STR_EQ(a, b) do { const char *a_ = (a), *b_ = (b); \
    if (strcmp(a_, b_) != 0) BN_FAIL("%s == %s failed: \"%s\" vs \"%s\"", #a, #b, a_, b_); } while (0)

/* Run a shell command; capture stdout (and stderr, when `err` is given) into
 * malloc'd NUL-terminated strings the caller frees. Returns the exit status
 * (128+signal when killed). Defined in tests/runner.c. */
int bn_test_run(const char *cmd, char **out, char **err);
/* Seed for random tests: BN_SEED from the environment, else from the clock; printed. */
uint64_t bn_test_seed(void);
/* Read a whole file into a malloc'd NUL-terminated buffer; NULL on failure. */
char *bn_test_read_file(const char *path, size_t *len);

#endif
