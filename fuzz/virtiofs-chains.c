// libFuzzer target for the native virtio-fs path (src/native/virtiofs_ring.h):
// the input is a guest's memory (rings, descriptors, indirect tables and FUSE
// requests as it likes), served as virtiofsServe serves a ring, under
// AddressSanitizer. The tables answer GETATTR of nodeid 2 and READ of nodeid 3
// (a 100 000-byte memfd). Nothing outside the guest memory may be read or
// written, every walk must end, and what is put on the used ring must be a
// head of the queue with a reply's length. The notification helpers of
// virtiofsLoop run on the same rings afterwards. Built and run
// by fuzz/run.sh.
#define _GNU_SOURCE
#include <node_api.h>
#include <sys/mman.h>
#include "../src/native/virtiofs_ring.h"

// Small enough that the fuzzer fills it: the rings first, requests and tables after.
enum { MEMORY = 4096, QUEUE = 16, DESC_GPA = 0, AVAIL_GPA = 256, USED_GPA = 320, DATA_GPA = 512 };

static tables_t *tables;

static void set_up(void) {
  tables = calloc(1, sizeof *tables);
  attr_slot_t *attr = &tables->attrs[slot_of(2, ATTR_SLOTS)];
  attr->nodeid = 2;
  memset(attr->reply, 0x41, sizeof attr->reply);
  int fd = memfd_create("blob", MFD_CLOEXEC);
  static uint8_t bytes[100000];
  memset(bytes, 0x42, sizeof bytes);
  if (fd < 0 || write(fd, bytes, sizeof bytes) != (ssize_t)sizeof bytes) abort();
  file_slot_t *file = &tables->files[slot_of(3, FILE_SLOTS)];
  *file = (file_slot_t){.nodeid = 3, .size = sizeof bytes, .fd = fd};
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!tables) set_up();
  // The guest's memory, exactly MEMORY bytes (ASan sees any access past it).
  uint8_t *memory = malloc(MEMORY);
  memset(memory, 0, MEMORY);
  memcpy(memory, data, size < MEMORY ? size : MEMORY);
  chunk_t chunk = {.gpa = 0, .primary = MEMORY, .length = MEMORY, .host = memory};
  ring_t ring = {.chunks = &chunk, .chunk_count = 1, .size = QUEUE, .indirect = true, .desc_gpa = DESC_GPA, .avail_gpa = AVAIL_GPA, .used_gpa = USED_GPA};
  uint16_t avail_idx;
  memcpy(&avail_idx, memory + AVAIL_GPA + 2, 2);
  double stats[3] = {0};
  uint32_t log[2 * QUEUE];
  int32_t answered = serve_ring(&ring, tables, 0, 0, QUEUE, stats, log);
  if (answered < 0 || answered > QUEUE || (answered > 0 && (uint16_t)answered > avail_idx)) __builtin_trap();
  for (int32_t i = 0; i < answered; i++) {
    if (log[2 * i] >= QUEUE || log[2 * i + 1] < OUT_HEADER_SIZE || log[2 * i + 1] > OUT_HEADER_SIZE + MAX_READ) __builtin_trap();
  }
  // The notification helpers virtiofsLoop uses, on the same rings and a state from the input.
  queue_state_t q = {.next_avail = (uint16_t)answered, .next_used = (uint16_t)answered, .signalled_used = memory[MEMORY - 1],
                     .event_idx = memory[MEMORY - 2] & 1, .awaiting_driver = memory[MEMORY - 2] & 2};
  disable_notification(&ring, &q);
  (void)enable_notification(&ring, &q);
  (void)wants_interrupt(&ring, &q);
  free(memory);
  return 0;
}
