// `nixcas nar` for the local store, in C: reads the store path's PathInfo,
// its directories and its small blobs straight from the store's LMDB
// environment, large blobs from their files, and writes the NAR to a file
// descriptor. It exists because of start-up: a fresh Node process needs more
// time to load lmdb-js and warm up the TypeScript renderer than
// `nix-store --dump` needs for a whole tree of small files
// (docs/design-notes.md, "the native NAR renderer"). The TypeScript renderer
// (render.ts) stays the reference and serves every other case.
//
// LMDB is compiled from the sources lmdb-js ships, with the same defines, so
// the lock file and data format are the ones lmdb-js writers use; a mismatch
// makes mdb_env_open fail, and the caller falls back to lmdb-js. Only one LMDB
// copy may have an environment open in a process (POSIX locks are per
// process), so this addon is loaded only by commands that never load lmdb-js
// while it holds the environment, and it closes it before returning.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <node_api.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lmdb.h"
#include "../../../native/blake3.h"

#define OUTPUT_BUFFER (1024 * 1024)
#define DIGEST_LENGTH 32
/** Files at least this big are sent with sendfile(2) rather than copied through the buffer (as write-fd.ts does). */
#define SENDFILE_MIN (64 * 1024)
#define SENDFILE_SLICE (16 * 1024 * 1024)
#define PATH_INFO_FORMAT 1
/** The blob-files record (src/castore/backends/blob-file-record.ts): version, then inode, size, mtime and ctime in ns. */
#define BLOB_FILE_RECORD_VERSION 1
#define BLOB_FILE_RECORD_LENGTH 40
#define HASH_STEP (1024 * 1024)

/* ---------- results ---------- */

enum outcome { RENDERED = 1, NOT_FOUND = 0, USE_FALLBACK = -1, FAILED = -2 };

typedef struct {
  char message[1024];
} failure_t;

static int fail(failure_t *failure, const char *format, ...) {
  va_list args;
  va_start(args, format);
  vsnprintf(failure->message, sizeof failure->message, format, args);
  va_end(args);
  return FAILED;
}

/* ---------- output ---------- */

typedef struct {
  int fd;
  unsigned char *buffer;
  size_t used;
  uint64_t written; // bytes that reached fd
  failure_t *failure;
  int sendfile_works;
} output_t;

static int wait_writable(int fd) {
  struct pollfd poller = {.fd = fd, .events = POLLOUT};
  while (poll(&poller, 1, -1) < 0) {
    if (errno != EINTR) return -1;
  }
  return 0;
}

static int write_error(output_t *out, int error) {
  if (error == EPIPE) return fail(out->failure, "the reader went away after %llu bytes of the NAR (broken pipe)", (unsigned long long)out->written);
  return fail(out->failure, "writing the NAR: %s", strerror(error));
}

static int write_all(output_t *out, const unsigned char *data, size_t length) {
  while (length > 0) {
    ssize_t n = write(out->fd, data, length);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN && wait_writable(out->fd) == 0) continue;
      return write_error(out, errno);
    }
    data += n;
    length -= (size_t)n;
    out->written += (uint64_t)n;
  }
  return 0;
}

static int flush_output(output_t *out) {
  int rc = write_all(out, out->buffer, out->used);
  out->used = 0;
  return rc;
}

static int put_bytes(output_t *out, const void *data, size_t length) {
  if (out->used + length > OUTPUT_BUFFER) {
    if (flush_output(out)) return FAILED;
    if (length > OUTPUT_BUFFER) return write_all(out, data, length);
  }
  memcpy(out->buffer + out->used, data, length);
  out->used += length;
  return 0;
}

static int put_u64(output_t *out, uint64_t value) {
  unsigned char bytes[8];
  for (int i = 0; i < 8; i++) bytes[i] = (unsigned char)(value >> (8 * i));
  return put_bytes(out, bytes, 8);
}

static int put_padding(output_t *out, uint64_t length) {
  static const unsigned char zeros[8];
  size_t padding = (size_t)((8 - length % 8) % 8);
  return padding ? put_bytes(out, zeros, padding) : 0;
}

/** A NAR string: its length as a little-endian u64, the bytes, zero padding to 8. */
static int put_string(output_t *out, const void *data, size_t length) {
  if (put_u64(out, length) || put_bytes(out, data, length) || put_padding(out, length)) return FAILED;
  return 0;
}

#define PUT_LITERAL(out, text) put_string((out), (text), sizeof(text) - 1)

struct render;
/** Where the renderer is, for messages; only formatted when something failed. */
static const char *here(struct render *render);

/** `count` bytes of `fd` from offset 0 onto the output, by sendfile(2) when the output takes it. */
static int put_file_contents(output_t *out, int fd, uint64_t count, struct render *render) {
  if (count >= SENDFILE_MIN && out->sendfile_works) {
    if (flush_output(out)) return FAILED;
    off_t offset = 0;
    while ((uint64_t)offset < count) {
      uint64_t left = count - (uint64_t)offset;
      ssize_t n = sendfile(out->fd, fd, &offset, left > SENDFILE_SLICE ? SENDFILE_SLICE : (size_t)left);
      if (n > 0) {
        out->written += (uint64_t)n;
        continue;
      }
      if (n == 0) return fail(out->failure, "%s: blob file ended after %lld of %llu bytes", here(render), (long long)offset, (unsigned long long)count);
      if (errno == EINTR) continue;
      if (errno == EAGAIN && wait_writable(out->fd) == 0) continue;
      if ((errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) && offset == 0) {
        out->sendfile_works = 0; // e.g. an O_APPEND file: copy instead
        break;
      }
      return errno == EPIPE ? write_error(out, errno) : fail(out->failure, "%s: sending the blob: %s", here(render), strerror(errno));
    }
    if (out->sendfile_works) return 0;
  }
  uint64_t offset = 0;
  while (offset < count) {
    if (out->used == OUTPUT_BUFFER && flush_output(out)) return FAILED;
    size_t room = OUTPUT_BUFFER - out->used;
    size_t want = count - offset < room ? (size_t)(count - offset) : room;
    ssize_t n = pread(fd, out->buffer + out->used, want, (off_t)offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail(out->failure, "%s: reading the blob: %s", here(render), strerror(errno));
    }
    if (n == 0) return fail(out->failure, "%s: blob file ended after %llu of %llu bytes", here(render), (unsigned long long)offset, (unsigned long long)count);
    out->used += (size_t)n;
    offset += (uint64_t)n;
  }
  return 0;
}

/* ---------- names for messages ---------- */

/** 'b3:' and the digest in standard base64, as formatDigest() writes it. */
static void format_digest(const unsigned char *digest, char *text) {
  static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char *p = text + sprintf(text, "b3:");
  for (int i = 0; i < DIGEST_LENGTH; i += 3) {
    unsigned value = (unsigned)digest[i] << 16 | (i + 1 < DIGEST_LENGTH ? (unsigned)digest[i + 1] << 8 : 0) | (i + 2 < DIGEST_LENGTH ? digest[i + 2] : 0);
    *p++ = alphabet[value >> 18 & 63];
    *p++ = alphabet[value >> 12 & 63];
    *p++ = i + 1 < DIGEST_LENGTH ? alphabet[value >> 6 & 63] : '=';
    *p++ = i + 2 < DIGEST_LENGTH ? alphabet[value & 63] : '=';
  }
  *p = 0;
}

/* ---------- Directory messages (protobuf) ---------- */

enum kind { DIRECTORY = 1, FILE_NODE = 2, SYMLINK = 3 };

typedef struct {
  enum kind kind;
  const unsigned char *name;
  size_t name_length;
  const unsigned char *digest; // directories and files
  uint64_t size;               // files
  int executable;
  const unsigned char *target; // symlinks
  size_t target_length;
} entry_t;

typedef struct {
  const unsigned char *at, *end;
} reader_t;

static int read_varint(reader_t *r, uint64_t *value) {
  *value = 0;
  for (int shift = 0; shift < 64 && r->at < r->end; shift += 7) {
    unsigned char byte = *r->at++;
    *value |= (uint64_t)(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return 0;
  }
  return -1;
}

/** Skips a field of `wire_type`; -1 when it runs past the end or the type is unknown. */
static int skip_field(reader_t *r, uint64_t wire_type) {
  uint64_t length;
  switch (wire_type) {
  case 0: return read_varint(r, &length);
  case 1: length = 8; break;
  case 2: if (read_varint(r, &length)) return -1; break;
  case 5: length = 4; break;
  default: return -1;
  }
  if (length > (uint64_t)(r->end - r->at)) return -1;
  r->at += length;
  return 0;
}

static int read_bytes(reader_t *r, const unsigned char **data, size_t *length) {
  uint64_t n;
  if (read_varint(r, &n) || n > (uint64_t)(r->end - r->at)) return -1;
  *data = r->at;
  *length = (size_t)n;
  r->at += n;
  return 0;
}

/** One DirectoryNode, FileNode or SymlinkNode message. */
static int decode_node(const unsigned char *data, size_t length, enum kind kind, entry_t *entry) {
  reader_t r = {data, data + length};
  memset(entry, 0, sizeof *entry);
  entry->kind = kind;
  size_t digest_length = 0;
  while (r.at < r.end) {
    uint64_t key, value;
    if (read_varint(&r, &key)) return -1;
    uint64_t field = key >> 3, wire_type = key & 7;
    if (field == 1 && wire_type == 2) {
      if (read_bytes(&r, &entry->name, &entry->name_length)) return -1;
    } else if (field == 2 && wire_type == 2 && kind != SYMLINK) {
      if (read_bytes(&r, &entry->digest, &digest_length)) return -1;
    } else if (field == 2 && wire_type == 2) {
      if (read_bytes(&r, &entry->target, &entry->target_length)) return -1;
    } else if (field == 3 && wire_type == 0 && kind != SYMLINK) {
      if (read_varint(&r, &entry->size)) return -1;
    } else if (field == 4 && wire_type == 0 && kind == FILE_NODE) {
      if (read_varint(&r, &value)) return -1;
      entry->executable = value != 0;
    } else if (skip_field(&r, wire_type)) {
      return -1;
    }
  }
  if (kind != SYMLINK && digest_length != DIGEST_LENGTH) return -1;
  if (kind == SYMLINK && (entry->target_length == 0 || memchr(entry->target, 0, entry->target_length))) return -1;
  return 0;
}

static int compare_names(const entry_t *a, const entry_t *b) {
  size_t shorter = a->name_length < b->name_length ? a->name_length : b->name_length;
  int order = memcmp(a->name, b->name, shorter);
  if (order) return order;
  return a->name_length < b->name_length ? -1 : a->name_length > b->name_length;
}

static int compare_entries(const void *a, const void *b) {
  return compare_names(a, b);
}

static int valid_name(const entry_t *entry) {
  if (entry->name_length == 0 || entry->name_length > 255) return 0;
  if (memchr(entry->name, '/', entry->name_length) || memchr(entry->name, 0, entry->name_length)) return 0;
  if (entry->name[0] == '.' && (entry->name_length == 1 || (entry->name_length == 2 && entry->name[1] == '.'))) return 0;
  return 1;
}

/**
 * A Directory message's entries in NAR order (sorted by name bytes), in a
 * malloc'd array. -1 when the message is malformed or breaks the castore
 * rules the NAR depends on (valid names, each list sorted, names unique).
 */
static int decode_directory(const unsigned char *data, size_t length, entry_t **entries_out, size_t *count_out) {
  reader_t r = {data, data + length};
  size_t count = 0, capacity = 16;
  entry_t *entries = malloc(capacity * sizeof *entries);
  size_t last_of_kind[4] = {SIZE_MAX, SIZE_MAX, SIZE_MAX, SIZE_MAX}; // index of the previous entry of each list
  if (!entries) return -1;
  while (r.at < r.end) {
    uint64_t key;
    if (read_varint(&r, &key)) goto bad;
    uint64_t field = key >> 3, wire_type = key & 7;
    if (field >= 1 && field <= 3 && wire_type == 2) {
      const unsigned char *node;
      size_t node_length;
      if (read_bytes(&r, &node, &node_length)) goto bad;
      if (count == capacity) {
        entry_t *grown = realloc(entries, (capacity *= 2) * sizeof *entries);
        if (!grown) goto bad;
        entries = grown;
      }
      entry_t *entry = &entries[count];
      if (decode_node(node, node_length, (enum kind)field, entry) || !valid_name(entry)) goto bad;
      if (last_of_kind[field] != SIZE_MAX && compare_names(&entries[last_of_kind[field]], entry) >= 0) goto bad;
      last_of_kind[field] = count;
      count++;
    } else if (skip_field(&r, wire_type)) {
      goto bad;
    }
  }
  qsort(entries, count, sizeof *entries, compare_entries);
  for (size_t i = 1; i < count; i++) {
    if (compare_names(&entries[i - 1], &entries[i]) == 0) goto bad;
  }
  *entries_out = entries;
  *count_out = count;
  return 0;
bad:
  free(entries);
  return -1;
}

/* ---------- PathInfo values (msgpack) ---------- */

// store/backends/local.ts keeps { v: 1, info: PathInfo } as msgpack; only the
// root node is needed here.

typedef struct {
  const unsigned char *at, *end;
} mp_t;

static int mp_take(mp_t *m, size_t n, const unsigned char **data) {
  if (n > (size_t)(m->end - m->at)) return -1;
  if (data) *data = m->at;
  m->at += n;
  return 0;
}

static int mp_uint(mp_t *m, int bytes, uint64_t *value) {
  const unsigned char *p;
  if (mp_take(m, (size_t)bytes, &p)) return -1;
  *value = 0;
  for (int i = 0; i < bytes; i++) *value = *value << 8 | p[i];
  return 0;
}

/** The length of a str or bin at the cursor, which then points at its bytes; -1 for other types. */
static int mp_bytes(mp_t *m, const unsigned char **data, size_t *length) {
  if (m->at >= m->end) return -1;
  unsigned char type = *m->at++;
  uint64_t n;
  if ((type & 0xe0) == 0xa0) n = type & 0x1f;
  else if (type == 0xc4 || type == 0xd9) { if (mp_uint(m, 1, &n)) return -1; }
  else if (type == 0xc5 || type == 0xda) { if (mp_uint(m, 2, &n)) return -1; }
  else if (type == 0xc6 || type == 0xdb) { if (mp_uint(m, 4, &n)) return -1; }
  else return -1;
  *length = (size_t)n;
  return mp_take(m, (size_t)n, data);
}

/** A non-negative integer (msgpackr writes large ones as float64). */
static int mp_count(mp_t *m, uint64_t *value) {
  if (m->at >= m->end) return -1;
  unsigned char type = *m->at++;
  if (type <= 0x7f) { *value = type; return 0; }
  if (type >= 0xcc && type <= 0xcf) return mp_uint(m, 1 << (type - 0xcc), value);
  if (type >= 0xd0 && type <= 0xd3) {
    if (mp_uint(m, 1 << (type - 0xd0), value)) return -1;
    int bits = 8 << (type - 0xd0);
    return bits < 64 && (*value >> (bits - 1)) ? -1 : 0; // negative
  }
  if (type == 0xcb) {
    uint64_t bits;
    double number;
    if (mp_uint(m, 8, &bits)) return -1;
    memcpy(&number, &bits, 8);
    if (!(number >= 0 && number <= 9007199254740991.0) || number != (double)(uint64_t)number) return -1;
    *value = (uint64_t)number;
    return 0;
  }
  return -1;
}

static int mp_map_size(mp_t *m, uint64_t *pairs) {
  if (m->at >= m->end) return -1;
  unsigned char type = *m->at++;
  if ((type & 0xf0) == 0x80) { *pairs = type & 0x0f; return 0; }
  if (type == 0xde) return mp_uint(m, 2, pairs);
  if (type == 0xdf) return mp_uint(m, 4, pairs);
  return -1;
}

static int mp_skip(mp_t *m, int depth) {
  if (m->at >= m->end || depth > 64) return -1;
  unsigned char type = *m->at;
  uint64_t n;
  const unsigned char *ignored;
  size_t length;
  if (type <= 0x7f || type >= 0xe0 || type == 0xc0 || type == 0xc2 || type == 0xc3) { m->at++; return 0; }
  if ((type & 0xe0) == 0xa0 || type == 0xc4 || type == 0xc5 || type == 0xc6 || type == 0xd9 || type == 0xda || type == 0xdb) {
    return mp_bytes(m, &ignored, &length);
  }
  m->at++;
  switch (type) {
  case 0xca: return mp_take(m, 4, NULL);
  case 0xcb: return mp_take(m, 8, NULL);
  case 0xcc: case 0xd0: return mp_take(m, 1, NULL);
  case 0xcd: case 0xd1: return mp_take(m, 2, NULL);
  case 0xce: case 0xd2: return mp_take(m, 4, NULL);
  case 0xcf: case 0xd3: return mp_take(m, 8, NULL);
  case 0xd4: return mp_take(m, 2, NULL);
  case 0xd5: return mp_take(m, 3, NULL);
  case 0xd6: return mp_take(m, 5, NULL);
  case 0xd7: return mp_take(m, 9, NULL);
  case 0xd8: return mp_take(m, 17, NULL);
  case 0xc7: if (mp_uint(m, 1, &n)) return -1; return mp_take(m, (size_t)n + 1, NULL);
  case 0xc8: if (mp_uint(m, 2, &n)) return -1; return mp_take(m, (size_t)n + 1, NULL);
  case 0xc9: if (mp_uint(m, 4, &n)) return -1; return mp_take(m, (size_t)n + 1, NULL);
  }
  uint64_t items;
  if ((type & 0xf0) == 0x90) items = type & 0x0f;
  else if ((type & 0xf0) == 0x80) items = 2 * (uint64_t)(type & 0x0f);
  else if (type == 0xdc || type == 0xde) { if (mp_uint(m, 2, &items)) return -1; if (type == 0xde) items *= 2; }
  else if (type == 0xdd || type == 0xdf) { if (mp_uint(m, 4, &items)) return -1; if (type == 0xdf) items *= 2; }
  else return -1;
  for (uint64_t i = 0; i < items; i++) {
    if (mp_skip(m, depth + 1)) return -1;
  }
  return 0;
}

/** Moves the cursor to the value of `key` in the map at the cursor; -1 when absent or malformed. */
static int mp_find(mp_t *m, const char *key) {
  uint64_t pairs;
  if (mp_map_size(m, &pairs)) return -1;
  size_t key_length = strlen(key);
  for (uint64_t i = 0; i < pairs; i++) {
    const unsigned char *name;
    size_t name_length;
    mp_t before = *m;
    if (mp_bytes(m, &name, &name_length) == 0) {
      if (name_length == key_length && memcmp(name, key, key_length) == 0) return 0;
    } else {
      *m = before;
      if (mp_skip(m, 0)) return -1;
    }
    if (mp_skip(m, 0)) return -1;
  }
  return -1;
}

/** The root node of a stored PathInfo. USE_FALLBACK for a format this code does not know. */
static int decode_root(const unsigned char *data, size_t length, entry_t *root) {
  mp_t m = {data, data + length}, at;
  uint64_t version;
  at = m;
  if (mp_find(&at, "v") || mp_count(&at, &version) || version != PATH_INFO_FORMAT) return USE_FALLBACK;
  at = m;
  if (mp_find(&at, "info") || mp_find(&at, "node")) return USE_FALLBACK;
  mp_t node_map = at;
  const unsigned char *kind;
  size_t kind_length;
  if (mp_find(&at, "kind") || mp_bytes(&at, &kind, &kind_length)) return USE_FALLBACK;
  memset(root, 0, sizeof *root);
  if (kind_length == 9 && memcmp(kind, "directory", 9) == 0) root->kind = DIRECTORY;
  else if (kind_length == 4 && memcmp(kind, "file", 4) == 0) root->kind = FILE_NODE;
  else if (kind_length == 7 && memcmp(kind, "symlink", 7) == 0) root->kind = SYMLINK;
  else return USE_FALLBACK;
  mp_t fields = node_map;
  if (mp_find(&fields, "node")) return USE_FALLBACK;
  mp_t start = fields;
  size_t digest_length = 0;
  at = start;
  if (mp_find(&at, "name") || mp_bytes(&at, &root->name, &root->name_length)) return USE_FALLBACK;
  if (root->kind == SYMLINK) {
    at = start;
    if (mp_find(&at, "target") || mp_bytes(&at, &root->target, &root->target_length)) return USE_FALLBACK;
    return 0;
  }
  at = start;
  if (mp_find(&at, "digest") || mp_bytes(&at, &root->digest, &digest_length) || digest_length != DIGEST_LENGTH) return USE_FALLBACK;
  at = start;
  if (mp_find(&at, "size") || mp_count(&at, &root->size)) return USE_FALLBACK;
  if (root->kind == FILE_NODE) {
    at = start;
    if (mp_find(&at, "executable") || at.at >= at.end || (*at.at != 0xc2 && *at.at != 0xc3)) return USE_FALLBACK;
    root->executable = *at.at == 0xc3;
  }
  return 0;
}

/* ---------- rendering ---------- */

/* ---------- checking records beside the output ---------- */

// Small blobs and directory records are hashed on a second thread while the
// NAR is written (render-alone time more than doubled when they were hashed
// in line; docs/design-notes.md). Their bytes stay mapped for the whole read
// transaction, and the NAR's last bytes are written only after every check
// passed: a damaged record makes the NAR stop short with an error, never
// complete.

typedef struct {
  const unsigned char *data;
  size_t length;
  const unsigned char *digest;
  const char *what;
  char *where; // the renderer's path when it was queued
} check_t;

typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  check_t *checks;
  size_t count, capacity, next; // next: the first check not yet taken
  size_t queued_bytes;
  int started, finishing;
  size_t failed; // 1 + the index of the first check that failed, 0 while none has
  pthread_t thread;
} checker_t;

/** Bytes queued before the second thread is started: a small NAR is checked at its end, on this one. */
#define CHECKER_START_BYTES (256 * 1024)
/** The worker is woken once per this many checks (and at the end), not for each. */
#define CHECKER_WAKE_EVERY 32

typedef struct render {
  const char *store_root;
  MDB_txn *txn;
  MDB_dbi directories;
  MDB_dbi small_blobs;
  int has_small_blobs;
  MDB_dbi blob_files;
  int has_blob_files;
  /** Whether records and blobs are checked against their digests (NIXCAS_VERIFY_READS=0 is for benchmarks). */
  int verify;
  checker_t checker;
  output_t out;
  failure_t *failure;
  // The names from the root to the node being rendered, for messages.
  const entry_t **path;
  size_t depth;
  size_t path_capacity;
} render_t;

/** Where the renderer is, as render.ts's here() says it: root, or names joined by '/'. */
static const char *here(struct render *render) {
  static char text[768];
  if (render->depth == 0) return "root";
  size_t used = 0;
  for (size_t i = 0; i < render->depth && used < sizeof text - 8; i++) {
    if (i) text[used++] = '/';
    const entry_t *entry = render->path[i];
    for (size_t j = 0; j < entry->name_length && used < sizeof text - 8; j++) {
      unsigned char c = entry->name[j];
      if (c == '"') used += (size_t)sprintf(text + used, "\\\"");
      else if (c >= 0x20 && c < 0x7f && c != '\\') text[used++] = (char)c;
      else used += (size_t)sprintf(text + used, "\\x%02x", c);
    }
  }
  text[used] = 0;
  return text;
}

static int blob_missing(render_t *render, const entry_t *file) {
  char digest[64];
  format_digest(file->digest, digest);
  return fail(render->failure, "%s: blob %s is missing", here(render), digest);
}

static int wrong_size(render_t *render, const entry_t *file, uint64_t actual) {
  char digest[64];
  format_digest(file->digest, digest);
  return fail(render->failure, "the store at %s is damaged: %s: blob %s has %llu bytes, its node says %llu", render->store_root, here(render), digest,
              (unsigned long long)actual, (unsigned long long)file->size);
}

static int damaged_at(render_t *render, const char *path, const char *what, const unsigned char *digest, const char *where) {
  char text[64];
  format_digest(digest, text);
  return fail(render->failure, "the store at %s is damaged: %s: %s %s (%s) does not hash to its digest; whatever holds it must be imported again",
              render->store_root, path, what, text, where);
}

static int damaged(render_t *render, const char *what, const unsigned char *digest, const char *where) {
  return damaged_at(render, here(render), what, digest, where);
}

/**
 * Takes and makes queued checks until none is left (or, unless `finishing` is set, waits for
 * more), several at a time: nixcas_blake3_many hashes small records side by side.
 */
static void take_checks(checker_t *c) {
  pthread_mutex_lock(&c->lock);
  for (;;) {
    while (c->next == c->count && !c->finishing) pthread_cond_wait(&c->wake, &c->lock);
    if (c->next == c->count || c->failed) break;
    size_t first = c->next, taken = c->count - first < NIXCAS_BLAKE3_MANY_MAX ? c->count - first : NIXCAS_BLAKE3_MANY_MAX;
    c->next += taken;
    const void *data[NIXCAS_BLAKE3_MANY_MAX];
    size_t lengths[NIXCAS_BLAKE3_MANY_MAX];
    const unsigned char *digests[NIXCAS_BLAKE3_MANY_MAX];
    for (size_t i = 0; i < taken; i++) {
      data[i] = c->checks[first + i].data;
      lengths[i] = c->checks[first + i].length;
      digests[i] = c->checks[first + i].digest;
    }
    pthread_mutex_unlock(&c->lock);
    uint8_t found[NIXCAS_BLAKE3_MANY_MAX][BLAKE3_OUT_LEN];
    nixcas_blake3_many(data, lengths, taken, found);
    size_t bad = 0; // 1 + the first damaged one
    for (size_t i = 0; i < taken && !bad; i++)
      if (memcmp(found[i], digests[i], BLAKE3_OUT_LEN) != 0) bad = i + 1;
    pthread_mutex_lock(&c->lock);
    if (bad && (!c->failed || c->failed > first + bad)) c->failed = first + bad;
  }
  pthread_mutex_unlock(&c->lock);
}

static void *check_in_background(void *arg) {
  take_checks(arg);
  return NULL;
}

/** Queues a check of `length` bytes at `data` (mapped from LMDB) against `digest`. */
static int queue_check(render_t *render, const void *data, size_t length, const unsigned char *digest, const char *what) {
  checker_t *c = &render->checker;
  char *where = strdup(here(render));
  if (!where) return fail(render->failure, "out of memory");
  pthread_mutex_lock(&c->lock);
  if (c->count == c->capacity) {
    size_t capacity = c->capacity ? 2 * c->capacity : 1024;
    check_t *grown = realloc(c->checks, capacity * sizeof *grown);
    if (!grown) {
      pthread_mutex_unlock(&c->lock);
      free(where);
      return fail(render->failure, "out of memory");
    }
    c->checks = grown;
    c->capacity = capacity;
  }
  c->checks[c->count++] = (check_t){data, length, digest, what, where};
  c->queued_bytes += length;
  // Where no thread can be started, the checks are all made at the end, here.
  if (!c->started && c->queued_bytes >= CHECKER_START_BYTES) c->started = pthread_create(&c->thread, NULL, check_in_background, c) == 0;
  if (c->started && c->count % CHECKER_WAKE_EVERY == 0) pthread_cond_signal(&c->wake);
  pthread_mutex_unlock(&c->lock);
  return 0;
}

/** Waits for every queued check (making those no thread took); fails naming the first damaged record. */
static int finish_checks(render_t *render) {
  checker_t *c = &render->checker;
  pthread_mutex_lock(&c->lock);
  c->finishing = 1;
  if (c->started) pthread_cond_signal(&c->wake);
  pthread_mutex_unlock(&c->lock);
  take_checks(c); // beside the worker: what is left is shared between both
  if (c->started) pthread_join(c->thread, NULL);
  c->started = 0;
  if (!c->failed) return 0;
  const check_t *bad = &c->checks[c->failed - 1];
  return damaged_at(render, bad->where, bad->what, bad->digest, "in metadata/");
}

static void free_checks(render_t *render) {
  checker_t *c = &render->checker;
  if (c->started) {
    pthread_mutex_lock(&c->lock);
    c->finishing = 1;
    c->failed = c->failed ? c->failed : (size_t)-1; // stop early: nothing waits for the answer
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->thread, NULL);
  }
  for (size_t i = 0; i < c->count; i++) free(c->checks[i].where);
  free(c->checks);
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->wake);
}

static void put_u64_le(unsigned char *at, uint64_t value) {
  for (int i = 0; i < 8; i++) at[i] = (unsigned char)(value >> (8 * i));
}

/**
 * Checks a large blob's open file as castore/backends/local.ts does: its
 * blob-files record matching the file's identity vouches for it, otherwise
 * it is hashed in full before any of it is sent.
 */
static int check_blob_file(render_t *render, const entry_t *file, int fd, const struct stat *st, const char *path) {
  unsigned char record[BLOB_FILE_RECORD_LENGTH] = {BLOB_FILE_RECORD_VERSION};
  put_u64_le(record + 8, (uint64_t)st->st_ino);
  put_u64_le(record + 16, (uint64_t)st->st_size);
  put_u64_le(record + 24, (uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec);
  put_u64_le(record + 32, (uint64_t)st->st_ctim.tv_sec * 1000000000u + (uint64_t)st->st_ctim.tv_nsec);
  if (render->has_blob_files) {
    MDB_val key = {DIGEST_LENGTH, (void *)file->digest}, value;
    if (mdb_get(render->txn, render->blob_files, &key, &value) == 0 && value.mv_size == BLOB_FILE_RECORD_LENGTH &&
        memcmp(value.mv_data, record, BLOB_FILE_RECORD_LENGTH) == 0) {
      return 0;
    }
  }
  unsigned char *step = malloc(HASH_STEP);
  if (!step) return fail(render->failure, "out of memory");
  nixcas_blake3_t hasher;
  nixcas_blake3_init(&hasher);
  for (off_t offset = 0;;) {
    ssize_t n = pread(fd, step, HASH_STEP, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      free(step);
      return fail(render->failure, "%s: reading %s: %s", here(render), path, strerror(errno));
    }
    if (n == 0) break;
    nixcas_blake3_update(&hasher, step, (size_t)n);
    offset += n;
  }
  free(step);
  uint8_t found[BLAKE3_OUT_LEN];
  nixcas_blake3_final(&hasher, found);
  if (memcmp(found, file->digest, BLAKE3_OUT_LEN) != 0) return damaged(render, "blob", file->digest, path);
  return 0;
}

static int render_file(render_t *render, const entry_t *file) {
  output_t *out = &render->out;
  if (PUT_LITERAL(out, "(") || PUT_LITERAL(out, "type") || PUT_LITERAL(out, "regular")) return FAILED;
  if (file->executable && (PUT_LITERAL(out, "executable") || PUT_LITERAL(out, ""))) return FAILED;
  if (PUT_LITERAL(out, "contents") || put_u64(out, file->size)) return FAILED;
  if (file->size > 0) {
    MDB_val key = {DIGEST_LENGTH, (void *)file->digest}, value;
    int rc = render->has_small_blobs ? mdb_get(render->txn, render->small_blobs, &key, &value) : MDB_NOTFOUND;
    if (rc == 0) {
      if (value.mv_size != file->size) return wrong_size(render, file, value.mv_size);
      if (render->verify && queue_check(render, value.mv_data, value.mv_size, file->digest, "small blob")) return FAILED;
      if (put_bytes(out, value.mv_data, value.mv_size)) return FAILED;
    } else if (rc != MDB_NOTFOUND) {
      return fail(render->failure, "%s: reading a small blob: %s", here(render), mdb_strerror(rc));
    } else {
      // blobs/ab/abcd…: the first byte's directory, then the whole digest in hex (castore/backends/local.ts).
      char path[PATH_MAX], hex[2 * DIGEST_LENGTH + 1];
      for (int i = 0; i < DIGEST_LENGTH; i++) sprintf(hex + 2 * i, "%02x", file->digest[i]);
      snprintf(path, sizeof path, "%s/blobs/%.2s/%s", render->store_root, hex, hex);
      int fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        if (errno == ENOENT) return blob_missing(render, file);
        return fail(render->failure, "%s: opening %s: %s", here(render), path, strerror(errno));
      }
      struct stat st;
      int result = fstat(fd, &st) ? fail(render->failure, "%s: %s: %s", here(render), path, strerror(errno))
                   : (uint64_t)st.st_size != file->size ? wrong_size(render, file, (uint64_t)st.st_size)
                   : render->verify && check_blob_file(render, file, fd, &st, path) ? FAILED
                   : put_file_contents(out, fd, file->size, render);
      close(fd);
      if (result) return FAILED;
    }
    if (put_padding(out, file->size)) return FAILED;
  }
  return PUT_LITERAL(out, ")");
}

static int render_symlink(render_t *render, const entry_t *symlink) {
  output_t *out = &render->out;
  if (PUT_LITERAL(out, "(") || PUT_LITERAL(out, "type") || PUT_LITERAL(out, "symlink") || PUT_LITERAL(out, "target")) return FAILED;
  if (put_string(out, symlink->target, symlink->target_length) || PUT_LITERAL(out, ")")) return FAILED;
  return 0;
}

/** One directory level on the explicit stack (a deep tree must not exhaust the C stack). */
typedef struct {
  entry_t *entries;
  size_t count, next;
} level_t;

static int push_path(render_t *render, const entry_t *entry) {
  if (render->depth == render->path_capacity) {
    size_t capacity = render->path_capacity ? 2 * render->path_capacity : 64;
    const entry_t **grown = realloc(render->path, capacity * sizeof *grown);
    if (!grown) return fail(render->failure, "out of memory");
    render->path = grown;
    render->path_capacity = capacity;
  }
  render->path[render->depth++] = entry;
  return 0;
}

static int open_directory(render_t *render, const entry_t *node, level_t *level) {
  char digest[64];
  MDB_val key = {DIGEST_LENGTH, (void *)node->digest}, value;
  int rc = mdb_get(render->txn, render->directories, &key, &value);
  if (rc == MDB_NOTFOUND) {
    format_digest(node->digest, digest);
    return fail(render->failure, "%s: directory %s is missing", here(render), digest);
  }
  if (rc) return fail(render->failure, "%s: reading a directory: %s", here(render), mdb_strerror(rc));
  if (render->verify && queue_check(render, value.mv_data, value.mv_size, node->digest, "directory")) return FAILED;
  if (decode_directory(value.mv_data, value.mv_size, &level->entries, &level->count)) {
    format_digest(node->digest, digest);
    return fail(render->failure, "%s: directory %s is malformed or breaks the castore rules", here(render), digest);
  }
  level->next = 0;
  if (PUT_LITERAL(&render->out, "(") || PUT_LITERAL(&render->out, "type") || PUT_LITERAL(&render->out, "directory")) {
    free(level->entries);
    return FAILED;
  }
  return 0;
}

static int render_tree(render_t *render, const entry_t *root) {
  output_t *out = &render->out;
  size_t depth = 0, capacity = 64;
  level_t *levels = malloc(capacity * sizeof *levels);
  int rc = 0;
  if (!levels) return fail(render->failure, "out of memory");
  if (open_directory(render, root, &levels[0])) { free(levels); return FAILED; }
  depth = 1;
  while (depth > 0 && rc == 0) {
    level_t *level = &levels[depth - 1];
    if (level->next == level->count) {
      free(level->entries);
      depth--;
      if (PUT_LITERAL(out, ")")) { rc = FAILED; break; }
      if (depth > 0) { // closes the entry that held this directory
        render->depth--;
        if (PUT_LITERAL(out, ")")) rc = FAILED;
      }
      continue;
    }
    const entry_t *entry = &level->entries[level->next++];
    if (PUT_LITERAL(out, "entry") || PUT_LITERAL(out, "(") || PUT_LITERAL(out, "name") || put_string(out, entry->name, entry->name_length) ||
        PUT_LITERAL(out, "node") || push_path(render, entry)) {
      rc = FAILED;
      break;
    }
    if (entry->kind == DIRECTORY) {
      if (depth == capacity) {
        level_t *grown = realloc(levels, (capacity *= 2) * sizeof *levels);
        if (!grown) { rc = fail(render->failure, "out of memory"); break; }
        levels = grown;
      }
      if (open_directory(render, entry, &levels[depth])) { rc = FAILED; break; }
      depth++;
      continue;
    }
    rc = entry->kind == FILE_NODE ? render_file(render, entry) : render_symlink(render, entry);
    render->depth--;
    if (rc == 0 && PUT_LITERAL(out, ")")) rc = FAILED;
  }
  while (depth > 0) free(levels[--depth].entries);
  free(levels);
  return rc;
}

static int render_root(render_t *render, const entry_t *root) {
  if (PUT_LITERAL(&render->out, "nix-archive-1")) return FAILED;
  switch (root->kind) {
  case DIRECTORY: return render_tree(render, root);
  case FILE_NODE: return render_file(render, root);
  case SYMLINK: return render_symlink(render, root);
  }
  return FAILED;
}

/**
 * A pipe on stdout holds 64 KiB by default: each write or sendfile then
 * moves at most that much before the reader must run. Asking for 1 MiB
 * (what an unprivileged process may, /proc/sys/fs/pipe-max-size) took 1 GiB
 * through `| cat` from 1.35 to 0.17 s here; where it is refused, nothing changes.
 */
static void widen_pipe(int fd) {
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) fcntl(fd, F_SETPIPE_SZ, OUTPUT_BUFFER);
}

/** The store's layout version from its marker file, or 0 when there is none to read. */
static int layout_version(const char *store_root) {
  char path[PATH_MAX], text[64] = {0};
  snprintf(path, sizeof path, "%s/nixcas-store", store_root);
  FILE *marker = fopen(path, "re");
  if (!marker) return 0;
  size_t n = fread(text, 1, sizeof text - 1, marker);
  fclose(marker);
  text[n] = 0;
  int version = 0;
  return sscanf(text, "nixcas-store %d", &version) == 1 ? version : 0;
}

typedef struct {
  const unsigned char *digest; // the 20 bytes the hash part encodes
  size_t digest_length;
  const unsigned char *basename; // <hash>-<name>, which the root node is named
  size_t basename_length;
} wanted_path_t;

/**
 * Writes the NAR of `wanted` to `fd`. USE_FALLBACK means nothing was written
 * and the TypeScript renderer should do it (no store yet, an unknown layout
 * or format, LMDB refusing the environment); NOT_FOUND that the path is not
 * registered (or is, under another name).
 */
static int render_local_nar(const char *store_root, const wanted_path_t *wanted, int fd, failure_t *failure) {
  int version = layout_version(store_root);
  if (version != 1 && version != 2) return USE_FALLBACK;
  char metadata[PATH_MAX];
  snprintf(metadata, sizeof metadata, "%s/metadata", store_root);
  MDB_env *env;
  if (mdb_env_create(&env)) return USE_FALLBACK;
  int result = USE_FALLBACK;
  MDB_txn *txn = NULL;
  render_t render = {.store_root = store_root, .failure = failure};
  pthread_mutex_init(&render.checker.lock, NULL);
  pthread_cond_init(&render.checker.wake, NULL);
  if (mdb_env_set_maxdbs(env, 12) || mdb_env_open(env, metadata, MDB_RDONLY | MDB_NOTLS, 0644)) goto done;
  int rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn);
  if (rc == MDB_MAP_RESIZED) { // another process grew the map since it was opened
    if (mdb_env_set_mapsize(env, 0) == 0) rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn);
  }
  if (rc) { txn = NULL; goto done; }
  MDB_dbi path_infos;
  rc = mdb_dbi_open(txn, "pathinfos", 0, &path_infos);
  if (rc == MDB_NOTFOUND) { result = NOT_FOUND; goto done; }
  if (rc || mdb_dbi_open(txn, "directories", 0, &render.directories)) goto done;
  rc = mdb_dbi_open(txn, "small-blobs", 0, &render.small_blobs);
  if (rc && rc != MDB_NOTFOUND) goto done;
  render.has_small_blobs = rc == 0;
  rc = mdb_dbi_open(txn, "blob-files", 0, &render.blob_files);
  if (rc && rc != MDB_NOTFOUND) goto done;
  render.has_blob_files = rc == 0;
  const char *verify = getenv("NIXCAS_VERIFY_READS");
  render.verify = !(verify && strcmp(verify, "0") == 0);
  render.txn = txn;
  MDB_val key = {wanted->digest_length, (void *)wanted->digest}, value;
  rc = mdb_get(txn, path_infos, &key, &value);
  if (rc == MDB_NOTFOUND) { result = NOT_FOUND; goto done; }
  if (rc) goto done;
  entry_t root;
  if (decode_root(value.mv_data, value.mv_size, &root)) goto done;
  if (root.name_length != wanted->basename_length || memcmp(root.name, wanted->basename, root.name_length)) {
    result = NOT_FOUND;
    goto done;
  }
  render.out = (output_t){.fd = fd, .buffer = malloc(OUTPUT_BUFFER), .failure = failure, .sendfile_works = 1};
  widen_pipe(fd);
  if (!render.out.buffer) goto done;
  // The NAR's last bytes are still in the buffer: they go out only once every record checked out.
  result = render_root(&render, &root) || finish_checks(&render) || flush_output(&render.out) ? FAILED : RENDERED;
done:
  free(render.out.buffer);
  free(render.path);
  free_checks(&render);
  if (txn) mdb_txn_abort(txn);
  mdb_env_close(env);
  return result;
}

/* ---------- N-API ---------- */

/**
 * renderLocalNar(storeRoot: string, pathDigest: Buffer, basename: Buffer, fd: number):
 * 'rendered' | 'not-found' | 'fallback'; throws when rendering failed.
 */
static napi_value render_local_nar_js(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], result;
  char store_root[PATH_MAX];
  size_t root_length;
  void *digest, *basename;
  wanted_path_t wanted;
  int32_t fd;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 ||
      napi_get_value_string_utf8(env, argv[0], store_root, sizeof store_root, &root_length) != napi_ok ||
      root_length >= sizeof store_root - 1 || napi_get_buffer_info(env, argv[1], &digest, &wanted.digest_length) != napi_ok ||
      napi_get_buffer_info(env, argv[2], &basename, &wanted.basename_length) != napi_ok || napi_get_value_int32(env, argv[3], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "renderLocalNar(storeRoot: string, pathDigest: Buffer, basename: Buffer, fd: number)");
    return NULL;
  }
  wanted.digest = digest;
  wanted.basename = basename;
  failure_t failure = {{0}};
  int outcome = render_local_nar(store_root, &wanted, fd, &failure);
  if (outcome == FAILED) {
    napi_throw_error(env, NULL, failure.message);
    return NULL;
  }
  const char *text = outcome == RENDERED ? "rendered" : outcome == NOT_FOUND ? "not-found" : "fallback";
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"renderLocalNar", NULL, render_local_nar_js, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
