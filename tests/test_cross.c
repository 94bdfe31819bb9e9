/* test_cross.c - the NEON kernels (kernels/arm/neon.c), tested on this x86-64 host:
 * the aarch64 build of this very test runner (`make cross`, bin-aarch64/) runs
 * under qemu-user and must pass the kernel and whole-model tests.
 *
 * Not a skip when the cross build or qemu is missing: the test fails and says how
 * to get them (`make test` installs the packages and builds bin-aarch64/ first).
 * Paths are relative to the repository root, where the suite runs. */
#include "test.h"

#include <string.h>
#include <unistd.h>

#define CROSS_TESTS "bin-aarch64/bitnet-tests"
#define QEMU "qemu-aarch64-static -L /usr/aarch64-linux-gnu"

static void need_cross_build(void)
{
    const char *how = "run `make cross` (packages: sh tools/install-deps.sh); `make test` does both";
    if (access(CROSS_TESTS, X_OK) != 0)
        BN_FAIL("%s not found: %s", CROSS_TESTS, how);
    if (bn_test_run("command -v qemu-aarch64-static", NULL, NULL) != 0)
        BN_FAIL("qemu-aarch64-static not found: %s", how);
    if (access("/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1", R_OK) != 0)
        BN_FAIL("the aarch64 C library (/usr/aarch64-linux-gnu) is missing: %s", how);
}

static int count(const char *s, const char *needle)
{
    int n = 0;
    for (const char *p = s ? strstr(s, needle) : NULL; p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* Run the aarch64 runner as `prefix` (environment, qemu and its flags) says, on
 * the tests `names` (n of them); all must pass. Returns its stderr (caller frees). */
static char *run_cross(const char *prefix, const char *names, int n)
{
    char cmd[1024], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "%s " CROSS_TESTS " %s", prefix, names);
    fprintf(stderr, "  %s\n", cmd);
    int rc = bn_test_run(cmd, &out, &err);
    char want[64];
    snprintf(want, sizeof want, "%d passed, 0 failed", n);
    if (rc != 0 || !strstr(out ? out : "", want))
        BN_FAIL("exit %d, want \"%s\"\n--- stdout\n%s--- stderr\n%s", rc, want, out ? out : "", err ? err : "");
    free(out);
    return err;
}

/* The NEON table's every kernel check against the reference, twice: on a
 * Cortex-A53 (baseline NEON: int16 multiply-accumulate) and on qemu's "max" CPU,
 * which has the dot-product extension (SDOT) that neon.c picks at run time. */
BN_TEST(kernels_neon_qemu)
{
    need_cross_build();
    static const char *const cpus[] = { "cortex-a53", "max" };
    for (int i = 0; i < 2; i++) {
        char args[128];
        snprintf(args, sizeof args, QEMU " -cpu %s", cpus[i]);
        char *err = run_cross(args, "kernels_neon kernels_ref", 2);
        if (count(err, "testing neon") != 1)
            BN_FAIL("-cpu %s: kernels_neon did not say \"testing neon\"\n%s", cpus[i], err ? err : "");
        fprintf(stderr, "  -cpu %s: the neon table passed every kernel check\n", cpus[i]);
        free(err);
    }
}

/* The whole model with the NEON kernels against the golden logits and greedy
 * continuations, and the forward-pass tests that run in process. shapes_vs_naive
 * makes its models with the host's bitnet-mkmodel ($BN_BIN, built by `make`). */
BN_TEST(model_neon_qemu)
{
    need_cross_build();
    char *err = run_cross("BN_KERNELS=neon " QEMU " -cpu max",
                          "bitlinear_golden logits_golden scale_tensor_applied greedy_golden forward_batch_contract "
                          "formats_same_logits lm_head_formats shapes_vs_naive kv_types_accuracy",
                          9);
    fprintf(stderr, "  9 whole-model tests passed on aarch64 with BN_KERNELS=neon\n");
    free(err);
}
