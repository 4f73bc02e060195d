// The virtio-fs requests that need no decision: GETATTR of an inode whose
// attributes were answered before, and READ by inode (no file handle) of a
// blob file that was opened and verified before, answered here without
// entering JavaScript. JavaScript keeps the state: it registers what may be
// answered here (fastAttributes, fastFile), forgets it (fastForget), and owns
// the ring's indices; virtiofsServe takes chains from the ring's avail index
// on, answers them in order, and stops at the first one it cannot answer
// (anything unusual: it is left, untouched, for JavaScript, which also gives
// every error its message). Nothing a guest wrote is trusted: every address
// is translated through the guest memory chunks JavaScript mapped, every
// chain walk is bounded, and the request bytes are copied out once before
// they are looked at.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>
#include <uv.h>

#include "virtiofs_fast.h"
#include "napi_check.h"
#include "virtiofs_ring.h"


// ---------------------------------------------------------------- guest memory and the ring

/** Whether every chunk is still mapped where it was (JavaScript unmaps by detaching its buffer). */
static bool chunks_current(napi_env env, const ring_t *ring) {
  for (uint32_t i = 0; i < ring->chunk_count; i++) {
    napi_value value;
    void *data;
    size_t length;
    if (napi_get_reference_value(env, ring->chunks[i].buffer, &value) != napi_ok || value == NULL) return false;
    if (napi_get_arraybuffer_info(env, value, &data, &length) != napi_ok) return false;
    if (data != ring->chunks[i].host || length != ring->chunks[i].length) return false;
  }
  return true;
}

static void ring_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  ring_t *ring = data;
  for (uint32_t i = 0; i < ring->chunk_count; i++) napi_delete_reference(env, ring->chunks[i].buffer);
  free(ring->chunks);
  free(ring);
}

static bool get_u64(napi_env env, napi_value value, uint64_t *out) {
  double number;
  if (napi_get_value_double(env, value, &number) != napi_ok || !(number >= 0) || number > 9007199254740991.0) return false;
  *out = (uint64_t)number;
  return true;
}

static ring_t *get_ring(napi_env env, napi_value value) {
  void *data = NULL;
  if (napi_get_value_external(env, value, &data) != napi_ok || !data) return NULL;
  return data;
}

static napi_value make_int32(napi_env env, int32_t value) {
  napi_value result;
  napi_create_int32(env, value, &result);
  return result;
}

/** What a call on a ring whose memory JavaScript has unmapped since fastRing answers: make another. */
#define STALE_RING (-1)

// fastRing(buffers, gpas, primaries, desc, avail, used, size, indirect) -> a
// ring handle: the guest memory chunks (ArrayBuffers from mmap, each mapping
// `primaries[i]` bytes of guest memory from `gpas[i]`, maybe more after) and
// where the split ring's three parts are.
static napi_value fast_ring(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 8) {
    napi_throw_type_error(env, NULL, "nixcas native: fastRing takes 8 arguments");
    return NULL;
  }
  uint32_t count;
  CHECK(napi_get_array_length(env, argv[0], &count));
  ring_t *ring = calloc(1, sizeof *ring);
  ring->chunks = calloc(count ? count : 1, sizeof *ring->chunks);
  bool ok = true;
  for (uint32_t i = 0; ok && i < count; i++) {
    napi_value buffer, gpa, primary;
    void *data;
    size_t length;
    ok = napi_get_element(env, argv[0], i, &buffer) == napi_ok && napi_get_element(env, argv[1], i, &gpa) == napi_ok &&
         napi_get_element(env, argv[2], i, &primary) == napi_ok && napi_get_arraybuffer_info(env, buffer, &data, &length) == napi_ok;
    chunk_t *c = &ring->chunks[i];
    ok = ok && get_u64(env, gpa, &c->gpa) && get_u64(env, primary, &c->primary) && c->primary <= length;
    if (!ok) break;
    c->host = data;
    c->length = length;
    ok = napi_create_reference(env, buffer, 1, &c->buffer) == napi_ok;
    if (ok) ring->chunk_count++;
  }
  uint32_t size = 0;
  bool indirect = false;
  ok = ok && get_u64(env, argv[3], &ring->desc_gpa) && get_u64(env, argv[4], &ring->avail_gpa) && get_u64(env, argv[5], &ring->used_gpa) &&
       napi_get_value_uint32(env, argv[6], &size) == napi_ok && napi_get_value_bool(env, argv[7], &indirect) == napi_ok;
  ring->size = size;
  ring->indirect = indirect;
  ok = ok && size > 0 && size <= 32768 && (size & (size - 1)) == 0;
  ok = ok && translate(ring, ring->desc_gpa, (uint64_t)DESC_SIZE * size) && translate(ring, ring->avail_gpa, 2 * (3 + (uint64_t)size)) &&
       translate(ring, ring->used_gpa, 6 + 8 * (uint64_t)size);
  if (!ok) {
    ring_finalize(env, ring, NULL);
    napi_throw_range_error(env, NULL, "nixcas native: fastRing: bad chunks or ring addresses");
    return NULL;
  }
  napi_value result;
  CHECK(napi_create_external(env, ring, ring_finalize, NULL, &result));
  return result;
}

// ---------------------------------------------------------------- what may be answered here

static void tables_finalize(napi_env env, void *data, void *hint) {
  (void)env, (void)hint;
  tables_clear(data);
  free(data);
}

static tables_t *get_tables(napi_env env, napi_value value) {
  void *data = NULL;
  if (napi_get_value_external(env, value, &data) != napi_ok || !data) {
    napi_throw_type_error(env, NULL, "nixcas native: expected the handle fastTables() made");
    return NULL;
  }
  return data;
}

/**
 * The arguments of a call on the tables: (tables, nodeid, …) into `argv`, the tables
 * returned and the node id (never 0) in `nodeid`; NULL with `usage` thrown when they are not.
 */
static tables_t *tables_call(napi_env env, napi_callback_info info, size_t argc_wanted, napi_value *argv, uint64_t *nodeid, const char *usage) {
  size_t argc = argc_wanted;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < argc_wanted) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  tables_t *t = get_tables(env, argv[0]);
  if (t && (!get_u64(env, argv[1], nodeid) || *nodeid == 0)) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  return t;
}

// fastTables() -> a handle for one FUSE session's attributes and files.
static napi_value fast_tables(napi_env env, napi_callback_info info) {
  (void)info;
  tables_t *t = calloc(1, sizeof *t);
  if (!t) {
    napi_throw_error(env, NULL, "nixcas native: out of memory");
    return NULL;
  }
  napi_value result;
  CHECK(napi_create_external(env, t, tables_finalize, NULL, &result));
  return result;
}

// fastAttributes(tables, nodeid, attrOut): GETATTR of `nodeid` is answered
// with these 104 bytes (fuse_attr_out) from now on.
static napi_value fast_attributes(napi_env env, napi_callback_info info) {
  static const char usage[] = "nixcas native: fastAttributes(tables, nodeid, 104 bytes)";
  napi_value argv[3];
  uint64_t nodeid;
  tables_t *t = tables_call(env, info, 3, argv, &nodeid, usage);
  if (!t) return NULL;
  void *bytes;
  size_t length;
  if (napi_get_buffer_info(env, argv[2], &bytes, &length) != napi_ok || length != ATTR_REPLY_SIZE - OUT_HEADER_SIZE) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  attr_slot_t *slot = &t->attrs[slot_of(nodeid, ATTR_SLOTS)];
  slot->nodeid = nodeid;
  memcpy(slot->reply, bytes, length);
  return NULL;
}

// fastFile(tables, nodeid, fd, size): READ of `nodeid` without a file
// handle is answered from `size` bytes of `fd` (duplicated here; the
// caller keeps its own) while they are in the page cache.
static napi_value fast_file(napi_env env, napi_callback_info info) {
  static const char usage[] = "nixcas native: fastFile(tables, nodeid, fd, size)";
  napi_value argv[4];
  uint64_t nodeid, size;
  tables_t *t = tables_call(env, info, 4, argv, &nodeid, usage);
  if (!t) return NULL;
  int32_t fd;
  if (napi_get_value_int32(env, argv[2], &fd) != napi_ok || !get_u64(env, argv[3], &size)) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  file_slot_t *slot = &t->files[slot_of(nodeid, FILE_SLOTS)];
  if (slot->nodeid == nodeid && slot->size == size) return NULL;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (copy < 0) return NULL; // out of fds: JavaScript keeps answering
  drop_file(slot);
  slot->nodeid = nodeid;
  slot->size = size;
  slot->fd = copy;
  return NULL;
}

// fastForget(tables, nodeid): nothing of `nodeid` is answered here any more.
static napi_value fast_forget(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint64_t nodeid;
  tables_t *t = tables_call(env, info, 2, argv, &nodeid, "nixcas native: fastForget(tables, nodeid)");
  if (!t) return NULL;
  attr_slot_t *attr = &t->attrs[slot_of(nodeid, ATTR_SLOTS)];
  if (attr->nodeid == nodeid) attr->nodeid = 0;
  file_slot_t *file = &t->files[slot_of(nodeid, FILE_SLOTS)];
  if (file->nodeid == nodeid) drop_file(file);
  return NULL;
}

// fastClear(tables): forgets everything and closes the files (a session's end).
static napi_value fast_clear(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  tables_t *t = argc == 1 ? get_tables(env, argv[0]) : NULL;
  if (t) tables_clear(t);
  return NULL;
}

// ---------------------------------------------------------------- answering

// The elements of `value` if it is a Float64Array of at least `min_length`; NULL otherwise.
static double *float64_array(napi_env env, napi_value value, size_t min_length) {
  napi_typedarray_type type;
  size_t length;
  void *data;
  if (napi_get_typedarray_info(env, value, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_float64_array || length < min_length) return NULL;
  return data;
}

// virtiofsServe(ring, tables, nextAvail, nextUsed, stats, max) -> chains
// answered: from avail index `nextAvail` on, while the chains are requests
// this path answers (at most `max`: the caller interrupts the driver between
// batches), each is answered and put on the used ring at `nextUsed` on (and
// used.idx published after each). The caller advances both indices by the
// count. stats (a Float64Array) gets += GETATTRs, READs and bytes read.
// -1: the ring's memory changed since fastRing (make another).
static napi_value virtiofs_serve(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  ring_t *ring = NULL;
  tables_t *t = argc == 6 ? get_tables(env, argv[1]) : NULL;
  uint32_t next_avail, next_used, max;
  double *stats_data;
  if (!t || !(ring = get_ring(env, argv[0])) || napi_get_value_uint32(env, argv[2], &next_avail) != napi_ok ||
      napi_get_value_uint32(env, argv[3], &next_used) != napi_ok || !(stats_data = float64_array(env, argv[4], 3)) ||
      napi_get_value_uint32(env, argv[5], &max) != napi_ok) {
    if (t) napi_throw_type_error(env, NULL, "nixcas native: virtiofsServe(ring, tables, nextAvail, nextUsed, Float64Array(3), max)");
    return NULL;
  }
  if (!chunks_current(env, ring)) return make_int32(env, STALE_RING);
  return make_int32(env, serve_ring(ring, t, next_avail, next_used, max, stats_data, NULL));
}

// ringSpin(ring, nextAvail, maxNs) -> 1 as soon as the driver makes a chain
// available beyond `nextAvail`, 0 after `maxNs` without one, -1 when the
// ring's memory changed. A busy driver posts its next request within a few
// microseconds; waiting for it on the CPU saves the two wake-ups (a kick for
// us, an interrupt for it) that sleeping costs.
static napi_value ring_spin(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  ring_t *ring = NULL;
  uint32_t next_avail, max_ns;
  if (argc < 3 || !(ring = get_ring(env, argv[0])) || napi_get_value_uint32(env, argv[1], &next_avail) != napi_ok ||
      napi_get_value_uint32(env, argv[2], &max_ns) != napi_ok) {
    napi_throw_type_error(env, NULL, "nixcas native: ringSpin(ring, nextAvail, maxNs)");
    return NULL;
  }
  if (!chunks_current(env, ring)) return make_int32(env, STALE_RING);
  const uint16_t *avail = avail_ring(ring);
  uint64_t deadline = now_ns() + max_ns;
  int found = 0;
  for (uint32_t i = 1;; i++) {
    if (__atomic_load_n(&avail[1], __ATOMIC_ACQUIRE) != (uint16_t)next_avail) {
      found = 1;
      break;
    }
    __builtin_ia32_pause();
    if (i % 64 == 0 && now_ns() >= deadline) break;
  }
  return make_int32(env, found);
}

enum { LOOP_EVENT_LOOP = 0, LOOP_FOR_JAVASCRIPT = 1, LOOP_BUSY = 2, LOOP_ROUNDS = 3, LOOP_FAILED = 4 };

// virtiofsLoop(ring, tables, kickFd, callFd, state, stats, rounds) -> why it
// returned: one request at a time, the turn through JavaScript costs more
// than the request, so this waits for the next kick itself, answers natively
// what it can, interrupts the driver as SplitQueue.notify would at the end of
// a turn, and waits again, up to `rounds` times. It returns when anything
// else the event loop watches is ready or a timer is due (0), when a chain
// is left that JavaScript must take (1), when a kick brought more than one
// chain (2: JavaScript's turn decides whether to wait on the CPU), after
// `rounds` (3), or when a system call failed (4). `state` (a Float64Array:
// nextAvail, nextUsed, signalledUsed, awaitingDriver, availAtInterrupt,
// eventIdx) is the queue's, read and written back; `stats` as virtiofsServe's.
// -1: the ring's memory changed since fastRing.
static napi_value virtiofs_loop(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  ring_t *ring = NULL;
  tables_t *t = argc == 7 ? get_tables(env, argv[1]) : NULL;
  int32_t kick_fd, call_fd;
  uint32_t rounds;
  double *state, *stats;
  if (!t || !(ring = get_ring(env, argv[0])) || napi_get_value_int32(env, argv[2], &kick_fd) != napi_ok ||
      napi_get_value_int32(env, argv[3], &call_fd) != napi_ok || !(state = float64_array(env, argv[4], 6)) ||
      !(stats = float64_array(env, argv[5], 3)) || napi_get_value_uint32(env, argv[6], &rounds) != napi_ok) {
    if (t) napi_throw_type_error(env, NULL, "nixcas native: virtiofsLoop(ring, tables, kickFd, callFd, Float64Array(6), Float64Array(3), rounds)");
    return NULL;
  }
  if (!chunks_current(env, ring)) return make_int32(env, STALE_RING);
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  queue_state_t q = {
      .next_avail = (uint16_t)state[0], .next_used = (uint16_t)state[1], .signalled_used = (uint16_t)state[2],
      .awaiting_driver = state[3] != 0, .avail_at_interrupt = (uint16_t)state[4], .event_idx = state[5] != 0,
  };
  const uint16_t *avail = avail_ring(ring);
  int why = LOOP_ROUNDS;
  for (uint32_t round = 0; round < rounds; round++) {
    struct pollfd fds[2] = {{.fd = kick_fd, .events = POLLIN}, {.fd = uv_backend_fd(loop), .events = POLLIN}};
    int n;
    do n = poll(fds, 2, uv_backend_timeout(loop));
    while (n < 0 && errno == EINTR);
    if (n < 0) {
      why = LOOP_FAILED;
      break;
    }
    if (!(fds[0].revents & POLLIN)) {
      why = LOOP_EVENT_LOOP;
      break;
    }
    uint64_t counter;
    ssize_t r;
    do r = read(kick_fd, &counter, sizeof counter);
    while (r < 0 && errno == EINTR);
    // A turn, as VhostUserBackend.take: kicks off while taking, on again and a last look.
    int32_t taken = 0;
    bool left = false;
    do {
      disable_notification(ring, &q);
      int32_t answered = serve_ring(ring, t, q.next_avail, q.next_used, UINT32_MAX, stats, NULL);
      q.next_avail += (uint16_t)answered;
      q.next_used += (uint16_t)answered;
      taken += answered;
      left = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE) != q.next_avail;
    } while (!left && enable_notification(ring, &q));
    if (left) {
      why = LOOP_FOR_JAVASCRIPT; // JavaScript's turn takes it, and interrupts at its end
      break;
    }
    if (call_fd >= 0 && wants_interrupt(ring, &q)) {
      uint64_t one = 1;
      ssize_t w;
      do w = write(call_fd, &one, sizeof one);
      while (w < 0 && errno == EINTR);
    }
    if (taken > 1) {
      why = LOOP_BUSY;
      break;
    }
  }
  state[0] = q.next_avail;
  state[1] = q.next_used;
  state[2] = q.signalled_used;
  state[3] = q.awaiting_driver;
  state[4] = q.avail_at_interrupt;
  return make_int32(env, why);
}

void virtiofs_fast_register(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"fastRing", NULL, fast_ring, NULL, NULL, NULL, napi_default, NULL},
      {"fastTables", NULL, fast_tables, NULL, NULL, NULL, napi_default, NULL},
      {"fastAttributes", NULL, fast_attributes, NULL, NULL, NULL, napi_default, NULL},
      {"fastFile", NULL, fast_file, NULL, NULL, NULL, napi_default, NULL},
      {"fastForget", NULL, fast_forget, NULL, NULL, NULL, napi_default, NULL},
      {"fastClear", NULL, fast_clear, NULL, NULL, NULL, napi_default, NULL},
      {"virtiofsServe", NULL, virtiofs_serve, NULL, NULL, NULL, napi_default, NULL},
      {"ringSpin", NULL, ring_spin, NULL, NULL, NULL, napi_default, NULL},
      {"virtiofsLoop", NULL, virtiofs_loop, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof properties[0], properties);
}
