// BLAKE3 (unkeyed, 32-byte output) for the C readers of the store: they check
// every directory record and blob they hand out against the digest it is
// stored under. Written from the BLAKE3 specification; several chunks are
// hashed side by side in vector lanes (GCC vector extensions, SSE2 on every
// x86-64, AVX2 where the CPU has it).
#ifndef NIXCAS_BLAKE3_H
#define NIXCAS_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define BLAKE3_OUT_LEN 32
#define BLAKE3_BLOCK_LEN 64
#define BLAKE3_CHUNK_LEN 1024
/** Enough for 2^54 chunks: any input smaller than 16 EiB. */
#define BLAKE3_MAX_DEPTH 54

typedef struct {
  uint32_t cv[8];
  uint64_t chunk_counter;
  uint8_t block[BLAKE3_BLOCK_LEN];
  uint8_t block_len;
  uint8_t blocks_compressed;
  uint32_t cv_stack[BLAKE3_MAX_DEPTH + 1][8];
  uint8_t cv_stack_len;
} nixcas_blake3_t;

void nixcas_blake3_init(nixcas_blake3_t *hasher);
void nixcas_blake3_update(nixcas_blake3_t *hasher, const void *input, size_t length);
/** The digest of everything passed to update; the hasher may be updated further afterwards. */
void nixcas_blake3_final(const nixcas_blake3_t *hasher, uint8_t out[BLAKE3_OUT_LEN]);
/** The digest of one buffer. */
void nixcas_blake3(const void *input, size_t length, uint8_t out[BLAKE3_OUT_LEN]);

/** Inputs nixcas_blake3_many takes at a time (more are taken in turn). */
#define NIXCAS_BLAKE3_MANY_MAX 16
/**
 * The digests of `count` buffers, as nixcas_blake3 gives them, faster for many
 * small ones: the whole chunks of all of them share the vector lanes.
 */
void nixcas_blake3_many(const void *const inputs[], const size_t lengths[], size_t count, uint8_t outs[][BLAKE3_OUT_LEN]);

#endif
