// What the N-API functions of the addons share (nixcas_native.c, virtiofs_fast.c, zstd.c).
// An addon may define NAPI_CHECK_PREFIX before including this, to name itself in the message.
#ifndef NIXCAS_NAPI_CHECK_H
#define NIXCAS_NAPI_CHECK_H

#include <node_api.h>

#ifndef NAPI_CHECK_PREFIX
#define NAPI_CHECK_PREFIX "nixcas native: "
// Declares `napi_value argv[want]` with the call's arguments; throws a type error naming the call
// (`usage`, e.g. "feed(handle, chunks)") and returns NULL when it has fewer.
#define CHECK_ARGS(want, usage)                                                               \
  napi_value argv[want];                                                                      \
  do {                                                                                        \
    size_t argc_ = (want);                                                                    \
    if (napi_get_cb_info(env, info, &argc_, argv, NULL, NULL) != napi_ok || argc_ < (want)) { \
      napi_throw_type_error(env, NULL, NAPI_CHECK_PREFIX usage);                              \
      return NULL;                                                                            \
    }                                                                                         \
  } while (0)

#endif

// Throws and returns NULL from the calling N-API function when `call` fails.
#define CHECK(call)                                                           \
  do {                                                                        \
    if ((call) != napi_ok) {                                                  \
      napi_throw_error(env, NULL, NAPI_CHECK_PREFIX #call " failed");           \
      return NULL;                                                            \
    }                                                                         \
  } while (0)

// Declares `napi_value argv[want]` with the call's arguments; throws a type error naming the call
// (`usage`, e.g. "feed(handle, chunks)") and returns NULL when it has fewer.
#define CHECK_ARGS(want, usage)                                                               \
  napi_value argv[want];                                                                      \
  do {                                                                                        \
    size_t argc_ = (want);                                                                    \
    if (napi_get_cb_info(env, info, &argc_, argv, NULL, NULL) != napi_ok || argc_ < (want)) { \
      napi_throw_type_error(env, NULL, NAPI_CHECK_PREFIX usage);                              \
      return NULL;                                                                            \
    }                                                                                         \
  } while (0)

#endif
