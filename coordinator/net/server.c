/* server.c - rank 0's ZeroMQ service loop; see server.h. */
#include "coordinator/net/server.h"

#include "coordinator/net/wire.h"
#include "base/status.h"
#include "base/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#define IDENT_MAX 256 /* bytes of a ZeroMQ routing id (libzmq's limit is 255) */

/* one client's running generate request */
typedef struct client_req {
    struct client_req *next;
    unsigned char ident[IDENT_MAX];
    size_t ident_len;
    char id[BN_WIRE_ID_MAX + 1];
    uint64_t sid;     /* the scheduler's id */
    uint32_t seq;     /* chunks sent */
    int gone;         /* a send failed: the client vanished */
} client_req_t;

typedef struct {
    void *ctx, *sock;
    const bn_server_opts_t *o;
    bn_sched_t *sched;
    client_req_t *reqs;
    uint64_t bad;
    double t_start;
    int draining;
    bn_wire_info_t info;
} server_t;

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

/* one reply to a client; 0, or -1 when it cannot be delivered (vanished) */
static int send_to(server_t *sv, const void *ident, size_t ident_len, const uint8_t *buf, size_t len)
{
    if (zmq_send(sv->sock, ident, ident_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return -1;
    if (zmq_send(sv->sock, buf, len, ZMQ_DONTWAIT) < 0)
        return -1;
    return 0;
}

static void reply_error(server_t *sv, const void *ident, size_t ident_len, const char *id, int status, const char *msg)
{
    uint8_t *b = NULL;
    size_t n = 0;
    if (bn_wire_error(id, status, msg, &b, &n) == BN_OK)
        send_to(sv, ident, ident_len, b, n);
    free(b);
}

static void on_text(void *ctx, void *user, const char *text, size_t len, const int32_t *ids, int n_ids)
{
    server_t *sv = ctx;
    client_req_t *cr = user;
    if (cr->gone)
        return;
    uint8_t *b = NULL;
    size_t n = 0;
    if (bn_wire_chunk(cr->id, cr->seq++, text, len, ids, n_ids, &b, &n) == BN_OK &&
        send_to(sv, cr->ident, cr->ident_len, b, n) < 0) {
        BN_INFO("client of request '%s' is gone (%s): cancelling it", cr->id, zmq_strerror(errno));
        cr->gone = 1;
        bn_sched_cancel(sv->sched, cr->sid, "the client vanished");
    }
    free(b);
}

static void on_final(void *ctx, void *user, int finish, const bn_usage_t *u, const char *detail)
{
    server_t *sv = ctx;
    client_req_t *cr = user;
    if (!cr->gone) {
        uint8_t *b = NULL;
        size_t n = 0;
        if (bn_wire_final(cr->id, finish, u, detail, &b, &n) == BN_OK)
            send_to(sv, cr->ident, cr->ident_len, b, n);
        free(b);
    }
    for (client_req_t **p = &sv->reqs; *p; p = &(*p)->next)
        if (*p == cr) {
            *p = cr->next;
            break;
        }
    free(cr);
}

static client_req_t *find_req(server_t *sv, const void *ident, size_t ident_len, const char *id)
{
    for (client_req_t *c = sv->reqs; c; c = c->next)
        if (c->ident_len == ident_len && !memcmp(c->ident, ident, ident_len) && !strcmp(c->id, id))
            return c;
    return NULL;
}

static void handle(server_t *sv, const unsigned char *ident, size_t ident_len, const void *msg, size_t len)
{
    char err[512] = "";
    uint8_t *b = NULL;
    size_t n = 0;
    if (len > sv->o->max_msg_bytes) {
        snprintf(err, sizeof err, "a message of %zu bytes is over the limit of %u bytes", len, sv->o->max_msg_bytes);
        sv->bad++;
        BN_WARN("%s", err);
        reply_error(sv, ident, ident_len, "", BN_ERANGE, err);
        return;
    }
    bn_wire_req_t rq;
    int rc = bn_wire_decode(msg, len, &rq, err, sizeof err);
    if (rc) {
        sv->bad++;
        BN_WARN("bad request '%s': %s", rq.id, err);
        reply_error(sv, ident, ident_len, rq.id, rc, err);
        bn_wire_req_free(&rq);
        return;
    }
    switch (rq.kind) {
    case BN_MSG_GENERATE: {
        if (sv->draining) {
            reply_error(sv, ident, ident_len, rq.id, BN_ESTOPPING, "the server is shutting down");
            break;
        }
        if (find_req(sv, ident, ident_len, rq.id)) {
            snprintf(err, sizeof err, "request id '%s' is already running for this client", rq.id);
            reply_error(sv, ident, ident_len, rq.id, BN_EINVAL, err);
            break;
        }
        client_req_t *cr = calloc(1, sizeof *cr);
        if (!cr) {
            reply_error(sv, ident, ident_len, rq.id, BN_ENOMEM, "out of memory");
            break;
        }
        memcpy(cr->ident, ident, ident_len);
        cr->ident_len = ident_len;
        memcpy(cr->id, rq.id, sizeof cr->id);
        snprintf(rq.gen.label, sizeof rq.gen.label, "%s", rq.id);
        rc = bn_sched_submit(sv->sched, &rq.gen, cr, &cr->sid, err, sizeof err);
        if (rc) {
            BN_INFO("request '%s' refused: %s", rq.id, err);
            reply_error(sv, ident, ident_len, rq.id, rc, err);
            free(cr);
            break;
        }
        cr->next = sv->reqs;
        sv->reqs = cr;
        break;
    }
    case BN_MSG_CANCEL: {
        client_req_t *cr = find_req(sv, ident, ident_len, rq.id);
        if (!cr) {
            snprintf(err, sizeof err, "no running request '%s' to cancel", rq.id);
            reply_error(sv, ident, ident_len, rq.id, BN_ENOTFOUND, err);
        } else {
            bn_sched_cancel(sv->sched, cr->sid, "cancelled by the client");
        }
        break;
    }
    case BN_MSG_INFO:
        if (bn_wire_info(rq.id, &sv->info, &b, &n) == BN_OK)
            send_to(sv, ident, ident_len, b, n);
        break;
    case BN_MSG_HEALTH: {
        bn_sched_stats_t st;
        bn_sched_stats(sv->sched, &st);
        if (bn_wire_health(rq.id, !sv->draining, sv->draining, bn_now_s() - sv->t_start, (uint32_t)st.running,
                           (uint32_t)st.queued, &b, &n) == BN_OK)
            send_to(sv, ident, ident_len, b, n);
        break;
    }
    case BN_MSG_STATS: {
        bn_sched_stats_t st;
        bn_sched_stats(sv->sched, &st);
        uint64_t budget = sv->o->sched.kv_budget * (uint64_t)sv->info.replicas;
        if (bn_wire_stats(rq.id, &st, bn_now_s() - sv->t_start, sv->bad, budget, bn_kvcache_resident(sv->o->kv), &b,
                          &n) == BN_OK)
            send_to(sv, ident, ident_len, b, n);
        break;
    }
    }
    free(b);
    bn_wire_req_free(&rq);
}

/* read every message waiting now */
static void drain_socket(server_t *sv)
{
    for (int i = 0; i < 1000; i++) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        if (zmq_msg_recv(&id, sv->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&id);
            return;
        }
        int more = zmq_msg_more(&id);
        zmq_msg_init(&body);
        int got = more && zmq_msg_recv(&body, sv->sock, 0) >= 0;
        int extra = 0;
        while (got && zmq_msg_more(&body)) { /* a request is one frame: drop the rest */
            zmq_msg_t x;
            zmq_msg_init(&x);
            if (zmq_msg_recv(&x, sv->sock, 0) < 0) {
                zmq_msg_close(&x);
                break;
            }
            extra++;
            int m = zmq_msg_more(&x);
            zmq_msg_close(&x);
            if (!m)
                break;
        }
        size_t il = zmq_msg_size(&id);
        if (got && il <= IDENT_MAX) {
            if (extra) {
                char e[128];
                snprintf(e, sizeof e, "a request is one frame; this one had %d", 1 + extra);
                sv->bad++;
                reply_error(sv, zmq_msg_data(&id), il, "", BN_EPROTO, e);
            } else {
                handle(sv, zmq_msg_data(&id), il, zmq_msg_data(&body), zmq_msg_size(&body));
            }
        }
        zmq_msg_close(&body);
        zmq_msg_close(&id);
    }
}

/* CURVE: the secret key file must be the owner's alone */
static int setup_curve(server_t *sv, const char *path, char pub[41], char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return bn_err(err, errlen, BN_EIO, "%s: cannot read the CURVE secret key: %s", path, strerror(errno));
    if (st.st_mode & 077)
        return bn_err(err, errlen, BN_EDENIED, "%s: the CURVE secret key file is readable by others (mode %03o); "
                      "chmod 600 it", path, (unsigned)(st.st_mode & 0777));
    FILE *f = fopen(path, "r");
    char line[128] = "";
    if (!f || !fgets(line, sizeof line, f)) {
        if (f)
            fclose(f);
        return bn_err(err, errlen, BN_EIO, "%s: cannot read the CURVE secret key", path);
    }
    fclose(f);
    line[strcspn(line, "\r\n")] = 0;
    if (strlen(line) != 40 || zmq_curve_public(pub, line) != 0)
        return bn_err(err, errlen, BN_EINVAL, "%s: the first line is not a 40-character Z85 CURVE secret key "
                      "(bitnet-client keygen writes one)", path);
    int one = 1;
    if (zmq_setsockopt(sv->sock, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(sv->sock, ZMQ_CURVE_SECRETKEY, line, 40) != 0)
        return bn_err(err, errlen, BN_EIO, "CURVE setup failed: %s", zmq_strerror(errno));
    memset(line, 0, sizeof line);
    BN_INFO("CURVE on: clients need the server key %s (--server-key)", pub);
    return BN_OK;
}

/* A name other hosts can reach this one by: the host name when it resolves
 * here, else the first IPv4 address of an interface that is up and not
 * loopback, else 127.0.0.1. */
static void reachable_host(char *out, size_t n)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai = NULL;
    if (gethostname(out, n - 1) == 0 && (out[n - 1] = 0, getaddrinfo(out, NULL, &hints, &ai) == 0)) {
        freeaddrinfo(ai);
        return;
    }
    snprintf(out, n, "127.0.0.1");
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) != 0)
        return;
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
        if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET && (i->ifa_flags & IFF_UP) &&
            !(i->ifa_flags & IFF_LOOPBACK)) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, out, (socklen_t)n);
            break;
        }
    freeifaddrs(ifs);
}

/* The endpoint file: where clients find this server (serve.sbatch writes it to
 * a shared folder). A wildcard address becomes reachable_host(). Written whole
 * under a temporary name, then renamed, so a reader never sees half of it. */
static int write_endpoint_file(const char *path, const char *ep, const char *pub, char *err, size_t errlen)
{
    char host[256] = "", addr[320];
    const char *port = strrchr(ep, ':');
    if (!strncmp(ep, "tcp://", 6) && port &&
        (!strncmp(ep + 6, "0.0.0.0:", 8) || !strncmp(ep + 6, "[::]:", 5) || !strncmp(ep + 6, "*:", 2))) {
        reachable_host(host, sizeof host);
        snprintf(addr, sizeof addr, "tcp://%s%s", host, port);
    } else {
        snprintf(addr, sizeof addr, "%s", ep);
    }
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp)
        return bn_err(err, errlen, BN_EINVAL, "--endpoint-file: path too long");
    FILE *f = fopen(tmp, "w");
    if (!f)
        return bn_err(err, errlen, BN_EIO, "%s: cannot write: %s", tmp, strerror(errno));
    fprintf(f, "# bitnet-worker --serve, pid %d; read by bitnet-client --endpoint-file\nendpoint=%s\n", (int)getpid(),
            addr);
    if (pub)
        fprintf(f, "server_key=%s\n", pub);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return bn_err(err, errlen, BN_EIO, "%s: cannot write: %s", path, strerror(e));
    }
    BN_INFO("endpoint %s written to %s", addr, path);
    return BN_OK;
}

static int loopback(const char *ep)
{
    return !strncmp(ep, "tcp://127.", 10) || !strncmp(ep, "tcp://localhost:", 16) || !strncmp(ep, "tcp://[::1]", 11) ||
           !strncmp(ep, "ipc://", 6) || !strncmp(ep, "inproc://", 9);
}

int bn_server_run(const bn_server_opts_t *o, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
                  const bn_tokenizer_t *tok, char *err, size_t errlen)
{
    server_t sv = { .o = o, .t_start = bn_now_s() };
    int wrote_endpoint = 0;
    const bn_config_t *c = &m->cfg;
    sv.info = (bn_wire_info_t){ .model = o->model_path, .arch = c->arch, .plan = o->plan_text, .kernels = o->kernels,
                                .lm_head = o->lm_head, .kv_type = o->kv_type, .n_layer = c->n_layer,
                                .n_embd = c->n_embd, .n_vocab = c->n_vocab, .n_ctx = o->sched.n_ctx,
                                .ranks = (uint32_t)plan->world, .replicas = (uint32_t)plan->R,
                                .stages = (uint32_t)plan->P, .tensor_ranks = (uint32_t)plan->T,
                                .threads = (uint32_t)o->threads, .max_seqs = (uint32_t)o->sched.max_seqs,
                                .max_queue = (uint32_t)o->sched.max_queue, .max_tokens = BN_MAX_TOKENS_LIMIT,
                                .max_message_bytes = o->max_msg_bytes, .step_tokens = (uint32_t)o->sched.step_tokens,
                                .kv_budget_bytes = o->sched.kv_budget };
    bn_sched_sink_t sink = { .ctx = &sv, .on_text = on_text, .on_final = on_final };
    int rc = bn_sched_new(eng, plan, m, tok, &o->sched, &sink, &sv.sched, err, errlen);
    if (rc)
        return rc;
    sv.ctx = zmq_ctx_new();
    sv.sock = sv.ctx ? zmq_socket(sv.ctx, ZMQ_ROUTER) : NULL;
    if (!sv.sock) {
        rc = bn_err(err, errlen, BN_EIO, "cannot make a ZeroMQ socket: %s", zmq_strerror(errno));
        goto done;
    }
    int one = 1, zero = 0, hwm = 100000;
    int64_t maxmsg = (int64_t)o->max_msg_bytes * 4 + 4096;
    zmq_setsockopt(sv.sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sv.sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(sv.sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    zmq_setsockopt(sv.sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sv.sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    char pub[41] = "";
    if (o->curve_secret_file && (rc = setup_curve(&sv, o->curve_secret_file, pub, err, errlen)))
        goto done;
    if (zmq_bind(sv.sock, o->bind) != 0) {
        rc = bn_err(err, errlen, BN_EIO, "cannot bind %s: %s", o->bind, zmq_strerror(errno));
        goto done;
    }
    char ep[256] = "";
    size_t epl = sizeof ep;
    zmq_getsockopt(sv.sock, ZMQ_LAST_ENDPOINT, ep, &epl);
    if (!loopback(ep) && !o->curve_secret_file)
        BN_WARN("%s is beyond loopback, without CURVE: anyone who can reach it can submit work "
                "(see --curve-secret-file)", ep);
    if (o->endpoint_file &&
        (rc = write_endpoint_file(o->endpoint_file, ep, o->curve_secret_file ? pub : NULL, err, errlen)))
        goto done;
    wrote_endpoint = o->endpoint_file != NULL;
    struct sigaction sa = { .sa_handler = on_signal };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL); /* what mpirun and srun pass on to the ranks (serve.sbatch) */
    g_stop = 0;
    BN_INFO("serving on %s (pid %d): %d sequences per replica, queue %d, %d tokens a step, messages up to %u bytes",
            ep, (int)getpid(), o->sched.max_seqs, o->sched.max_queue, o->sched.step_tokens, o->max_msg_bytes);
    double drain_end = 0;
    for (;;) {
        if (g_stop && !sv.draining) {
            sv.draining = 1;
            drain_end = bn_now_s() + o->drain_s;
            BN_INFO("stopping: %d requests still running or queued; they have %.0f s to finish",
                    bn_sched_pending(sv.sched), o->drain_s);
        }
        if (sv.draining && bn_sched_pending(sv.sched) && bn_now_s() >= drain_end) {
            bn_sched_cancel_all(sv.sched, "the server is shutting down");
            drain_end = 1e300;
        }
        if (sv.draining && !bn_sched_pending(sv.sched) && !bn_sched_inflight(sv.sched))
            break;
        /* sleep in zmq_poll only when nothing is ready to run: a running step
         * of another replica is checked again within a millisecond */
        int busy = bn_sched_ready(sv.sched), inflight = bn_sched_inflight(sv.sched);
        zmq_pollitem_t it = { .socket = sv.sock, .events = ZMQ_POLLIN };
        int n = zmq_poll(&it, 1, busy ? 0 : inflight ? 1 : 100);
        if (n < 0 && errno != EINTR) {
            rc = bn_err(err, errlen, BN_EIO, "zmq_poll: %s", zmq_strerror(errno));
            goto done;
        }
        if (n > 0)
            drain_socket(&sv);
        if ((rc = bn_sched_pump(sv.sched, 0, err, errlen)))
            goto done;
    }
    drain_socket(&sv); /* requests that came during the last step: refused as shutting down */
    BN_INFO("stopped: every client answered");
done:
    if (wrote_endpoint) /* nobody should try a server that is gone */
        unlink(o->endpoint_file);
    bn_sched_destroy(&sv.sched); /* anything still held gets its final reply */
    while (sv.reqs) {            /* (none: on_final frees each) */
        client_req_t *n = sv.reqs->next;
        free(sv.reqs);
        sv.reqs = n;
    }
    if (sv.sock) { /* the last replies (finals of a drain) still go out, for a second at most */
        int linger = 1000;
        zmq_setsockopt(sv.sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(sv.sock);
    }
    if (sv.ctx)
        zmq_ctx_term(sv.ctx);
    return rc;
}
