// The native answer path of virtio-fs (virtiofs_fast.c), registered on the addon's exports.
#ifndef NIXCAS_VIRTIOFS_FAST_H
#define NIXCAS_VIRTIOFS_FAST_H

#include <node_api.h>

void virtiofs_fast_register(napi_env env, napi_value exports);

#endif
