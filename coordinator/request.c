/* request.c - defaults and ownership of a generate request; see request.h. */
#include "coordinator/request.h"

#include <stdlib.h>
#include <string.h>

const char *bn_finish_name(int f)
{
    switch (f) {
    case BN_FINISH_EOS: return "eos";
    case BN_FINISH_LENGTH: return "length";
    case BN_FINISH_STOP: return "stop";
    case BN_FINISH_CANCELLED: return "cancelled";
    case BN_FINISH_ERROR: return "error";
    default: return "none";
    }
}

void bn_gen_params_init(bn_gen_params_t *p)
{
    memset(p, 0, sizeof *p);
    p->sp = (bn_sampler_params_t){ .temp = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f };
    p->max_tokens = 64;
    p->replica = -1;
}

void bn_gen_params_free(bn_gen_params_t *p)
{
    if (!p)
        return;
    free(p->prompt);
    free(p->tokens);
    for (int i = 0; i < p->n_stop; i++)
        free(p->stop[i]);
    p->prompt = NULL;
    p->tokens = NULL;
    p->n_stop = 0;
}
