/* repack.h - ternary tensors from the file into row-major I2_S rows, the rows the
 * kernels' layout (kernels.h) is made of.
 *
 * Runs once at load. An I2_S tensor whose full rows are wanted is used in place
 * (no copy); I2_S column slices (a tensor rank's part of o or down) are copied, so
 * each rank streams its own contiguous rows; TQ2_0 and TQ1_0 tensors, column slices, and F16/F32 tensors whose
 * values are w * scale with w in {-1, 0, +1} (llama.cpp writes such rows when they
 * are not a multiple of 256) are decoded into a new buffer. The result is not yet
 * in row groups: worker/model.c groups the rows (bn_tmat_interleave) as it moves
 * them into the weight arena. */
#ifndef BN_REPACK_H
#define BN_REPACK_H

#include "kernels/kernels.h"

#include <stddef.h>
#include <stdint.h>

/* Rows [r0, r1) and columns [c0, c1) of the tensor `name` (type, n_in x n_out,
 * data at src) into *out. Columns on the type's block boundaries (128, 256 for TQ
 * types) are cut exactly; any other column range is moved to the start of rows
 * padded to a multiple of 128 (out->n_in is then c1 - c0 rounded up), whose
 * padding the caller multiplies by zero activations.
 * *owned is NULL when out points into src, else a malloc'd buffer behind out's
 * data and bscale, for the caller to free. Returns BN_OK, BN_EUNSUPPORTED (a type
 * that is not ternary, or a float tensor whose values are not), BN_EFORMAT (a TQ2_0
 * field of 3, a non-finite block scale), BN_EINVAL (ranges) or BN_ENOMEM, naming
 * the tensor. Thread safe (pure function of its inputs). */
int bn_repack_ternary(const char *name, uint32_t type, const void *src, uint32_t n_in, uint32_t n_out,
                      uint32_t r0, uint32_t r1, uint32_t c0, uint32_t c1, bn_tmat_t *out, void **owned,
                      char *err, size_t errlen);

#endif
