/* batch_file.c - a batch job's input and output files; see batch.h. */
#include "coordinator/batch.h"

#include "base/status.h"
#include "base/log.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

struct bn_batch_file {
    const char *in_path, *out_path;
    FILE *in;
    int fd;                       /* OUT, O_APPEND, flock'd */
    bn_batch_done_t *done;        /* answered by earlier runs */
    bn_batch_done_t *seen;        /* ids met in this run */
    bn_gen_params_t defaults;     /* shallow: the caller's */
    char *line;
    size_t cap;
    int line_no;
    bn_batch_summary_t sum;
    double t0;
};

static int blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isspace((unsigned char)s[i]))
            return 0;
    return 1;
}

int bn_batch_file_open(const char *in, const char *out, const bn_gen_params_t *defaults, bn_batch_file_t **fp,
                       char *err, size_t errlen)
{
    *fp = NULL;
    bn_batch_file_t *f = calloc(1, sizeof *f);
    if (!f)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    f->in_path = in;
    f->out_path = out;
    f->defaults = *defaults;
    f->t0 = bn_now_s();
    int rc = BN_OK;
    /* the lock first: loading may truncate a cut-short line that another job is writing */
    if ((f->fd = open(out, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644)) < 0) {
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot open for writing: %s", out, strerror(errno));
    } else if (flock(f->fd, LOCK_EX | LOCK_NB) != 0) {
        rc = errno == EWOULDBLOCK
                 ? bn_err(err, errlen, BN_EBUSY, "%s is being written by another batch job (it holds the file's lock)",
                          out)
                 : bn_err(err, errlen, BN_EIO, "%s: cannot lock: %s", out, strerror(errno));
    } else if ((rc = bn_batch_done_load(out, &f->done, err, errlen)) == BN_OK &&
               (rc = bn_batch_done_new(&f->seen)) != BN_OK) {
        rc = bn_err(err, errlen, rc, "out of memory");
    }
    if (rc == BN_OK && !(f->in = fopen(in, "rb")))
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot open: %s", in, strerror(errno));
    if (rc == BN_OK) { /* count the lines for progress, then read from the start */
        ssize_t n;
        while ((n = getline(&f->line, &f->cap, f->in)) >= 0)
            f->sum.total += !blank(f->line, (size_t)n);
        if (ferror(f->in) || fseek(f->in, 0, SEEK_SET) != 0)
            rc = bn_err(err, errlen, BN_EIO, "%s: cannot read: %s", in, strerror(errno));
    }
    if (rc) {
        char e2[8];
        bn_batch_file_close(&f, e2, sizeof e2);
        return rc;
    }
    if (bn_batch_done_count(f->done))
        BN_INFO("%s already answers %zu lines: they are skipped", out, bn_batch_done_count(f->done));
    *fp = f;
    return BN_OK;
}

int bn_batch_file_close(bn_batch_file_t **fp, char *err, size_t errlen)
{
    bn_batch_file_t *f = *fp;
    int rc = BN_OK;
    if (!f)
        return BN_OK;
    if (f->in)
        fclose(f->in);
    if (f->fd >= 0 && close(f->fd) != 0)
        rc = bn_err(err, errlen, BN_EIO, "%s: %s", f->out_path, strerror(errno));
    bn_batch_done_destroy(&f->done);
    bn_batch_done_destroy(&f->seen);
    free(f->line);
    free(f);
    *fp = NULL;
    return rc;
}

/* one whole line, one write (O_APPEND: never interleaved, never split by a kill
 * except as a cut-short last line, which the next run drops) */
static int put(bn_batch_file_t *f, char *line, char *err, size_t errlen)
{
    if (!line)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    size_t n = strlen(line);
    ssize_t w;
    do
        w = write(f->fd, line, n);
    while (w < 0 && errno == EINTR);
    free(line);
    if (w != (ssize_t)n)
        return bn_err(err, errlen, BN_EIO, "%s: write failed: %s", f->out_path, w < 0 ? strerror(errno) : "short write");
    return BN_OK;
}

static int error_line(bn_batch_file_t *f, const char *id_json, int line_no, const char *msg, char *err, size_t errlen)
{
    BN_WARN("%s line %d: %s", f->in_path, line_no, msg);
    f->sum.errors++;
    return put(f, bn_batch_error(id_json, line_no, msg), err, errlen);
}

int bn_batch_file_next(bn_batch_file_t *f, bn_batch_item_t **item, bn_gen_params_t *g, char *err, size_t errlen)
{
    *item = NULL;
    for (;;) {
        ssize_t n = getline(&f->line, &f->cap, f->in);
        if (n < 0)
            return ferror(f->in) ? bn_err(err, errlen, BN_EIO, "%s: cannot read: %s", f->in_path, strerror(errno)) : 1;
        int line_no = ++f->line_no;
        if (n && f->line[n - 1] == '\n')
            f->line[--n] = 0;
        if (blank(f->line, (size_t)n))
            continue;
        char *id = NULL, e[320];
        int prc = bn_batch_parse(f->line, (size_t)n, &f->defaults, &id, g, e, sizeof e);
        if (id ? bn_batch_done_has_id(f->done, id) : bn_batch_done_has_line(f->done, line_no)) {
            f->sum.skipped++; /* answered by an earlier run */
            if (id && bn_batch_done_add(f->seen, id) != BN_OK)
                prc = BN_ENOMEM;
            free(id);
            bn_gen_params_free(g);
            if (prc == BN_ENOMEM)
                return bn_err(err, errlen, BN_ENOMEM, "out of memory");
            continue;
        }
        if (id && bn_batch_done_has_id(f->seen, id)) { /* the first line keeps the id */
            char msg[400];
            snprintf(msg, sizeof msg, "duplicate id %s", id);
            free(id);
            bn_gen_params_free(g);
            int rc = error_line(f, NULL, line_no, msg, err, errlen);
            if (rc)
                return rc;
            continue;
        }
        if (id && bn_batch_done_add(f->seen, id) != BN_OK)
            prc = bn_err(e, sizeof e, BN_ENOMEM, "out of memory");
        bn_batch_item_t *it = prc == BN_OK ? calloc(1, sizeof *it) : NULL;
        if (prc == BN_OK && !it)
            prc = bn_err(e, sizeof e, BN_ENOMEM, "out of memory");
        if (prc == BN_OK) {
            it->id_json = id;
            it->line_no = line_no;
            *item = it;
            return BN_OK;
        }
        bn_gen_params_free(g);
        int rc = error_line(f, id, line_no, e, err, errlen);
        free(id);
        if (rc)
            return rc;
    }
}

void bn_batch_item_append(bn_batch_item_t *it, const char *text, size_t len, const int32_t *ids, size_t n_ids)
{
    if (it->nomem)
        return;
    if (it->len + len + 1 > it->cap) {
        size_t cap = (it->len + len + 1) * 2;
        char *nt = realloc(it->text, cap);
        if (!nt) {
            it->nomem = 1;
            return;
        }
        it->text = nt;
        it->cap = cap;
    }
    if (len)
        memcpy(it->text + it->len, text, len);
    it->len += len;
    if (it->n_ids + n_ids > it->ids_cap) {
        size_t cap = (it->n_ids + n_ids) * 2 + 16;
        int32_t *ni = realloc(it->ids, cap * sizeof *ni);
        if (!ni) {
            it->nomem = 1;
            return;
        }
        it->ids = ni;
        it->ids_cap = cap;
    }
    if (n_ids) /* (a final flush of held-back text comes without ids) */
        memcpy(it->ids + it->n_ids, ids, n_ids * sizeof *ids);
    it->n_ids += n_ids;
}

void bn_batch_item_free(bn_batch_item_t *it)
{
    if (!it)
        return;
    free(it->id_json);
    free(it->text);
    free(it->ids);
    free(it);
}

int bn_batch_file_finish(bn_batch_file_t *f, bn_batch_item_t *it, int finish, const bn_usage_t *u,
                         const char *detail, char *err, size_t errlen)
{
    int rc;
    if (it->nomem) {
        rc = error_line(f, it->id_json, it->line_no, "out of memory while collecting the answer", err, errlen);
    } else if (finish == BN_FINISH_ERROR || finish == BN_FINISH_CANCELLED) {
        rc = error_line(f, it->id_json, it->line_no, detail && *detail ? detail : bn_finish_name(finish), err, errlen);
    } else {
        f->sum.answered++;
        f->sum.prompt_tokens += u->prompt_tokens;
        f->sum.completion_tokens += u->completion_tokens;
        rc = put(f, bn_batch_answer(it->id_json, it->text ? it->text : "", it->len, it->ids, it->n_ids, finish, u), err,
                 errlen);
    }
    bn_batch_item_free(it);
    return rc;
}

int bn_batch_file_reject(bn_batch_file_t *f, bn_batch_item_t *it, const char *msg, char *err, size_t errlen)
{
    int rc = error_line(f, it->id_json, it->line_no, msg, err, errlen);
    bn_batch_item_free(it);
    return rc;
}

void bn_batch_file_summary(const bn_batch_file_t *f, bn_batch_summary_t *s)
{
    *s = f->sum;
    s->seconds = bn_now_s() - f->t0;
}
