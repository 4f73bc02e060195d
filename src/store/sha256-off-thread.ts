// SHA-256 on a worker thread. Importing a tree hashes every byte twice
// (BLAKE3 for castore, SHA-256 for the NAR); hashing the NAR on the second
// core takes ~0.7 s per GiB off this thread, which meanwhile reads, hashes
// BLAKE3 and writes. Bytes in a lent slab (castore/lent-slabs.ts: shared
// memory already) are hashed where they are; others are copied into a ring
// of shared memory (a copy costs a tenth of hashing) and travel in 1 MiB
// messages.
import { Worker } from 'node:worker_threads';
import { lentSlabOf } from '../castore/lent-slabs.js';

// CommonJS, evaluated: the worker needs no file of its own (and so works from
// dist/ and under tsx alike).
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const hashes = new Map();
parentPort.on('message', ({ id, op, buffer, offset, length }) => {
  if (op === 'data') {
    let hash = hashes.get(id);
    if (!hash) hashes.set(id, (hash = createHash('sha256')));
    hash.update(new Uint8Array(buffer, offset, length));
    parentPort.postMessage({ id, op: 'hashed', length });
  } else if (op === 'digest') {
    const hash = hashes.get(id) ?? createHash('sha256');
    hashes.delete(id);
    parentPort.postMessage({ id, op: 'digest', digest: hash.digest() });
  } else if (op === 'drop') {
    hashes.delete(id);
  }
});
`;

interface Reply {
  id: number;
  op: 'hashed' | 'digest';
  length: number;
  digest: Uint8Array;
}

interface StreamEnd {
  onHashed(length: number): void;
  onDigest(digest: Buffer): void;
  onFailure(err: Error): void;
}

/**
 * The one hashing thread, shared by all streams. It keeps the process alive
 * only while it owes a reply, so a stream left open never holds it.
 */
class HashThread {
  private static current?: HashThread;
  private readonly worker = new Worker(WORKER_SOURCE, { eval: true });
  private readonly streams = new Map<number, StreamEnd>();
  private nextId = 1;
  private owed = 0; // messages sent whose reply has not come
  private failed?: Error;

  static get(): HashThread {
    if (!HashThread.current || HashThread.current.failed) HashThread.current = new HashThread();
    return HashThread.current;
  }

  private constructor() {
    this.worker.on('message', (reply: Reply) => {
      if (--this.owed === 0) this.worker.unref();
      const stream = this.streams.get(reply.id);
      if (reply.op === 'hashed') stream?.onHashed(reply.length);
      else {
        this.close(reply.id);
        stream?.onDigest(Buffer.from(reply.digest));
      }
    });
    const fail = (err: Error) => {
      this.failed ??= err;
      for (const stream of this.streams.values()) stream.onFailure(this.failed);
      this.streams.clear();
      this.worker.unref();
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`the SHA-256 worker thread exited (${code})`)));
    // After the listeners: adding a 'message' listener refs the worker again, and a thread
    // started early (startHashThread) that is never sent anything must not keep the process up.
    this.worker.unref();
  }

  open(end: StreamEnd): number {
    if (this.failed) throw this.failed;
    const id = this.nextId++;
    this.streams.set(id, end);
    return id;
  }

  close(id: number): void {
    this.streams.delete(id);
  }

  send(id: number, op: 'data' | 'digest' | 'drop', buffer?: SharedArrayBuffer, offset = 0, length = 0): void {
    if (this.failed) throw this.failed;
    if (op !== 'drop' && this.owed++ === 0) this.worker.ref();
    this.worker.postMessage({ id, op, buffer, offset, length });
  }
}

/**
 * Starts the hashing thread now rather than at the first hash: a worker takes
 * ~35 ms to boot, which then overlaps with opening the store instead of
 * holding up the first bytes (SHA-256 is the longest step of an import).
 */
export function startHashThread(): void {
  HashThread.get();
}

/** Bytes per message to the thread. */
const MESSAGE = 1024 * 1024;
/** Shared memory each stream copies its bytes into, reused once hashed (fresh memory costs a page fault per 4 KiB). */
const RING = 16 * 1024 * 1024;
/**
 * Bytes handed over and not yet hashed before ready() makes the caller wait:
 * two lent slabs, so the caller works on the next one while the thread
 * hashes (and never waits for the thread to run dry).
 */
const AHEAD = 8 * 1024 * 1024;
/** Lent chunks at least this large are hashed in place; smaller ones are cheaper to copy than to message. */
const LEND_MIN = 256 * 1024;

/**
 * A SHA-256 computed on the shared hashing thread. update() copies into
 * shared memory, or holds a lent slab, and never blocks; await ready() (when
 * it returns a promise) to keep the thread from falling behind.
 */
export class OffThreadSha256 {
  private readonly thread = HashThread.get();
  private readonly id: number;
  private ring?: Uint8Array;
  private appended = 0; // bytes copied into the ring, ever
  private sent = 0; // of those, bytes handed to the thread
  private ringHashed = 0; // of those, bytes the thread has hashed
  private ahead = 0; // bytes handed over, not yet hashed
  /** Per message in flight: whether its bytes live in the ring, or else the release of the lent slab they live in (if any). */
  private readonly inFlight: (true | (() => void) | undefined)[] = [];
  private failure?: Error;
  private wake?: () => void;
  private result?: { resolve: (digest: Buffer) => void; reject: (err: Error) => void };

  constructor() {
    this.id = this.thread.open({
      onHashed: (length) => {
        const where = this.inFlight.shift();
        if (where === true) this.ringHashed += length;
        else where?.();
        this.ahead -= length;
        if (this.ahead <= AHEAD / 2) this.wakeUp();
      },
      onDigest: (digest) => this.result?.resolve(digest),
      onFailure: (err) => {
        this.failure = err;
        this.releaseLent();
        this.wakeUp();
        this.result?.reject(err);
      },
    });
  }

  update(chunk: Uint8Array): void {
    if (this.failure) throw this.failure;
    const lent = chunk.length >= LEND_MIN ? lentSlabOf(chunk) : undefined;
    if (lent) {
      this.sendRing();
      this.send(chunk.buffer as SharedArrayBuffer, chunk.byteOffset, chunk.length, lent.hold());
      return;
    }
    if (chunk.length > RING - (this.appended - this.ringHashed)) {
      // The caller went far past ready(): hand this over in memory of its own.
      this.sendRing();
      const copy = new Uint8Array(new SharedArrayBuffer(chunk.length));
      copy.set(chunk);
      this.send(copy.buffer as SharedArrayBuffer, 0, chunk.length, undefined);
      return;
    }
    this.ring ??= new Uint8Array(new SharedArrayBuffer(RING));
    for (let at = 0; at < chunk.length; ) {
      const offset = this.appended % RING;
      const piece = Math.min(chunk.length - at, RING - offset);
      this.ring.set(chunk.subarray(at, at + piece), offset);
      this.appended += piece;
      at += piece;
    }
    if (this.appended - this.sent >= MESSAGE) this.sendRing();
  }

  /** A promise while the thread is too far behind; undefined when the caller may go on. */
  ready(): Promise<void> | undefined {
    if (this.failure) return Promise.reject(this.failure);
    if (this.ahead <= AHEAD) return undefined;
    return new Promise((resolve) => (this.wake = resolve));
  }

  digest(): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    this.sendRing();
    return new Promise((resolve, reject) => {
      this.result = { resolve, reject };
      this.thread.send(this.id, 'digest');
    });
  }

  /** Forgets the hash (the import failed). */
  drop(): void {
    if (this.failure || this.result) return;
    this.thread.send(this.id, 'drop');
    this.thread.close(this.id);
    // No reply comes for this stream now. The thread may still read the slabs; what it
    // makes of them no longer matters.
    this.releaseLent();
  }

  private releaseLent(): void {
    for (const where of this.inFlight.splice(0)) if (typeof where === 'function') where();
  }

  /** Hands over what was copied into the ring since the last time, split where the ring wraps. */
  private sendRing(): void {
    while (this.sent < this.appended) {
      const offset = this.sent % RING;
      const length = Math.min(this.appended - this.sent, RING - offset);
      this.send(this.ring!.buffer as SharedArrayBuffer, offset, length, true);
      this.sent += length;
    }
  }

  private send(buffer: SharedArrayBuffer, offset: number, length: number, where: true | (() => void) | undefined): void {
    this.ahead += length;
    this.inFlight.push(where);
    this.thread.send(this.id, 'data', buffer, offset, length);
  }

  private wakeUp(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}
