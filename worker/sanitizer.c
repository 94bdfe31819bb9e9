/* sanitizer.c - defaults for `make SAN=1` builds of bitnet-worker, read by the
 * sanitizer runtimes at start-up (unused in normal builds).
 *
 * Open MPI keeps allocations of its plugins until exit; LeakSanitizer would report
 * them on every run. Their stacks pass through dlopen'ed plugins that are gone by
 * then, so full unwinding is needed to see the libmpi frames the suppressions match.
 * Leaks in our own code are still reported. */
const char *__asan_default_options(void);
const char *__lsan_default_suppressions(void);

const char *__asan_default_options(void)
{
    return "fast_unwind_on_malloc=0";
}

const char *__lsan_default_suppressions(void)
{
    return "leak:libmpi.so\n"
           "leak:libopen-pal.so\n"
           "leak:libopen-rte.so\n"
           "leak:libpmix.so\n"
           "leak:libhwloc.so\n"
           "leak:libevent\n";
}
