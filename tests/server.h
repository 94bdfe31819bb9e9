/* server.h - a real bitnet-worker --serve for tests: started (one process, or
 * under mpirun on loopback) on an ephemeral port, stopped with SIGTERM to rank 0.
 * Shared by test_serve.c and test_batchjob.c. */
#ifndef BN_TEST_SERVER_H
#define BN_TEST_SERVER_H

#include <sys/types.h>

typedef struct {
    pid_t launcher;    /* our child: the worker, or mpirun */
    int rank0;         /* rank 0's pid, from its log */
    char ep[128];      /* the endpoint it bound */
    char errp[64];     /* its stderr */
} server_t;

/* Start a server (ranks > 1: under mpirun) with extra flags `args` and wait
 * for "serving on EP (pid N)"; a failure ends the test. */
void server_start(server_t *s, int ranks, const char *args);
/* SIGTERM to rank 0; returns the launcher's exit status. */
int server_stop(server_t *s);
/* Its stderr so far (malloc'd). */
char *server_log(const server_t *s);

#endif
