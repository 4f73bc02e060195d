// What the N-API functions of the nixcas_native addon share (nixcas_native.c, virtiofs_fast.c).
#ifndef NIXCAS_NAPI_CHECK_H
#define NIXCAS_NAPI_CHECK_H

#include <node_api.h>

// Throws and returns NULL from the calling N-API function when `call` fails.
#define CHECK(call)                                                           \
  do {                                                                        \
    if ((call) != napi_ok) {                                                  \
      napi_throw_error(env, NULL, "nixcas native: " #call " failed");        \
      return NULL;                                                            \
    }                                                                         \
  } while (0)

#endif
