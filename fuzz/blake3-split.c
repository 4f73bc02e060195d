// libFuzzer target for src/native/blake3.c: the digest of an input must not
// depend on how it is split across updates, nor on which path (one pass,
// incremental, or side by side with other inputs in nixcas_blake3_many)
// hashes it. The first bytes choose the split points.
#include <string.h>
#include "../src/native/blake3.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  size_t step = (size_t)data[0] * 61 + data[1] + 1;
  const uint8_t *input = data + 2;
  size_t length = size - 2;
  uint8_t one_pass[BLAKE3_OUT_LEN], pieces[BLAKE3_OUT_LEN];
  nixcas_blake3(input, length, one_pass);
  nixcas_blake3_t hasher;
  nixcas_blake3_init(&hasher);
  for (size_t at = 0; at < length; at += step) nixcas_blake3_update(&hasher, input + at, length - at < step ? length - at : step);
  nixcas_blake3_final(&hasher, pieces);
  if (memcmp(one_pass, pieces, BLAKE3_OUT_LEN) != 0) __builtin_trap();
  // The pieces as inputs of their own, hashed side by side, each as if alone.
  enum { MOST = 3 * NIXCAS_BLAKE3_MANY_MAX };
  const void *inputs[MOST];
  size_t lengths[MOST], count = 0;
  for (size_t at = 0; at < length && count < MOST; at += step) {
    inputs[count] = input + at;
    lengths[count++] = length - at < step ? length - at : step;
  }
  uint8_t many[MOST][BLAKE3_OUT_LEN], alone[BLAKE3_OUT_LEN];
  nixcas_blake3_many(inputs, lengths, count, many);
  for (size_t i = 0; i < count; i++) {
    nixcas_blake3(inputs[i], lengths[i], alone);
    if (memcmp(alone, many[i], BLAKE3_OUT_LEN) != 0) __builtin_trap();
  }
  return 0;
}
