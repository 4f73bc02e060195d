// The body of a NAR fetched over plain http://, read from the socket straight
// into lent slabs (castore/lent-slabs.ts): the kernel writes the bytes where
// the native ingest hashes and parses them, with no allocation per read and
// no copy in this process. node:http gives each read its own new Buffer and
// copies the body once more; on a 200 MB closure that was ~40 ms of copying
// on the main thread and a full garbage collection every few tens of MB
// (external memory pressure), and a full collection runs on the other core
// the ingest needs (docs/design-notes.md).
//
// Only the plain case is read here: a 200 answer with a Content-Length or a
// chunked body and no Content-Encoding. Anything else (a redirect, an error
// status, a compressed or close-delimited body) makes the caller ask again
// through node:http (binary-cache.ts), which handles every case; so does a
// connection that fails before its first byte. Connections are kept alive
// and used again, a few per upstream.
import { type Socket, connect } from 'node:net';
import { type LentSlab, LentSlabPool, lentSlabOf } from '../castore/lent-slabs.js';

/** Slabs the bodies are read into: a slab is a batch of the native ingest. */
const bodySlabs = new LentSlabPool(1024 * 1024, 16);
/** Slabs read but not yet taken by the consumer, past which the socket is paused. */
const QUEUED_SLABS = 2;
const MAX_HEAD_BYTES = 64 * 1024;
const IDLE_CONNECTIONS_PER_UPSTREAM = 8;

/** This response is not one read here: ask through node:http. */
export class PlainHttpFallback extends Error {}

/** The upstream stopped answering for longer than the timeout. */
export class PlainHttpTimeout extends Error {}

const idle = new Map<string, Connection[]>();

type State = 'head' | 'length' | 'chunk-size' | 'chunk-data' | 'chunk-end' | 'trailers' | 'done';

/** One response read into slabs. */
class Response {
  private slab: LentSlab = bodySlabs.take();
  private filled = 0;
  /** Where the head or a chunk-size line being read starts in the slab. */
  private lineStart = 0;
  private state: State = 'head';
  /** Body bytes left: of the body (Content-Length) or of the chunk. */
  private left = 0;
  private keepAlive = true;
  /** Bytes of the current slab's body not yet queued, from here to `filled`. */
  private bodyFrom = 0;
  /** Body views ready for the consumer, each with the slab to release once it is taken (the last view of a retired slab). */
  readonly queue: { view: Buffer; release?: LentSlab }[] = [];
  private queuedSlabs = 0;
  failure?: Error;
  /** Whether any byte of the answer came. */
  answered = false;
  wake?: () => void;

  /** Set once the response has its connection. */
  socket!: Socket;

  /** Where the next read goes: the rest of the slab. */
  buffer(): Buffer {
    return this.slab.bytes.subarray(this.filled);
  }

  get finished(): boolean {
    return this.state === 'done';
  }

  fail(err: Error): void {
    this.failure ??= err;
    this.signal();
  }

  private signal(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }

  /** `n` bytes read into `buffer`: the slab's free part, or the scratch buffer, whose bytes are copied in. */
  absorb(buffer: Uint8Array, n: number): void {
    if (this.finished || this.failure) {
      this.fail(new Error('the upstream sent more than the response'));
      return;
    }
    if (buffer.buffer === this.slab.bytes.buffer && buffer.byteOffset === this.slab.bytes.byteOffset + this.filled) {
      this.read(n);
      return;
    }
    let at = 0;
    while (at < n && !this.failure && !this.finished) {
      const take = Math.min(n - at, this.slab.bytes.length - this.filled);
      this.slab.bytes.set(buffer.subarray(at, at + take), this.filled);
      at += take;
      this.read(take);
    }
    // Once complete, the slab is gone: what is left of the read is not copied anywhere.
    if (at < n && this.finished) this.fail(new Error('the upstream sent more than the response'));
  }

  /** `n` more bytes are in the slab at `filled`. */
  private read(n: number): void {
    this.answered = true;
    const end = this.filled + n;
    let at = this.filled;
    this.filled = end;
    try {
      while (at < end && this.state !== 'done') at = this.step(at, end);
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    if (this.state === 'done') {
      this.retire(true);
      // Bytes past the response: the body stands, the connection is not used again.
      if (at < end) this.fail(new Error('the upstream sent more than the response'));
    } else if (this.filled === this.slab.bytes.length) {
      this.retire(false);
    }
    this.signal();
  }

  /** Parses from `at`; returns how far it got. */
  private step(at: number, end: number): number {
    const bytes = this.slab.bytes;
    switch (this.state) {
      case 'head': {
        const stop = bytes.subarray(this.lineStart, end).indexOf('\r\n\r\n');
        if (stop < 0) {
          if (end - this.lineStart > MAX_HEAD_BYTES) throw new PlainHttpFallback('a response head longer than 64 KiB');
          return end;
        }
        this.head(bytes.subarray(this.lineStart, this.lineStart + stop).toString('latin1'));
        this.lineStart = this.bodyFrom = this.lineStart + stop + 4;
        return this.lineStart;
      }
      case 'length':
      case 'chunk-data': {
        const take = Math.min(this.left, end - at);
        this.left -= take;
        at += take;
        if (this.left === 0) {
          this.queueBody(at);
          this.state = this.state === 'length' ? 'done' : 'chunk-end';
          this.lineStart = at;
        }
        return at;
      }
      case 'chunk-size':
      case 'chunk-end':
      case 'trailers': {
        // From a byte back: a CR may have ended the last read.
        const from = Math.max(this.lineStart, at - 1);
        const found = bytes.subarray(from, end).indexOf('\r\n');
        if (found < 0) {
          // A line split between slabs is carried over by retire(); lines are short.
          if (end - this.lineStart > 4096) throw new Error('a chunk header longer than 4 KiB');
          return end;
        }
        const line = bytes.subarray(this.lineStart, from + found).toString('latin1');
        at = from + found + 2;
        this.lineStart = at;
        if (this.state === 'chunk-end') {
          if (line !== '') throw new Error('a chunk does not end with CRLF');
          this.state = 'chunk-size';
        } else if (this.state === 'trailers') {
          if (line === '') this.state = 'done';
        } else {
          const size = parseInt(line.split(';')[0]!.trim(), 16);
          if (!Number.isSafeInteger(size) || size < 0 || !/^[0-9a-fA-F]+$/.test(line.split(';')[0]!.trim())) throw new Error(`a chunk size ${JSON.stringify(line.slice(0, 40))}`);
          if (size === 0) this.state = 'trailers';
          else {
            this.left = size;
            this.state = 'chunk-data';
            this.bodyFrom = at;
          }
        }
        return at;
      }
      default:
        return end;
    }
  }

  private head(text: string): void {
    const [status, ...lines] = text.split('\r\n');
    const match = /^HTTP\/1\.([01]) (\d{3})/.exec(status!);
    if (!match || match[2] !== '200') throw new PlainHttpFallback(`answered ${status}`);
    const headers = new Map<string, string>();
    for (const line of lines) {
      const colon = line.indexOf(':');
      if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim().toLowerCase());
    }
    const encoding = headers.get('content-encoding');
    if (encoding && encoding !== 'identity') throw new PlainHttpFallback(`Content-Encoding ${encoding}`);
    this.keepAlive = match[1] === '1' && headers.get('connection') !== 'close';
    if (headers.get('transfer-encoding') === 'chunked') {
      this.state = 'chunk-size';
    } else if (headers.has('content-length') && /^\d+$/.test(headers.get('content-length')!)) {
      this.left = Number(headers.get('content-length'));
      this.state = this.left === 0 ? 'done' : 'length';
    } else {
      throw new PlainHttpFallback('a body with neither Content-Length nor chunks');
    }
  }

  /** The body read since `bodyFrom`, up to `to`, goes to the queue. */
  private queueBody(to: number): void {
    if (to > this.bodyFrom) this.queue.push({ view: this.slab.bytes.subarray(this.bodyFrom, to) });
    this.bodyFrom = to;
  }

  /** The slab is full, or the response is complete: its last view releases it; a new slab carries a partial line over. */
  private retire(complete: boolean): void {
    if (this.state === 'length' || this.state === 'chunk-data') this.queueBody(this.filled);
    const carried = complete || this.state === 'length' || this.state === 'chunk-data' ? Buffer.alloc(0) : Buffer.from(this.slab.bytes.subarray(this.lineStart, this.filled));
    const last = this.queue[this.queue.length - 1];
    if (last && lentSlabOf(last.view) === this.slab) {
      last.release = this.slab;
      this.queuedSlabs++;
    } else {
      this.slab.release();
    }
    if (complete) return;
    this.slab = bodySlabs.take();
    carried.copy(this.slab.bytes);
    this.filled = carried.length;
    this.lineStart = 0;
    this.bodyFrom = 0;
    if (this.queuedSlabs >= QUEUED_SLABS) this.socket.pause();
  }

  /** The consumer took a view: its slab is released if it was the last, and the socket may read again. */
  taken(entry: { release?: LentSlab }): void {
    if (!entry.release) return;
    entry.release.release();
    if (--this.queuedSlabs < QUEUED_SLABS) this.socket.resume();
  }

  /** Whether the connection can carry another request (read() refuses bytes past the response). */
  get reusable(): boolean {
    return this.finished && this.keepAlive && !this.failure;
  }

  /** Gives back what is still held (an abandoned response). */
  drop(): void {
    for (const entry of this.queue.splice(0)) entry.release?.release();
    if (this.state !== 'done') this.slab.release();
  }
}

function upstreamKey(url: URL): string {
  return `${url.hostname}:${url.port || 80}`;
}

/** A connection and the response it is reading, if any; a scratch buffer takes what comes between responses. */
interface Connection {
  socket: Socket;
  response?: Response;
  scratch: Buffer;
  /** Given while the connection is idle: drops it from the idle list. */
  forget?: () => void;
}

/** Where the next read goes: the response's slab while it reads, else the scratch buffer (a slab may have gone back to its pool). */
function nextBuffer(connection: Connection): Buffer {
  const response = connection.response;
  return response && !response.finished && !response.failure ? response.buffer() : connection.scratch;
}

/** An idle connection to the upstream kept alive, or a new one. */
function connectionTo(url: URL, response: Response): { connection: Connection; reused: boolean } {
  const kept = idle.get(upstreamKey(url))?.pop();
  if (kept) {
    // Its idle-time listeners go; net's own stay.
    const forget = kept.forget!;
    kept.socket.off('close', forget).off('error', forget).off('end', forget);
    kept.forget = undefined;
    kept.response = response;
    kept.socket.ref();
    return { connection: kept, reused: true };
  }
  const connection = { response, scratch: Buffer.allocUnsafe(16 * 1024) } as Connection;
  connection.socket = connect({
    host: url.hostname.replace(/^\[|\]$/g, ''),
    port: Number(url.port || 80),
    onread: {
      // Asked for once at the start and again after every read.
      buffer: () => nextBuffer(connection),
      callback: (n: number, buffer: Uint8Array) => {
        if (!connection.response) {
          connection.forget?.(); // bytes on an idle connection: it cannot be used again
          return false;
        }
        connection.response.absorb(buffer, n);
        return true;
      },
    },
  });
  return { connection, reused: false };
}

function keep(url: URL, connection: Connection): void {
  const key = upstreamKey(url);
  const pool = idle.get(key) ?? [];
  if (pool.length >= IDLE_CONNECTIONS_PER_UPSTREAM) {
    connection.socket.destroy();
    return;
  }
  idle.set(key, pool);
  pool.push(connection);
  connection.response = undefined;
  connection.socket.setTimeout(0);
  connection.socket.unref(); // an idle connection does not keep the process running
  const forget = () => {
    const at = pool.indexOf(connection);
    if (at >= 0) pool.splice(at, 1);
    connection.socket.destroy();
  };
  connection.forget = forget;
  connection.socket.once('close', forget);
  connection.socket.once('error', forget);
  connection.socket.once('end', forget);
}

/**
 * The body of a GET of `url` (http:) as views into lent slabs. Throws PlainHttpFallback before
 * the first view when the answer is not a plain 200 body, and PlainHttpTimeout when the upstream
 * pauses longer than `timeoutMs`.
 */
export async function* plainHttpBody(url: URL, timeoutMs: number): AsyncGenerator<Buffer> {
  for (let attempt = 0; ; attempt++) {
    const response = new Response();
    const { connection, reused } = connectionTo(url, response);
    const socket = (response.socket = connection.socket);
    const onError = (err: Error) => response.fail(err);
    const onEnd = () => response.fail(new Error('the upstream closed the connection inside the response'));
    const onTimeout = () => response.fail(new PlainHttpTimeout(`no answer within ${timeoutMs / 1000} s`));
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('timeout', onTimeout);
    socket.setTimeout(timeoutMs);
    socket.resume();
    socket.write(`GET ${url.pathname}${url.search} HTTP/1.1\r\nHost: ${url.host}\r\nUser-Agent: nixcas\r\nAccept-Encoding: identity\r\n\r\n`);
    let finished = false;
    try {
      for (;;) {
        const entry = response.queue.shift();
        if (entry) {
          yield entry.view;
          response.taken(entry);
          continue;
        }
        if (response.finished) {
          finished = true;
          return;
        }
        if (response.failure) {
          // A kept connection the upstream had closed: ask again on a new one.
          if (reused && !response.answered && attempt === 0 && !(response.failure instanceof PlainHttpTimeout)) break;
          throw response.failure;
        }
        await new Promise<void>((resolve) => (response.wake = resolve));
      }
    } finally {
      socket.off('error', onError);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('timeout', onTimeout);
      if (finished && response.reusable) keep(url, connection);
      else {
        connection.response = undefined;
        socket.destroy();
      }
      response.drop();
    }
  }
}
