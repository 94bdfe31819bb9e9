/* log.h - leveled logging to stderr: "[time] [rank N] LEVEL message".
 * stdout is reserved for generated text. Thread safe (one fprintf per line). */
#ifndef BN_LOG_H
#define BN_LOG_H

typedef enum { BN_LOG_ERROR = 0, BN_LOG_WARN = 1, BN_LOG_INFO = 2, BN_LOG_DEBUG = 3 } bn_log_level_t;

/* Set the level (messages above it are dropped) and the rank shown (< 0: none). */
void bn_log_setup(bn_log_level_t level, int rank);
/* Parse "error|warn|info|debug"; returns -1 when unknown. */
int bn_log_parse_level(const char *s);
void bn_log(bn_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Seconds on the monotonic clock, for durations (--stats, step accounting). */
double bn_now_s(void);

#define BN_ERROR(...) bn_log(BN_LOG_ERROR, __VA_ARGS__)
#define BN_WARN(...) bn_log(BN_LOG_WARN, __VA_ARGS__)
#define BN_INFO(...) bn_log(BN_LOG_INFO, __VA_ARGS__)
#define BN_DEBUG(...) bn_log(BN_LOG_DEBUG, __VA_ARGS__)

#endif
