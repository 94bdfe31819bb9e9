/* batch.c - bitnet-client batch IN.jsonl OUT.jsonl: a JSONL job through a
 * running server, --concurrency requests in flight on one DEALER socket.
 *
 * The files are coordinator/batch.h's (the same as bitnet-worker --batch): lines
 * OUT already answers are skipped, bad lines become error lines, and each answer
 * is one whole write in completion order, so the same command after a kill
 * finishes the job with every id answered once. The server's busy replies are
 * retried after a pause (a full queue is not the line's fault); a line the server
 * refuses gets an error line with the server's message; a line that the server
 * cancels (it is shutting down) or that Ctrl-C cancels is not written, and is done
 * by the next run. Progress on stderr when it is a terminal; a summary line at
 * the end. */
#include "client/client.h"
#include "base/log.h"
#include "base/status.h"
#include "coordinator/batch.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define DEFAULT_CONCURRENCY 8
#define TICK_MS 100
#define CANCEL_GRACE_MS 5000.0
#define PROGRESS_MS 500.0
#define BUSY_PAUSE_MS 100.0          /* the first pause after busy; doubles up to BUSY_PAUSE_MAX_MS */
#define BUSY_PAUSE_MAX_MS 2000.0
#define STOPPING_SILENCE_MS 5000.0   /* a stopping server silent this long answers nothing more */

/* one line of the job sent (or waiting to be sent again) */
typedef struct flight {
    bn_batch_item_t *it;
    bn_gen_params_t g;               /* kept to send again after busy */
    char id[48];                     /* the request id on the wire */
    double resend_at;                /* 0: on the server */
    double pause_ms;
    struct flight *next;
} flight_t;

typedef struct {
    options_t *o;
    bn_batch_file_t *f;
    void *sock;
    flight_t *flights;
    int n_flights;
    uint32_t max_msg;                /* the server's limit on a request */
    size_t left;                     /* cancelled by the server or Ctrl-C: for the next run */
    size_t busy;                     /* busy replies (retried) */
    int server_stopping;             /* a line was cancelled or refused by a stopping server */
    uint64_t streamed;               /* tokens received, for the progress line */
    int interrupted, failed;
    double t0, last_frame, last_progress;
    char err[512];
} job_t;

static void flight_free(flight_t *fl)
{
    bn_batch_item_free(fl->it);
    bn_gen_params_free(&fl->g);
    free(fl);
}

static void unlink_flight(job_t *j, flight_t *fl)
{
    for (flight_t **p = &j->flights; *p; p = &(*p)->next)
        if (*p == fl) {
            *p = fl->next;
            j->n_flights--;
            return;
        }
}

static flight_t *find_flight(job_t *j, const char *id)
{
    for (flight_t *fl = j->flights; fl && id; fl = fl->next)
        if (!strcmp(fl->id, id))
            return fl;
    return NULL;
}

/* The line's OUT line is written (or it is dropped for the next run). */
static void done_flight(job_t *j, flight_t *fl, int rc)
{
    unlink_flight(j, fl);
    fl->it = NULL; /* (finish and reject free the item) */
    flight_free(fl);
    if (rc && !j->failed)
        j->failed = rc;
}

static void drop_flight(job_t *j, flight_t *fl)
{
    unlink_flight(j, fl);
    flight_free(fl);
    j->left++;
}

static int send_flight(job_t *j, flight_t *fl)
{
    fl->resend_at = 0;
    return send_generate(j->sock, fl->id, &fl->g);
}

/* Take lines from IN until --concurrency are in flight (or IN ends). */
static int fill(job_t *j, int *eof)
{
    while (!*eof && !j->failed && j->n_flights < j->o->concurrency) {
        flight_t *fl = calloc(1, sizeof *fl);
        if (!fl)
            return fail("out of memory"), 1;
        int rc = bn_batch_file_next(j->f, &fl->it, &fl->g, j->err, sizeof j->err);
        if (rc) {
            free(fl);
            if (rc == 1) {
                *eof = 1;
                return 0;
            }
            return fail("%s", j->err), 1;
        }
        snprintf(fl->id, sizeof fl->id, "batch-%ld-%d", (long)getpid(), fl->it->line_no);
        size_t size = generate_size(fl->id, &fl->g);
        if (j->max_msg && size > j->max_msg) {
            char msg[160];
            snprintf(msg, sizeof msg, "the request is %zu bytes; the server takes at most %" PRIu32, size, j->max_msg);
            rc = bn_batch_file_reject(j->f, fl->it, msg, j->err, sizeof j->err);
            fl->it = NULL;
            flight_free(fl);
            if (rc)
                return fail("%s", j->err), 1;
            continue;
        }
        fl->next = j->flights;
        j->flights = fl;
        j->n_flights++;
        if (send_flight(j, fl))
            return 1;
    }
    return 0;
}

static void on_final(job_t *j, flight_t *fl, const Bitnet__Final *f)
{
    int reason = f->has_finish_reason ? (int)f->finish_reason : 0;
    if (reason == BITNET__FINISH_REASON__FINISH_CANCELLED) { /* the server stops, or Ctrl-C: not this line's fault */
        debug("line %d cancelled (%s): left for the next run", fl->it->line_no, f->detail ? f->detail : "");
        if (!j->interrupted && !j->server_stopping) {
            j->server_stopping = 1;
            fprintf(stderr, "bitnet-client: the server cancelled line %d (%s): no more lines are sent\n",
                    fl->it->line_no, f->detail ? f->detail : "no detail");
        }
        drop_flight(j, fl);
        return;
    }
    if (reason < BITNET__FINISH_REASON__FINISH_EOS || reason > BITNET__FINISH_REASON__FINISH_ERROR)
        reason = BITNET__FINISH_REASON__FINISH_ERROR;
    const Bitnet__Usage *wu = f->usage;
    bn_usage_t u = { .seed = f->seed };
    if (wu) {
        u.prompt_tokens = wu->prompt_tokens;
        u.completion_tokens = wu->completion_tokens;
        u.ttft_ms = wu->time_to_first_token_ms;
        u.tokens_per_s = wu->tokens_per_s;
        u.total_ms = wu->total_ms;
        u.queue_ms = wu->queue_ms;
    }
    /* the wire's finish reasons are request.h's numbers */
    int rc = bn_batch_file_finish(j->f, fl->it, reason, &u, f->detail ? f->detail : "no detail from the server",
                                  j->err, sizeof j->err);
    if (rc)
        fail("%s", j->err);
    done_flight(j, fl, rc);
}

static void on_error(job_t *j, flight_t *fl, const Bitnet__Error *e)
{
    const char *msg = e->message ? e->message : "(no message)";
    if (e->has_code && e->code == BN_ESTOPPING) { /* not this line's fault: the next run does it */
        if (!j->server_stopping)
            fprintf(stderr, "bitnet-client: %s: no more lines are sent\n", msg);
        j->server_stopping = 1;
        drop_flight(j, fl);
        return;
    }
    if (e->has_code && e->code == BN_EBUSY) { /* the server's queue is full: send again later */
        if (!j->busy++)
            fprintf(stderr, "bitnet-client: the server is busy (%s); lines are sent again after a pause "
                    "(a lower --concurrency avoids this)\n", msg);
        fl->pause_ms = fl->pause_ms ? fl->pause_ms * 2 : BUSY_PAUSE_MS;
        if (fl->pause_ms > BUSY_PAUSE_MAX_MS)
            fl->pause_ms = BUSY_PAUSE_MAX_MS;
        fl->resend_at = now_ms() + fl->pause_ms;
        return;
    }
    int rc = bn_batch_file_reject(j->f, fl->it, msg, j->err, sizeof j->err);
    if (rc)
        fail("%s", j->err);
    done_flight(j, fl, rc);
}

static void on_frame(job_t *j, const uint8_t *data, size_t len)
{
    Bitnet__Reply *r = bitnet__reply__unpack(NULL, len, data);
    if (!r) {
        fail("a reply of %zu bytes is not a valid message (ignored)", len);
        return;
    }
    flight_t *fl = find_flight(j, r->request_id);
    if (!fl) {
        if (r->body_case == BITNET__REPLY__BODY_ERROR && (!r->request_id || !*r->request_id))
            fail("the server could not read a request: %s", r->error->message ? r->error->message : "");
        else
            debug("ignored a reply to request '%s' (not in flight)", r->request_id ? r->request_id : "");
    } else if (r->body_case == BITNET__REPLY__BODY_CHUNK) {
        const Bitnet__TokenChunk *c = r->chunk;
        bn_batch_item_append(fl->it, c->has_text ? (const char *)c->text.data : "", c->has_text ? c->text.len : 0,
                             c->tokens, c->n_tokens);
        j->streamed += c->n_tokens;
    } else if (r->body_case == BITNET__REPLY__BODY_FINAL) {
        on_final(j, fl, r->final);
    } else if (r->body_case == BITNET__REPLY__BODY_ERROR) {
        on_error(j, fl, r->error);
    } else {
        debug("a reply of an unexpected kind (body %d) to '%s'", (int)r->body_case, fl->id);
    }
    bitnet__reply__free_unpacked(r, NULL);
}

/* Every frame waiting: 0, or exit status 1 when the socket failed. */
static int read_frames(job_t *j)
{
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, j->sock, ZMQ_DONTWAIT) < 0) {
            int err = errno;
            zmq_msg_close(&msg);
            errno = err;
            return err == EAGAIN || err == EINTR ? 0 : zfail("zmq_msg_recv");
        }
        j->last_frame = now_ms();
        on_frame(j, zmq_msg_data(&msg), zmq_msg_size(&msg));
        zmq_msg_close(&msg);
    }
}

/* The server's limits, and whether it answers at all: 0 or exit status 1. */
static int ask_info(job_t *j)
{
    if (send_empty(j->sock, "batch-info", BITNET__REQUEST__BODY_INFO))
        return 1;
    double end = now_ms() + j->o->timeout_s * 1e3;
    while (!g_signals && now_ms() < end) {
        zmq_pollitem_t item = { .socket = j->sock, .events = ZMQ_POLLIN };
        if (zmq_poll(&item, 1, TICK_MS) <= 0)
            continue;
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, j->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            continue;
        }
        Bitnet__Reply *r = bitnet__reply__unpack(NULL, zmq_msg_size(&msg), zmq_msg_data(&msg));
        zmq_msg_close(&msg);
        int ok = r && r->body_case == BITNET__REPLY__BODY_INFO;
        if (ok) {
            j->max_msg = r->info->has_max_message_bytes ? r->info->max_message_bytes : 0;
            debug("server: model %s, %" PRIu32 " sequences per replica, queue %" PRIu32, r->info->model,
                  r->info->max_seqs, r->info->max_queue);
        } else if (r && r->body_case == BITNET__REPLY__BODY_ERROR) {
            fail("the server refused info: %s", r->error->message ? r->error->message : "");
        }
        if (r)
            bitnet__reply__free_unpacked(r, NULL);
        return ok ? 0 : 1;
    }
    if (g_signals)
        return EXIT_INTERRUPTED;
    fail("no answer from %s for %g s (%s)", j->o->server, j->o->timeout_s,
         j->o->server_key[0] ? "is the server running, and is the key its public key?" : "is the server running?");
    return 1;
}

static void fmt_eta(char *buf, size_t n, double s)
{
    if (!(s >= 0) || s > 99 * 3600)
        snprintf(buf, n, "?");
    else if (s >= 3600)
        snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
    else if (s >= 60)
        snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else
        snprintf(buf, n, "%ds", (int)s);
}

/* done/total, tokens/s, ETA on one line of a terminal's stderr, rewritten */
static void progress(job_t *j, int last)
{
    double t = now_ms();
    if (!last && t - j->last_progress < PROGRESS_MS)
        return;
    j->last_progress = t;
    bn_batch_summary_t s;
    bn_batch_file_summary(j->f, &s);
    size_t done = s.answered + s.errors + s.skipped, run_done = s.answered + s.errors;
    double el = (t - j->t0) / 1e3, rate = el > 0 ? run_done / el : 0;
    char eta[32];
    fmt_eta(eta, sizeof eta, rate > 0 ? (double)(s.total - done) / rate : -1);
    fprintf(stderr, "\r\033[Kbatch: %zu/%zu done (%zu errors), %d in flight, %.1f tokens/s, ETA %s%s", done, s.total,
            s.errors, j->n_flights, el > 0 ? j->streamed / el : 0.0, eta, last ? "\n" : "");
}

/* Wait for what is in flight, send lines, write answers: the exit status. */
static int pump(job_t *j)
{
    int eof = 0, tty = isatty(STDERR_FILENO);
    double grace_end = 0;
    j->last_frame = now_ms();
    for (;;) {
        if (g_signals > 1)
            return EXIT_INTERRUPTED;
        if (g_signals && !j->interrupted) { /* no new lines; cancel what runs, keep what is done */
            j->interrupted = 1;
            eof = 1;
            fprintf(stderr, "%sbitnet-client: interrupted: cancelling %d lines in flight (they are left for the next "
                    "run; Ctrl-C again quits at once)\n", tty ? "\n" : "", j->n_flights);
            for (flight_t *fl = j->flights, *nx; fl; fl = nx) {
                nx = fl->next;
                if (fl->resend_at)
                    drop_flight(j, fl);
                else if (send_empty(j->sock, fl->id, BITNET__REQUEST__BODY_CANCEL))
                    return 1;
            }
            grace_end = now_ms() + CANCEL_GRACE_MS;
        }
        if (j->server_stopping && !eof) {
            eof = 1;
            for (flight_t *fl = j->flights, *nx; fl; fl = nx) { /* not sent again */
                nx = fl->next;
                if (fl->resend_at)
                    drop_flight(j, fl);
            }
        }
        if (fill(j, &eof))
            return 1;
        if (j->failed)
            return 1;
        double t = now_ms();
        int waiting = 0; /* requests on the server */
        for (flight_t *fl = j->flights; fl; fl = fl->next) {
            if (fl->resend_at && t >= fl->resend_at && send_flight(j, fl))
                return 1;
            waiting += !fl->resend_at;
        }
        if (eof && !j->n_flights)
            return j->interrupted ? EXIT_INTERRUPTED : 0;
        if (j->interrupted && t >= grace_end)
            return EXIT_INTERRUPTED;
        if (waiting && j->server_stopping && t - j->last_frame > STOPPING_SILENCE_MS) {
            for (flight_t *fl = j->flights, *nx; fl; fl = nx) { /* lost with the server: the next run does them */
                nx = fl->next;
                drop_flight(j, fl);
            }
            continue;
        }
        if (waiting && t - j->last_frame > j->o->timeout_s * 1e3) {
            fail("no answer from %s for %g s with %d requests in flight (did the server stop?)", j->o->server,
                 j->o->timeout_s, waiting);
            return 1;
        }
        if (tty)
            progress(j, 0);
        zmq_pollitem_t item = { .socket = j->sock, .events = ZMQ_POLLIN };
        int n = zmq_poll(&item, 1, TICK_MS);
        if (n < 0 && errno != EINTR)
            return zfail("zmq_poll");
        if (n > 0 && read_frames(j))
            return 1;
    }
}

int run_batch(options_t *o)
{
    if (!o->concurrency)
        o->concurrency = DEFAULT_CONCURRENCY;
    catch_signals();
    bn_log_setup(g_verbose ? BN_LOG_DEBUG : BN_LOG_WARN, -1); /* the bad lines, with their numbers */
    bn_gen_params_t defaults;
    gen_defaults(o, &defaults);
    defaults.prompt = NULL; /* (the lines bring their own) */
    defaults.tokens = NULL;
    job_t j = { .o = o, .t0 = now_ms() };
    int rc = bn_batch_file_open(o->batch_in, o->batch_out, &defaults, &j.f, j.err, sizeof j.err);
    if (rc) {
        fail("%s", j.err);
        return 1;
    }
    void *ctx = zmq_ctx_new();
    rc = ctx ? open_socket(o, ctx, &j.sock) : zfail("zmq_ctx_new");
    if (!rc)
        rc = ask_info(&j);
    if (!rc)
        rc = pump(&j);
    if (isatty(STDERR_FILENO) && j.f)
        progress(&j, 1);
    while (j.flights) { /* not answered: the next run does them */
        flight_t *nx = j.flights->next;
        flight_free(j.flights);
        j.flights = nx;
        j.left++;
    }
    bn_batch_summary_t s;
    bn_batch_file_summary(j.f, &s);
    size_t left = s.total - s.answered - s.skipped - s.errors;
    double sec = s.seconds > 0 ? s.seconds : 1e-9;
    fprintf(stderr, "batch: %zu answered, %zu skipped (already in %s), %zu error lines, %zu left; %" PRIu64
            " prompt and %" PRIu64 " generated tokens in %.1f s (%.2f prompts/s, %.2f generated tokens/s)\n",
            s.answered, s.skipped, o->batch_out, s.errors, left, s.prompt_tokens, s.completion_tokens, s.seconds,
            s.answered / sec, s.completion_tokens / sec);
    if (rc == 0 && left) {
        fprintf(stderr, "bitnet-client: %zu lines are left (the server stopped): run the same command again, against a "
                "running server, to finish\n", left);
        rc = EXIT_LEFT;
    }
    if (bn_batch_file_close(&j.f, j.err, sizeof j.err)) {
        fail("%s", j.err);
        rc = rc ? rc : 1;
    }
    if (j.sock)
        zmq_close(j.sock);
    while (ctx && zmq_ctx_term(ctx) && errno == EINTR)
        ;
    return rc;
}
