// The virtio-fs device (virtio 1.2, 5.11): queue 0 is the high-priority queue
// (FORGET and BATCH_FORGET), queues 1..n carry FUSE requests. Each chain's
// readable part is one FUSE request, its writable part gets the reply; the
// same protocol layer and filesystem core as the FUSE mount answer them.
import { ReadOnlyFilesystem } from '../fs/filesystem.js';
import { Opcode } from '../fuse/abi.js';
import type { ScatterList } from '../castore/blobservice.js';
import { fuseCounters } from '../fuse/counters.js';
import { type Accelerator, expectsReply, FuseServer, type ReplySink } from '../fuse/protocol.js';
import { type FastRing, type FastTables, type NativeAddon, optionalNative } from '../native/index.js';
import { ChainError, type DescriptorChain, NativeWait, type SplitQueue, type VirtioDevice } from '../vhost-user/index.js';

/** virtio-fs has no device feature bits we need (notification queue, bit 0, is unused). */
const NO_FEATURES = 0n;
const OUT_HEADER_SIZE = 16;
const EIO = 5;
const HIPRIO_QUEUE = 0;
/** Kicks the native path waits for before the event loop gets a turn anyway (as the backend's own waits). */
const WAITS_IN_A_TURN = 1024;

export interface VirtioFsOptions {
  /** Request queues besides the high-priority one (the front end's num-request-queues). */
  requestQueues: number;
  /** A filesystem for one mount: a guest that unmounts and mounts again gets a fresh one. */
  makeFilesystem(): ReadOnlyFilesystem;
  log(message: string): void;
}

/** One FUSE session: from INIT to DESTROY (umount) or a device reset. */
interface Session {
  fs: ReadOnlyFilesystem;
  server: FuseServer;
  /** What the native path may answer in this session (none without the addon), and its call. */
  tables?: FastTables;
  serve?: (ring: FastRing, nextAvail: number, nextUsed: number, max: number) => number;
}

/**
 * GETATTRs and READs the FUSE layer has answered once are answered after that
 * by the addon (virtiofs_fast.c) straight from the ring, without a turn of
 * JavaScript per request; everything else, and anything unusual, comes to
 * the FUSE layer as before. NIXCAS_VIRTIOFS_NATIVE=0 turns it off (to measure it).
 */
const NATIVE_PATH = process.env.NIXCAS_VIRTIOFS_NATIVE !== '0';

export class VirtioFsDevice implements VirtioDevice {
  readonly queueCount: number;
  readonly deviceFeatures = NO_FEATURES;
  private session?: Session;

  constructor(private readonly options: VirtioFsOptions) {
    if (!Number.isInteger(options.requestQueues) || options.requestQueues < 1) throw new RangeError('virtio-fs needs at least one request queue');
    this.queueCount = 1 + options.requestQueues;
  }

  handle(_queue: number, chain: DescriptorChain): boolean {
    const message = chain.read();
    // A kernel sends INIT once per connection: another one means the guest rebooted (or crashed)
    // without a DESTROY, so whatever it knew of the last session is gone.
    if (message.length >= 8 && message.readUInt32LE(4) === Opcode.INIT && this.session?.server.negotiatedMinor) this.endSession();
    const { server } = this.current();
    if (!expectsReply(message)) {
      const waits = server.handle(message, NO_REPLY);
      chain.done(0);
      return waits;
    }
    return server.handle(message, new ChainSink(chain, this));
  }

  reset(): void {
    this.endSession();
  }

  serveNatively(queue: number, ring: SplitQueue): void {
    if (queue === HIPRIO_QUEUE) return; // FORGETs only
    const session = this.session;
    if (!session?.serve || !session.server.negotiatedMinor || !this.nativeMayAnswer) return;
    const answered = ring.serveNatively(session.serve);
    if (answered === 0) this.nativeMayAnswer = false;
    else if (answered) this.countNativeAnswers();
  }

  serveAfterKicks(queue: number, ring: SplitQueue, kickFd: number, callFd: number): NativeWait | undefined {
    const session = this.session;
    const tables = session?.tables;
    if (queue === HIPRIO_QUEUE || !tables || !session.server.negotiatedMinor || !this.nativeMayAnswer) return undefined;
    const why = ring.waitAndServeNatively((fastRing, state) => addon!.virtiofsLoop(fastRing, tables, kickFd, callFd, state, nativeStats, WAITS_IN_A_TURN));
    if (why === NativeWait.ForJavaScript && nativeStats[0] + nativeStats[1] === 0) this.nativeMayAnswer = false;
    this.countNativeAnswers();
    return why;
  }

  /**
   * Whether asking the native path is worth its call: false once it answered nothing of what it
   * was shown (LOOKUPs, small files: traffic that would pay for a failed try per request), true
   * again once the FUSE layer gives it something to answer (attributes, or a blob's file). A READ
   * of a small blob gives it nothing, so a run of small files never asks it.
   */
  private nativeMayAnswer = true;

  /** The FUSE layer registered something the native path may answer. */
  nativeGained(): void {
    this.nativeMayAnswer = true;
  }

  private countNativeAnswers(): void {
    const stats = nativeStats;
    if (stats[0] + stats[1] === 0) return;
    fuseCounters.requests[Opcode.GETATTR] += stats[0];
    fuseCounters.requests[Opcode.READ] += stats[1];
    fuseCounters.readBytes += stats[2];
    fuseCounters.nativeAnswers += stats[0] + stats[1];
    stats.fill(0);
  }

  /** A reply that does not fit its chain: logged, and the guest told the request failed, if there is room even for that. */
  replyDidNotFit(chain: DescriptorChain, header: Buffer, err: ChainError): void {
    this.options.log(`request ${header.readBigUInt64LE(8)}: ${err.message}`);
    if (chain.writableLength < OUT_HEADER_SIZE) return chain.done(0);
    const failure = Buffer.alloc(OUT_HEADER_SIZE);
    failure.writeUInt32LE(OUT_HEADER_SIZE, 0);
    failure.writeInt32LE(-EIO, 4);
    header.copy(failure, 8, 8, 16);
    chain.reply(failure);
  }

  private current(): Session {
    if (!this.session) {
      const fs = this.options.makeFilesystem();
      const tables = NATIVE_PATH ? addon?.fastTables() : undefined;
      // DESTROY is answered before onDestroy runs: the next request (a new mount's INIT) gets a fresh session.
      const server = new FuseServer(fs, { log: this.options.log, onDestroy: () => this.endSession(), accelerator: tables && accelerator(addon!, tables, this) });
      const serve = tables && ((fastRing: FastRing, nextAvail: number, nextUsed: number, max: number) => addon!.virtiofsServe(fastRing, tables, nextAvail, nextUsed, nativeStats, max));
      this.session = { fs, server, tables, serve };
    }
    return this.session;
  }

  private endSession(): void {
    const session = this.session;
    this.session = undefined;
    if (session?.tables) addon!.fastClear(session.tables);
    session?.fs.close().catch((err: unknown) => this.options.log(`closing the filesystem failed: ${(err as Error).message}`));
  }
}

const NO_REPLY: ReplySink = { send: () => {} };

const addon: NativeAddon | undefined = optionalNative();
/** GETATTRs, READs and bytes read the native path answered (added to the FUSE counters). */
const nativeStats = new Float64Array(3);

function accelerator(native: NativeAddon, tables: FastTables, device: VirtioFsDevice): Accelerator {
  return {
    attributes: (nodeid, attrOut) => {
      native.fastAttributes(tables, nodeid, attrOut);
      device.nativeGained();
    },
    file: (nodeid, fd, size) => {
      native.fastFile(tables, nodeid, fd, size);
      device.nativeGained();
    },
    forget: (nodeid) => native.fastForget(tables, nodeid),
  };
}

/**
 * Where one request's reply goes: its chain, by the guest's addresses. The
 * chain object is reused for the next request on the same head, so a sink
 * answers only while its own request is the chain's.
 */
class ChainSink implements ReplySink {
  private readonly generation: number;

  constructor(
    private readonly chain: DescriptorChain,
    private readonly device: VirtioFsDevice,
  ) {
    this.generation = chain.generation;
  }

  private get current(): boolean {
    return this.chain.generation === this.generation && this.chain.pending;
  }

  send(reply: Buffer): void {
    if (!this.current) return;
    try {
      this.chain.reply(reply);
    } catch (err) {
      if (!(err instanceof ChainError)) throw err;
      this.device.replyDidNotFit(this.chain, reply, err);
    }
  }

  scatter(offset: number, length: number, into: ScatterList): boolean {
    return this.current && this.chain.writablePlaces(offset, length, into);
  }

  sendInPlace(header: Buffer, length: number): void {
    if (!this.current) return;
    try {
      this.chain.replyInPlace(header, length);
    } catch (err) {
      if (!(err instanceof ChainError)) throw err;
      this.device.replyDidNotFit(this.chain, header, err);
    }
  }
}
