/* golden.c - see golden.h. */
#include "golden.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int golden_logits_read(const char *path, int n_vocab, golden_seq_t *seqs, int max_seq)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int ns = 0, cur = -1, row = 0;
    char tag[16];
    while (fscanf(f, "%15s", tag) == 1) {
        if (tag[0] == '#') {
            int ch;
            while ((ch = fgetc(f)) != '\n' && ch != EOF) {}
        } else if (!strcmp(tag, "seq")) {
            int k, n;
            if (fscanf(f, "%d %d", &k, &n) != 2 || ns >= max_seq || n <= 0 || n > 100000)
                goto bad;
            cur = ns++;
            seqs[cur].n = n;
            seqs[cur].ids = calloc(n, sizeof(int32_t));
            seqs[cur].argmax = calloc(n, sizeof(int32_t));
            seqs[cur].logits = calloc((size_t)n * n_vocab, sizeof(float));
            row = 0;
        } else if (!strcmp(tag, "ids")) {
            if (cur < 0)
                goto bad;
            for (int i = 0; i < seqs[cur].n; i++)
                if (fscanf(f, "%d", &seqs[cur].ids[i]) != 1)
                    goto bad;
        } else if (!strcmp(tag, "pos")) {
            int p, a;
            if (cur < 0 || row >= seqs[cur].n || fscanf(f, "%d argmax %d", &p, &a) != 2 || p != row)
                goto bad;
            seqs[cur].argmax[row] = a;
            for (int v = 0; v < n_vocab; v++)
                if (fscanf(f, "%f", &seqs[cur].logits[(size_t)row * n_vocab + v]) != 1)
                    goto bad;
            row++;
        } else {
            goto bad;
        }
    }
    fclose(f);
    return ns;
bad:
    fclose(f);
    return -1;
}

void golden_seq_free(golden_seq_t *s)
{
    free(s->ids);
    free(s->argmax);
    free(s->logits);
}

int golden_generate_read(const char *path, golden_gen_t *g, int max)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int n = 0;
    char tag[16];
    while (fscanf(f, "%15s", tag) == 1) {
        int k;
        if (tag[0] == '#') {
            int ch;
            while ((ch = fgetc(f)) != '\n' && ch != EOF) {}
            continue;
        }
        if (fscanf(f, "%d", &k) != 1 || k < 0 || k > 256)
            goto bad;
        if (!strcmp(tag, "prompt")) {
            if (n >= max)
                goto bad;
            g[n].n_prompt = k;
            for (int i = 0; i < k; i++)
                if (fscanf(f, "%d", &g[n].prompt[i]) != 1)
                    goto bad;
            n++;
        } else if (!strcmp(tag, "output") && n > 0) {
            g[n - 1].n_out = k;
            for (int i = 0; i < k; i++)
                if (fscanf(f, "%d", &g[n - 1].out[i]) != 1)
                    goto bad;
        } else if (!strcmp(tag, "margin") && n > 0) {
            for (int i = 0; i < k; i++)
                if (fscanf(f, "%f", &g[n - 1].margin[i]) != 1)
                    goto bad;
        } else {
            goto bad;
        }
    }
    fclose(f);
    return n;
bad:
    fclose(f);
    return -1;
}

int golden_compare(const float *got, const float *want, int n_rows, int n_vocab, double gap_tol,
                   double *max_diff)
{
    int bad = 0;
    double md = 0.0;
    for (int r = 0; r < n_rows; r++) {
        const float *g = got + (size_t)r * n_vocab, *w = want + (size_t)r * n_vocab;
        int ga = 0, wa = 0;
        for (int v = 0; v < n_vocab; v++) {
            double d = fabs((double)g[v] - w[v]);
            if (!(d <= md))
                md = d; /* also catches NaN */
            if (g[v] > g[ga]) ga = v;
            if (w[v] > w[wa]) wa = v;
        }
        float second = -INFINITY;
        for (int v = 0; v < n_vocab; v++)
            if (v != wa && w[v] > second)
                second = w[v];
        if (ga != wa && w[wa] - second > gap_tol) {
            fprintf(stderr, "  row %d: argmax %d, golden %d (golden gap %.3f)\n", r, ga, wa, w[wa] - second);
            bad++;
        }
    }
    *max_diff = md;
    return bad;
}
