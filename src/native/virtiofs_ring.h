// The native virtio-fs path's core (see virtiofs_fast.c): guest memory
// translation, chain walking and answering, with no N-API, so that the fuzz
// target (fuzz/virtiofs-chains.c) runs exactly this code.
#ifndef NIXCAS_VIRTIOFS_RING_H
#define NIXCAS_VIRTIOFS_RING_H

#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum {
  DESC_F_NEXT = 1,
  DESC_F_WRITE = 2,
  DESC_F_INDIRECT = 4,
  DESC_SIZE = 16,
  // FUSE (include/uapi/linux/fuse.h)
  FUSE_GETATTR = 3,
  FUSE_READ = 15,
  IN_HEADER_SIZE = 40,
  OUT_HEADER_SIZE = 16,
  GETATTR_IN_SIZE = 16,
  READ_IN_MIN = 24,
  ATTR_REPLY_SIZE = OUT_HEADER_SIZE + 104,
  // The largest READ answered (as fuse/protocol.ts's MAX_READ).
  MAX_READ = 1024 * 1024 + 4096,
  // Readable bytes of a request answered here (GETATTR and READ are 56 and 80).
  MAX_REQUEST = 128,
  MAX_WRITABLE = 1024,
  // As JavaScript's walk (one contiguous piece of at most 1 MiB): 65536 descriptors.
  MAX_INDIRECT_TABLE = 1024 * 1024,
  ATTR_SLOTS = 4096,
  FILE_SLOTS = 256,
};

/** One mapping of guest memory: `primary` bytes from `gpa` start in it, `length` are mapped (chunks overlap). */
typedef struct {
  uint64_t gpa;
  uint64_t primary;
  uint64_t length;
  uint8_t *host;
  napi_ref buffer;
} chunk_t;

typedef struct {
  chunk_t *chunks;
  uint32_t chunk_count;
  uint32_t size;
  bool indirect;
  uint64_t desc_gpa, avail_gpa, used_gpa;
} ring_t;

typedef struct {
  uint64_t nodeid; // 0: empty
  uint8_t reply[ATTR_REPLY_SIZE - OUT_HEADER_SIZE];
} attr_slot_t;

typedef struct {
  uint64_t nodeid; // 0: empty
  uint64_t size;
  int fd;
} file_slot_t;

typedef struct {
  attr_slot_t attrs[ATTR_SLOTS];
  file_slot_t files[FILE_SLOTS];
} tables_t;

typedef struct {
  uint8_t request[MAX_REQUEST];
  uint32_t request_length;
  struct iovec writable[MAX_WRITABLE];
  uint32_t writable_count;
  uint64_t writable_length;
} chain_t;

/** Host address of `length` bytes at guest address `gpa`, or NULL when they are not all in one mapping. */
static uint8_t *translate(const ring_t *ring, uint64_t gpa, uint64_t length) {
  for (uint32_t i = 0; i < ring->chunk_count; i++) {
    const chunk_t *c = &ring->chunks[i];
    if (gpa < c->gpa) continue;
    uint64_t at = gpa - c->gpa;
    if (at < c->primary && length <= c->length - at) return c->host + at;
  }
  return NULL;
}

static uint32_t slot_of(uint64_t nodeid, uint32_t slots) {
  return (uint32_t)((nodeid * 0x9E3779B97F4A7C15ull) >> 40) & (slots - 1);
}

static void drop_file(file_slot_t *slot) {
  if (slot->nodeid) close(slot->fd);
  slot->nodeid = 0;
}

static void tables_clear(tables_t *t) {
  for (uint32_t i = 0; i < ATTR_SLOTS; i++) t->attrs[i].nodeid = 0;
  for (uint32_t i = 0; i < FILE_SLOTS; i++) drop_file(&t->files[i]);
}

static uint16_t load16(const uint8_t *p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

static uint32_t load32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

static uint64_t load64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

/** Walks the chain from `head` (bounded as virtqueue.ts's walk); false for anything this path leaves to JavaScript. */
static bool walk(const ring_t *ring, uint16_t head, chain_t *chain) {
  const uint8_t *table = translate(ring, ring->desc_gpa, (uint64_t)DESC_SIZE * ring->size);
  uint32_t table_size = ring->size, index = head, seen = 0;
  bool in_indirect = false;
  chain->request_length = 0;
  chain->writable_count = 0;
  chain->writable_length = 0;
  for (;;) {
    if (!table || index >= table_size || ++seen > table_size) return false;
    const uint8_t *d = table + (size_t)index * DESC_SIZE;
    uint64_t address = load64(d);
    uint32_t length = load32(d + 8);
    uint16_t flags = load16(d + 12);
    if (flags & DESC_F_INDIRECT) {
      if (!ring->indirect || in_indirect || (flags & DESC_F_NEXT) || length == 0 || length % DESC_SIZE || length > MAX_INDIRECT_TABLE) return false;
      table = translate(ring, address, length);
      table_size = length / DESC_SIZE;
      in_indirect = true;
      index = 0;
      seen = 0;
      continue;
    }
    uint8_t *host = translate(ring, address, length);
    if (!host) return false;
    if (flags & DESC_F_WRITE) {
      if (chain->writable_count == MAX_WRITABLE) return false;
      chain->writable[chain->writable_count++] = (struct iovec){host, length};
      chain->writable_length += length;
    } else {
      if (chain->writable_count > 0 || length > MAX_REQUEST - chain->request_length) return false;
      memcpy(chain->request + chain->request_length, host, length);
      chain->request_length += length;
    }
    if (!(flags & DESC_F_NEXT)) return true;
    index = load16(d + 14);
  }
}

/** Copies `length` bytes into the writable part at `offset` (the caller checked they fit). */
static void write_at(chain_t *chain, uint64_t offset, const uint8_t *bytes, uint64_t length) {
  for (uint32_t i = 0; i < chain->writable_count && length > 0; i++) {
    uint64_t size = chain->writable[i].iov_len;
    if (offset >= size) {
      offset -= size;
      continue;
    }
    uint64_t take = size - offset < length ? size - offset : length;
    memcpy((uint8_t *)chain->writable[i].iov_base + offset, bytes, take);
    bytes += take;
    length -= take;
    offset = 0;
  }
}

/** The writable bytes [offset, offset + length) as iovecs; how many, or -1 when they are too many. */
static int writable_iovecs(const chain_t *chain, uint64_t offset, uint64_t length, struct iovec *out, int max) {
  int count = 0;
  for (uint32_t i = 0; i < chain->writable_count && length > 0; i++) {
    uint64_t size = chain->writable[i].iov_len;
    if (offset >= size) {
      offset -= size;
      continue;
    }
    if (count == max) return -1;
    uint64_t take = size - offset < length ? size - offset : length;
    out[count++] = (struct iovec){(uint8_t *)chain->writable[i].iov_base + offset, take};
    length -= take;
    offset = 0;
  }
  return count;
}

static void out_header(uint8_t header[OUT_HEADER_SIZE], uint32_t length, uint64_t unique) {
  memcpy(header, &length, 4);
  memset(header + 4, 0, 4);
  memcpy(header + 8, &unique, 8);
}

/** Answers the chain if it is a request this path takes; the reply's length, or -1 (left to JavaScript, nothing written that matters). */
static int64_t answer(tables_t *t, chain_t *chain, double *stats) {
  const uint8_t *request = chain->request;
  if (chain->request_length < IN_HEADER_SIZE || load32(request) != chain->request_length) return -1;
  uint32_t opcode = load32(request + 4);
  uint64_t unique = load64(request + 8), nodeid = load64(request + 16);
  uint8_t header[OUT_HEADER_SIZE];
  if (opcode == FUSE_GETATTR) {
    if (chain->request_length < IN_HEADER_SIZE + GETATTR_IN_SIZE || chain->writable_length < ATTR_REPLY_SIZE || nodeid == 0) return -1;
    const attr_slot_t *slot = &t->attrs[slot_of(nodeid, ATTR_SLOTS)];
    if (slot->nodeid != nodeid) return -1;
    out_header(header, ATTR_REPLY_SIZE, unique);
    write_at(chain, 0, header, OUT_HEADER_SIZE);
    write_at(chain, OUT_HEADER_SIZE, slot->reply, sizeof slot->reply);
    stats[0]++;
    return ATTR_REPLY_SIZE;
  }
  if (opcode == FUSE_READ) {
    if (chain->request_length < IN_HEADER_SIZE + READ_IN_MIN || nodeid == 0) return -1;
    const uint8_t *args = request + IN_HEADER_SIZE;
    uint64_t handle = load64(args), position = load64(args + 8);
    uint32_t size = load32(args + 16);
    if (handle != 0 || size > MAX_READ || chain->writable_length < (uint64_t)OUT_HEADER_SIZE + size) return -1;
    file_slot_t *file = &t->files[slot_of(nodeid, FILE_SLOTS)];
    if (file->nodeid != nodeid) return -1;
    uint64_t wanted = position >= file->size ? 0 : file->size - position < size ? file->size - position : size;
    if (wanted > 0) {
      struct iovec pieces[MAX_WRITABLE];
      int count = writable_iovecs(chain, OUT_HEADER_SIZE, wanted, pieces, MAX_WRITABLE);
      if (count < 0) return -1;
      // Only a whole answer from the page cache: anything else (not cached, a short
      // file, an error) JavaScript reads again, and reports.
      ssize_t n = preadv2(file->fd, pieces, count, (off_t)position, RWF_NOWAIT);
      // A file system without RWF_NOWAIT will never answer here: stop trying this file.
      if (n < 0 && errno == EOPNOTSUPP) drop_file(file);
      if (n < 0 || (uint64_t)n != wanted) return -1;
    }
    out_header(header, OUT_HEADER_SIZE + (uint32_t)wanted, unique);
    write_at(chain, 0, header, OUT_HEADER_SIZE);
    stats[1]++;
    stats[2] += (double)wanted;
    return OUT_HEADER_SIZE + (int64_t)wanted;
  }
  return -1;
}

/** The avail and used rings (translated when the ring was made: never NULL). */
static uint16_t *avail_ring(const ring_t *ring) {
  return (uint16_t *)translate(ring, ring->avail_gpa, 2 * (3 + (uint64_t)ring->size));
}

static uint16_t *used_ring(const ring_t *ring) {
  return (uint16_t *)translate(ring, ring->used_gpa, 6 + 8 * (uint64_t)ring->size);
}

/**
 * virtiofsServe's work, on a ring whose memory is current: the count of
 * chains answered. `log` (NULL but in the fuzz target) gets each one's head
 * and used length, as the guest's own ring may be overwritten by a reply.
 */
static int32_t serve_ring(const ring_t *ring, tables_t *t, uint32_t next_avail, uint32_t next_used, uint32_t max, double *stats, uint32_t *log) {
  uint16_t *avail = avail_ring(ring);
  uint8_t *used = (uint8_t *)used_ring(ring);
  uint16_t *used_idx = (uint16_t *)(used + 2);
  uint32_t mask = ring->size - 1;
  uint16_t taken = (uint16_t)next_avail, put = (uint16_t)next_used;
  // Acquire: the ring entries and descriptors are read after the index that covers them.
  uint16_t avail_idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
  int32_t answered = 0;
  static chain_t chain; // one thread (the event loop's) serves rings: 16 KiB kept off its stack
  if ((uint16_t)(avail_idx - taken) > ring->size) avail_idx = taken; // bogus: JavaScript says so
  while (taken != avail_idx && (uint32_t)answered < max) {
    uint16_t head = __atomic_load_n(&avail[2 + (taken & mask)], __ATOMIC_RELAXED);
    if (head >= ring->size || !walk(ring, head, &chain)) break;
    int64_t length = answer(t, &chain, stats);
    if (length < 0) break;
    uint8_t *element = used + 4 + 8 * (size_t)(put & mask);
    uint32_t id = head, written = (uint32_t)length;
    memcpy(element, &id, 4);
    memcpy(element + 4, &written, 4);
    if (log) {
      log[2 * answered] = id;
      log[2 * answered + 1] = written;
    }
    taken++;
    put++;
    answered++;
    // Release: the element (and the reply) before the index that publishes it.
    __atomic_store_n(used_idx, put, __ATOMIC_RELEASE);
  }
  // A full fence between publishing used.idx and the caller reading whether to interrupt.
  if (answered) __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return answered;
}

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

enum { AVAIL_F_NO_INTERRUPT = 1, USED_F_NO_NOTIFY = 1 };

/** What SplitQueue keeps of a ring's progress, handed to virtiofsLoop and back (its order). */
typedef struct {
  uint16_t next_avail, next_used, signalled_used, avail_at_interrupt;
  bool awaiting_driver, event_idx;
} queue_state_t;

/** SplitQueue.disableNotification: no kicks while chains are being taken anyway. */
static void disable_notification(const ring_t *ring, const queue_state_t *q) {
  if (!q->event_idx) __atomic_store_n(&used_ring(ring)[0], USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
}

/** SplitQueue.enableNotification: kicks wanted again; true when chains arrived meanwhile. */
static bool enable_notification(const ring_t *ring, const queue_state_t *q) {
  uint16_t *used = used_ring(ring);
  if (q->event_idx) __atomic_store_n(&used[2 + 4 * ring->size], q->next_avail, __ATOMIC_SEQ_CST);
  else __atomic_store_n(&used[0], 0, __ATOMIC_SEQ_CST);
  return __atomic_load_n(&avail_ring(ring)[1], __ATOMIC_ACQUIRE) != q->next_avail;
}

/** SplitQueue.notify(false), the end of a turn: whether to interrupt the driver now (and the state updated as if it was). */
static bool wants_interrupt(const ring_t *ring, queue_state_t *q) {
  if (q->signalled_used == q->next_used) return false;
  const uint16_t *avail = avail_ring(ring);
  uint16_t old = q->signalled_used, now = q->next_used;
  if (q->event_idx) {
    q->signalled_used = now;
    uint16_t used_event = __atomic_load_n(&avail[2 + ring->size], __ATOMIC_ACQUIRE);
    if ((uint16_t)(now - used_event - 1) >= (uint16_t)(now - old)) return false;
  } else {
    if (__atomic_load_n(&avail[0], __ATOMIC_ACQUIRE) & AVAIL_F_NO_INTERRUPT) {
      q->awaiting_driver = false; // it is reaping: it looks at used.idx again before it enables interrupts
      return false;
    }
    q->signalled_used = now;
  }
  q->awaiting_driver = true;
  q->avail_at_interrupt = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
  return true;
}

#endif
