/* golden.h - readers for the golden files of tests/fixtures (see their README). */
#ifndef BN_TEST_GOLDEN_H
#define BN_TEST_GOLDEN_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int n;              /* positions */
    int32_t *ids;       /* (n) */
    int32_t *argmax;    /* (n) */
    float *logits;      /* (n, n_vocab) */
} golden_seq_t;

/* Parse <model>.logits.txt: up to max_seq sequences; returns how many, -1 on error. */
int golden_logits_read(const char *path, int n_vocab, golden_seq_t *seqs, int max_seq);
void golden_seq_free(golden_seq_t *s);

typedef struct {
    int n_prompt, n_out;
    int32_t prompt[256], out[256];
    float margin[256];
} golden_gen_t;

/* Parse <model>.generate.txt; returns the number of prompts, -1 on error. */
int golden_generate_read(const char *path, golden_gen_t *g, int max);

/* Compare logits rows: max |diff| over all; and whether argmax agrees where the
 * golden top-2 gap exceeds gap_tol. Returns the count of such disagreements. */
int golden_compare(const float *got, const float *want, int n_rows, int n_vocab, double gap_tol,
                   double *max_diff);

#endif
