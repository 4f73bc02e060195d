// libFuzzer target for the native NAR ingest (src/store/nar/native/nar-ingest.c,
// compiled in whole, without N-API): arbitrary bytes, as an uncompressed NAR
// or as a zstd body (the first byte chooses, and how the body is cut into
// chunks and batches), under AddressSanitizer and UBSan. Whatever it is fed:
// no memory error, a balanced event stream when it accepts, and no temp file
// left behind once a failed batch and the release have run. Built and run by
// fuzz/run.sh; writes large files under $TMPDIR.
#define _GNU_SOURCE
#include <dirent.h>
#include <sys/stat.h>
#include <node_api.h>
#undef NAPI_MODULE
#define NAPI_MODULE(name, init)
#include "../src/store/nar/native/nar-ingest.c"

static char dir[256];

/** Checks a batch's events, and takes its large files away as the TypeScript side moves them to their addresses. */
static void check_events(const bytes_t *events, int *depth, const char *prefix) {
  for (size_t at = 0; at < events->length;) {
    uint8_t type = events->data[at++];
    uint16_t length;
    uint64_t size;
    switch (type) {
      case NAR_EVENT_END_DIRECTORY:
        if (--*depth < 0) __builtin_trap();
        continue;
      case NAR_EVENT_DIRECTORY:
        memcpy(&length, events->data + at, 2);
        at += 2 + length;
        ++*depth;
        continue;
      case NAR_EVENT_SYMLINK:
        memcpy(&length, events->data + at, 2);
        at += 2 + length;
        memcpy(&length, events->data + at, 2);
        at += 2 + length;
        continue;
      case NAR_EVENT_SMALL_FILE:
      case NAR_EVENT_LARGE_FILE:
        memcpy(&length, events->data + at + 1, 2);
        at += 3 + length;
        memcpy(&size, events->data + at, 8);
        at += 8 + BLAKE3_OUT_LEN;
        if (type == NAR_EVENT_SMALL_FILE) {
          if (size > NAR_SMALL_FILE_MAX) __builtin_trap();
          // The digest was computed side by side with the batch's others: it must be this file's own.
          uint8_t digest[BLAKE3_OUT_LEN];
          nixcas_blake3(events->data + at, (size_t)size, digest);
          if (memcmp(digest, events->data + at - BLAKE3_OUT_LEN, BLAKE3_OUT_LEN) != 0) __builtin_trap();
          at += (size_t)size;
        } else {
          if (size <= NAR_SMALL_FILE_MAX) __builtin_trap();
          uint32_t n;
          memcpy(&n, events->data + at, 4);
          char path[600];
          snprintf(path, sizeof path, "%s%u", prefix, n);
          struct stat st;
          // Complete and the size it said.
          if (stat(path, &st) != 0 || (uint64_t)st.st_size != size) __builtin_trap();
          unlink(path);
          at += 4;
        }
        continue;
      default:
        __builtin_trap();
    }
  }
}

/** Whether the ingest left a file behind. */
static int files_left(void) {
  DIR *d = opendir(dir);
  struct dirent *e;
  int left = 0;
  while (d && (e = readdir(d))) left |= e->d_name[0] != '.';
  if (d) closedir(d);
  return left;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  if (!dir[0]) {
    snprintf(dir, sizeof dir, "%s/nixcas-fuzz-ingest-%d", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", getpid());
    mkdir(dir, 0700);
  }
  int zstd = data[0] & 1;
  size_t chunk = ((size_t)1 << ((data[0] >> 1) % 17)) + data[1] % 13;
  size_t per_batch = data[1] % 5 + 1;
  char prefix[300];
  snprintf(prefix, sizeof prefix, "%s/t-", dir);
  ingest_t *in = ingest_new(zstd, 1, 1 << 24, prefix);
  if (!in) return 0;
  const uint8_t *body = data + 2;
  size_t length = size - 2;
  int depth = 0;
  for (size_t at = 0; at < length && !failed(in);) {
    for (size_t i = 0; i < per_batch && at < length && !failed(in); i++) {
      size_t take = length - at < chunk ? length - at : chunk;
      feed_chunk(in, body + at, take);
      at += take;
    }
    if (!failed(in)) hash_small_files(in);
    bytes_t events = in->events;
    in->events = (bytes_t){0};
    if (!failed(in)) check_events(&events, &depth, prefix);
    free(events.data);
    end_batch(in);
  }
  if (!failed(in)) check_complete(in);
  if (!failed(in) && depth != 0) __builtin_trap();
  release_memory(in);
  free(in);
  // Whatever happened, nothing is left: good batches' files were taken, a failed batch's removed, the unfinished one released.
  if (files_left()) __builtin_trap();
  return 0;
}
