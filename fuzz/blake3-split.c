// libFuzzer target for src/native/blake3.c: the digest of an input must not
// depend on how it is split across updates, nor on which path (one pass or
// incremental) hashes it. The first bytes choose the split points.
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
  return 0;
}
