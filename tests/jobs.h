/* jobs.h - the inputs and checks of batch-job tests (test_batchjob.c,
 * test_slurm.c): the same two JSONL jobs run offline, through a server and
 * under Slurm, and checked the same way. A failed check ends the test. */
#ifndef BN_TEST_JOBS_H
#define BN_TEST_JOBS_H

#include <sys/types.h>

#define I2S "tests/fixtures/tiny-b158-i2_s.gguf"
#define N_GOOD 12 /* good lines of either job */

/* The short job (long_run 0): N_GOOD greedy lines "story number i begins"
 * with 4+i tokens, and 4 bad lines and a blank one after the 4th. The long job
 * (1): N_GOOD seeded lines of 2000 tokens (run with --ignore-eos). */
void write_input(const char *path, int long_run);
/* OUT of the short job: every good id once, its tokens those of the same
 * prompt run alone by bitnet-worker --prompt (greedy), and the 4 error lines. */
void check_short_job(const char *out, const char *what);
/* OUT of the long job: every id exactly once, no error line. */
void check_long_job(const char *out);

/* how many lines of text answer id i ({"id":i, ...}) */
int count_id(const char *out, int i);
int lines(const char *s);
/* lines in the file OUT now (0 when missing) */
int out_lines(const char *out);
/* `cmd` run by sh in the background, its stderr to errp (NULL: /dev/null) */
pid_t job_start(const char *cmd, const char *errp);
/* wait (up to 60 s) until OUT has at least n lines; fails when p ends first
 * (p <= 0: no process to watch). Its line count. */
int wait_lines(const char *out, int n, pid_t p);
/* p's exit status (128 + signal when killed) */
int job_reap(pid_t p);

#endif
