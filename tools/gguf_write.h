/* gguf_write.h - a small GGUF v3 writer: metadata, tensor descriptors, streamed data.
 *
 * What it is: collect key/values and tensor descriptors, then bn_gguf_writer_write()
 * writes the file in one pass. A tensor's bytes come either from a buffer or from a
 * callback that streams them when the writer reaches that tensor, so a model far
 * larger than memory can be written with one tensor (or one chunk) alive at a time.
 * What it is not: a reader (worker/gguf.h) or a converter; it does not check that a
 * tensor's byte count matches its type and shape - the caller says how many bytes
 * each tensor holds, and the writer checks that exactly that many arrive.
 *
 * File layout (see worker/gguf.h): header, kvs in the order added, tensor
 * descriptors in the order added, zero padding to 32, then each tensor's data at
 * the next multiple of 32 (zero padded, the last one too). The alignment is always
 * 32 (the GGUF default), so no `general.alignment` key is written. Header integers
 * are written little endian; tensor bytes are written as given.
 *
 * Ownership: everything passed to the add functions is copied, except a tensor's
 * `data` buffer and callback `user` pointer, which must stay valid until
 * bn_gguf_writer_write() returns. Not thread safe: one thread per writer. */
#ifndef BN_GGUF_WRITE_H
#define BN_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>

typedef struct bn_gguf_writer bn_gguf_writer_t;
typedef struct bn_gguf_sink bn_gguf_sink_t;

/* Streams one tensor's data: called once, during bn_gguf_writer_write(), in tensor
 * order; must pass exactly the declared byte count to bn_gguf_sink_write() (in as
 * many pieces as it likes) and return BN_OK, or return an error status with a
 * message in err (which aborts the write). */
typedef int (*bn_gguf_fill_fn)(bn_gguf_sink_t *sink, void *user, char *err, size_t errlen);

/* A new empty writer; NULL when out of memory. */
bn_gguf_writer_t *bn_gguf_writer_new(void);
/* Free; accepts NULL and *w == NULL; sets *w to NULL. */
void bn_gguf_writer_destroy(bn_gguf_writer_t **w);

/* Key/values. Each returns BN_OK, BN_EINVAL (empty or duplicate key, unknown value
 * type, NULL string) or BN_ENOMEM, with a message naming the key. */
/* A scalar of value type `type` (BN_GGUF_UINT8..BN_GGUF_FLOAT64, not ARRAY): `value`
 * points to the C value of that type (uint8_t, int8_t, ..., float, double; a bool
 * is one uint8_t 0/1); for BN_GGUF_STRING it is a `const char *` NUL-terminated string. */
int bn_gguf_writer_add_kv(bn_gguf_writer_t *w, const char *key, uint32_t type, const void *value,
                          char *err, size_t errlen);
int bn_gguf_writer_add_u32(bn_gguf_writer_t *w, const char *key, uint32_t v, char *err, size_t errlen);
int bn_gguf_writer_add_f32(bn_gguf_writer_t *w, const char *key, float v, char *err, size_t errlen);
int bn_gguf_writer_add_bool(bn_gguf_writer_t *w, const char *key, int v, char *err, size_t errlen);
int bn_gguf_writer_add_str(bn_gguf_writer_t *w, const char *key, const char *s, char *err, size_t errlen);
/* An array of n numeric or bool elements of `elem_type`, packed as C values. */
int bn_gguf_writer_add_arr(bn_gguf_writer_t *w, const char *key, uint32_t elem_type, const void *elems,
                           uint64_t n, char *err, size_t errlen);
/* An array of n NUL-terminated strings. */
int bn_gguf_writer_add_arr_str(bn_gguf_writer_t *w, const char *key, const char *const *strs, uint64_t n,
                               char *err, size_t errlen);

/* Tensors, in file order. `ne` has n_dims (1..4) entries, ne[0] innermost, all > 0;
 * `type` is a ggml type id (BN_TYPE_*, not checked); `nbytes` is the size of its
 * data. Returns BN_OK, BN_EINVAL (empty or duplicate name, bad dims) or BN_ENOMEM. */
/* Data from a buffer of nbytes bytes (not copied). */
int bn_gguf_writer_add_tensor(bn_gguf_writer_t *w, const char *name, uint32_t type, uint32_t n_dims,
                              const uint64_t *ne, uint64_t nbytes, const void *data, char *err, size_t errlen);
/* Data from fill(sink, user, ...) at write time. */
int bn_gguf_writer_add_tensor_fn(bn_gguf_writer_t *w, const char *name, uint32_t type, uint32_t n_dims,
                                 const uint64_t *ne, uint64_t nbytes, bn_gguf_fill_fn fill, void *user,
                                 char *err, size_t errlen);

/* Write the file at `path` (created or truncated). Returns BN_OK; BN_EIO when the
 * file cannot be created or a write fails (disk full...: the message has the OS
 * reason); BN_EINVAL when a callback passes more or fewer bytes than declared; or
 * the status a callback returned, with its message. On failure a partly written
 * regular file is removed. May be called more than once. */
int bn_gguf_writer_write(bn_gguf_writer_t *w, const char *path, char *err, size_t errlen);

/* For fill callbacks: append n bytes to the current tensor. BN_OK, BN_EIO (write
 * failed) or BN_EINVAL (more than the tensor's declared size). */
int bn_gguf_sink_write(bn_gguf_sink_t *sink, const void *data, size_t n, char *err, size_t errlen);

#endif
