/* server.c - a real server for tests; see server.h. */
#include "tests/server.h"
#include "test.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MPIENV "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
#define MPIRUN "mpirun --oversubscribe --bind-to none --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void server_start(server_t *s, int ranks, const char *args)
{
    memset(s, 0, sizeof *s);
    snprintf(s->errp, sizeof s->errp, "/tmp/bn-serve-%d-%d.err", (int)getpid(), rand());
    char cmd[2048], mpi[256] = "";
    if (ranks > 1)
        snprintf(mpi, sizeof mpi, MPIRUN " -n %d", ranks);
    snprintf(cmd, sizeof cmd, "%sexec %s %s/bitnet-worker %s --serve --bind 'tcp://127.0.0.1:*' --log-level info %s",
             ranks > 1 ? MPIENV : "", mpi, bin_dir(), ranks > 1 ? "--threads 1" : "", args);
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(s->errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int nul = open("/dev/null", O_RDWR);
        dup2(nul, 0);
        dup2(nul, 1);
        dup2(fd, 2);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    s->launcher = pid;
    double t0 = now();
    while (now() - t0 < 90) {
        char *e = bn_test_read_file(s->errp, NULL);
        const char *p = e ? strstr(e, "serving on ") : NULL;
        if (p && sscanf(p, "serving on %127s (pid %d)", s->ep, &s->rank0) == 2) {
            free(e);
            fprintf(stderr, "  server (%d rank%s %s) on %s, rank 0 pid %d\n", ranks, ranks > 1 ? "s" : "", args, s->ep,
                    s->rank0);
            return;
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            BN_FAIL("the server ended before serving:\n%s", e ? e : "");
        free(e);
        usleep(50000);
    }
    BN_FAIL("the server did not start serving within 90 s");
}

int server_stop(server_t *s)
{
    kill(s->rank0, SIGTERM);
    int st = 0;
    double t0 = now();
    while (waitpid(s->launcher, &st, WNOHANG) != s->launcher) {
        if (now() - t0 > 60) {
            kill(s->launcher, SIGKILL);
            waitpid(s->launcher, &st, 0);
            BN_FAIL("the server did not stop within 60 s of SIGTERM");
        }
        usleep(20000);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

char *server_log(const server_t *s)
{
    return bn_test_read_file(s->errp, NULL);
}

