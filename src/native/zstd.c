// A streaming zstd decoder over libzstd, for NARs fetched from binary caches
// (`Compression: zstd`): decoding in this process saves the child process,
// and the two pipe copies per byte, that `zstd -dc` costs. Built only where
// libzstd's header is installed (binding.gyp); src/store/nar/decompress.ts
// falls back to the zstd program without it.
#include <node_api.h>
#include <stdlib.h>
#include <zstd.h>

#define NAPI_CHECK_PREFIX "nixcas zstd: "
#include "napi_check.h"

typedef struct {
  ZSTD_DStream *stream;
  size_t last; // ZSTD_decompressStream's last return: 0 once a frame is complete
} decoder_t;

static void decoder_finalize(napi_env env, void *data, void *hint) {
  decoder_t *d = data;
  ZSTD_freeDStream(d->stream); // NULL once released: a no-op
  free(d);
}

// decoder() -> a handle for decode() and finished().
static napi_value decoder(napi_env env, napi_callback_info info) {
  decoder_t *d = calloc(1, sizeof *d);
  if (d) d->stream = ZSTD_createDStream();
  if (!d || !d->stream) {
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
  else if (!d->stream) {
    napi_throw_error(env, NULL, "nixcas zstd: the decoder was released");
    d = NULL;
  }
  return d;
}

// release(handle): frees the decoder's memory now; the handle is unusable afterwards. A decoder
// holds its window (2 MiB and more) outside V8's view, so without this it stays until a full
// garbage collection, which a process streaming NARs may not have for dozens of them.
static napi_value release(napi_env env, napi_callback_info info) {
  CHECK_ARGS(1, "release(handle)");
  decoder_t *d = get_decoder(env, argv[0]);
  if (!d) return NULL;
  ZSTD_freeDStream(d->stream);
  d->stream = NULL;
  return NULL;
}

// decodeInto(handle, input, inputOffset, output, outputOffset) -> [inputOffset, outputOffset]:
// decompresses from input[inputOffset..] into output[outputOffset..] until the output is full or
// the input is consumed with room to spare in the output (then nothing is left inside the
// decoder). Writing into the caller's buffer (a lent slab) saves a copy and an allocation per
// output step. Throws on corrupt input.
static napi_value decode_into(napi_env env, napi_callback_info info) {
  CHECK_ARGS(5, "decodeInto(handle, input, inputOffset, output, outputOffset)");
  decoder_t *d = get_decoder(env, argv[0]);
  if (!d) return NULL;
  void *input, *output;
  size_t input_length, output_length;
  int64_t input_offset, output_offset;
  CHECK(napi_get_buffer_info(env, argv[1], &input, &input_length));
  CHECK(napi_get_value_int64(env, argv[2], &input_offset));
  CHECK(napi_get_buffer_info(env, argv[3], &output, &output_length));
  CHECK(napi_get_value_int64(env, argv[4], &output_offset));
  if (input_offset < 0 || (size_t)input_offset > input_length || output_offset < 0 || (size_t)output_offset > output_length) {
    napi_throw_range_error(env, NULL, "nixcas zstd: decodeInto: an offset outside its buffer");
    return NULL;
  }
  ZSTD_inBuffer in = {input, input_length, (size_t)input_offset};
  ZSTD_outBuffer out = {output, output_length, (size_t)output_offset};
  while (out.pos < out.size) {
    // A frame that ended exactly as the last output filled up is done: asked again with no input,
    // libzstd would start on the next frame's header and no longer report the end of this one.
    if (in.pos == in.size && d->last == 0) break;
    size_t ret = ZSTD_decompressStream(d->stream, &out, &in);
    if (ZSTD_isError(ret)) {
      napi_throw_error(env, "ZSTD_ERROR", ZSTD_getErrorName(ret));
      return NULL;
    }
    d->last = ret;
    if (in.pos == in.size && out.pos < out.size) break;
  }
  napi_value result, value;
  CHECK(napi_create_array_with_length(env, 2, &result));
  CHECK(napi_create_int64(env, (int64_t)in.pos, &value));
  CHECK(napi_set_element(env, result, 0, value));
  CHECK(napi_create_int64(env, (int64_t)out.pos, &value));
  CHECK(napi_set_element(env, result, 1, value));
  return result;
}

// finished(handle) -> whether the input so far ends at the end of a frame.
static napi_value finished(napi_env env, napi_callback_info info) {
  CHECK_ARGS(1, "finished(handle)");
  decoder_t *d = get_decoder(env, argv[0]);
  if (!d) return NULL;
  napi_value result;
  CHECK(napi_get_boolean(env, d->last == 0, &result));
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"decoder", NULL, decoder, NULL, NULL, NULL, napi_default, NULL},
      {"decodeInto", NULL, decode_into, NULL, NULL, NULL, napi_default, NULL},
      {"finished", NULL, finished, NULL, NULL, NULL, napi_default, NULL},
      {"release", NULL, release, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof *properties, properties);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
