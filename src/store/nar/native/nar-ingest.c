// Substituted NARs into the local store, in C: the compressed body is hashed
// (FileHash), decoded (zstd, or taken as it is), hashed again (NarHash) and
// parsed, small files gathered and hashed with BLAKE3 side by side, large
// files written to temp files in the store's tmp/ as they come. One call
// takes a batch of the body's chunks and runs on libuv's pool, so a copy's
// NARs are decoded and hashed on both cores while the main thread reads the
// sockets; the TypeScript side (store/nar/native-ingest.ts) gets a list of
// events per batch and builds the tree, publishes the blobs and registers
// nothing until the whole NAR checked out. store/nar/ingest.ts, the
// TypeScript reader, is the reference: the same rules, the same errors.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#define NAPI_CHECK_PREFIX "nixcas ingest: "
#include "../../../native/napi_check.h"
#include "../../../native/blake3.h"
#include "nar-ingest.h"

typedef enum {
  G_MAGIC,
  G_NODE_OPEN,
  G_TYPE_KEYWORD,
  G_TYPE,
  G_REGULAR_NEXT,
  G_EXECUTABLE_EMPTY,
  G_CONTENTS_KEYWORD,
  G_CONTENTS,
  G_TARGET_KEYWORD,
  G_TARGET,
  G_NODE_CLOSE,
  G_ENTRY_CLOSE,
  G_DIRECTORY_NEXT,
  G_ENTRY_OPEN,
  G_ENTRY_NAME_KEYWORD,
  G_ENTRY_NAME,
  G_ENTRY_NODE_KEYWORD,
  G_END,
} grammar_t;

typedef enum { L_LENGTH, L_BODY, L_PADDING } lexer_t;

/** A directory being read: the name of its last entry (entries must be sorted), and whether that entry is still open. */
typedef struct {
  uint8_t last[NAR_MAX_NAME + 1];
  uint16_t last_length;
  uint8_t has_last;
  uint8_t child_open;
} level_t;

typedef struct {
  uint8_t *data;
  size_t length, capacity;
} bytes_t;

typedef struct ingest {
  // Set at creation.
  int zstd;
  ZSTD_DStream *decoder;
  size_t decoder_last; // ZSTD_decompressStream's last return: 0 at the end of a frame
  EVP_MD_CTX *file_sha256; // NULL: no FileHash wanted
  EVP_MD_CTX *nar_sha256;
  uint64_t nar_size_max;
  char *temp_prefix;
  uint32_t temp_count;
  uint8_t *decoded; // zstd's output, NAR_DECODE_STEP bytes

  uint64_t file_size, nar_size;

  // The lexer: every NAR item is a length, that many bytes, and zero padding to 8.
  lexer_t lexer;
  uint8_t length_bytes[8];
  unsigned length_have;
  uint64_t string_length, string_have;
  unsigned padding_left;
  uint8_t string[NAR_MAX_TARGET + 1];

  // The grammar.
  grammar_t grammar;
  level_t *levels;
  size_t depth, levels_capacity;
  int executable;

  // The file being read: small ones gathered, large ones written.
  int large;
  uint8_t *small; // NAR_SMALL_FILE_MAX bytes
  int fd;
  char *temp_path;
  nixcas_blake3_t hasher;

  // The batch's events (nar-ingest.h has their layout) and where its small files' digests go.
  bytes_t events;
  size_t *small_files; // event offsets of small files, to hash side by side at the batch's end
  size_t small_count, small_capacity;

  // The first failure; everything after it is refused.
  const char *error_code;
  char error[1024];

  // The batch being fed on the pool.
  int busy;
  napi_deferred deferred;
  napi_async_work work;
  napi_ref self; // the handle, kept while its batch is on the pool
  uint32_t reported_temp; // the last temp file whose event reached JavaScript: those after it are removed if the batch fails
  napi_ref *chunk_refs;
  const uint8_t **chunk_data;
  size_t *chunk_lengths;
  uint32_t chunk_count;
} ingest_t;

static int failed(ingest_t *in) { return in->error_code != NULL; }

static void fail_with(ingest_t *in, const char *code, const char *format, ...) {
  if (failed(in)) return;
  in->error_code = code;
  va_list args;
  va_start(args, format);
  vsnprintf(in->error, sizeof in->error, format, args);
  va_end(args);
}

/** Writes `name` to `out` as castore/model.ts's displayName does inside its quotes: printable ASCII as it is, '"' as \", other bytes as \xNN. */
static size_t show_name(char *out, size_t room, const uint8_t *name, size_t length) {
  size_t at = 0;
  for (size_t i = 0; i < length && at + 5 < room; i++) {
    uint8_t c = name[i];
    if (c == '"') {
      out[at++] = '\\';
      out[at++] = '"';
    } else if (c >= 0x20 && c < 0x7f && c != '\\') {
      out[at++] = (char)c;
    } else {
      at += (size_t)snprintf(out + at, room - at, "\\x%02x", c);
    }
  }
  out[at] = 0;
  return at;
}

/** A malformed NAR: the message names where in the tree and at which byte, as ingest.ts's NarFormatError does. */
static void malformed(ingest_t *in, const char *format, ...) {
  if (failed(in)) return;
  char where[512] = "at the root";
  size_t at = 0;
  for (size_t i = 0; i < in->depth && in->levels[i].child_open && at + 8 < sizeof where; i++) {
    if (at == 0) at = (size_t)snprintf(where, sizeof where, "at ");
    where[at++] = '/';
    at += show_name(where + at, sizeof where - at, in->levels[i].last, in->levels[i].last_length);
  }
  char message[512];
  va_list args;
  va_start(args, format);
  vsnprintf(message, sizeof message, format, args);
  va_end(args);
  fail_with(in, "NAR_FORMAT", "malformed NAR %s (byte %llu): %s", where, (unsigned long long)in->nar_size, message);
}

static int grow(bytes_t *b, size_t more) {
  if (b->length + more <= b->capacity) return 1;
  size_t capacity = b->capacity ? b->capacity : 64 * 1024;
  while (capacity < b->length + more) capacity *= 2;
  uint8_t *data = realloc(b->data, capacity);
  if (!data) return 0;
  b->data = data;
  b->capacity = capacity;
  return 1;
}

static void put_bytes(ingest_t *in, const void *data, size_t length) {
  if (!grow(&in->events, length)) {
    fail_with(in, "ENOMEM", "out of memory for the NAR's events");
    return;
  }
  memcpy(in->events.data + in->events.length, data, length);
  in->events.length += length;
}

static void put_u8(ingest_t *in, uint8_t v) { put_bytes(in, &v, 1); }
static void put_u16(ingest_t *in, uint16_t v) { put_bytes(in, &v, 2); }
static void put_u32(ingest_t *in, uint32_t v) { put_bytes(in, &v, 4); }
static void put_u64(ingest_t *in, uint64_t v) { put_bytes(in, &v, 8); }

/** The name of the node being read: its entry's, or empty for the root. */
static void put_node_name(ingest_t *in) {
  if (in->depth == 0) {
    put_u16(in, 0);
    return;
  }
  level_t *parent = &in->levels[in->depth - 1];
  put_u16(in, parent->last_length);
  put_bytes(in, parent->last, parent->last_length);
}

static int string_is(ingest_t *in, const char *literal) {
  size_t length = strlen(literal);
  return in->string_length == length && memcmp(in->string, literal, length) == 0;
}

/** The token just read, for an error message. */
static const char *shown_token(ingest_t *in, char *out, size_t room) {
  out[0] = '"';
  size_t at = 1 + show_name(out + 1, room - 3, in->string, (size_t)in->string_length);
  out[at++] = '"';
  out[at] = 0;
  return out;
}

static void expect(ingest_t *in, const char *literal, grammar_t next) {
  if (string_is(in, literal)) {
    in->grammar = next;
    return;
  }
  char got[64];
  malformed(in, "expected \"%s\", found %s", literal, shown_token(in, got, sizeof got));
}

static void node_done(ingest_t *in) { in->grammar = in->depth == 0 ? G_END : G_ENTRY_CLOSE; }

static const char *name_problem(const uint8_t *name, size_t length) {
  if (length == 0) return "name is empty";
  if (length == 1 && name[0] == '.') return "name is '.'";
  if (length == 2 && name[0] == '.' && name[1] == '.') return "name is '..'";
  if (memchr(name, '/', length)) return "name contains '/'";
  if (memchr(name, 0, length)) return "name contains a NUL byte";
  return NULL;
}

static int compare_names(const uint8_t *a, size_t a_length, const uint8_t *b, size_t b_length) {
  int order = memcmp(a, b, a_length < b_length ? a_length : b_length);
  if (order) return order;
  return a_length < b_length ? -1 : a_length > b_length;
}

static void start_directory(ingest_t *in) {
  if (in->depth == in->levels_capacity) {
    size_t capacity = in->levels_capacity ? in->levels_capacity * 2 : 16;
    level_t *levels = realloc(in->levels, capacity * sizeof *levels);
    if (!levels) {
      fail_with(in, "ENOMEM", "out of memory for the NAR's directories");
      return;
    }
    in->levels = levels;
    in->levels_capacity = capacity;
  }
  put_u8(in, NAR_EVENT_DIRECTORY);
  put_node_name(in);
  level_t *level = &in->levels[in->depth++];
  level->has_last = 0;
  level->child_open = 0;
  in->grammar = G_DIRECTORY_NEXT;
}

static void write_all(ingest_t *in, const uint8_t *data, size_t length) {
  while (length > 0 && !failed(in)) {
    ssize_t written = write(in->fd, data, length);
    if (written < 0) {
      if (errno == EINTR) continue;
      int error = errno;
      fail_with(in, nar_errno_name(error), "writing a blob to %s: %s", in->temp_path, strerror(error));
      return;
    }
    data += written;
    length -= (size_t)written;
  }
}

static void start_contents(ingest_t *in) {
  in->large = in->string_length > NAR_SMALL_FILE_MAX;
  if (!in->large) return;
  snprintf(in->temp_path, NAR_TEMP_PATH_MAX, "%s%u", in->temp_prefix, ++in->temp_count);
  in->fd = open(in->temp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
  if (in->fd < 0) {
    int error = errno;
    fail_with(in, nar_errno_name(error), "creating a blob's temp file %s: %s", in->temp_path, strerror(error));
    return;
  }
  nixcas_blake3_init(&in->hasher);
}

static void contents(ingest_t *in, const uint8_t *data, size_t length) {
  if (!in->large) {
    memcpy(in->small + in->string_have, data, length);
    return;
  }
  nixcas_blake3_update(&in->hasher, data, length);
  write_all(in, data, length);
  // The disk starts on what was written now, so the fsync at the file's end waits only for the last of it.
  if (!failed(in)) sync_file_range(in->fd, (off64_t)in->string_have, (off64_t)length, SYNC_FILE_RANGE_WRITE);
}

static void end_contents(ingest_t *in) {
  put_u8(in, in->large ? NAR_EVENT_LARGE_FILE : NAR_EVENT_SMALL_FILE);
  put_u8(in, (uint8_t)in->executable);
  put_node_name(in);
  put_u64(in, in->string_length);
  if (in->large) {
    uint8_t digest[BLAKE3_OUT_LEN];
    nixcas_blake3_final(&in->hasher, digest);
    // Durable before the TypeScript side renames it to its address, as blob-file.ts's finish().
    if (!failed(in) && fsync(in->fd) != 0) {
      int error = errno;
      fail_with(in, nar_errno_name(error), "syncing a blob's temp file %s: %s", in->temp_path, strerror(error));
    }
    if (failed(in)) return; // the batch's temp files are removed when it fails
    close(in->fd);
    in->fd = -1;
    put_bytes(in, digest, sizeof digest);
    put_u32(in, in->temp_count);
  } else {
    if (in->small_count == in->small_capacity) {
      size_t capacity = in->small_capacity ? in->small_capacity * 2 : 256;
      size_t *offsets = realloc(in->small_files, capacity * sizeof *offsets);
      if (!offsets) {
        fail_with(in, "ENOMEM", "out of memory for the NAR's small files");
        return;
      }
      in->small_files = offsets;
      in->small_capacity = capacity;
    }
    in->small_files[in->small_count++] = in->events.length;
    uint8_t zero[BLAKE3_OUT_LEN] = {0};
    put_bytes(in, zero, sizeof zero); // the digest, hashed with the batch's other small files
    put_bytes(in, in->small, (size_t)in->string_length);
  }
  in->grammar = G_NODE_CLOSE;
}

/** The limit on the string about to be read in the current state, and what it is called in errors. */
static uint64_t string_limit(ingest_t *in, const char **what) {
  switch (in->grammar) {
    case G_MAGIC: *what = "the NAR header"; return NAR_MAX_TOKEN;
    case G_CONTENTS: *what = "file contents"; return UINT64_MAX;
    case G_ENTRY_NAME: *what = "entry name"; return NAR_MAX_NAME;
    case G_TARGET: *what = "symlink target"; return NAR_MAX_TARGET;
    default: *what = "a token"; return NAR_MAX_TOKEN;
  }
}

/** A whole string was read (after its padding): the grammar moves on. */
static void end_string(ingest_t *in) {
  char got[64];
  switch (in->grammar) {
    case G_MAGIC:
      if (!string_is(in, "nix-archive-1")) fail_with(in, "NAR_FORMAT", "not a NAR: it does not start with \"nix-archive-1\"");
      in->grammar = G_NODE_OPEN;
      break;
    case G_NODE_OPEN: expect(in, "(", G_TYPE_KEYWORD); break;
    case G_TYPE_KEYWORD: expect(in, "type", G_TYPE); break;
    case G_TYPE:
      if (string_is(in, "regular")) {
        in->executable = 0;
        in->grammar = G_REGULAR_NEXT;
      } else if (string_is(in, "symlink")) {
        in->grammar = G_TARGET_KEYWORD;
      } else if (string_is(in, "directory")) {
        start_directory(in);
      } else {
        malformed(in, "unknown node type %s", shown_token(in, got, sizeof got));
      }
      break;
    case G_REGULAR_NEXT:
      if (string_is(in, "executable")) in->grammar = G_EXECUTABLE_EMPTY;
      else if (string_is(in, "contents")) in->grammar = G_CONTENTS;
      else malformed(in, "expected \"contents\" or \"executable\", found %s", shown_token(in, got, sizeof got));
      break;
    case G_EXECUTABLE_EMPTY:
      in->executable = 1;
      expect(in, "", G_CONTENTS_KEYWORD);
      break;
    case G_CONTENTS_KEYWORD: expect(in, "contents", G_CONTENTS); break;
    case G_CONTENTS: end_contents(in); break;
    case G_TARGET_KEYWORD: expect(in, "target", G_TARGET); break;
    case G_TARGET:
      if (in->string_length == 0) malformed(in, "symlink target symlink target is empty");
      else if (memchr(in->string, 0, (size_t)in->string_length)) malformed(in, "symlink target symlink target contains a NUL byte");
      if (failed(in)) break;
      put_u8(in, NAR_EVENT_SYMLINK);
      put_node_name(in);
      put_u16(in, (uint16_t)in->string_length);
      put_bytes(in, in->string, (size_t)in->string_length);
      in->grammar = G_NODE_CLOSE;
      break;
    case G_NODE_CLOSE:
      expect(in, ")", G_NODE_CLOSE);
      if (!failed(in)) node_done(in);
      break;
    case G_ENTRY_CLOSE:
      expect(in, ")", G_DIRECTORY_NEXT);
      in->levels[in->depth - 1].child_open = 0;
      break;
    case G_DIRECTORY_NEXT:
      if (string_is(in, ")")) {
        put_u8(in, NAR_EVENT_END_DIRECTORY);
        in->depth--;
        node_done(in);
      } else if (string_is(in, "entry")) {
        in->grammar = G_ENTRY_OPEN;
      } else {
        malformed(in, "expected \"entry\" or \")\", found %s", shown_token(in, got, sizeof got));
      }
      break;
    case G_ENTRY_OPEN: expect(in, "(", G_ENTRY_NAME_KEYWORD); break;
    case G_ENTRY_NAME_KEYWORD: expect(in, "name", G_ENTRY_NAME); break;
    case G_ENTRY_NAME: {
      level_t *level = &in->levels[in->depth - 1];
      size_t length = (size_t)in->string_length;
      char shown[NAR_MAX_NAME * 4 + 8], previous[NAR_MAX_NAME * 4 + 8];
      const char *problem = name_problem(in->string, length);
      show_name(shown, sizeof shown, in->string, length);
      if (problem) {
        malformed(in, "entry name \"%s\": %s", shown, problem);
        break;
      }
      if (level->has_last) {
        int order = compare_names(level->last, level->last_length, in->string, length);
        show_name(previous, sizeof previous, level->last, level->last_length);
        if (order == 0) malformed(in, "entry \"%s\" appears twice", shown);
        else if (order > 0) malformed(in, "entry \"%s\" comes after \"%s\": entries must be sorted", shown, previous);
        if (failed(in)) break;
      }
      memcpy(level->last, in->string, length);
      level->last_length = (uint16_t)length;
      level->has_last = 1;
      in->grammar = G_ENTRY_NODE_KEYWORD;
      break;
    }
    case G_ENTRY_NODE_KEYWORD:
      expect(in, "node", G_NODE_OPEN);
      if (failed(in)) break;
      in->levels[in->depth - 1].child_open = 1;
      if (in->depth > NAR_MAX_DEPTH) malformed(in, "directories nested deeper than %d", NAR_MAX_DEPTH);
      break;
    case G_END: break; // consume() refuses bytes after the end
  }
}

/** A string's length was read: checked against the state's limit; file contents start. */
static void start_string(ingest_t *in) {
  uint64_t length = 0;
  for (int i = 7; i >= 0; i--) length = length << 8 | in->length_bytes[i];
  const char *what;
  uint64_t limit = string_limit(in, &what);
  if (length > NAR_MAX_SAFE_INTEGER) {
    malformed(in, "%s length %llu is too large", what, (unsigned long long)length);
    return;
  }
  if (length > limit) {
    malformed(in, "%s is %llu bytes, more than %llu", what, (unsigned long long)length, (unsigned long long)limit);
    return;
  }
  in->string_length = length;
  in->string_have = 0;
  if (in->grammar == G_CONTENTS) start_contents(in);
}

static void after_body(ingest_t *in) {
  in->padding_left = (unsigned)((8 - in->string_length % 8) % 8);
  if (in->padding_left) {
    in->lexer = L_PADDING;
    return;
  }
  in->lexer = L_LENGTH;
  end_string(in);
}

/** Parses `length` decoded NAR bytes. */
static void consume(ingest_t *in, const uint8_t *data, size_t length) {
  while (length > 0 && !failed(in)) {
    if (in->grammar == G_END) {
      fail_with(in, "NAR_FORMAT", "NAR has trailing data after byte %llu", (unsigned long long)in->nar_size);
      return;
    }
    size_t take = 0;
    switch (in->lexer) {
      case L_LENGTH:
        take = 8 - in->length_have < length ? 8 - in->length_have : length;
        memcpy(in->length_bytes + in->length_have, data, take);
        in->length_have += (unsigned)take;
        in->nar_size += take;
        if (in->length_have == 8) {
          in->length_have = 0;
          start_string(in);
          if (failed(in)) return;
          if (in->string_length == 0) after_body(in);
          else in->lexer = L_BODY;
        }
        break;
      case L_BODY: {
        uint64_t left = in->string_length - in->string_have;
        take = left < length ? (size_t)left : length;
        if (in->grammar == G_CONTENTS) contents(in, data, take);
        else memcpy(in->string + in->string_have, data, take);
        in->string_have += take;
        in->nar_size += take;
        if (in->string_have == in->string_length) after_body(in);
        break;
      }
      case L_PADDING:
        take = in->padding_left < length ? in->padding_left : length;
        for (size_t i = 0; i < take; i++) {
          if (data[i]) {
            in->nar_size += i;
            malformed(in, "non-zero padding after %s", in->grammar == G_CONTENTS ? "file contents" : "a string");
            return;
          }
        }
        in->padding_left -= (unsigned)take;
        in->nar_size += take;
        if (in->padding_left == 0) {
          in->lexer = L_LENGTH;
          end_string(in);
        }
        break;
    }
    data += take;
    length -= take;
  }
}

/** Decoded bytes: counted, hashed, parsed. */
static void decoded(ingest_t *in, const uint8_t *data, size_t length) {
  if (in->nar_size + length > in->nar_size_max) {
    fail_with(in, "NAR_SIZE", "it decompresses to more than %llu bytes", (unsigned long long)in->nar_size_max);
    return;
  }
  EVP_DigestUpdate(in->nar_sha256, data, length);
  consume(in, data, length);
}

static void feed_chunk(ingest_t *in, const uint8_t *data, size_t length) {
  in->file_size += length;
  if (in->file_sha256) EVP_DigestUpdate(in->file_sha256, data, length);
  if (!in->zstd) {
    decoded(in, data, length);
    return;
  }
  ZSTD_inBuffer input = {data, length, 0};
  for (;;) {
    // A frame that ended exactly as the last output filled up is done: asked again with no input,
    // libzstd would start on the next frame's header and no longer report the end of this one.
    if (input.pos == input.size && in->decoder_last == 0) return;
    ZSTD_outBuffer output = {in->decoded, NAR_DECODE_STEP, 0};
    size_t result = ZSTD_decompressStream(in->decoder, &output, &input);
    if (ZSTD_isError(result)) {
      fail_with(in, "ZSTD", "%s", ZSTD_getErrorName(result));
      return;
    }
    in->decoder_last = result;
    if (output.pos) decoded(in, in->decoded, output.pos);
    if (failed(in)) return;
    if (input.pos == input.size && output.pos < output.size) return;
  }
}

/** The digests of the batch's small files, 16 at a time. */
static void hash_small_files(ingest_t *in) {
  for (size_t first = 0; first < in->small_count; first += NIXCAS_BLAKE3_MANY_MAX) {
    size_t count = in->small_count - first < NIXCAS_BLAKE3_MANY_MAX ? in->small_count - first : NIXCAS_BLAKE3_MANY_MAX;
    const void *inputs[NIXCAS_BLAKE3_MANY_MAX];
    size_t lengths[NIXCAS_BLAKE3_MANY_MAX];
    uint8_t digests[NIXCAS_BLAKE3_MANY_MAX][BLAKE3_OUT_LEN];
    for (size_t i = 0; i < count; i++) {
      // After the digest: the contents; before it, the size (nar-ingest.h).
      uint8_t *digest = in->events.data + in->small_files[first + i];
      uint64_t size;
      memcpy(&size, digest - 8, 8);
      inputs[i] = digest + BLAKE3_OUT_LEN;
      lengths[i] = (size_t)size;
    }
    nixcas_blake3_many(inputs, lengths, count, digests);
    for (size_t i = 0; i < count; i++) memcpy(in->events.data + in->small_files[first + i], digests[i], BLAKE3_OUT_LEN);
  }
  in->small_count = 0;
}

static void feed_execute(napi_env env, void *data) {
  ingest_t *in = data;
  for (uint32_t i = 0; i < in->chunk_count && !failed(in); i++) feed_chunk(in, in->chunk_data[i], in->chunk_lengths[i]);
  if (!failed(in)) hash_small_files(in);
}

static napi_value error_value(napi_env env, ingest_t *in) {
  napi_value code, message, error;
  if (napi_create_string_utf8(env, in->error_code, NAPI_AUTO_LENGTH, &code) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, in->error, NAPI_AUTO_LENGTH, &message) != napi_ok) return NULL;
  if (napi_create_error(env, code, message, &error) != napi_ok) return NULL;
  return error;
}

/** Closes and removes the temp file of a large file being read, if any. */
static void drop_temp_file(ingest_t *in) {
  if (in->fd < 0) return;
  close(in->fd);
  in->fd = -1;
  unlink(in->temp_path);
}

/** After a failed batch: every temp file it made, finished or not, is removed (their events never reach JavaScript). */
static void drop_batch_temp_files(ingest_t *in) {
  drop_temp_file(in);
  char path[NAR_TEMP_PATH_MAX];
  for (uint32_t n = in->reported_temp + 1; n <= in->temp_count; n++) {
    snprintf(path, sizeof path, "%s%u", in->temp_prefix, n);
    unlink(path);
  }
  in->reported_temp = in->temp_count;
}

/**
 * After a batch, its events taken: a failed batch's temp files are all removed (their events never
 * reach JavaScript); after a good one, every finished temp file is JavaScript's to move or remove.
 */
static void end_batch(ingest_t *in) {
  if (failed(in)) drop_batch_temp_files(in);
  else in->reported_temp = in->fd >= 0 ? in->temp_count - 1 : in->temp_count; // one still being written is not reported
}

static void free_events(napi_env env, void *data, void *hint) { free(data); }

static void feed_complete(napi_env env, napi_status status, void *data) {
  ingest_t *in = data;
  for (uint32_t i = 0; i < in->chunk_count; i++) napi_delete_reference(env, in->chunk_refs[i]);
  free(in->chunk_refs);
  free(in->chunk_data);
  free(in->chunk_lengths);
  in->chunk_refs = NULL;
  in->chunk_data = NULL;
  in->chunk_lengths = NULL;
  in->chunk_count = 0;
  napi_delete_async_work(env, in->work);
  napi_delete_reference(env, in->self);
  in->busy = 0;
  napi_value result = NULL;
  bytes_t events = in->events;
  // The events go to JavaScript as they are, in memory it frees when the Buffer is collected.
  if (!failed(in) && events.length && napi_create_external_buffer(env, events.length, events.data, free_events, NULL, &result) != napi_ok) {
    fail_with(in, "ENOMEM", "the events could not be handed over");
  }
  if (failed(in)) {
    if (!result) free(events.data);
    in->events = (bytes_t){0};
    end_batch(in);
    napi_reject_deferred(env, in->deferred, error_value(env, in));
    return;
  }
  if (!result) {
    free(events.data);
    napi_create_buffer(env, 0, NULL, &result);
  }
  in->events = (bytes_t){0};
  end_batch(in);
  napi_resolve_deferred(env, in->deferred, result);
}

static void release_memory(ingest_t *in) {
  drop_temp_file(in);
  ZSTD_freeDStream(in->decoder);
  in->decoder = NULL;
  EVP_MD_CTX_free(in->file_sha256);
  EVP_MD_CTX_free(in->nar_sha256);
  in->file_sha256 = in->nar_sha256 = NULL;
  free(in->decoded);
  free(in->small);
  free(in->levels);
  free(in->events.data);
  free(in->small_files);
  free(in->temp_prefix);
  free(in->temp_path);
  in->decoded = in->small = NULL;
  in->levels = NULL;
  in->events = (bytes_t){0};
  in->small_files = NULL;
  in->temp_prefix = in->temp_path = NULL;
}

static void finalize(napi_env env, void *data, void *hint) {
  ingest_t *in = data;
  release_memory(in); // never while busy: the pending work holds a reference to the handle's owner
  free(in);
}

/** A new ingest, or NULL without memory (or without a digest from OpenSSL). */
static ingest_t *ingest_new(int zstd, int hash_file, uint64_t nar_size_max, const char *temp_prefix) {
  ingest_t *in = calloc(1, sizeof *in);
  if (!in) return NULL;
  in->fd = -1;
  in->zstd = zstd;
  in->nar_size_max = nar_size_max;
  in->temp_prefix = strdup(temp_prefix);
  in->temp_path = malloc(NAR_TEMP_PATH_MAX);
  in->small = malloc(NAR_SMALL_FILE_MAX);
  in->nar_sha256 = EVP_MD_CTX_new();
  if (hash_file) in->file_sha256 = EVP_MD_CTX_new();
  if (zstd) {
    in->decoder = ZSTD_createDStream();
    in->decoded = malloc(NAR_DECODE_STEP);
  }
  int ok = in->temp_prefix && in->temp_path && in->small && in->nar_sha256 && (!hash_file || in->file_sha256) && (!zstd || (in->decoder && in->decoded));
  ok = ok && EVP_DigestInit_ex(in->nar_sha256, EVP_sha256(), NULL) == 1 && (!hash_file || EVP_DigestInit_ex(in->file_sha256, EVP_sha256(), NULL) == 1);
  if (ok && zstd) ZSTD_initDStream(in->decoder);
  if (!ok) {
    release_memory(in);
    free(in);
    return NULL;
  }
  return in;
}

/** After the last batch: fails the ingest if the NAR or the zstd frame is incomplete. */
static void check_complete(ingest_t *in) {
  if (!failed(in) && in->zstd && in->decoder_last != 0) fail_with(in, "ZSTD", "it ends inside a frame");
  if (failed(in) || in->grammar == G_END) return;
  const char *what = in->grammar == G_CONTENTS && in->lexer == L_BODY ? "file contents" : in->lexer == L_PADDING ? "padding" : "a token";
  if (in->grammar == G_ENTRY_NAME && in->lexer == L_BODY) what = "entry name";
  if (in->grammar == G_TARGET && in->lexer == L_BODY) what = "symlink target";
  if (in->grammar == G_MAGIC) what = "the NAR header";
  fail_with(in, "NAR_FORMAT", "NAR is truncated: it ends at byte %llu inside %s", (unsigned long long)in->nar_size, what);
}

static ingest_t *get_ingest(napi_env env, napi_value value) {
  ingest_t *in = NULL;
  if (napi_get_value_external(env, value, (void **)&in) != napi_ok || !in) {
    napi_throw_type_error(env, NULL, "nixcas ingest: not an ingest handle");
    return NULL;
  }
  if (!in->nar_sha256) {
    napi_throw_error(env, NULL, "nixcas ingest: the ingest was released");
    return NULL;
  }
  if (in->busy) {
    napi_throw_error(env, NULL, "nixcas ingest: a batch is still being fed");
    return NULL;
  }
  return in;
}

// create(zstd, hashFile, narSizeMax, tempPrefix) -> handle
static napi_value create(napi_env env, napi_callback_info info) {
  CHECK_ARGS(4, "create(zstd, hashFile, narSizeMax, tempPrefix)");
  bool zstd, hash_file;
  int64_t nar_size_max;
  size_t prefix_length;
  CHECK(napi_get_value_bool(env, argv[0], &zstd));
  CHECK(napi_get_value_bool(env, argv[1], &hash_file));
  CHECK(napi_get_value_int64(env, argv[2], &nar_size_max));
  CHECK(napi_get_value_string_utf8(env, argv[3], NULL, 0, &prefix_length));
  if (prefix_length + 16 > NAR_TEMP_PATH_MAX) {
    napi_throw_range_error(env, NULL, "nixcas ingest: the temp file prefix is too long");
    return NULL;
  }
  char *prefix = malloc(prefix_length + 1);
  if (!prefix || napi_get_value_string_utf8(env, argv[3], prefix, prefix_length + 1, &prefix_length) != napi_ok) {
    free(prefix);
    napi_throw_error(env, NULL, "nixcas ingest: out of memory");
    return NULL;
  }
  ingest_t *in = ingest_new(zstd, hash_file, nar_size_max < 0 ? 0 : (uint64_t)nar_size_max, prefix);
  free(prefix);
  int ok = in != NULL;
  napi_value handle;
  if (!ok || napi_create_external(env, in, finalize, NULL, &handle) != napi_ok) {
    if (in) {
      release_memory(in);
      free(in);
    }
    napi_throw_error(env, NULL, "nixcas ingest: out of memory");
    return NULL;
  }
  return handle;
}

// feed(handle, chunks: Buffer[]) -> Promise<Buffer>: the events of the batch (nar-ingest.h).
static napi_value feed(napi_env env, napi_callback_info info) {
  CHECK_ARGS(2, "feed(handle, chunks)");
  ingest_t *in = get_ingest(env, argv[0]);
  if (!in) return NULL;
  if (failed(in)) {
    napi_throw(env, error_value(env, in));
    return NULL;
  }
  uint32_t count;
  CHECK(napi_get_array_length(env, argv[1], &count));
  in->chunk_refs = calloc(count ? count : 1, sizeof *in->chunk_refs);
  in->chunk_data = calloc(count ? count : 1, sizeof *in->chunk_data);
  in->chunk_lengths = calloc(count ? count : 1, sizeof *in->chunk_lengths);
  if (!in->chunk_refs || !in->chunk_data || !in->chunk_lengths) {
    free(in->chunk_refs);
    free(in->chunk_data);
    free(in->chunk_lengths);
    in->chunk_refs = NULL;
    in->chunk_data = NULL;
    in->chunk_lengths = NULL;
    napi_throw_error(env, NULL, "nixcas ingest: out of memory");
    return NULL;
  }
  // The chunks and the handle stay referenced until the work is complete.
  for (uint32_t i = 0; i < count; i++) {
    napi_value chunk;
    void *data;
    size_t length;
    if (napi_get_element(env, argv[1], i, &chunk) != napi_ok || napi_get_buffer_info(env, chunk, &data, &length) != napi_ok ||
        napi_create_reference(env, chunk, 1, &in->chunk_refs[i]) != napi_ok) {
      for (uint32_t j = 0; j < i; j++) napi_delete_reference(env, in->chunk_refs[j]);
      in->chunk_count = 0;
      napi_throw_type_error(env, NULL, "nixcas ingest: feed takes an array of Buffers");
      return NULL;
    }
    in->chunk_data[i] = data;
    in->chunk_lengths[i] = length;
    in->chunk_count = i + 1;
  }
  napi_value promise, name;
  CHECK(napi_create_promise(env, &in->deferred, &promise));
  CHECK(napi_create_string_utf8(env, "nixcas ingest", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, argv[0], name, feed_execute, feed_complete, in, &in->work));
  CHECK(napi_create_reference(env, argv[0], 1, &in->self));
  CHECK(napi_queue_async_work(env, in->work));
  in->busy = 1;
  return promise;
}

static napi_value digest_value(napi_env env, EVP_MD_CTX *context) {
  uint8_t digest[32];
  unsigned length = 0;
  napi_value value;
  if (EVP_DigestFinal_ex(context, digest, &length) != 1 || length != 32) return NULL;
  void *out;
  if (napi_create_buffer_copy(env, 32, digest, &out, &value) != napi_ok) return NULL;
  return value;
}

// finish(handle) -> { narSize, narSha256, fileSize, fileSha256? }; throws if the NAR or the zstd frame is incomplete.
static napi_value finish(napi_env env, napi_callback_info info) {
  CHECK_ARGS(1, "finish(handle)");
  ingest_t *in = get_ingest(env, argv[0]);
  if (!in) return NULL;
  check_complete(in);
  if (failed(in)) {
    napi_throw(env, error_value(env, in));
    return NULL;
  }
  napi_value result, value;
  CHECK(napi_create_object(env, &result));
  CHECK(napi_create_double(env, (double)in->nar_size, &value));
  CHECK(napi_set_named_property(env, result, "narSize", value));
  CHECK(napi_create_double(env, (double)in->file_size, &value));
  CHECK(napi_set_named_property(env, result, "fileSize", value));
  value = digest_value(env, in->nar_sha256);
  if (!value) return NULL;
  CHECK(napi_set_named_property(env, result, "narSha256", value));
  if (in->file_sha256) {
    value = digest_value(env, in->file_sha256);
    if (!value) return NULL;
    CHECK(napi_set_named_property(env, result, "fileSha256", value));
  }
  return result;
}

// release(handle): frees the ingest's memory now and removes a large file's unfinished temp file.
static napi_value release(napi_env env, napi_callback_info info) {
  CHECK_ARGS(1, "release(handle)");
  ingest_t *in = get_ingest(env, argv[0]);
  if (in) release_memory(in);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"create", NULL, create, NULL, NULL, NULL, napi_default, NULL},
      {"feed", NULL, feed, NULL, NULL, NULL, napi_default, NULL},
      {"finish", NULL, finish, NULL, NULL, NULL, napi_default, NULL},
      {"release", NULL, release, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof *properties, properties);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
