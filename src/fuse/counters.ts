// What the FUSE protocol layer counts, for metrics (cli/metrics.ts reads it when scraped): plain
// numbers in typed arrays, one increment per request, so that counting costs the hot path nothing
// worth measuring. One set per process: a process serves one transport.
/** Opcodes are below 64 (Linux's fuse.h goes to 52). */
const OPCODES = 64;

export const fuseCounters = {
  /** Requests by opcode. */
  requests: new Float64Array(OPCODES),
  /** Requests answered with an error, by opcode. */
  errors: new Float64Array(OPCODES),
  /** File bytes answered to READs. */
  readBytes: 0,
  /** Requests the transport answered without this layer (virtio-fs's native path; also in `requests`). */
  nativeAnswers: 0,
  /** READs answered through a buffer of ours (the bytes had to be waited for), not in the transport's place. */
  bufferedReads: 0,
};
