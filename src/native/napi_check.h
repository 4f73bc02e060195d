// What the N-API functions of the addons share (nixcas_native.c, virtiofs_fast.c, zstd.c).
// An addon may define NAPI_CHECK_PREFIX before including this, to name itself in the message.
#ifndef NIXCAS_NAPI_CHECK_H
#define NIXCAS_NAPI_CHECK_H

#include <node_api.h>

#ifndef NAPI_CHECK_PREFIX
#define NAPI_CHECK_PREFIX "nixcas native: "
#endif

// Throws and returns NULL from the calling N-API function when `call` fails.
#define CHECK(call)                                                           \
  do {                                                                        \
    if ((call) != napi_ok) {                                                  \
      napi_throw_error(env, NULL, NAPI_CHECK_PREFIX #call " failed");           \
      return NULL;                                                            \
    }                                                                         \
  } while (0)

#endif
