/* log.c - see log.h. The level and rank are set once at start-up. */
#include "base/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static bn_log_level_t log_level = BN_LOG_INFO;
static int log_rank = 0;
static const char *const names[] = { "error", "warn", "info", "debug" };

void bn_log_setup(bn_log_level_t level, int rank)
{
    log_level = level;
    log_rank = rank;
}

int bn_log_parse_level(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

void bn_log(bn_log_level_t level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    if (log_rank < 0) /* not an MPI rank (bitnet-client) */
        fprintf(stderr, "%02d:%02d:%02d.%03ld %-5s %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                names[level], msg);
    else
        fprintf(stderr, "%02d:%02d:%02d.%03ld [rank %d] %-5s %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
                ts.tv_nsec / 1000000, log_rank, names[level], msg);
}

double bn_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
