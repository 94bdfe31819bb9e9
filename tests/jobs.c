/* jobs.c - the inputs and checks of batch-job tests; see jobs.h. */
#include "tests/jobs.h"
#include "test.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

void write_input(const char *path, int long_run)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    for (int i = 0; i < N_GOOD; i++) {
        if (long_run)
            fprintf(f, "{\"id\": %d, \"prompt\": \"line %d\", \"max_tokens\": 2000, \"temperature\": 0.8, "
                    "\"seed\": %d}\n", i, i, i);
        else
            fprintf(f, "{\"id\": %d, \"prompt\": \"story number %d begins\", \"max_tokens\": %d, \"temperature\": 0}\n",
                    i, i, 4 + i);
        if (i == 3 && !long_run) { /* bad lines between good ones */
            fputs("this is not json\n", f);
            fputs("{\"prompt\": \"no id here\"}\n", f);
            fputs("{\"id\": 2, \"prompt\": \"a duplicate id\"}\n", f);
            fputs("{\"id\": \"bad-temp\", \"prompt\": \"x\", \"temperature\": -1}\n", f);
            fputs("\n", f);
        }
    }
    fclose(f);
}

/* how many output lines answer id i ({"id":i, ...}) */
int count_id(const char *out, int i)
{
    char key[32];
    snprintf(key, sizeof key, "{\"id\":%d,", i);
    int n = 0;
    for (const char *p = out; (p = strstr(p, key)); p++)
        n++;
    return n;
}

int lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* OUT of the short job: every good id once, its tokens those of the same prompt
 * run alone (greedy), and the 4 error lines */
void check_short_job(const char *out, const char *what)
{
    char *o = bn_test_read_file(out, NULL);
    CHECK(o != NULL);
    CHECK_EQ_INT(lines(o), N_GOOD + 4);
    for (int i = 0; i < N_GOOD; i++) {
        CHECK_EQ_INT(count_id(o, i), 1);
        char args[512], *want = NULL, key[32];
        snprintf(args, sizeof args, "%s/bitnet-worker --log-level warn --model " I2S
                 " --prompt 'story number %d begins' -n %d --temp 0 --print-ids", bin_dir(), i, 4 + i);
        CHECK_EQ_INT(bn_test_run(args, &want, NULL), 0);
        want[strcspn(want, "\n")] = 0;
        for (char *c = want; *c; c++)
            if (*c == ' ')
                *c = ',';
        snprintf(key, sizeof key, "{\"id\":%d,", i);
        const char *t = strstr(strstr(o, key), "\"tokens\":[") + 10;
        if (strncmp(t, want, strlen(want)) != 0 || t[strlen(want)] != ']')
            BN_FAIL("%s, id %d: tokens [%.*s] vs alone [%s]", what, i, (int)strcspn(t, "]"), t, want);
        free(want);
    }
    CHECK(strstr(o, "{\"id\":null,\"line\":5,\"error\":\"not JSON\"}") != NULL);
    CHECK(strstr(o, "{\"id\":null,\"line\":6,\"error\":\"no \\\"id\\\"") != NULL);
    CHECK(strstr(o, "{\"id\":null,\"line\":7,\"error\":\"duplicate id 2\"}") != NULL);
    CHECK(strstr(o, "{\"id\":\"bad-temp\",\"line\":8,\"error\":\"\\\"temperature\\\" must be") != NULL);
    fprintf(stderr, "  %s: %d ids answered once each, equal to --prompt alone; 4 error lines\n", what, N_GOOD);
    free(o);
}

/* `cmd` in the background, its stderr to errp (NULL: /dev/null) */
pid_t job_start(const char *cmd, const char *errp)
{
    fflush(NULL);
    pid_t p = fork();
    if (p == 0) {
        int fd = open(errp ? errp : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 2);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return p;
}

int out_lines(const char *out)
{
    char *o = bn_test_read_file(out, NULL);
    int n = o ? lines(o) : 0;
    free(o);
    return n;
}

/* wait (up to 60 s) until OUT has at least n lines or p ended; its line count */
int wait_lines(const char *out, int n, pid_t p)
{
    int have = 0;
    for (int i = 0; i < 12000 && (have = out_lines(out)) < n; i++) {
        if (p > 0 && waitpid(p, NULL, WNOHANG) == p)
            BN_FAIL("the job ended before OUT had %d lines (it has %d)", n, have);
        usleep(5000);
    }
    return have;
}

int job_reap(pid_t p)
{
    int st;
    waitpid(p, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* every id of the long job answered exactly once, none refused */
void check_long_job(const char *out)
{
    char *o = bn_test_read_file(out, NULL);
    CHECK(o != NULL);
    CHECK_EQ_INT(lines(o), N_GOOD);
    for (int i = 0; i < N_GOOD; i++)
        CHECK_EQ_INT(count_id(o, i), 1);
    CHECK(strstr(o, "\"error\"") == NULL);
    free(o);
}

