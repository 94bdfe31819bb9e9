/* gguf.h - read-only GGUF v3 reader over a memory mapping.
 *
 * What it is: bn_gguf_open() maps a file, parses and validates the header, every
 * metadata key/value and every tensor descriptor, and checks that each tensor's
 * data lies inside the file and is aligned. Nothing of the tensor data is copied.
 * What it is not: it knows nothing about models; worker/model.c reads the keys.
 * Invariants after a successful open: every kv and tensor entry is in range, every
 * string is inside the mapping, tensor data pointers are valid for nbytes bytes.
 * Malformed input never crashes: it gives BN_EFORMAT (or BN_EUNSUPPORTED) and a
 * one-line message naming the file and the key or tensor at fault.
 *
 * File layout (little endian), as gguf.h of ggml describes it:
 *   u32 magic "GGUF"; u32 version (3); u64 n_tensors; u64 n_kv;
 *   n_kv x { string key; u32 value_type; value }
 *   n_tensors x { string name; u32 n_dims; u64 ne[n_dims]; u32 type; u64 offset }
 *   padding to general.alignment (default 32); tensor data (offsets relative here)
 *   string = u64 length + bytes (no NUL); array = u32 elem_type + u64 n + elems.
 */
#ifndef BN_GGUF_H
#define BN_GGUF_H

#include "kernels/quants.h"

#include <stddef.h>
#include <stdint.h>

/* Metadata value types. */
enum {
    BN_GGUF_UINT8 = 0, BN_GGUF_INT8 = 1, BN_GGUF_UINT16 = 2, BN_GGUF_INT16 = 3,
    BN_GGUF_UINT32 = 4, BN_GGUF_INT32 = 5, BN_GGUF_FLOAT32 = 6, BN_GGUF_BOOL = 7,
    BN_GGUF_STRING = 8, BN_GGUF_ARRAY = 9, BN_GGUF_UINT64 = 10, BN_GGUF_INT64 = 11,
    BN_GGUF_FLOAT64 = 12,
};

#define BN_GGUF_MAGIC 0x46554747u /* "GGUF" read as little-endian u32 */
#define BN_GGUF_DEFAULT_ALIGNMENT 32

/* A string inside the mapping: not NUL-terminated. */
typedef struct {
    const char *ptr;
    uint64_t len;
} bn_str_t;

typedef struct {
    char *key;              /* NUL-terminated copy (owned by the bn_gguf_t) */
    uint32_t type;          /* BN_GGUF_* */
    uint32_t arr_type;      /* element type when type == BN_GGUF_ARRAY */
    uint64_t n;             /* number of elements (1 for a scalar) */
    const uint8_t *data;    /* scalar or array elements in the mapping (not for strings) */
    bn_str_t *strs;         /* n strings, for a string or an array of strings */
} bn_gguf_kv_t;

typedef struct {
    char *name;             /* NUL-terminated copy */
    uint32_t type;          /* BN_TYPE_* */
    uint32_t n_dims;
    uint64_t ne[4];         /* ne[0] = innermost (input) dimension; unused dims are 1 */
    uint64_t n_elements;
    uint64_t offset;        /* relative to the data section */
    uint64_t nbytes;        /* size of the data, from type and shape */
    const void *data;       /* in the mapping */
} bn_gguf_tensor_t;

typedef struct {
    char *path;
    const uint8_t *map;     /* whole file, read-only */
    uint64_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t n_kv;
    bn_gguf_kv_t *kv;       /* (n_kv) */
    uint64_t n_tensors;
    bn_gguf_tensor_t *tensors; /* (n_tensors) */
    uint64_t data_offset;   /* file offset of the data section */
    int fd;                 /* the open file, for bn_gguf_pread */
} bn_gguf_t;

/* Map and validate `path`. On success *out owns the mapping (close with
 * bn_gguf_close). Returns BN_OK, BN_EIO (cannot open/map), BN_EFORMAT, BN_ENOMEM or
 * BN_EUNSUPPORTED, with a one-line message in err naming the file and culprit. */
int bn_gguf_open(const char *path, bn_gguf_t **out, char *err, size_t errlen);
/* Unmap and free; accepts NULL and *g == NULL; sets *g to NULL. */
void bn_gguf_close(bn_gguf_t **g);

/* Tell the kernel we are done with [p, p + len) of the mapping for now (after a
 * tensor was copied out of it): its pages leave our resident set, the page cache
 * keeps them, and a later read maps them again. */
void bn_gguf_release(const bn_gguf_t *g, const void *p, uint64_t len);

/* Copy [p, p + len) of the mapping into dst with pread(), not through the mapping:
 * for scattered small reads (embedding rows of the tokens in a step) that must not
 * map pages into our resident set (the kernel maps whole large folios on a fault).
 * BN_OK, or BN_EINVAL when the range is outside the file. Thread safe. */
int bn_gguf_pread(const bn_gguf_t *g, const void *p, size_t len, void *dst);

/* Look-ups; NULL when absent. */
const bn_gguf_kv_t *bn_gguf_find(const bn_gguf_t *g, const char *key);
const bn_gguf_tensor_t *bn_gguf_tensor(const bn_gguf_t *g, const char *name);

/* Typed getters: BN_OK, BN_ENOTFOUND (absent) or BN_EFORMAT (wrong type, out of
 * range); messages name the file and key. Integer getters accept any integer type
 * whose value fits; the float getter accepts f32 and f64. */
int bn_gguf_get_u32(const bn_gguf_t *g, const char *key, uint32_t *out, char *err, size_t errlen);
int bn_gguf_get_i32(const bn_gguf_t *g, const char *key, int32_t *out, char *err, size_t errlen);
int bn_gguf_get_f32(const bn_gguf_t *g, const char *key, float *out, char *err, size_t errlen);
int bn_gguf_get_bool(const bn_gguf_t *g, const char *key, int *out, char *err, size_t errlen);
int bn_gguf_get_str(const bn_gguf_t *g, const char *key, bn_str_t *out, char *err, size_t errlen);
/* Element i of an integer array as int64 (any integer element type). */
int64_t bn_gguf_arr_int(const bn_gguf_kv_t *kv, uint64_t i);

/* Bytes of one scalar metadata value of type t; 0 for strings, arrays, unknown. */
size_t bn_gguf_value_size(uint32_t t);

/* Name of a tensor type ("I2_S"), or NULL for a type we do not read. */
const char *bn_type_name(uint32_t type);
/* Bytes of `n` elements of `type` (a row or a whole tensor; I2_S adds its 32-byte
 * scale tail only when `whole_tensor`). 0 for an unknown type or an n that is not a
 * multiple of the type's block. */
uint64_t bn_type_nbytes(uint32_t type, uint64_t n, int whole_tensor);
/* Elements per block of `type` (1 for float types). 0 for unknown types. */
uint32_t bn_type_block(uint32_t type);

#endif
