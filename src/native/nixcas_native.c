// The few system calls Node does not offer, for the FUSE session (and, later,
// vhost-user): readiness of a file descriptor on the event loop, reads and
// gathered writes that report errno as a negative number instead of throwing,
// mount(2)/umount2(2), and receiving a file descriptor over a unix socket.
//
// Everything here is a thin wrapper: policy lives in TypeScript.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>

#define MAX_IOVECS 64

#define CHECK(call)                                                           \
  do {                                                                        \
    if ((call) != napi_ok) {                                                  \
      napi_throw_error(env, NULL, "nixcas native: " #call " failed");        \
      return NULL;                                                            \
    }                                                                         \
  } while (0)

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
} watcher_t;

static void watcher_closed(uv_handle_t *handle) {
  free(handle->data);
}

static void watcher_fired(uv_poll_t *handle, int status, int events) {
  watcher_t *w = handle->data;
  if (w->closed) return;
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

// watch(fd, callback(status, events)) -> handle. Calls back whenever fd is readable.
static napi_value watch(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd;
  if (!get_args(env, info, 2, argv) || !get_int(env, argv[0], &fd)) return NULL;
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  watcher_t *w = calloc(1, sizeof(*w));
  w->env = env;
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
  rc = uv_poll_start(&w->handle, UV_READABLE | UV_DISCONNECT, watcher_fired);
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

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"watch", NULL, watch, NULL, NULL, NULL, napi_default, NULL},
      {"unwatch", NULL, unwatch, NULL, NULL, NULL, napi_default, NULL},
      {"read", NULL, read_fd, NULL, NULL, NULL, napi_default, NULL},
      {"writev", NULL, writev_fd, NULL, NULL, NULL, napi_default, NULL},
      {"setNonBlocking", NULL, set_non_blocking, NULL, NULL, NULL, napi_default, NULL},
      {"mount", NULL, mount_fs, NULL, NULL, NULL, napi_default, NULL},
      {"umount2", NULL, umount_fs, NULL, NULL, NULL, napi_default, NULL},
      {"socketpair", NULL, socket_pair, NULL, NULL, NULL, napi_default, NULL},
      {"receiveFd", NULL, receive_fd, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
