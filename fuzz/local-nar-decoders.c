// libFuzzer target for the C renderer's readers of store records
// (src/store/nar/native/local-nar.c): the protobuf Directory decoder and the
// msgpack PathInfo root decoder, fed arbitrary bytes under AddressSanitizer.
// The first byte picks the decoder. Built and run by fuzz/run.sh.
#define _GNU_SOURCE
#include <node_api.h>
#undef NAPI_MODULE
#define NAPI_MODULE(name, init)
#include "../src/store/nar/native/local-nar.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  const unsigned char *body = data + 1;
  size_t length = size - 1;
  if (data[0] & 1) {
    entry_t *entries = NULL;
    size_t count = 0;
    if (decode_directory(body, length, &entries, &count) == 0) {
      // What it accepts is sorted and unique: the NAR depends on it.
      for (size_t i = 1; i < count; i++) {
        if (compare_names(&entries[i - 1], &entries[i]) >= 0) __builtin_trap();
      }
      free(entries);
    }
  } else {
    entry_t root;
    if (decode_root(body, length, &root) == 0 && root.kind != SYMLINK && root.digest == NULL) __builtin_trap();
  }
  return 0;
}
