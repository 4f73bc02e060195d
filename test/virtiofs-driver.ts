// A guest-less virtio-fs driver: it plays a Linux guest's part against any
// vhost-user-fs back end (nixcas virtiofs, QEMU's virtiofsd) without booting
// one, for the request benchmark (bench/virtiofs-requests.ts) and the tests
// that check it. Built on the scripted front end (vhost-user-frontend.ts) for
// the socket and the guest memory; what it adds is a request engine that
// behaves as Linux's virtio_fs driver does:
//
// * QEMU's negotiation, without EVENT_IDX (a plain split ring, as the issue
//   measured): one memfd region, queue 0 high priority, queue 1 requests.
// * Many requests in flight (depth): each completed request is followed by
//   the next one of its "process"; new chains are published as they are made
//   and the device is kicked unless it set VRING_USED_F_NO_NOTIFY.
// * Interrupts suppressed while it reaps (VRING_AVAIL_F_NO_INTERRUPT), then
//   enabled again and the used ring checked once more, as
//   virtqueue_disable_cb / virtqueue_enable_cb do.
// * Chains as Linux builds them when asked: the in header and the arguments in
//   their own descriptors, the out header and every 4 KiB page of a READ in
//   theirs, through an indirect table.
//
// It waits for interrupts on the call eventfd with uv_poll (no sleeps), and
// keeps its own cost per request small (fixed slots, no allocation per
// request), so that what a benchmark measures is the back end.
import { native, type Watch } from '../src/native/index.js';
import {
  Connection, Feature, FUSE_IN_HEADER, FUSE_OUT_HEADER, GuestMemory, NEED_REPLY, ProtocolFeature, Req,
  SplitQueue, initArgs, memTablePayload, u64, vringState, VERSION,
} from './vhost-user-frontend.js';

export const FuseOp = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, READLINK: 5, OPEN: 14, READ: 15, RELEASE: 18, FLUSH: 25, INIT: 26,
  OPENDIR: 27, RELEASEDIR: 29, READDIRPLUS: 44,
} as const;

const AVAIL_F_NO_INTERRUPT = 1;
const USED_F_NO_NOTIFY = 1;
const DESC_F_NEXT = 1;
const DESC_F_WRITE = 2;
const DESC_F_INDIRECT = 4;
const PAGE = 4096;
/** Room for one request's in header and arguments. */
const REQUEST_AREA = 4096;
/** Room for one reply written into a single descriptor: a 1 MiB READ or READDIRPLUS and its header. */
const REPLY_AREA = 1024 * 1024 + PAGE;
/** Pages of an indirect READ reply, each in its own descriptor: up to 256 (1 MiB). */
const MAX_REPLY_PAGES = 256;
const ONE = u64(1);
const SMALL_REPLY = 4096;

/** Linux 6.1's fuse_init_in flags (FUSE 7.36): every flag up to INIT_EXT, NO_OPEN_SUPPORT among them. */
export const LINUX_INIT_FLAGS = 0x7fffffff;

export interface DriverOptions {
  /** Guest RAM: one memfd region of this many bytes (default 256 MiB). */
  memoryBytes?: number;
  /** Descriptors per queue (default 256). */
  queueSize?: number;
  /** Requests that may be in flight at once (slots; default 64, at most 128). */
  maxDepth?: number;
  /** fuse_init_in flags (default LINUX_INIT_FLAGS). */
  initFlags?: number;
}

/** How a slot's reply comes back: one writable descriptor, or the out header and then 4 KiB pages (indirect). */
export type ReplyLayout = 'single' | 'pages';

/**
 * One request in flight at a time: its place in guest memory. A job writes
 * the request into `request` (the unique is the engine's), says how long it
 * is, and reads the reply from `reply()`.
 */
export class Slot {
  /** The in header and arguments, in guest memory. */
  readonly request: Buffer;
  requestLength = 0;
  /** Writable bytes offered for the reply (out header included). */
  replyLength = 0;
  layout: ReplyLayout = 'single';
  /** The unique of the request in flight (below 2^53: a number, no bigint on the hot path). */
  unique = 0;
  /** Whatever the job keeps per slot (its "process" state). */
  state: unknown;
  readonly requestGpa: number;
  readonly replyGpa: number;
  readonly pageGpas: number[];
  readonly tableGpa: number;
  /** The slot's indirect table. */
  readonly table: DataView;
  private readonly replyView: Buffer;
  private readonly headerView: Buffer;
  private readonly pageViews: Buffer[];
  /** Where a reply in pages is gathered, made on first use (only the READ variant needs it). */
  private gathered?: Buffer;
  private readonly replyViews: Buffer[] = [];
  /** What writeRequest last wrote here, so an identical request is not written again. */
  written?: { opcode: number; nodeid: number; args: Buffer };

  constructor(
    readonly index: number,
    memory: GuestMemory,
    /** Where this slot's pages lie: spread out, so no two pages of a reply are adjacent. */
    pageGpa: (page: number) => bigint,
  ) {
    const requestGpa = memory.alloc(REQUEST_AREA, PAGE);
    this.request = memory.view(requestGpa, REQUEST_AREA);
    const replyGpa = memory.alloc(REPLY_AREA, PAGE);
    this.replyView = memory.view(replyGpa, REPLY_AREA);
    this.headerView = this.replyView.subarray(0, FUSE_OUT_HEADER);
    const pages = Array.from({ length: MAX_REPLY_PAGES }, (_, i) => pageGpa(i));
    this.pageViews = pages.map((gpa) => memory.view(gpa, PAGE));
    // request header, arguments, out header, pages
    const tableGpa = memory.alloc(16 * (3 + MAX_REPLY_PAGES), 16);
    this.requestGpa = Number(requestGpa);
    this.replyGpa = Number(replyGpa);
    this.pageGpas = pages.map(Number);
    this.tableGpa = Number(tableGpa);
    const table = memory.view(tableGpa, 16 * (3 + MAX_REPLY_PAGES));
    this.table = new DataView(table.buffer, table.byteOffset, table.length);
  }

  /** The reply's out header (a view of guest memory). */
  header(): Buffer {
    return this.headerView;
  }

  /** The reply's first `length` bytes: a view of guest memory, or (pages) gathered into a scratch buffer. */
  reply(length: number): Buffer {
    if (this.layout === 'single') {
      // Views of small replies are made once per length: the driver's cost per request is part of every measurement.
      if (length > SMALL_REPLY) return this.replyView.subarray(0, length);
      return (this.replyViews[length] ??= this.replyView.subarray(0, length));
    }
    const out = (this.gathered ??= Buffer.alloc(REPLY_AREA));
    this.replyView.copy(out, 0, 0, Math.min(length, FUSE_OUT_HEADER));
    let at = FUSE_OUT_HEADER;
    for (let i = 0; at < length; i++) {
      const n = Math.min(PAGE, length - at);
      this.pageViews[i].copy(out, at, 0, n);
      at += n;
    }
    return out.subarray(0, length);
  }

  /**
   * Whether the reply's body (after the out header) is `expected`, compared
   * where it lies (no gathering of pages).
   */
  bodyEquals(expected: Buffer): boolean {
    if (this.layout === 'single') return this.replyView.subarray(FUSE_OUT_HEADER, FUSE_OUT_HEADER + expected.length).equals(expected);
    for (let i = 0, at = 0; at < expected.length; i++, at += PAGE) {
      const n = Math.min(PAGE, expected.length - at);
      if (!this.pageViews[i].subarray(0, n).equals(expected.subarray(at, at + n))) return false;
    }
    return true;
  }

  /**
   * Fills the bytes a reply may use with a pattern, so bytes the device did
   * not write show. Only the first 8 KiB: larger replies are file contents
   * that differ from one request to the next, which their check compares.
   */
  poison(): void {
    const length = Math.min(this.replyLength, 8192);
    if (this.layout === 'single') this.replyView.fill(0xa5, 0, length);
    else {
      this.replyView.fill(0xa5, 0, FUSE_OUT_HEADER);
      for (let i = 0; i * PAGE < length - FUSE_OUT_HEADER; i++) this.pageViews[i].fill(0xa5);
    }
  }
}

/**
 * What runs on the slots: each slot is one "process" issuing requests one
 * after the other. `issue` writes the slot's next request (false: this slot
 * has no more work); `complete` checks the reply (throws on a wrong one).
 */
export interface Job {
  issue(slot: Slot): boolean;
  /** The reply is `length` bytes (header checked already): read it with slot.reply(length) or compare it in place. */
  complete(slot: Slot, length: number): void;
}

export interface RunResult {
  /** Requests answered. */
  requests: number;
  wallNs: number;
  /** Interrupts taken (call eventfd wake-ups). */
  interrupts: number;
  /** Kicks sent. */
  kicks: number;
}

export class VirtioFsDriver {
  readonly slots: Slot[] = [];
  private unique = 0;
  private readonly availFlags: Uint16Array;
  private readonly availIdx: Uint16Array;
  private readonly availRing: Uint16Array;
  private readonly usedFlags: Uint16Array;
  private readonly usedIdx: Uint16Array;
  private readonly usedRing: Uint32Array;
  private readonly descriptors: DataView;
  private nextAvail = 0;
  private lastUsed = 0;
  private readonly bySlotHead: (Slot | undefined)[] = [];
  private readonly eventBuffer = Buffer.alloc(8);
  /** INIT's reply body (fuse_init_out). */
  initReply?: Buffer;

  private constructor(
    readonly conn: Connection,
    readonly memory: GuestMemory,
    readonly hiprio: SplitQueue,
    readonly queue: SplitQueue,
    maxDepth: number,
  ) {
    const region = memory.regions[0];
    const view16 = (gpa: bigint, count: number) => new Uint16Array(region.arrayBuffer, Number(gpa - region.gpa), count);
    const size = queue.size;
    this.availFlags = view16(queue.avail, 1);
    this.availIdx = view16(queue.avail + 2n, 1);
    this.availRing = view16(queue.avail + 4n, size);
    this.usedFlags = view16(queue.used, 1);
    this.usedIdx = view16(queue.used + 2n, 1);
    this.usedRing = new Uint32Array(region.arrayBuffer, Number(queue.used + 4n - region.gpa), 2 * size);
    this.descriptors = new DataView(region.arrayBuffer, Number(queue.desc - region.gpa), 16 * size);
    // Pages of all slots interleaved: slot s's page i at (i * maxDepth + s), every other 4 KiB left out.
    const pages = memory.alloc(2 * PAGE * MAX_REPLY_PAGES * maxDepth, PAGE);
    for (let s = 0; s < maxDepth; s++) this.slots.push(new Slot(s, memory, (i) => pages + BigInt(2 * PAGE * (i * maxDepth + s))));
  }

  /** Connects as QEMU does (no EVENT_IDX), starts both queues and sends INIT. */
  static async connect(socketPath: string, options: DriverOptions = {}): Promise<VirtioFsDriver> {
    const queueSize = options.queueSize ?? 256;
    const maxDepth = options.maxDepth ?? 64;
    if (maxDepth > 128 || 2 * maxDepth > queueSize) throw new Error(`depth ${maxDepth} does not fit a queue of ${queueSize}`);
    const conn = await Connection.connect(socketPath);
    const memory = new GuestMemory([{ gpa: 0n, size: options.memoryBytes ?? 256 << 20, userAddr: 0x7f00_0000_0000n }], 'nixcas-bench-guest');
    const hiprio = new SplitQueue(memory, 0, queueSize);
    const queue = new SplitQueue(memory, 1, queueSize);
    const driver = new VirtioFsDriver(conn, memory, hiprio, queue, maxDepth);
    try {
      await driver.negotiate();
      const init = await driver.call(FuseOp.INIT, 0, initArgs(7, 36, 128 * 1024, options.initFlags ?? LINUX_INIT_FLAGS), 4096);
      if (init.error !== 0) throw new Error(`INIT failed: error ${init.error}`);
      driver.initReply = Buffer.from(init.body);
    } catch (err) {
      driver.close();
      throw err;
    }
    return driver;
  }

  private async negotiate(): Promise<void> {
    const conn = this.conn;
    conn.send(Req.SET_OWNER);
    const features = await conn.getU64(Req.GET_FEATURES);
    if (!(features & Feature.PROTOCOL_FEATURES)) throw new Error('the back end offers no PROTOCOL_FEATURES');
    const offered = await conn.getU64(Req.GET_PROTOCOL_FEATURES);
    const protocol = offered & (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK);
    conn.send(Req.SET_PROTOCOL_FEATURES, u64(protocol));
    const ack = (protocol & ProtocolFeature.REPLY_ACK) !== 0n;
    const send = async (request: number, payload: Buffer, fds: number[] = []) => {
      conn.send(request, payload, { flags: ack ? VERSION | NEED_REPLY : VERSION, fds });
      if (ack && (await conn.expectAck(request)) !== 0n) throw new Error(`the back end refused request ${request}`);
    };
    if (protocol & ProtocolFeature.MQ) {
      const queues = await conn.getU64(Req.GET_QUEUE_NUM);
      if (queues < 2n) throw new Error(`the back end has ${queues} queues`);
    }
    await send(Req.SET_FEATURES, u64(features & (Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.PROTOCOL_FEATURES)));
    await send(Req.SET_MEM_TABLE, memTablePayload(this.memory.descriptions()), this.memory.fds());
    for (const q of [this.hiprio, this.queue]) {
      await send(Req.SET_VRING_NUM, vringState(q.index, q.size));
      await send(Req.SET_VRING_BASE, vringState(q.index, 0));
      await send(Req.SET_VRING_ADDR, q.addrPayload());
      await send(Req.SET_VRING_CALL, u64(q.index), [q.callFd]);
      await send(Req.SET_VRING_KICK, u64(q.index), [q.kickFd]);
    }
    for (const q of [this.hiprio, this.queue]) await send(Req.SET_VRING_ENABLE, vringState(q.index, 1));
  }

  /** One request, alone, on slot 0: for setting things up, not for timing. */
  async call(opcode: number, nodeid: bigint | number, args: Buffer = Buffer.alloc(0), replyLength = 4096): Promise<{ error: number; body: Buffer }> {
    let result: { error: number; body: Buffer } | undefined;
    const job: Job = {
      issue: (slot) => {
        if (result) return false;
        writeRequest(slot, opcode, nodeid, args);
        slot.replyLength = replyLength;
        return true;
      },
      complete: (slot, length) => {
        const reply = slot.reply(length);
        result = { error: reply.readInt32LE(4), body: Buffer.from(reply.subarray(FUSE_OUT_HEADER)) };
      },
    };
    await this.run(job, 1);
    return result!;
  }

  /**
   * Runs `job` on `depth` slots at once until every slot says it is done.
   * Rejects when a reply is wrong (the job's check, or a unique or length
   * that does not match) or when no interrupt comes for `stallMs`.
   */
  run(job: Job, depth: number, stallMs = 10_000): Promise<RunResult> {
    if (depth < 1 || depth > this.slots.length) throw new Error(`depth ${depth}: the driver has ${this.slots.length} slots`);
    for (const slot of this.slots) slot.state = undefined;
    const start = process.hrtime.bigint();
    let inFlight = 0;
    let requests = 0;
    let interrupts = 0;
    let kicks = 0;
    let published = false;
    const post = (slot: Slot): boolean => {
      if (!job.issue(slot)) return false;
      this.unique += 2;
      slot.unique = this.unique;
      const request = slot.request;
      request.writeUInt32LE(slot.requestLength, 0);
      request.writeUInt32LE(this.unique >>> 0, 8);
      request.writeUInt32LE(Math.floor(this.unique / 2 ** 32), 12);
      const head = this.writeChain(slot);
      this.availRing[this.nextAvail & (this.queue.size - 1)] = head;
      this.nextAvail = (this.nextAvail + 1) & 0xffff;
      inFlight++;
      published = true;
      return true;
    };
    const flush = () => {
      if (!published) return;
      published = false;
      Atomics.store(this.availIdx, 0, this.nextAvail);
      if ((Atomics.load(this.usedFlags, 0) & USED_F_NO_NOTIFY) === 0) {
        native().writev(this.queue.kickFd, [ONE]);
        kicks++;
      }
    };
    return new Promise<RunResult>((resolve, reject) => {
      let watch: Watch | undefined;
      let timer: NodeJS.Timeout | undefined;
      let failed = false;
      const finish = (error?: Error) => {
        if (watch) native().unwatch(watch);
        watch = undefined;
        clearTimeout(timer);
        this.availFlags[0] = 0;
        if (error) {
          failed = true;
          return reject(error);
        }
        resolve({ requests, wallNs: Number(process.hrtime.bigint() - start), interrupts, kicks });
      };
      const armStall = () => {
        clearTimeout(timer);
        timer = setTimeout(() => finish(new Error(`no reply for ${stallMs} ms with ${inFlight} requests in flight (after ${requests})`)), stallMs);
      };
      const reap = () => {
        // virtqueue_disable_cb: no interrupts while we reap.
        this.availFlags[0] = AVAIL_F_NO_INTERRUPT;
        for (;;) {
          const used = Atomics.load(this.usedIdx, 0);
          while (this.lastUsed !== used) {
            const at = 2 * (this.lastUsed & (this.queue.size - 1));
            const head = this.usedRing[at];
            const length = this.usedRing[at + 1];
            this.lastUsed = (this.lastUsed + 1) & 0xffff;
            const slot = this.bySlotHead[head];
            if (!slot) throw new Error(`used ring names descriptor ${head}, which is no request in flight`);
            inFlight--;
            requests++;
            checkReply(slot, length);
            job.complete(slot, length);
            post(slot);
          }
          flush();
          // virtqueue_enable_cb: interrupts back on, then look once more (a reply may have come meanwhile).
          Atomics.store(this.availFlags, 0, 0);
          if (Atomics.load(this.usedIdx, 0) === this.lastUsed) break;
          this.availFlags[0] = AVAIL_F_NO_INTERRUPT;
        }
      };
      const onInterrupt = () => {
        if (failed) return;
        native().read(this.queue.callFd, this.eventBuffer);
        interrupts++;
        try {
          reap();
        } catch (err) {
          return finish(err as Error);
        }
        if (inFlight === 0) return finish();
        armStall();
      };
      // A call left over from an earlier run is drained first.
      native().read(this.queue.callFd, this.eventBuffer);
      watch = native().watch(this.queue.callFd, onInterrupt);
      try {
        for (const slot of this.slots.slice(0, depth)) post(slot);
        flush();
      } catch (err) {
        return finish(err as Error);
      }
      if (inFlight === 0) return finish();
      armStall();
    });
  }

  /** Writes the slot's chain into the descriptor table (slot i owns descriptors 2i and 2i + 1); returns its head. */
  private writeChain(slot: Slot): number {
    const head = 2 * slot.index;
    this.bySlotHead[head] = slot;
    slot.poison();
    const d = this.descriptors;
    if (slot.layout === 'single') {
      writeDescriptor(d, head, slot.requestGpa, slot.requestLength, DESC_F_NEXT, head + 1);
      writeDescriptor(d, head + 1, slot.replyGpa, slot.replyLength, DESC_F_WRITE, 0);
      return head;
    }
    // As Linux builds a READ: in header, arguments, out header, then one descriptor per page.
    const table = slot.table;
    const pages = Math.ceil((slot.replyLength - FUSE_OUT_HEADER) / PAGE);
    const entries = 3 + pages;
    writeDescriptor(table, 0, slot.requestGpa, FUSE_IN_HEADER, DESC_F_NEXT, 1);
    writeDescriptor(table, 1, slot.requestGpa + FUSE_IN_HEADER, slot.requestLength - FUSE_IN_HEADER, DESC_F_NEXT, 2);
    writeDescriptor(table, 2, slot.replyGpa, FUSE_OUT_HEADER, DESC_F_WRITE | (pages > 0 ? DESC_F_NEXT : 0), 3);
    for (let i = 0; i < pages; i++) {
      const last = i === pages - 1;
      const length = last ? slot.replyLength - FUSE_OUT_HEADER - PAGE * i : PAGE;
      writeDescriptor(table, 3 + i, slot.pageGpas[i], length, DESC_F_WRITE | (last ? 0 : DESC_F_NEXT), last ? 0 : 4 + i);
    }
    writeDescriptor(d, head, slot.tableGpa, 16 * entries, DESC_F_INDIRECT, 0);
    return head;
  }

  /** Hangs up and frees the guest memory. */
  close(): void {
    this.conn.close();
    this.hiprio.close();
    this.queue.close();
    this.memory.free();
  }
}

function writeDescriptor(table: DataView, index: number, gpa: number, length: number, flags: number, next: number): void {
  const at = 16 * index;
  table.setUint32(at, gpa >>> 0, true);
  table.setUint32(at + 4, Math.floor(gpa / 2 ** 32), true);
  table.setUint32(at + 8, length, true);
  table.setUint16(at + 12, flags, true);
  table.setUint16(at + 14, next, true);
}

/** The used length must be the reply's own, and the reply must answer this slot's request. */
function checkReply(slot: Slot, usedLength: number): void {
  if (usedLength < FUSE_OUT_HEADER) throw new Error(`request ${slot.unique}: used length ${usedLength}, shorter than an out header`);
  const header = slot.header();
  const length = header.readUInt32LE(0);
  const unique = header.readUInt32LE(8) + header.readUInt32LE(12) * 2 ** 32;
  if (unique !== slot.unique) throw new Error(`request ${slot.unique}: the reply names request ${unique}`);
  if (length !== usedLength) throw new Error(`request ${slot.unique}: used length ${usedLength}, the reply header says ${length}`);
}

/**
 * Writes a FUSE request (in header and `args`) into the slot; the engine
 * fills in len and unique. With `constantArgs` (the caller never changes that
 * buffer) the same request as the slot's last one is not written again.
 */
export function writeRequest(slot: Slot, opcode: number, nodeid: bigint | number, args: Buffer, constantArgs = false): void {
  const b = slot.request;
  const id = Number(nodeid);
  slot.layout = 'single';
  const last = slot.written;
  if (constantArgs && last && last.opcode === opcode && last.nodeid === id && last.args === args) return;
  slot.written = constantArgs ? { opcode, nodeid: id, args } : undefined;
  b.writeUInt32LE(opcode, 4);
  b.writeUInt32LE(id >>> 0, 16);
  b.writeUInt32LE(Math.floor(id / 2 ** 32), 20);
  b.writeUInt32LE(0, 24); // uid, gid 0, pid 1: root, as the kernel says for a root process
  b.writeUInt32LE(0, 28);
  b.writeUInt32LE(1, 32);
  b.writeUInt32LE(0, 36);
  args.copy(b, FUSE_IN_HEADER);
  slot.requestLength = FUSE_IN_HEADER + args.length;
}
