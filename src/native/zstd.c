// A streaming zstd decoder over libzstd, for NARs fetched from binary caches
// (`Compression: zstd`): decoding in this process saves the child process,
// and the two pipe copies per byte, that `zstd -dc` costs. Built only where
// libzstd's header is installed (binding.gyp); src/store/nar/decompress.ts
// falls back to the zstd program without it.
#include <node_api.h>
#include <stdlib.h>
#include <zstd.h>

#define CHECK(call)                                                  \
  do {                                                               \
    if ((call) != napi_ok) {                                         \
      napi_throw_error(env, NULL, "nixcas zstd: " #call " failed"); \
      return NULL;                                                   \
    }                                                                \
  } while (0)

typedef struct {
  ZSTD_DStream *stream;
  void *scratch;
  size_t scratch_size;
  size_t last; // ZSTD_decompressStream's last return: 0 once a frame is complete
} decoder_t;

static void decoder_finalize(napi_env env, void *data, void *hint) {
  decoder_t *d = data;
  ZSTD_freeDStream(d->stream);
  free(d->scratch);
  free(d);
}

// decoder() -> a handle for decode() and finished().
static napi_value decoder(napi_env env, napi_callback_info info) {
  decoder_t *d = calloc(1, sizeof *d);
  if (d) {
    d->stream = ZSTD_createDStream();
    d->scratch_size = ZSTD_DStreamOutSize();
    d->scratch = malloc(d->scratch_size);
  }
  if (!d || !d->stream || !d->scratch) {
    if (d) decoder_finalize(env, d, NULL);
    napi_throw_error(env, NULL, "nixcas zstd: out of memory");
    return NULL;
  }
  ZSTD_initDStream(d->stream);
  d->last = 1;
  napi_value handle;
  CHECK(napi_create_external(env, d, decoder_finalize, NULL, &handle));
  return handle;
}

static decoder_t *get_decoder(napi_env env, napi_value value) {
  decoder_t *d = NULL;
  if (napi_get_value_external(env, value, (void **)&d) != napi_ok || !d) napi_throw_type_error(env, NULL, "nixcas zstd: not a decoder");
  return d;
}

// decode(handle, input) -> the Buffers `input` decompresses to (maybe none). Throws on corrupt input.
static napi_value decode(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    napi_throw_type_error(env, NULL, "nixcas zstd: decode(handle, input)");
    return NULL;
  }
  decoder_t *d = get_decoder(env, argv[0]);
  if (!d) return NULL;
  void *data;
  size_t length;
  CHECK(napi_get_buffer_info(env, argv[1], &data, &length));
  napi_value outputs;
  CHECK(napi_create_array(env, &outputs));
  uint32_t count = 0;
  ZSTD_inBuffer in = {data, length, 0};
  for (;;) {
    ZSTD_outBuffer out = {d->scratch, d->scratch_size, 0};
    size_t ret = ZSTD_decompressStream(d->stream, &out, &in);
    if (ZSTD_isError(ret)) {
      napi_throw_error(env, "ZSTD_ERROR", ZSTD_getErrorName(ret));
      return NULL;
    }
    d->last = ret;
    if (out.pos > 0) {
      napi_value chunk;
      CHECK(napi_create_buffer_copy(env, out.pos, d->scratch, NULL, &chunk));
      CHECK(napi_set_element(env, outputs, count++, chunk));
    }
    // Done with this input once it is consumed and the decoder had room to spare (nothing left inside).
    if (in.pos == in.size && out.pos < out.size) break;
  }
  return outputs;
}

// finished(handle) -> whether the input so far ends at the end of a frame.
static napi_value finished(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  decoder_t *d = argc < 1 ? NULL : get_decoder(env, argv[0]);
  if (!d) return NULL;
  napi_value result;
  CHECK(napi_get_boolean(env, d->last == 0, &result));
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"decoder", NULL, decoder, NULL, NULL, NULL, napi_default, NULL},
      {"decode", NULL, decode, NULL, NULL, NULL, napi_default, NULL},
      {"finished", NULL, finished, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof *properties, properties);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
