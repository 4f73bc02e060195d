// BLAKE3, unkeyed, 32-byte digests (see blake3.h). The tree is hashed as the
// specification's reference does: a chunk's chaining value is pushed onto a
// stack only once more input is known to follow it, and merged with its
// left neighbours while the number of chunks so far is even. Runs of whole
// chunks with more input after them are hashed side by side, one chunk per
// vector lane; the rest goes through the one-block compression.
// The rounds are unrolled by hand; -O3 lets GCC keep the vector lanes in registers.
#pragma GCC optimize("O3")

#include "blake3.h"

#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "blake3.c reads message words in host order and assumes a little-endian host"
#endif

enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

static const uint32_t IV[8] = {
  0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
};

/** The message word order of each of the seven rounds: the permutation applied 0–6 times. */
static const uint8_t SCHEDULE[7][16] = {
  {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
  {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
  {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
  {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
  {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
  {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
  {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t load32(const uint8_t *p) {
  uint32_t word;
  memcpy(&word, p, 4);
  return word;
}

// The quarter-round and a full round, as macros so that one text serves
// plain words and every vector width (shifts and adds apply lane-wise).
#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define G(a, b, c, d, x, y) \
  do { \
    a = a + b + (x); d = ROTR(d ^ a, 16); c = c + d; b = ROTR(b ^ c, 12); \
    a = a + b + (y); d = ROTR(d ^ a, 8); c = c + d; b = ROTR(b ^ c, 7); \
  } while (0)
#define ROUND(s, m, r) \
  do { \
    const uint8_t *order = SCHEDULE[r]; \
    G(s[0], s[4], s[8], s[12], m[order[0]], m[order[1]]); \
    G(s[1], s[5], s[9], s[13], m[order[2]], m[order[3]]); \
    G(s[2], s[6], s[10], s[14], m[order[4]], m[order[5]]); \
    G(s[3], s[7], s[11], s[15], m[order[6]], m[order[7]]); \
    G(s[0], s[5], s[10], s[15], m[order[8]], m[order[9]]); \
    G(s[1], s[6], s[11], s[12], m[order[10]], m[order[11]]); \
    G(s[2], s[7], s[8], s[13], m[order[12]], m[order[13]]); \
    G(s[3], s[4], s[9], s[14], m[order[14]], m[order[15]]); \
  } while (0)

/** One compression, one word at a time: the first 8 words of `out` are the new chaining value. */
static void compress_words(const uint32_t cv[8], const uint8_t block[BLAKE3_BLOCK_LEN], uint8_t block_len, uint64_t counter, uint8_t flags, uint32_t out[8]) {
  uint32_t m[16];
  for (int i = 0; i < 16; i++) m[i] = load32(block + 4 * i);
  uint32_t s[16] = {
    cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7],
    IV[0], IV[1], IV[2], IV[3], (uint32_t)counter, (uint32_t)(counter >> 32), block_len, flags,
  };
  ROUND(s, m, 0); ROUND(s, m, 1); ROUND(s, m, 2); ROUND(s, m, 3); ROUND(s, m, 4); ROUND(s, m, 5); ROUND(s, m, 6);
  for (int i = 0; i < 8; i++) out[i] = s[i] ^ s[i + 8];
}

// One compression with the state's four rows in vectors: the column step,
// then the rows rotated so that the diagonals line up as columns.
typedef uint32_t row_t __attribute__((vector_size(16)));
#define DEFINE_COMPRESS_ROWS(NAME, TARGET) \
  TARGET static void NAME(const uint32_t cv[8], const uint8_t block[BLAKE3_BLOCK_LEN], uint8_t block_len, uint64_t counter, uint8_t flags, uint32_t out[8]) { \
    uint32_t m[16]; \
    memcpy(m, block, sizeof m); \
    row_t a = {cv[0], cv[1], cv[2], cv[3]}, b = {cv[4], cv[5], cv[6], cv[7]}; \
    row_t c = {IV[0], IV[1], IV[2], IV[3]}, d = {(uint32_t)counter, (uint32_t)(counter >> 32), block_len, flags}; \
    for (int r = 0; r < 7; r++) { \
      const uint8_t *o = SCHEDULE[r]; \
      row_t x = {m[o[0]], m[o[2]], m[o[4]], m[o[6]]}, y = {m[o[1]], m[o[3]], m[o[5]], m[o[7]]}; \
      G(a, b, c, d, x, y); \
      b = __builtin_shufflevector(b, b, 1, 2, 3, 0); \
      c = __builtin_shufflevector(c, c, 2, 3, 0, 1); \
      d = __builtin_shufflevector(d, d, 3, 0, 1, 2); \
      row_t z = {m[o[8]], m[o[10]], m[o[12]], m[o[14]]}, w = {m[o[9]], m[o[11]], m[o[13]], m[o[15]]}; \
      G(a, b, c, d, z, w); \
      b = __builtin_shufflevector(b, b, 3, 0, 1, 2); \
      c = __builtin_shufflevector(c, c, 2, 3, 0, 1); \
      d = __builtin_shufflevector(d, d, 1, 2, 3, 0); \
    } \
    row_t low = a ^ c, high = b ^ d; \
    memcpy(out, &low, 16); \
    memcpy(out + 4, &high, 16); \
  }

DEFINE_COMPRESS_ROWS(compress_rows, )
#if defined(__x86_64__) && defined(__GNUC__)
DEFINE_COMPRESS_ROWS(compress_rows_vl, __attribute__((target("avx512f,avx512vl"))))
#endif

typedef void compress_fn(const uint32_t cv[8], const uint8_t block[BLAKE3_BLOCK_LEN], uint8_t block_len, uint64_t counter, uint8_t flags, uint32_t out[8]);
/** The fastest compression this CPU runs (choose_widths picks it). */
static compress_fn *compress = compress_words;

// A step of the transposition of LANES rows of LANES words: rows r and r + s
// (r without bit s) trade the lanes whose index has bit s, which swaps that
// bit between row and lane; after the steps 1, 2, … LANES / 2 every row holds
// one word of every lane. The masks are constants, so each trade is one shuffle.
#define LOW_LANE(c, s, n) (((c) & (s)) ? (n) + (c) - (s) : (c))
#define HIGH_LANE(c, s, n) (((c) & (s)) ? (n) + (c) : (c) + (s))
#define LANE_LIST_4(F, s, n) F(0, s, n), F(1, s, n), F(2, s, n), F(3, s, n)
#define LANE_LIST_8(F, s, n) F(0, s, n), F(1, s, n), F(2, s, n), F(3, s, n), F(4, s, n), F(5, s, n), F(6, s, n), F(7, s, n)
#define LANE_LIST_16(F, s, n) \
  F(0, s, n), F(1, s, n), F(2, s, n), F(3, s, n), F(4, s, n), F(5, s, n), F(6, s, n), F(7, s, n), \
  F(8, s, n), F(9, s, n), F(10, s, n), F(11, s, n), F(12, s, n), F(13, s, n), F(14, s, n), F(15, s, n)
// __builtin_shufflevector: GCC 12 and clang both have it (clang has no __builtin_shuffle).
#define TRANSPOSE_STEP(V, rows, s, LANES) \
  do { \
    for (int r = 0; r < (LANES); r++) { \
      if (r & (s)) continue; \
      V low = __builtin_shufflevector(rows[r], rows[r + (s)], LANE_LIST_##LANES(LOW_LANE, s, LANES)); \
      rows[r + (s)] = __builtin_shufflevector(rows[r], rows[r + (s)], LANE_LIST_##LANES(HIGH_LANE, s, LANES)); \
      rows[r] = low; \
    } \
  } while (0)

/**
 * Whole chunks hashed side by side, chunk i (numbered counters[i] in its
 * input) at chunks[i]; their chaining values go to out[0..LANES). The
 * chunks may come from different inputs. A caller with fewer chunks than
 * lanes repeats a chunk and ignores the extra values.
 */
#define DEFINE_HASH_CHUNKS(NAME, LANES, TARGET) \
  typedef uint32_t NAME##_vector __attribute__((vector_size(4 * (LANES)))); \
  TARGET static void NAME(const uint8_t *const chunks[], const uint64_t counters[], uint32_t out[][8]) { \
    NAME##_vector h[8], counter_low, counter_high; \
    for (int i = 0; i < 8; i++) h[i] = (NAME##_vector){0} + IV[i]; \
    for (int lane = 0; lane < (LANES); lane++) { \
      counter_low[lane] = (uint32_t)counters[lane]; \
      counter_high[lane] = (uint32_t)(counters[lane] >> 32); \
    } \
    for (int block = 0; block < BLAKE3_CHUNK_LEN / BLAKE3_BLOCK_LEN; block++) { \
      NAME##_vector m[16]; \
      /* Each lane's words as rows, transposed: then a vector per message word. */ \
      for (int part = 0; (LANES) < 16 && part < 16 / (LANES); part++) { \
        NAME##_vector rows[LANES]; \
        for (int lane = 0; lane < (LANES); lane++) \
          memcpy(&rows[lane], chunks[lane] + block * BLAKE3_BLOCK_LEN + part * 4 * (LANES), sizeof rows[lane]); \
        TRANSPOSE_STEP(NAME##_vector, rows, 1, LANES); \
        TRANSPOSE_STEP(NAME##_vector, rows, 2, LANES); \
        if ((LANES) > 4) TRANSPOSE_STEP(NAME##_vector, rows, 4, LANES); \
        for (int word = 0; word < (LANES); word++) m[part * (LANES) + word] = rows[word]; \
      } \
      /* Sixteen lanes measured faster loaded word by word. */ \
      for (int i = 0; (LANES) == 16 && i < 16; i++) \
        for (int lane = 0; lane < (LANES); lane++) m[i][lane] = load32(chunks[lane] + block * BLAKE3_BLOCK_LEN + 4 * i); \
      uint32_t flags = (block == 0 ? CHUNK_START : 0) | (block == 15 ? CHUNK_END : 0); \
      NAME##_vector s[16] = { \
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], \
        (NAME##_vector){0} + IV[0], (NAME##_vector){0} + IV[1], (NAME##_vector){0} + IV[2], (NAME##_vector){0} + IV[3], \
        counter_low, counter_high, (NAME##_vector){0} + BLAKE3_BLOCK_LEN, (NAME##_vector){0} + flags, \
      }; \
      ROUND(s, m, 0); ROUND(s, m, 1); ROUND(s, m, 2); ROUND(s, m, 3); ROUND(s, m, 4); ROUND(s, m, 5); ROUND(s, m, 6); \
      for (int i = 0; i < 8; i++) h[i] = s[i] ^ s[i + 8]; \
    } \
    for (int lane = 0; lane < (LANES); lane++) \
      for (int i = 0; i < 8; i++) out[lane][i] = h[i][lane]; \
  }

typedef void hash_chunks_fn(const uint8_t *const chunks[], const uint64_t counters[], uint32_t out[][8]);

DEFINE_HASH_CHUNKS(hash_4_chunks, 4, )
#if defined(__x86_64__) && defined(__GNUC__)
DEFINE_HASH_CHUNKS(hash_8_chunks, 8, __attribute__((target("avx2"))))
DEFINE_HASH_CHUNKS(hash_16_chunks, 16, __attribute__((target("avx512f"))))
// With AVX-512VL, narrower vectors get the one-instruction rotate too.
DEFINE_HASH_CHUNKS(hash_4_chunks_vl, 4, __attribute__((target("avx512f,avx512vl"))))
DEFINE_HASH_CHUNKS(hash_8_chunks_vl, 8, __attribute__((target("avx2,avx512f,avx512vl"))))
#endif

typedef struct {
  const uint32_t *cv;
  const uint8_t *block; // BLAKE3_BLOCK_LEN bytes (a short last block zero-padded)
  uint64_t counter;
  uint32_t block_len;
  uint32_t flags;
} compression_t;

typedef void compress_many_fn(const compression_t jobs[], size_t count, uint32_t *const out[]);

/**
 * Single compressions side by side, each with its own chaining value, block,
 * counter, block length and flags: the last blocks of chunks and the parents
 * of many inputs at once (nixcas_blake3_many). Lanes past `count` repeat lane 0.
 */
#define DEFINE_COMPRESS_MANY(NAME, LANES, TARGET) \
  typedef uint32_t NAME##_vector __attribute__((vector_size(4 * (LANES)))); \
  TARGET static void NAME(const compression_t jobs[], size_t count, uint32_t *const out[]) { \
    NAME##_vector h[8], m[16], counter_low, counter_high, block_len, flags; \
    for (int lane = 0; lane < (LANES); lane++) { \
      const compression_t *job = &jobs[(size_t)lane < count ? (size_t)lane : 0]; \
      for (int i = 0; i < 8; i++) h[i][lane] = job->cv[i]; \
      for (int i = 0; i < 16; i++) m[i][lane] = load32(job->block + 4 * i); \
      counter_low[lane] = (uint32_t)job->counter; \
      counter_high[lane] = (uint32_t)(job->counter >> 32); \
      block_len[lane] = job->block_len; \
      flags[lane] = job->flags; \
    } \
    NAME##_vector s[16] = { \
      h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], \
      (NAME##_vector){0} + IV[0], (NAME##_vector){0} + IV[1], (NAME##_vector){0} + IV[2], (NAME##_vector){0} + IV[3], \
      counter_low, counter_high, block_len, flags, \
    }; \
    ROUND(s, m, 0); ROUND(s, m, 1); ROUND(s, m, 2); ROUND(s, m, 3); ROUND(s, m, 4); ROUND(s, m, 5); ROUND(s, m, 6); \
    for (size_t lane = 0; lane < count; lane++) \
      for (int i = 0; i < 8; i++) out[lane][i] = s[i][lane] ^ s[i + 8][lane]; \
  }

DEFINE_COMPRESS_MANY(compress_4, 4, )
#if defined(__x86_64__) && defined(__GNUC__)
DEFINE_COMPRESS_MANY(compress_8, 8, __attribute__((target("avx2"))))
DEFINE_COMPRESS_MANY(compress_16, 16, __attribute__((target("avx512f"))))
#endif

#define MAX_LANES 16

/** The widths this CPU runs, narrowest first. */
static struct {
  int count;
  int lanes[3];
  hash_chunks_fn *fn[3];
  compress_many_fn *many[3];
} widths;

static void add_width(int lanes, hash_chunks_fn *fn, compress_many_fn *many) {
  widths.lanes[widths.count] = lanes;
  widths.many[widths.count] = many;
  widths.fn[widths.count++] = fn;
}

static void choose_widths(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  int vl = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  compress = vl ? compress_rows_vl : compress_rows;
  add_width(4, vl ? hash_4_chunks_vl : hash_4_chunks, compress_4);
  if (__builtin_cpu_supports("avx2")) add_width(8, vl ? hash_8_chunks_vl : hash_8_chunks, compress_8);
  if (__builtin_cpu_supports("avx512f")) add_width(16, hash_16_chunks, compress_16);
#else
  compress = compress_rows;
  add_width(4, hash_4_chunks, compress_4);
#endif
}

/**
 * Hashes up to the widest width of the `available` chunks at `input`
 * (numbered from `counter`), in the narrowest width that holds them;
 * their chaining values go to `cvs`. Returns how many.
 */
static size_t hash_chunks(uint64_t counter, const uint8_t *input, size_t available, uint32_t cvs[][8]);

static void parent_cv(const uint32_t left[8], const uint32_t right[8], uint8_t flags, uint32_t out[8]) {
  uint8_t block[BLAKE3_BLOCK_LEN];
  memcpy(block, left, 32);
  memcpy(block + 32, right, 32);
  compress(IV, block, BLAKE3_BLOCK_LEN, 0, PARENT | flags, out);
}

static size_t chunk_bytes(const nixcas_blake3_t *h) {
  return (size_t)h->blocks_compressed * BLAKE3_BLOCK_LEN + h->block_len;
}

static uint8_t chunk_flags(const nixcas_blake3_t *h) {
  return h->blocks_compressed == 0 ? CHUNK_START : 0;
}

/** A finished chunk's chaining value, `total` chunks so far: merged with the subtrees it completes. */
static void push_chunk(nixcas_blake3_t *h, const uint32_t chunk_cv[8], uint64_t total) {
  uint32_t cv[8];
  memcpy(cv, chunk_cv, sizeof cv);
  while ((total & 1) == 0) {
    parent_cv(h->cv_stack[--h->cv_stack_len], cv, 0, cv);
    total >>= 1;
  }
  memcpy(h->cv_stack[h->cv_stack_len++], cv, sizeof cv);
}

static void start_chunk(nixcas_blake3_t *h, uint64_t counter) {
  memcpy(h->cv, IV, sizeof h->cv);
  h->chunk_counter = counter;
  h->block_len = 0;
  h->blocks_compressed = 0;
}

static size_t hash_chunks(uint64_t counter, const uint8_t *input, size_t available, uint32_t cvs[][8]) {
  int w = 0;
  while (w + 1 < widths.count && widths.lanes[w] < (int)available) w++;
  size_t lanes = (size_t)widths.lanes[w];
  size_t count = available < lanes ? available : lanes;
  const uint8_t *chunks[MAX_LANES];
  uint64_t counters[MAX_LANES];
  for (size_t lane = 0; lane < lanes; lane++) {
    size_t chunk = lane < count ? lane : count - 1;
    chunks[lane] = input + chunk * BLAKE3_CHUNK_LEN;
    counters[lane] = counter + chunk;
  }
  uint32_t all[MAX_LANES][8];
  widths.fn[w](chunks, counters, all);
  memcpy(cvs, all, count * sizeof all[0]);
  return count;
}

/** The chaining value of one chunk (whole or the last, shorter one) that is not the root. */
static void chunk_cv(const uint8_t *input, size_t length, uint64_t counter, uint32_t out[8]) {
  uint32_t cv[8];
  memcpy(cv, IV, sizeof cv);
  uint8_t flags = CHUNK_START;
  while (length > BLAKE3_BLOCK_LEN) {
    compress(cv, input, BLAKE3_BLOCK_LEN, counter, flags, cv);
    flags = 0;
    input += BLAKE3_BLOCK_LEN;
    length -= BLAKE3_BLOCK_LEN;
  }
  uint8_t block[BLAKE3_BLOCK_LEN] = {0};
  memcpy(block, input, length);
  compress(cv, block, (uint8_t)length, counter, flags | CHUNK_END, out);
}

void nixcas_blake3_init(nixcas_blake3_t *h) {
  if (!widths.count) choose_widths();
  start_chunk(h, 0);
  h->cv_stack_len = 0;
}

void nixcas_blake3_update(nixcas_blake3_t *h, const void *data, size_t length) {
  const uint8_t *input = data;
  while (length > 0) {
    if (chunk_bytes(h) == BLAKE3_CHUNK_LEN) {
      // A full chunk with input after it: finished.
      uint32_t out[8];
      compress(h->cv, h->block, h->block_len, h->chunk_counter, chunk_flags(h) | CHUNK_END, out);
      push_chunk(h, out, h->chunk_counter + 1);
      start_chunk(h, h->chunk_counter + 1);
    }
    // Whole chunks with input after them are finished as soon as they are hashed.
    size_t finished = (length - 1) / BLAKE3_CHUNK_LEN;
    if (chunk_bytes(h) == 0 && finished >= 2) {
      uint32_t cvs[MAX_LANES][8];
      size_t done = hash_chunks(h->chunk_counter, input, finished, cvs);
      for (size_t i = 0; i < done; i++) push_chunk(h, cvs[i], h->chunk_counter + i + 1);
      start_chunk(h, h->chunk_counter + done);
      input += done * BLAKE3_CHUNK_LEN;
      length -= done * BLAKE3_CHUNK_LEN;
      continue;
    }
    if (h->block_len == BLAKE3_BLOCK_LEN) {
      // A full block with input after it: not the chunk's last.
      compress(h->cv, h->block, BLAKE3_BLOCK_LEN, h->chunk_counter, chunk_flags(h), h->cv);
      h->blocks_compressed++;
      h->block_len = 0;
    }
    size_t take = BLAKE3_BLOCK_LEN - h->block_len;
    if (take > length) take = length;
    memcpy(h->block + h->block_len, input, take);
    h->block_len += (uint8_t)take;
    input += take;
    length -= take;
  }
}

void nixcas_blake3_final(const nixcas_blake3_t *h, uint8_t out[BLAKE3_OUT_LEN]) {
  // The open chunk's last block, and then each parent up the stack; the top one is the root.
  uint8_t block[BLAKE3_BLOCK_LEN] = {0};
  memcpy(block, h->block, h->block_len);
  uint32_t cv[8];
  uint8_t flags = chunk_flags(h) | CHUNK_END;
  if (h->cv_stack_len == 0) {
    compress(h->cv, block, h->block_len, h->chunk_counter, flags | ROOT, cv);
  } else {
    compress(h->cv, block, h->block_len, h->chunk_counter, flags, cv);
    for (int i = h->cv_stack_len - 1; i >= 0; i--) parent_cv(h->cv_stack[i], cv, i == 0 ? ROOT : 0, cv);
  }
  memcpy(out, cv, BLAKE3_OUT_LEN);
}

/** Inputs up to this size are hashed in one pass that knows where they end (nixcas_blake3). */
#define ONE_PASS_MAX (64 * BLAKE3_CHUNK_LEN)

static void finish_tree(const uint8_t *input, size_t length, size_t done, uint32_t cvs[][8], uint8_t out[BLAKE3_OUT_LEN]);

void nixcas_blake3(const void *data, size_t length, uint8_t out[BLAKE3_OUT_LEN]) {
  nixcas_blake3_t h;
  nixcas_blake3_init(&h);
  if (length <= BLAKE3_CHUNK_LEN || length > ONE_PASS_MAX) {
    nixcas_blake3_update(&h, data, length);
    nixcas_blake3_final(&h, out);
    return;
  }
  // Knowing the end, every whole chunk can go through the lanes, the last one
  // too (only a lone chunk is the root), and the tree is reduced level by
  // level: adjacent pairs merged, an odd one out carried up, which is the
  // specification's left-balanced tree.
  const uint8_t *input = data;
  uint32_t cvs[ONE_PASS_MAX / BLAKE3_CHUNK_LEN][8];
  size_t whole = length / BLAKE3_CHUNK_LEN, count = 0;
  while (whole - count >= 2) count += hash_chunks(count, input + count * BLAKE3_CHUNK_LEN, whole - count, cvs + count);
  finish_tree(input, length, count, cvs, out);
}

/**
 * The digest of an input of more than one chunk and at most ONE_PASS_MAX bytes whose
 * first `done` chunks' chaining values are in `cvs`: the remaining chunks one at a time,
 * then the tree reduced level by level (adjacent pairs merged, an odd one out carried
 * up: the specification's left-balanced tree).
 */
static void finish_tree(const uint8_t *input, size_t length, size_t done, uint32_t cvs[][8], uint8_t out[BLAKE3_OUT_LEN]) {
  size_t count = done;
  for (size_t at = count * BLAKE3_CHUNK_LEN; at < length; at += BLAKE3_CHUNK_LEN) {
    size_t piece = length - at < BLAKE3_CHUNK_LEN ? length - at : BLAKE3_CHUNK_LEN;
    chunk_cv(input + at, piece, count, cvs[count]);
    count++;
  }
  while (count > 2) {
    size_t merged = 0;
    for (size_t i = 0; i + 1 < count; i += 2) parent_cv(cvs[i], cvs[i + 1], 0, cvs[merged++]);
    if (count % 2) memcpy(cvs[merged++], cvs[count - 1], sizeof cvs[0]);
    count = merged;
  }
  uint32_t root[8];
  parent_cv(cvs[0], cvs[1], ROOT, root);
  memcpy(out, root, BLAKE3_OUT_LEN);
}

/** Runs `count` compressions in the widest lanes, as many at a time as fit. */
static void compress_all(const compression_t jobs[], size_t count, uint32_t *const out[]) {
  size_t lanes = (size_t)widths.lanes[widths.count - 1];
  compress_many_fn *many = widths.many[widths.count - 1];
  for (size_t at = 0; at < count; at += lanes) many(jobs + at, count - at < lanes ? count - at : lanes, out + at);
}

void nixcas_blake3_many(const void *const inputs[], const size_t lengths[], size_t count, uint8_t outs[][BLAKE3_OUT_LEN]) {
  if (!widths.count) choose_widths();
  // Every step of every input side by side in the widest lanes: first the whole chunks of all
  // inputs, then the last (short) chunks block by block, then the parents level by level. A
  // 4 KiB input alone would fill 4 lanes of 16, and its last chunk and parents one.
  enum { MAX = NIXCAS_BLAKE3_MANY_MAX, CHUNKS = ONE_PASS_MAX / BLAKE3_CHUNK_LEN, BLOCKS = BLAKE3_CHUNK_LEN / BLAKE3_BLOCK_LEN };
  size_t lanes = (size_t)widths.lanes[widths.count - 1];
  hash_chunks_fn *fn = widths.fn[widths.count - 1];
  for (size_t first = 0; first < count; first += MAX) {
    size_t batch = count - first < MAX ? count - first : MAX;
    const uint8_t *input[MAX];
    size_t length[MAX], whole[MAX], cv_count[MAX];
    int alone[MAX]; // one chunk: it is the root
    uint32_t cvs[MAX][CHUNKS][8];
    // The whole chunks (of inputs of more than one chunk).
    const uint8_t *chunks[MAX_LANES];
    uint64_t counters[MAX_LANES];
    uint32_t(*targets[MAX_LANES])[8];
    size_t queued = 0;
    for (size_t i = 0; i < batch; i++) {
      input[i] = inputs[first + i];
      length[i] = lengths[first + i];
      alone[i] = length[i] <= BLAKE3_CHUNK_LEN;
      whole[i] = alone[i] || length[i] > ONE_PASS_MAX ? 0 : length[i] / BLAKE3_CHUNK_LEN;
      cv_count[i] = whole[i];
      for (size_t c = 0; c < whole[i]; c++) {
        chunks[queued] = input[i] + c * BLAKE3_CHUNK_LEN;
        counters[queued] = c;
        targets[queued++] = &cvs[i][c];
        if (queued == lanes) {
          uint32_t all[MAX_LANES][8];
          fn(chunks, counters, all);
          for (size_t lane = 0; lane < lanes; lane++) memcpy(*targets[lane], all[lane], sizeof all[0]);
          queued = 0;
        }
      }
    }
    if (queued) { // the rest, the spare lanes repeating the first chunk
      uint32_t all[MAX_LANES][8];
      for (size_t lane = queued; lane < lanes; lane++) chunks[lane] = chunks[0], counters[lane] = counters[0];
      fn(chunks, counters, all);
      for (size_t lane = 0; lane < queued; lane++) memcpy(*targets[lane], all[lane], sizeof all[0]);
    }
    // The last chunks that are short (or the only one), block by block.
    uint32_t tail_cv[MAX][8];
    size_t tail_bytes[MAX], tail_blocks[MAX];
    uint8_t padded[MAX][BLAKE3_BLOCK_LEN];
    for (size_t i = 0; i < batch; i++) {
      int large = length[i] > ONE_PASS_MAX;
      tail_bytes[i] = large ? 0 : length[i] - whole[i] * BLAKE3_CHUNK_LEN;
      tail_blocks[i] = large || (!alone[i] && tail_bytes[i] == 0) ? 0 : tail_bytes[i] == 0 ? 1 : (tail_bytes[i] + BLAKE3_BLOCK_LEN - 1) / BLAKE3_BLOCK_LEN;
      memcpy(tail_cv[i], IV, sizeof tail_cv[i]);
    }
    for (size_t step = 0; step < BLOCKS; step++) {
      compression_t jobs[MAX];
      uint32_t *out[MAX];
      size_t n = 0;
      for (size_t i = 0; i < batch; i++) {
        if (step >= tail_blocks[i]) continue;
        const uint8_t *at = input[i] + whole[i] * BLAKE3_CHUNK_LEN + step * BLAKE3_BLOCK_LEN;
        int last = step == tail_blocks[i] - 1;
        size_t bytes = last ? tail_bytes[i] - step * BLAKE3_BLOCK_LEN : BLAKE3_BLOCK_LEN;
        const uint8_t *block = at;
        if (bytes < BLAKE3_BLOCK_LEN) {
          memset(padded[i], 0, sizeof padded[i]);
          memcpy(padded[i], at, bytes);
          block = padded[i];
        }
        uint32_t flags = (step == 0 ? CHUNK_START : 0) | (last ? CHUNK_END | (alone[i] ? ROOT : 0) : 0);
        jobs[n] = (compression_t){tail_cv[i], block, whole[i], (uint32_t)bytes, flags};
        out[n++] = tail_cv[i];
      }
      if (!n) break;
      compress_all(jobs, n, out);
    }
    for (size_t i = 0; i < batch; i++) {
      if (length[i] > ONE_PASS_MAX) nixcas_blake3(input[i], length[i], outs[first + i]);
      else if (alone[i]) memcpy(outs[first + i], tail_cv[i], BLAKE3_OUT_LEN);
      else if (tail_blocks[i]) memcpy(cvs[i][cv_count[i]++], tail_cv[i], sizeof tail_cv[i]);
    }
    // The parents, level by level: adjacent pairs merged, an odd one out carried up (the
    // specification's left-balanced tree); the last merge of an input is its root.
    for (;;) {
      static _Thread_local compression_t jobs[MAX * CHUNKS / 2];
      static _Thread_local uint8_t blocks[MAX * CHUNKS / 2][BLAKE3_BLOCK_LEN];
      uint32_t *out[MAX * CHUNKS / 2];
      size_t n = 0;
      for (size_t i = 0; i < batch; i++) {
        if (alone[i] || length[i] > ONE_PASS_MAX || cv_count[i] < 2) continue;
        for (size_t k = 0; k + 1 < cv_count[i]; k += 2) {
          memcpy(blocks[n], cvs[i][k], 32);
          memcpy(blocks[n] + 32, cvs[i][k + 1], 32);
          jobs[n] = (compression_t){IV, blocks[n], 0, BLAKE3_BLOCK_LEN, PARENT | (cv_count[i] == 2 ? ROOT : 0)};
          out[n++] = cvs[i][k / 2];
        }
      }
      if (!n) break;
      compress_all(jobs, n, out);
      for (size_t i = 0; i < batch; i++) {
        if (alone[i] || length[i] > ONE_PASS_MAX || cv_count[i] < 2) continue;
        if (cv_count[i] % 2) memcpy(cvs[i][cv_count[i] / 2], cvs[i][cv_count[i] - 1], sizeof cvs[i][0]);
        cv_count[i] = (cv_count[i] + 1) / 2;
        if (cv_count[i] == 1) memcpy(outs[first + i], cvs[i][0], BLAKE3_OUT_LEN);
      }
    }
  }
}
