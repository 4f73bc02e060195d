// The few system calls Node does not offer, for the FUSE session and the
// vhost-user backend: readiness of a file descriptor on the event loop, reads
// and gathered writes that report errno as a negative number instead of
// throwing, mount(2)/umount2(2), unix sockets that carry file descriptors
// (SCM_RIGHTS), shared memory mappings (guest RAM), eventfds, sendfile(2)
// in the thread pool (file to socket without passing through user space), and
// what O_DIRECT writes need (aligned memory, a way back to buffered writes).
//
// Everything here is a thin wrapper: policy lives in TypeScript.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include "napi_check.h"
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "blake3.h"
#include "virtiofs_fast.h"

#define MAX_IOVECS 1024


static napi_value make_int(napi_env env, int64_t value) {
  napi_value result;
  napi_create_int64(env, value, &result);
  return result;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "nixcas native: too few arguments");
    return 0;
  }
  return 1;
}

static int get_int(napi_env env, napi_value value, int64_t *out) {
  if (napi_get_value_int64(env, value, out) != napi_ok) {
    napi_throw_type_error(env, NULL, "nixcas native: expected a number");
    return 0;
  }
  return 1;
}

// A NUL-terminated copy of a JS string or Buffer (paths may be any bytes); free() it.
static char *get_bytes_z(napi_env env, napi_value value) {
  bool is_buffer = false;
  napi_is_buffer(env, value, &is_buffer);
  if (is_buffer) {
    void *data;
    size_t length;
    napi_get_buffer_info(env, value, &data, &length);
    char *copy = malloc(length + 1);
    memcpy(copy, data, length);
    copy[length] = 0;
    return copy;
  }
  size_t length;
  if (napi_get_value_string_utf8(env, value, NULL, 0, &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "nixcas native: expected a string or Buffer");
    return NULL;
  }
  char *copy = malloc(length + 1);
  napi_get_value_string_utf8(env, value, copy, length + 1, &length);
  return copy;
}

// --- readiness -------------------------------------------------------------

typedef struct {
  uv_poll_t handle;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
  int closed;
  // An eventfd whose counter is read here before each call back (a kick): one system call less
  // through N-API per wake-up.
  int drain_fd;
} watcher_t;

static void watcher_closed(uv_handle_t *handle) {
  free(handle->data);
}

static void watcher_fired(uv_poll_t *handle, int status, int events) {
  watcher_t *w = handle->data;
  if (w->closed) return;
  if (w->drain_fd >= 0 && status == 0) {
    uint64_t counter;
    ssize_t n;
    do n = read(w->drain_fd, &counter, sizeof counter);
    while (n < 0 && errno == EINTR);
  }
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value callback, global, result, argv[2];
  napi_get_reference_value(env, w->callback, &callback);
  napi_get_global(env, &global);
  argv[0] = make_int(env, status);
  argv[1] = make_int(env, events);
  if (napi_make_callback(env, w->context, global, callback, 2, argv, &result) == napi_pending_exception) {
    napi_value error;
    napi_get_and_clear_last_exception(env, &error);
    napi_fatal_exception(env, error);
  }
  napi_close_handle_scope(env, scope);
}

static void watcher_stop(napi_env env, watcher_t *w) {
  if (w->closed) return;
  w->closed = 1;
  uv_poll_stop(&w->handle);
  napi_delete_reference(env, w->callback);
  napi_async_destroy(env, w->context);
  uv_close((uv_handle_t *)&w->handle, watcher_closed);
}

// watch(fd, callback(status, events), writable?, drainEventfd?) -> handle. Calls back whenever
// fd is readable (or, with writable true, writable); with drainEventfd, fd is an eventfd whose
// counter is read (reset) before each call back.
static napi_value watch(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fd;
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2) {
    napi_throw_type_error(env, NULL, "nixcas native: too few arguments");
    return NULL;
  }
  if (!get_int(env, argv[0], &fd)) return NULL;
  bool writable = false, drain = false;
  if (argc >= 3) napi_get_value_bool(env, argv[2], &writable);
  if (argc >= 4) napi_get_value_bool(env, argv[3], &drain);
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  watcher_t *w = calloc(1, sizeof(*w));
  w->env = env;
  w->drain_fd = drain ? (int)fd : -1;
  int rc = uv_poll_init(loop, &w->handle, (int)fd);
  if (rc != 0) {
    free(w);
    napi_throw_error(env, NULL, uv_strerror(rc));
    return NULL;
  }
  w->handle.data = w;
  napi_value name;
  napi_create_string_utf8(env, "nixcas.watch", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &w->context);
  napi_create_reference(env, argv[1], 1, &w->callback);
  rc = uv_poll_start(&w->handle, (writable ? UV_WRITABLE : UV_READABLE) | UV_DISCONNECT, watcher_fired);
  if (rc != 0) {
    watcher_stop(env, w);
    napi_throw_error(env, NULL, uv_strerror(rc));
    return NULL;
  }
  napi_value external;
  CHECK(napi_create_external(env, w, NULL, NULL, &external));
  return external;
}

// unwatch(handle): stops calling back; safe to call twice.
static napi_value unwatch(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  watcher_t *w;
  CHECK(napi_get_value_external(env, argv[0], (void **)&w));
  watcher_stop(env, w);
  return NULL;
}

// --- reads and writes ------------------------------------------------------

// read(fd, buffer) -> bytes read, or -errno (EAGAIN when nothing is waiting).
static napi_value read_fd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[0], &fd)) return NULL;
  void *data;
  size_t length;
  CHECK(napi_get_buffer_info(env, argv[1], &data, &length));
  ssize_t n;
  do n = read((int)fd, data, length);
  while (n < 0 && errno == EINTR);
  return make_int(env, n < 0 ? -errno : n);
}

// readCached(fd, buffer, offset, length, position) -> bytes read, or -errno; -EAGAIN when the
// data is not in the page cache (preadv2 with RWF_NOWAIT: never waits for the disk, but starts
// readahead). Saves the thread-pool round trip for reads the page cache can answer at once.
static napi_value read_cached(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t fd, offset, length, position;
  if (!get_args(env, info, 5, argv) || !get_int(env, argv[0], &fd) || !get_int(env, argv[2], &offset) ||
      !get_int(env, argv[3], &length) || !get_int(env, argv[4], &position))
    return NULL;
  void *data;
  size_t size;
  CHECK(napi_get_buffer_info(env, argv[1], &data, &size));
  if (offset < 0 || length < 0 || (size_t)(offset + length) > size || position < 0) {
    napi_throw_range_error(env, NULL, "nixcas native: readCached outside its buffer");
    return NULL;
  }
  struct iovec iov = {.iov_base = (char *)data + offset, .iov_len = (size_t)length};
  ssize_t n;
  do n = preadv2((int)fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  while (n < 0 && errno == EINTR);
  return make_int(env, n < 0 ? -errno : n);
}

#define MAX_SCATTER_BUFFERS 16

// readCachedScatter(fd, buffers[], spans: Uint32Array, count, position) -> bytes read, or -errno;
// -EAGAIN when the data is not in the page cache. Piece i is spans[3i + 2] bytes of
// buffers[spans[3i]] from spans[3i + 1]; every piece is checked to lie in its buffer. One
// preadv2(RWF_NOWAIT) into them all: a READ's bytes land straight in the guest's pages, and the
// pieces cost no JavaScript object each.
static napi_value read_cached_scatter(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t fd, count, position;
  if (!get_args(env, info, 5, argv) || !get_int(env, argv[0], &fd) || !get_int(env, argv[3], &count) ||
      !get_int(env, argv[4], &position))
    return NULL;
  uint32_t buffer_count;
  CHECK(napi_get_array_length(env, argv[1], &buffer_count));
  if (count < 0 || count > MAX_IOVECS || buffer_count > MAX_SCATTER_BUFFERS || position < 0) {
    napi_throw_range_error(env, NULL, "nixcas native: readCachedScatter with too many pieces or a negative position");
    return NULL;
  }
  char *bases[MAX_SCATTER_BUFFERS];
  size_t sizes[MAX_SCATTER_BUFFERS];
  for (uint32_t i = 0; i < buffer_count; i++) {
    napi_value element;
    void *data;
    CHECK(napi_get_element(env, argv[1], i, &element));
    CHECK(napi_get_buffer_info(env, element, &data, &sizes[i]));
    bases[i] = data;
  }
  napi_typedarray_type type;
  size_t span_words;
  void *span_data;
  CHECK(napi_get_typedarray_info(env, argv[2], &type, &span_words, &span_data, NULL, NULL));
  if (type != napi_uint32_array || span_words < (size_t)count * 3) {
    napi_throw_type_error(env, NULL, "nixcas native: readCachedScatter needs a Uint32Array of 3 words per piece");
    return NULL;
  }
  const uint32_t *spans = span_data;
  struct iovec iov[MAX_IOVECS];
  for (int64_t i = 0; i < count; i++) {
    uint32_t buffer = spans[3 * i], offset = spans[3 * i + 1], length = spans[3 * i + 2];
    if (buffer >= buffer_count || (uint64_t)offset + length > sizes[buffer]) {
      napi_throw_range_error(env, NULL, "nixcas native: readCachedScatter piece outside its buffer");
      return NULL;
    }
    iov[i].iov_base = bases[buffer] + offset;
    iov[i].iov_len = length;
  }
  ssize_t n;
  do n = preadv2((int)fd, iov, (int)count, (off_t)position, RWF_NOWAIT);
  while (n < 0 && errno == EINTR);
  return make_int(env, n < 0 ? -errno : n);
}

// waitKick(fd) -> 1 when the eventfd fd fired (its counter is read), 0 as soon as anything the
// event loop watches is ready or its next timer is due, -errno on failure. Lets a virtqueue wait
// for its next kick in poll(2) instead of through a turn of the event loop (which costs more than
// a small request itself), without holding up anything else: the loop's own epoll fd is polled too.
static napi_value wait_kick(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &fd)) return NULL;
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  struct pollfd fds[2] = {{.fd = (int)fd, .events = POLLIN}, {.fd = uv_backend_fd(loop), .events = POLLIN}};
  int n;
  do n = poll(fds, 2, uv_backend_timeout(loop));
  while (n < 0 && errno == EINTR);
  if (n < 0) return make_int(env, -errno);
  if (!(fds[0].revents & POLLIN)) return make_int(env, 0);
  uint64_t counter;
  ssize_t r;
  do r = read((int)fd, &counter, sizeof counter);
  while (r < 0 && errno == EINTR);
  return make_int(env, r == sizeof counter ? 1 : 0);
}

// signal(fd) -> 0 or -errno: adds 1 to an eventfd's counter (an interrupt to a guest, a kick).
static napi_value signal_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &fd)) return NULL;
  uint64_t one = 1;
  ssize_t n;
  do n = write((int)fd, &one, sizeof one);
  while (n < 0 && errno == EINTR);
  return make_int(env, n < 0 ? -errno : 0);
}

// writev(fd, buffers[]) -> bytes written, or -errno. One system call, so a
// reply made of several pieces reaches /dev/fuse as one message.
static napi_value writev_fd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[0], &fd)) return NULL;
  uint32_t count;
  CHECK(napi_get_array_length(env, argv[1], &count));
  if (count > MAX_IOVECS) {
    napi_throw_range_error(env, NULL, "nixcas native: too many buffers for one writev");
    return NULL;
  }
  struct iovec iov[MAX_IOVECS];
  for (uint32_t i = 0; i < count; i++) {
    napi_value element;
    CHECK(napi_get_element(env, argv[1], i, &element));
    CHECK(napi_get_buffer_info(env, element, &iov[i].iov_base, &iov[i].iov_len));
  }
  ssize_t n;
  do n = writev((int)fd, iov, (int)count);
  while (n < 0 && errno == EINTR);
  return make_int(env, n < 0 ? -errno : n);
}

// setNonBlocking(fd) -> 0 or -errno. For fds that arrive from elsewhere
// (fusermount3), which Node cannot open with O_NONBLOCK itself.
static napi_value set_non_blocking(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &fd)) return NULL;
  int flags = fcntl((int)fd, F_GETFL);
  if (flags < 0 || fcntl((int)fd, F_SETFL, flags | O_NONBLOCK) < 0) return make_int(env, -errno);
  return make_int(env, 0);
}

// widenPipe(fd, size) -> the pipe's capacity now, or -errno (-EBADF, -EPERM
// past /proc/sys/fs/pipe-max-size; an fd that is not a pipe gives -EBADF).
static napi_value widen_pipe(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd, size;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[0], &fd) || !get_int(env, argv[1], &size)) return NULL;
  int capacity = fcntl((int)fd, F_SETPIPE_SZ, (int)size);
  return make_int(env, capacity < 0 ? -errno : capacity);
}

// --- direct I/O -------------------------------------------------------------

// misalignment(buffer, alignment) -> how many bytes into `buffer` the first
// address that is a multiple of `alignment` lies (0 when it starts on one).
// O_DIRECT needs aligned memory, which JavaScript cannot ask for; a buffer a
// little larger than needed, used from that offset, is. Backing stores of
// ArrayBuffers never move, so the answer stays true.
static napi_value misalignment(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t alignment;
  void *data;
  size_t length;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[1], &alignment)) return NULL;
  CHECK(napi_get_buffer_info(env, argv[0], &data, &length));
  if (alignment <= 0) return make_int(env, 0);
  uintptr_t address = (uintptr_t)data;
  return make_int(env, (int64_t)((alignment - address % (uintptr_t)alignment) % (uintptr_t)alignment));
}

// blake3Matches(data, digest) -> whether BLAKE3(data) is the 32 bytes of
// `digest`: the check of a small blob or directory record before it is
// handed out, without making a Buffer for the digest as a hasher's binding does.
static napi_value blake3_matches(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  void *data, *expected;
  size_t length, expected_length;
  if (!get_args(env, info, 2, argv)) return NULL;
  CHECK(napi_get_buffer_info(env, argv[0], &data, &length));
  CHECK(napi_get_buffer_info(env, argv[1], &expected, &expected_length));
  uint8_t digest[BLAKE3_OUT_LEN];
  nixcas_blake3(data, length, digest);
  napi_value result;
  CHECK(napi_get_boolean(env, expected_length == BLAKE3_OUT_LEN && memcmp(digest, expected, BLAKE3_OUT_LEN) == 0, &result));
  return result;
}

// blake3ManyMatch(buffers, digests) -> the index of the first buffer whose
// BLAKE3 is not its digest, or -1: nixcas_blake3_many, which hashes many
// small inputs side by side (the C renderer's checks).
static napi_value blake3_many_match(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  uint32_t count, digest_count;
  CHECK(napi_get_array_length(env, argv[0], &count));
  CHECK(napi_get_array_length(env, argv[1], &digest_count));
  if (count != digest_count) {
    napi_throw_range_error(env, NULL, "nixcas native: blake3ManyMatch takes as many digests as buffers");
    return NULL;
  }
  int64_t mismatch = -1;
  for (uint32_t first = 0; first < count && mismatch < 0; first += NIXCAS_BLAKE3_MANY_MAX) {
    uint32_t taken = count - first < NIXCAS_BLAKE3_MANY_MAX ? count - first : NIXCAS_BLAKE3_MANY_MAX;
    const void *inputs[NIXCAS_BLAKE3_MANY_MAX];
    size_t lengths[NIXCAS_BLAKE3_MANY_MAX];
    void *expected[NIXCAS_BLAKE3_MANY_MAX];
    size_t expected_lengths[NIXCAS_BLAKE3_MANY_MAX];
    for (uint32_t i = 0; i < taken; i++) {
      napi_value buffer, digest;
      void *data;
      CHECK(napi_get_element(env, argv[0], first + i, &buffer));
      CHECK(napi_get_element(env, argv[1], first + i, &digest));
      CHECK(napi_get_buffer_info(env, buffer, &data, &lengths[i]));
      CHECK(napi_get_buffer_info(env, digest, &expected[i], &expected_lengths[i]));
      inputs[i] = data;
    }
    uint8_t found[NIXCAS_BLAKE3_MANY_MAX][BLAKE3_OUT_LEN];
    nixcas_blake3_many(inputs, lengths, taken, found);
    for (uint32_t i = 0; i < taken && mismatch < 0; i++)
      if (expected_lengths[i] != BLAKE3_OUT_LEN || memcmp(found[i], expected[i], BLAKE3_OUT_LEN) != 0) mismatch = first + i;
  }
  return make_int(env, mismatch);
}

// setDirect(fd, on) -> 0 or -errno: turns O_DIRECT on or off for an open
// file (fcntl F_SETFL), so a file can be written through the page cache at
// first and around it later, or go back when its file system refuses direct
// writes.
static napi_value set_direct(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd;
  bool on;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[0], &fd)) return NULL;
  CHECK(napi_get_value_bool(env, argv[1], &on));
  int flags = fcntl((int)fd, F_GETFL);
  if (flags < 0) return make_int(env, -errno);
  if (fcntl((int)fd, F_SETFL, on ? flags | O_DIRECT : flags & ~O_DIRECT) < 0) return make_int(env, -errno);
  return make_int(env, 0);
}

// flock(fd, exclusive, wait) -> 0, or -errno (-EWOULDBLOCK: held by another without `wait`).
// The store's GC lock (castore/backends/gc-lock.ts): writers share it, the collector takes it alone.
static napi_value flock_fd(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd;
  bool exclusive, wait;
  if (!get_args(env, info, 3, argv) || !get_int(env, argv[0], &fd)) return NULL;
  CHECK(napi_get_value_bool(env, argv[1], &exclusive));
  CHECK(napi_get_value_bool(env, argv[2], &wait));
  int r;
  do r = flock((int)fd, (exclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB));
  while (r < 0 && errno == EINTR);
  return make_int(env, r < 0 ? -errno : 0);
}

// unflock(fd) -> 0 or -errno.
static napi_value unflock_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &fd)) return NULL;
  return make_int(env, flock((int)fd, LOCK_UN) < 0 ? -errno : 0);
}

// notifySocket(path, message) -> 0 or -errno: one datagram to a unix datagram socket (systemd's
// NOTIFY_SOCKET; a leading '@' names one in the abstract namespace). Node has no unix datagrams.
static napi_value notify_socket(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  char *path = get_bytes_z(env, argv[0]);
  char *message = path ? get_bytes_z(env, argv[1]) : NULL;
  if (!path || !message) {
    free(path);
    return NULL;
  }
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  size_t length = strlen(path);
  int result = 0;
  if (length == 0 || length >= sizeof addr.sun_path) {
    result = -EINVAL;
  } else {
    memcpy(addr.sun_path, path, length);
    if (path[0] == '@') addr.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      result = -errno;
    } else {
      socklen_t size = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + length);
      ssize_t n;
      do n = sendto(fd, message, strlen(message), MSG_NOSIGNAL, (struct sockaddr *)&addr, size);
      while (n < 0 && errno == EINTR);
      if (n < 0) result = -errno;
      close(fd);
    }
  }
  free(path);
  free(message);
  return make_int(env, result);
}

// --- mounts ----------------------------------------------------------------

// mount(source, target, fstype, flags, data) -> 0 or -errno.
static napi_value mount_fs(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t flags;
  if (!get_args(env, info, 5, argv) || !get_int(env, argv[3], &flags)) return NULL;
  char *source = get_bytes_z(env, argv[0]);
  char *target = source ? get_bytes_z(env, argv[1]) : NULL;
  char *fstype = target ? get_bytes_z(env, argv[2]) : NULL;
  char *data = fstype ? get_bytes_z(env, argv[4]) : NULL;
  int rc = -EINVAL;
  if (data) rc = mount(source, target, fstype, (unsigned long)flags, data) == 0 ? 0 : -errno;
  free(source);
  free(target);
  free(fstype);
  free(data);
  return make_int(env, rc);
}

// umount2(target, flags) -> 0 or -errno.
static napi_value umount_fs(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t flags;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[1], &flags)) return NULL;
  char *target = get_bytes_z(env, argv[0]);
  if (!target) return NULL;
  int rc = umount2(target, (int)flags) == 0 ? 0 : -errno;
  free(target);
  return make_int(env, rc);
}

// --- file descriptors over unix sockets ------------------------------------

// socketpair() -> [fd, fd] (AF_UNIX stream, close-on-exec) or -errno.
static napi_value socket_pair(napi_env env, napi_callback_info info) {
  (void)info;
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return make_int(env, -errno);
  napi_value result;
  CHECK(napi_create_array_with_length(env, 2, &result));
  napi_set_element(env, result, 0, make_int(env, fds[0]));
  napi_set_element(env, result, 1, make_int(env, fds[1]));
  return result;
}

// receiveFd(socket) -> the fd passed with SCM_RIGHTS, or -errno (-ECONNRESET when
// the peer closed without sending one). Blocks.
static napi_value receive_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t sock;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &sock)) return NULL;
  char byte;
  struct iovec iov = {.iov_base = &byte, .iov_len = 1};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int))];
  } control;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof(control.buf)};
  ssize_t n;
  do n = recvmsg((int)sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) return make_int(env, -errno);
  struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
  if (n == 0 || !cmsg || cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) return make_int(env, -ECONNRESET);
  int fd;
  memcpy(&fd, CMSG_DATA(cmsg), sizeof(fd));
  return make_int(env, fd);
}

// --- unix sockets that carry file descriptors (vhost-user) -----------------

#define MAX_FDS 32

static int unix_address(napi_env env, napi_value value, struct sockaddr_un *address) {
  char *path = get_bytes_z(env, value);
  if (!path) return 0;
  memset(address, 0, sizeof(*address));
  address->sun_family = AF_UNIX;
  size_t length = strlen(path);
  if (length >= sizeof(address->sun_path)) {
    free(path);
    napi_throw_range_error(env, NULL, "nixcas native: unix socket path longer than 107 bytes");
    return 0;
  }
  memcpy(address->sun_path, path, length);
  free(path);
  return 1;
}

// `fd` if `ok`; otherwise closes it and returns -errno of the call that failed.
static napi_value fd_or_errno(napi_env env, int fd, int ok) {
  if (ok) return make_int(env, fd);
  int error = errno;
  close(fd);
  return make_int(env, -error);
}

// listenUnix(path) -> listening fd (non-blocking, close-on-exec) or -errno.
static napi_value listen_unix(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un address;
  if (!get_args(env, info, 1, argv) || !unix_address(env, argv[0], &address)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_int(env, -errno);
  return fd_or_errno(env, fd, bind(fd, (struct sockaddr *)&address, sizeof(address)) == 0 && listen(fd, 16) == 0);
}

// connectUnix(path) -> connected fd (blocking, close-on-exec) or -errno.
static napi_value connect_unix(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un address;
  if (!get_args(env, info, 1, argv) || !unix_address(env, argv[0], &address)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_int(env, -errno);
  int rc;
  do rc = connect(fd, (struct sockaddr *)&address, sizeof(address));
  while (rc != 0 && errno == EINTR);
  return fd_or_errno(env, fd, rc == 0);
}

// accept(fd) -> connected fd (non-blocking, close-on-exec) or -errno (-EAGAIN: nobody waiting).
static napi_value accept_unix(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &fd)) return NULL;
  int client;
  do client = accept4((int)fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  while (client < 0 && errno == EINTR);
  return make_int(env, client < 0 ? -errno : client);
}

// recvmsg(fd, buffer) -> [bytes or -errno, ...fds received with them (close-on-exec)].
// Fds that do not fit are closed by the kernel (MSG_CTRUNC), reported as -EMSGSIZE.
static napi_value recvmsg_fds(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[0], &fd)) return NULL;
  void *data;
  size_t length;
  CHECK(napi_get_buffer_info(env, argv[1], &data, &length));
  struct iovec iov = {.iov_base = data, .iov_len = length};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
  } control;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof(control.buf)};
  ssize_t n;
  do n = recvmsg((int)fd, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) n = -errno;
  napi_value result;
  CHECK(napi_create_array(env, &result));
  uint32_t count = 0;
  if (n >= 0) {
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
      if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
      size_t fds = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < fds; i++) {
        int received;
        memcpy(&received, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
        napi_set_element(env, result, ++count, make_int(env, received));
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) n = -EMSGSIZE;
  }
  napi_set_element(env, result, 0, make_int(env, n));
  return result;
}

// sendmsg(fd, buffers[], fds[]) -> bytes sent or -errno; the fds travel with the first byte.
static napi_value sendmsg_fds(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd;
  if (!get_args(env, info, 3, argv) || !get_int(env, argv[0], &fd)) return NULL;
  uint32_t count, fd_count;
  CHECK(napi_get_array_length(env, argv[1], &count));
  CHECK(napi_get_array_length(env, argv[2], &fd_count));
  if (count > MAX_IOVECS || fd_count > MAX_FDS) {
    napi_throw_range_error(env, NULL, "nixcas native: too many buffers or fds for one sendmsg");
    return NULL;
  }
  struct iovec iov[MAX_IOVECS];
  for (uint32_t i = 0; i < count; i++) {
    napi_value element;
    CHECK(napi_get_element(env, argv[1], i, &element));
    CHECK(napi_get_buffer_info(env, element, &iov[i].iov_base, &iov[i].iov_len));
  }
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
  } control;
  memset(&control, 0, sizeof(control));
  struct msghdr msg = {.msg_iov = iov, .msg_iovlen = count};
  if (fd_count > 0) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fd_count);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fd_count);
    for (uint32_t i = 0; i < fd_count; i++) {
      napi_value element;
      int64_t value;
      CHECK(napi_get_element(env, argv[2], i, &element));
      if (!get_int(env, element, &value)) return NULL;
      int one = (int)value;
      memcpy(CMSG_DATA(cmsg) + i * sizeof(int), &one, sizeof(int));
    }
  }
  ssize_t n;
  do n = sendmsg((int)fd, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  return make_int(env, n < 0 ? -errno : n);
}

// --- shared memory (guest RAM) and eventfds ---------------------------------

typedef struct {
  void *address;
  size_t length;
  int mapped;
} mapping_t;

static void mapping_finalize(napi_env env, void *data, void *hint) {
  mapping_t *m = hint;
  if (m->mapped) munmap(m->address, m->length);
  free(m);
}

// mmap(fd, length, offset, writable) -> ArrayBuffer over a MAP_SHARED mapping, or -errno.
// munmap(buffer) releases it at once; otherwise the garbage collector does.
static napi_value mmap_fd(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fd, length, offset;
  bool writable;
  if (!get_args(env, info, 4, argv) || !get_int(env, argv[0], &fd) || !get_int(env, argv[1], &length) ||
      !get_int(env, argv[2], &offset))
    return NULL;
  CHECK(napi_get_value_bool(env, argv[3], &writable));
  if (length <= 0 || offset < 0) return make_int(env, -EINVAL);
  int protection = PROT_READ | (writable ? PROT_WRITE : 0);
  void *address = mmap(NULL, (size_t)length, protection, MAP_SHARED | MAP_NORESERVE, (int)fd, (off_t)offset);
  if (address == MAP_FAILED) return make_int(env, -errno);
  mapping_t *m = malloc(sizeof(*m));
  m->address = address;
  m->length = (size_t)length;
  m->mapped = 1;
  napi_value buffer;
  if (napi_create_external_arraybuffer(env, address, (size_t)length, mapping_finalize, m, &buffer) != napi_ok) {
    // The finalizer has run already (and freed `m`).
    napi_throw_error(env, NULL, "nixcas native: cannot wrap a mapping in an ArrayBuffer");
    return NULL;
  }
  napi_wrap(env, buffer, m, NULL, NULL, NULL);
  return buffer;
}

// munmap(buffer): unmaps a buffer from mmap() now and detaches it (its length becomes 0).
static napi_value munmap_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  mapping_t *m;
  if (napi_unwrap(env, argv[0], (void **)&m) != napi_ok) {
    napi_throw_type_error(env, NULL, "nixcas native: munmap of a buffer mmap() did not make");
    return NULL;
  }
  // Detaching frees the backing store, whose finalizer frees `m`: unmap first.
  CHECK(napi_remove_wrap(env, argv[0], NULL));
  munmap(m->address, m->length);
  m->mapped = 0;
  CHECK(napi_detach_arraybuffer(env, argv[0]));
  return NULL;
}

// mappingsOf(path) -> [start, end, …] of this process's shared mappings of
// the file at `path` (as /proc/self/maps names it), or -errno. Reading
// /proc/self/maps costs ~150 µs in a process as big as node: callers keep
// the answer and check it with releaseMapping.
static napi_value mappings_of(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  char *path = get_bytes_z(env, argv[0]);
  if (!path) return NULL;
  int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  enum { TEXT_SIZE = 64 * 1024 };
  char *text = fd < 0 ? NULL : malloc(TEXT_SIZE);
  if (!text) {
    int error = fd < 0 ? errno : ENOMEM;
    if (fd >= 0) close(fd);
    free(path);
    return make_int(env, -error);
  }
  napi_value result;
  CHECK(napi_create_array(env, &result));
  uint32_t found = 0;
  size_t path_length = strlen(path);
  // Whole lines are parsed out of `text`; a line cut by the buffer's end is moved to its start.
  size_t held = 0;
  for (;;) {
    ssize_t n;
    do n = read(fd, text + held, TEXT_SIZE - 1 - held);
    while (n < 0 && errno == EINTR);
    if (n <= 0) break;
    held += (size_t)n;
    char *line = text;
    char *newline;
    while ((newline = memchr(line, '\n', held - (size_t)(line - text)))) {
      *newline = 0;
      size_t length = (size_t)(newline - line);
      // "start-end perms offset dev inode   path": the path is the line's tail.
      if (length > path_length && line[length - path_length - 1] == ' ' && memcmp(line + length - path_length, path, path_length) == 0) {
        char *cursor;
        unsigned long start = strtoul(line, &cursor, 16);
        unsigned long end = *cursor == '-' ? strtoul(cursor + 1, &cursor, 16) : 0;
        // Only a shared mapping: dropping a private one's pages would lose what was written to them.
        if (*cursor == ' ' && cursor[4] == 's' && end > start) {
          napi_value bound;
          CHECK(napi_create_double(env, (double)start, &bound));
          CHECK(napi_set_element(env, result, found++, bound));
          CHECK(napi_create_double(env, (double)end, &bound));
          CHECK(napi_set_element(env, result, found++, bound));
        }
      }
      line = newline + 1;
    }
    held -= (size_t)(line - text);
    memmove(text, line, held);
    if (held == TEXT_SIZE - 1) held = 0; // a line longer than the buffer names no path we look for
  }
  close(fd);
  free(text);
  free(path);
  return result;
}

// releaseMapping(path, start, end) -> bytes whose pages were dropped from
// this process (madvise MADV_DONTNEED), or -ESTALE when [start, end) is not
// (any longer) one mapping of the file at `path`, which /proc/self/map_files
// tells in one readlink. For a shared mapping of a file this only takes the
// pages out of the process: they stay in the page cache, and the next access
// maps them again.
static napi_value release_mapping(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t start, end;
  if (!get_args(env, info, 3, argv) || !get_int(env, argv[1], &start) || !get_int(env, argv[2], &end)) return NULL;
  char *path = get_bytes_z(env, argv[0]);
  if (!path) return NULL;
  char link[64];
  snprintf(link, sizeof link, "/proc/self/map_files/%" PRIx64 "-%" PRIx64, (uint64_t)start, (uint64_t)end);
  size_t path_length = strlen(path);
  char *target = malloc(path_length + 2);
  ssize_t n = target ? readlink(link, target, path_length + 2) : -1;
  bool same = n == (ssize_t)path_length && memcmp(target, path, path_length) == 0;
  free(target);
  free(path);
  if (!same || end <= start) return make_int(env, -ESTALE);
  if (madvise((void *)(uintptr_t)start, (size_t)(end - start), MADV_DONTNEED) != 0) return make_int(env, -errno);
  return make_int(env, end - start);
}

// eventfd() -> a non-blocking, close-on-exec eventfd, or -errno.
static napi_value event_fd(napi_env env, napi_callback_info info) {
  (void)info;
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  return make_int(env, fd < 0 ? -errno : fd);
}

// memfd(name, size) -> a close-on-exec memfd of `size` bytes, or -errno (front ends in tests).
static napi_value memfd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t size;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[1], &size)) return NULL;
  char *name = get_bytes_z(env, argv[0]);
  if (!name) return NULL;
  int fd = memfd_create(name, MFD_CLOEXEC);
  free(name);
  if (fd < 0) return make_int(env, -errno);
  return fd_or_errno(env, fd, ftruncate(fd, (off_t)size) == 0);
}

// exec(path, argv[]) -> -errno; on success it does not return: the process becomes `path`
// (same pid, environment and open fds without close-on-exec).
static napi_value exec_process(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  uint32_t count;
  CHECK(napi_get_array_length(env, argv[1], &count));
  char *path = get_bytes_z(env, argv[0]);
  if (!path) return NULL;
  char **args = calloc(count + 1, sizeof(char *));
  for (uint32_t i = 0; i < count; i++) {
    napi_value element;
    CHECK(napi_get_element(env, argv[1], i, &element));
    args[i] = get_bytes_z(env, element);
    if (!args[i]) return NULL;
  }
  // Node marks its stdio close-on-exec; the new image must keep them, and the sockets systemd
  // handed over (socket activation: fds 3 and up, LISTEN_PID being this process, which exec keeps).
  int keep = 2;
  const char *listen_pid = getenv("LISTEN_PID"), *listen_fds = getenv("LISTEN_FDS");
  if (listen_pid && listen_fds && atol(listen_pid) == (long)getpid()) {
    long count = atol(listen_fds);
    if (count > 0 && count < 1024) keep = 2 + (int)count;
  }
  for (int fd = 0; fd <= keep; fd++) {
    int flags = fcntl(fd, F_GETFD);
    if (flags >= 0) fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
  }
  execv(path, args);
  int error = errno;
  for (uint32_t i = 0; i < count; i++) free(args[i]);
  free(args);
  free(path);
  return make_int(env, -error);
}

// --- sendfile in the thread pool ---------------------------------------------

// sendfileAsync(outFd, inFd, offset, count, callback(result)): sendfile(2)
// from inFd at offset to outFd (a socket, pipe, file or /dev/null) on a libuv
// worker thread, so reading the file from disk never blocks the event loop;
// waiting for a full non-blocking outFd stays on the event loop (the worker
// returns at EAGAIN). result: bytes sent (> 0), 0 at the end of inFd, or -errno
// (-EAGAIN: the socket is full and nothing was sent).
typedef struct {
  napi_async_work work;
  napi_ref callback;
  int out_fd, in_fd;
  off_t offset;
  size_t count;
  int64_t result;
} sendfile_job_t;

static void sendfile_execute(napi_env env, void *data) {
  (void)env;
  sendfile_job_t *job = data;
  size_t sent = 0;
  int error = 0;
  while (sent < job->count) {
    ssize_t n = sendfile(job->out_fd, job->in_fd, &job->offset, job->count - sent);
    if (n > 0) {
      sent += (size_t)n;
      continue;
    }
    if (n == 0) break;
    if (errno == EINTR) continue;
    error = errno;
    break;
  }
  job->result = sent > 0 ? (int64_t)sent : -(int64_t)error;
}

static void sendfile_complete(napi_env env, napi_status status, void *data) {
  sendfile_job_t *job = data;
  napi_value callback, global, argv[1], ignored;
  napi_get_reference_value(env, job->callback, &callback);
  napi_get_global(env, &global);
  argv[0] = make_int(env, status == napi_ok ? job->result : -ECANCELED);
  napi_call_function(env, global, callback, 1, argv, &ignored);
  napi_delete_reference(env, job->callback);
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value sendfile_async(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t out_fd, in_fd, offset, count;
  if (!get_args(env, info, 5, argv) || !get_int(env, argv[0], &out_fd) || !get_int(env, argv[1], &in_fd) ||
      !get_int(env, argv[2], &offset) || !get_int(env, argv[3], &count))
    return NULL;
  if (offset < 0 || count < 0) {
    napi_throw_range_error(env, NULL, "nixcas native: sendfileAsync with a negative offset or count");
    return NULL;
  }
  sendfile_job_t *job = calloc(1, sizeof(*job));
  job->out_fd = (int)out_fd;
  job->in_fd = (int)in_fd;
  job->offset = (off_t)offset;
  job->count = (size_t)count;
  napi_value name;
  napi_create_string_utf8(env, "nixcas.sendfile", NAPI_AUTO_LENGTH, &name);
  CHECK(napi_create_reference(env, argv[4], 1, &job->callback));
  CHECK(napi_create_async_work(env, NULL, name, sendfile_execute, sendfile_complete, job, &job->work));
  CHECK(napi_queue_async_work(env, job->work));
  return NULL;
}

// dup(fd) -> a new close-on-exec descriptor for the same open file, or -errno.
static napi_value dup_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_int(env, argv[0], &fd)) return NULL;
  int copy = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
  return make_int(env, copy < 0 ? -errno : copy);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"watch", NULL, watch, NULL, NULL, NULL, napi_default, NULL},
      {"unwatch", NULL, unwatch, NULL, NULL, NULL, napi_default, NULL},
      {"read", NULL, read_fd, NULL, NULL, NULL, napi_default, NULL},
      {"writev", NULL, writev_fd, NULL, NULL, NULL, napi_default, NULL},
      {"readCached", NULL, read_cached, NULL, NULL, NULL, napi_default, NULL},
      {"readCachedScatter", NULL, read_cached_scatter, NULL, NULL, NULL, napi_default, NULL},
      {"signal", NULL, signal_fd, NULL, NULL, NULL, napi_default, NULL},
      {"waitKick", NULL, wait_kick, NULL, NULL, NULL, napi_default, NULL},
      {"setNonBlocking", NULL, set_non_blocking, NULL, NULL, NULL, napi_default, NULL},
      {"widenPipe", NULL, widen_pipe, NULL, NULL, NULL, napi_default, NULL},
      {"misalignment", NULL, misalignment, NULL, NULL, NULL, napi_default, NULL},
      {"blake3Matches", NULL, blake3_matches, NULL, NULL, NULL, napi_default, NULL},
      {"blake3ManyMatch", NULL, blake3_many_match, NULL, NULL, NULL, napi_default, NULL},
      {"setDirect", NULL, set_direct, NULL, NULL, NULL, napi_default, NULL},
      {"flock", NULL, flock_fd, NULL, NULL, NULL, napi_default, NULL},
      {"notifySocket", NULL, notify_socket, NULL, NULL, NULL, napi_default, NULL},
      {"unflock", NULL, unflock_fd, NULL, NULL, NULL, napi_default, NULL},
      {"mount", NULL, mount_fs, NULL, NULL, NULL, napi_default, NULL},
      {"umount2", NULL, umount_fs, NULL, NULL, NULL, napi_default, NULL},
      {"socketpair", NULL, socket_pair, NULL, NULL, NULL, napi_default, NULL},
      {"receiveFd", NULL, receive_fd, NULL, NULL, NULL, napi_default, NULL},
      {"listenUnix", NULL, listen_unix, NULL, NULL, NULL, napi_default, NULL},
      {"connectUnix", NULL, connect_unix, NULL, NULL, NULL, napi_default, NULL},
      {"accept", NULL, accept_unix, NULL, NULL, NULL, napi_default, NULL},
      {"recvmsg", NULL, recvmsg_fds, NULL, NULL, NULL, napi_default, NULL},
      {"sendmsg", NULL, sendmsg_fds, NULL, NULL, NULL, napi_default, NULL},
      {"mmap", NULL, mmap_fd, NULL, NULL, NULL, napi_default, NULL},
      {"munmap", NULL, munmap_buffer, NULL, NULL, NULL, napi_default, NULL},
      {"eventfd", NULL, event_fd, NULL, NULL, NULL, napi_default, NULL},
      {"mappingsOf", NULL, mappings_of, NULL, NULL, NULL, napi_default, NULL},
      {"releaseMapping", NULL, release_mapping, NULL, NULL, NULL, napi_default, NULL},
      {"memfd", NULL, memfd, NULL, NULL, NULL, napi_default, NULL},
      {"exec", NULL, exec_process, NULL, NULL, NULL, napi_default, NULL},
      {"sendfileAsync", NULL, sendfile_async, NULL, NULL, NULL, napi_default, NULL},
      {"dup", NULL, dup_fd, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props));
  virtiofs_fast_register(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
