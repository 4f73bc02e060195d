// A split virtqueue (virtio 1.x, 2.7) in shared guest memory, seen from the
// device side: take the chains the driver made available, give them back
// through the used ring, and interrupt the driver only when it asked.
//
// Memory ordering (x86-64, which is what we run on): the index loads and
// stores use Atomics, which V8 neither reorders nor lets the CPU reorder:
// avail.idx is loaded before the ring entries and descriptors it covers
// (acquire); a used element is written before used.idx is published
// (release); Atomics.store is a full fence (XCHG), which the spec needs
// between publishing used.idx and reading used_event, and between
// publishing avail_event and re-reading avail.idx (else a kick is lost).
import { GuestMemory, GuestMemoryError, hex, type Places, type Span } from './memory.js';
import { type FastRing, optionalNative } from '../native/index.js';

const DESC_F_NEXT = 1;
const DESC_F_WRITE = 2;
const DESC_F_INDIRECT = 4;
const DESC_SIZE = 16;
const AVAIL_F_NO_INTERRUPT = 1;
const USED_F_NO_NOTIFY = 1;
/**
 * Replies that make an interrupt worth sending before the turn ends: enough
 * for the driver to reap and post more while we answer the rest, few enough
 * that an interrupt (a wake-up on another CPU) is not paid per reply.
 */
const EARLY_INTERRUPT_BATCH = 16;
/** A request's readable part is copied into one buffer; FUSE requests are far smaller. */
const MAX_READABLE = 4 * 1024 * 1024;

export interface QueueLayout {
  size: number;
  /** Guest physical addresses of the three parts. */
  desc: number;
  avail: number;
  used: number;
  /** The first avail index to take (SET_VRING_BASE). */
  nextAvail: number;
  eventIdx: boolean;
  indirect: boolean;
}

/** Why native code that waited for kicks (SplitQueue.waitAndServeNatively) handed the turn back. */
export enum NativeWait {
  /** Something else the event loop watches is ready, or a timer is due. */
  EventLoop = 0,
  /** A chain is left that JavaScript must take. */
  ForJavaScript = 1,
  /** A kick brought more than one chain: the driver is busy. */
  Busy = 2,
  /** It waited as often as it may in one go. */
  Rounds = 3,
  /** A system call failed. */
  Failed = 4,
}

/** A chain that breaks the rules: the device returns it unused and goes on. */
export class ChainError extends Error {
  override name = 'ChainError';
}

/** The queue itself is beyond repair (bogus indices): it stops until the front end resets it. */
export class QueueError extends Error {
  override name = 'QueueError';
}

/** Where the three parts of a ring are, as guest physical addresses. */
export interface RingAddresses {
  desc: number;
  avail: number;
  used: number;
}

export class SplitQueue {
  private readonly mask: number;
  private descriptors!: DataView;
  /** flags, idx, ring[size], used_event */
  private avail!: Uint16Array;
  /** flags, idx, then (at 2 + 4·size) avail_event; elements through `usedElements` */
  private used!: Uint16Array;
  private usedElements!: Uint32Array;
  private readonly availEventIndex: number;
  private nextAvail: number;
  private nextUsed: number;
  private signalledUsed: number;
  private notifyScheduled = false;
  /** An interrupt was sent and the driver has not been seen acting on it since (reaping, or adding chains). */
  private awaitingDriver = false;
  /** avail.idx when that interrupt was sent. */
  private availAtInterrupt = 0;
  private readonly endOfTurn = () => {
    this.notifyScheduled = false;
    this.notify(false);
  };
  private active = true;
  private brokenReason?: string;
  /** Chains taken and not yet completed, and who waits for there to be none. */
  private inFlight = 0;
  private idleWaiters: (() => void)[] = [];
  /** One chain object per head, reused request after request. */
  private readonly chains: (DescriptorChain | undefined)[] = [];
  /** Where the rings are (guest addresses), for native code. */
  private addresses!: RingAddresses;
  /** The ring as native code takes it, for the memory table of `nativeGeneration`; null: native code cannot have it. */
  private nativeRing?: FastRing | null;
  private nativeGeneration = -1;

  constructor(
    private readonly memory: GuestMemory,
    private readonly layout: QueueLayout,
    /** Interrupts the driver (writes the call eventfd). */
    private readonly interrupt: () => void,
  ) {
    const { size } = layout;
    if (size === 0 || (size & (size - 1)) !== 0) throw new QueueError(`queue size ${size} is not a power of two`);
    this.mask = size - 1;
    this.availEventIndex = 2 + 4 * size;
    this.bind(layout);
    this.nextAvail = layout.nextAvail & 0xffff;
    // The driver may have used entries from before (a reconnect): carry on from its used.idx.
    this.nextUsed = Atomics.load(this.used, 1);
    this.signalledUsed = this.nextUsed;
  }

  /**
   * Finds the rings again after the memory table changed (hotplug): the
   * queue's state and the chains in flight carry on.
   */
  rebind(addresses: RingAddresses): void {
    this.bind(addresses);
  }

  private bind({ desc, avail, used }: RingAddresses): void {
    const { size } = this.layout;
    this.addresses = { desc, avail, used };
    this.nativeRing = undefined;
    if (desc % 16 !== 0 || avail % 2 !== 0 || used % 4 !== 0) {
      throw new QueueError(`misaligned rings (descriptors ${hex(desc)}, avail ${hex(avail)}, used ${hex(used)})`);
    }
    const table = this.span(desc, DESC_SIZE * size, 'descriptor table');
    const availSpan = this.span(avail, 2 * (3 + size), 'avail ring');
    const usedSpan = this.span(used, 6 + 8 * size, 'used ring');
    this.descriptors = new DataView(table.bytes.buffer, table.bytes.byteOffset + table.offset, table.length);
    this.avail = new Uint16Array(availSpan.bytes.buffer, availSpan.bytes.byteOffset + availSpan.offset, 3 + size);
    this.used = new Uint16Array(usedSpan.bytes.buffer, usedSpan.bytes.byteOffset + usedSpan.offset, 3 + 4 * size);
    this.usedElements = new Uint32Array(usedSpan.bytes.buffer, usedSpan.bytes.byteOffset + usedSpan.offset + 4, 2 * size);
  }

  /** Resolves once every chain taken so far has been completed. */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  get size(): number {
    return this.layout.size;
  }

  /** The next avail index to take: what GET_VRING_BASE reports. */
  get availIndex(): number {
    return this.nextAvail;
  }

  /** False once stopped: nothing may be written to guest memory for it any more. */
  get isActive(): boolean {
    return this.active;
  }

  get broken(): string | undefined {
    return this.brokenReason;
  }

  /** Stops the queue for good: chains completed later are dropped (the ring may be unmapped). */
  deactivate(): void {
    this.active = false;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }

  /**
   * The next chain the driver made available, or null when there is none (or
   * the queue is broken). A chain that breaks the rules is returned to the
   * driver unused and reported through `onRejected`; taking goes on.
   */
  pop(onRejected: (error: Error) => void): DescriptorChain | null {
    while (this.active && this.brokenReason === undefined) {
      const availIdx = Atomics.load(this.avail, 1);
      if (availIdx === this.nextAvail) return null;
      const pending = (availIdx - this.nextAvail) & 0xffff;
      if (pending > this.layout.size) {
        this.break(`avail.idx ${availIdx} is ${pending} entries ahead of ${this.nextAvail}, more than the queue holds (${this.layout.size})`);
        return null;
      }
      const head = this.avail[2 + (this.nextAvail & this.mask)];
      this.nextAvail = (this.nextAvail + 1) & 0xffff;
      if (head >= this.layout.size) {
        this.break(`avail ring names descriptor ${head}, beyond the queue's ${this.layout.size}`);
        return null;
      }
      this.inFlight++;
      this.taken++;
      try {
        return this.walk(head);
      } catch (err) {
        if (!(err instanceof ChainError || err instanceof GuestMemoryError)) throw err;
        this.complete(head, 0);
        onRejected(err);
      }
    }
    return null;
  }

  /**
   * Asks the driver to kick again for new chains (EVENT_IDX: avail_event), then
   * says whether chains arrived meanwhile, which the caller must take: a
   * driver that added them before seeing avail_event will not kick.
   */
  enableNotification(): boolean {
    if (!this.active || this.brokenReason !== undefined) return false;
    if (this.layout.eventIdx) Atomics.store(this.used, this.availEventIndex, this.nextAvail);
    else Atomics.store(this.used, 0, 0);
    return Atomics.load(this.avail, 1) !== this.nextAvail;
  }

  /**
   * Tells the driver it need not kick while we are taking chains anyway
   * (VRING_USED_F_NO_NOTIFY; with EVENT_IDX, avail_event already says so
   * until enableNotification moves it): a kick costs it a system call and us
   * a wake-up.
   */
  disableNotification(): void {
    if (!this.active || this.layout.eventIdx) return;
    this.used[0] = USED_F_NO_NOTIFY;
  }

  /**
   * Lets native code answer chains, in order, from the next one: `serve` gets
   * the ring (see the addon's fastRing) and the next avail and used indices,
   * answers and puts on the used ring as many as it can, and returns how many
   * (-1: its view of the memory is stale). Returns that count (0 when there is no addon),
   * or undefined when there was no chain to show it.
   */
  serveNatively(serve: (ring: FastRing, nextAvail: number, nextUsed: number, max: number) => number): number | undefined {
    if (!this.active || this.brokenReason !== undefined || Atomics.load(this.avail, 1) === this.nextAvail) return undefined;
    if (this.nativeRing === undefined || this.nativeGeneration !== this.memory.generation) this.makeNativeRing();
    let total = 0;
    // In batches, so that the driver hears of the first replies while the rest are answered.
    for (let answered = EARLY_INTERRUPT_BATCH; answered === EARLY_INTERRUPT_BATCH && this.nativeRing && Atomics.load(this.avail, 1) !== this.nextAvail; ) {
      answered = serve(this.nativeRing, this.nextAvail, this.nextUsed, EARLY_INTERRUPT_BATCH);
      if (answered <= 0) {
        if (answered < 0) this.nativeRing = undefined; // made again next time
        break;
      }
      this.nextAvail = (this.nextAvail + answered) & 0xffff;
      this.nextUsed = (this.nextUsed + answered) & 0xffff;
      this.taken += answered;
      total += answered;
      this.notify(true);
    }
    if (total > 0 && !this.notifyScheduled) {
      this.notifyScheduled = true;
      queueMicrotask(this.endOfTurn);
    }
    return total;
  }

  /**
   * Waits on the CPU, at most `maxNs`, for the driver to make another chain
   * available, with its kicks turned off meanwhile; true when it did (take
   * it). False at once without the addon. Notifications are on again after.
   */
  spinForChains(maxNs: number): boolean {
    if (!this.active || this.brokenReason !== undefined) return false;
    if (this.nativeRing === undefined || this.nativeGeneration !== this.memory.generation) this.makeNativeRing();
    if (!this.nativeRing) return false;
    this.disableNotification();
    const found = optionalNative()!.ringSpin(this.nativeRing, this.nextAvail, maxNs) === 1;
    return this.enableNotification() || found;
  }

  /**
   * Lets native code wait for the driver's kicks and answer what they bring
   * (see the addon's virtiofsLoop): `run` gets the ring and the queue's
   * state (read and written back). Returns why it stopped, or undefined when
   * native code cannot have the ring (then wait as usual).
   */
  waitAndServeNatively(run: (ring: FastRing, state: Float64Array) => number): NativeWait | undefined {
    if (!this.active || this.brokenReason !== undefined) return undefined;
    if (this.nativeRing === undefined || this.nativeGeneration !== this.memory.generation) this.makeNativeRing();
    if (!this.nativeRing) return undefined;
    const state = this.loopState;
    state[0] = this.nextAvail;
    state[1] = this.nextUsed;
    state[2] = this.signalledUsed;
    state[3] = this.awaitingDriver ? 1 : 0;
    state[4] = this.availAtInterrupt;
    state[5] = this.layout.eventIdx ? 1 : 0;
    const why = run(this.nativeRing, state);
    if (why < 0) {
      this.nativeRing = undefined;
      return undefined;
    }
    this.taken += (state[0] - this.nextAvail) & 0xffff;
    this.nextAvail = state[0];
    this.nextUsed = state[1];
    this.signalledUsed = state[2];
    this.awaitingDriver = state[3] !== 0;
    this.availAtInterrupt = state[4];
    return why;
  }
  private readonly loopState = new Float64Array(6);

  /** Chains taken so far (by pop and natively): a turn's count tells how busy the driver is. */
  get takenCount(): number {
    return this.taken;
  }
  private taken = 0;

  private makeNativeRing(): void {
    const addon = optionalNative();
    this.nativeGeneration = this.memory.generation;
    if (!addon) return void (this.nativeRing = null);
    const { buffers, gpas, primaries } = this.memory.nativeChunks();
    const { desc, avail, used } = this.addresses;
    try {
      this.nativeRing = addon.fastRing(buffers, gpas, primaries, desc, avail, used, this.layout.size, this.layout.indirect);
    } catch {
      this.nativeRing = null; // the rings are not where native code can see them whole: JavaScript answers
    }
  }

  /** Puts a chain on the used ring with `length` bytes written; interrupts the driver soon after if it wants that. */
  complete(head: number, length: number): void {
    if (!this.active) return;
    if (this.inFlight > 0 && --this.inFlight === 0 && this.idleWaiters.length > 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
    const slot = this.nextUsed & this.mask;
    this.usedElements[2 * slot] = head;
    this.usedElements[2 * slot + 1] = length;
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    Atomics.store(this.used, 1, this.nextUsed);
    // The driver hears of a batch of replies at once, so it reaps while we answer the rest;
    // the end of the turn covers whatever it has not seen by then.
    this.notify(true);
    if (!this.notifyScheduled) {
      this.notifyScheduled = true;
      queueMicrotask(this.endOfTurn);
    }
  }

  /**
   * Interrupts the driver if it wants to hear of the used entries added since
   * the last check. `early` (right after a reply, mid-turn) waits for a batch
   * of replies, and holds back while an interrupt sent before has not been
   * acted on (the driver neither reaped nor added chains since): a driver
   * still waking up would only be interrupted again. The check at the end of the
   * turn does not hold back, for drivers that never disable interrupts.
   */
  /** Sends the interrupt the end of the turn would send, now (before the device waits for a kick). */
  flushInterrupt(): void {
    this.notify(false);
  }

  private notify(early: boolean): void {
    if (!this.active || this.signalledUsed === this.nextUsed) return;
    const old = this.signalledUsed;
    const now = this.nextUsed;
    if (early && ((now - old) & 0xffff) < EARLY_INTERRUPT_BATCH) return;
    if (this.layout.eventIdx) {
      this.signalledUsed = now;
      const usedEvent = Atomics.load(this.avail, 2 + this.layout.size);
      if (((now - usedEvent - 1) & 0xffff) >= ((now - old) & 0xffff)) return;
    } else {
      if (Atomics.load(this.avail, 0) & AVAIL_F_NO_INTERRUPT) {
        // It is reaping: it looks at used.idx again before it enables interrupts.
        this.awaitingDriver = false;
        return;
      }
      if (early && this.awaitingDriver) {
        if (Atomics.load(this.avail, 1) === this.availAtInterrupt) return;
        this.awaitingDriver = false; // it added chains since: it is awake, or asleep again
      }
      this.signalledUsed = now;
    }
    this.awaitingDriver = true;
    this.availAtInterrupt = Atomics.load(this.avail, 1);
    this.interrupt();
  }

  private break(reason: string): void {
    this.brokenReason = reason;
  }

  /**
   * Follows a chain from `head`, bounded so that loops and overlong chains
   * end. The readable bytes are copied into the chain (the guest may change
   * its memory at any time); writable descriptors are kept as guest addresses.
   */
  private walk(head: number): DescriptorChain {
    // A head's chain object is reused once its last request was answered; a
    // guest that posts a head still in flight gets a fresh one.
    let chain = this.chains[head];
    if (!chain || chain.pending) chain = this.chains[head] = new DescriptorChain(this, this.memory, head);
    chain.begin();
    let table = this.descriptors;
    let tableSize = this.layout.size;
    let inIndirect = false;
    let index = head;
    let seen = 0;
    for (;;) {
      if (index >= tableSize) throw new ChainError(`chain from ${head}: descriptor ${index} is beyond its table of ${tableSize}`);
      if (++seen > tableSize) throw new ChainError(`chain from ${head} is longer than its table of ${tableSize} (a loop?)`);
      const at = index * DESC_SIZE;
      const address = table.getUint32(at, true) + table.getUint32(at + 4, true) * 2 ** 32;
      const length = table.getUint32(at + 8, true);
      const flags = table.getUint16(at + 12, true);
      if (flags & DESC_F_INDIRECT) {
        if (!this.layout.indirect) throw new ChainError(`chain from ${head}: an indirect descriptor, but INDIRECT_DESC was not negotiated`);
        if (inIndirect) throw new ChainError(`chain from ${head}: an indirect descriptor inside an indirect table`);
        if (flags & DESC_F_NEXT) throw new ChainError(`chain from ${head}: a descriptor with both INDIRECT and NEXT`);
        if (length === 0 || length % DESC_SIZE !== 0) throw new ChainError(`chain from ${head}: an indirect table of ${length} bytes`);
        const span = this.memory.contiguous(address, length);
        table = new DataView(span.bytes.buffer, span.bytes.byteOffset + span.offset, length);
        tableSize = length / DESC_SIZE;
        inIndirect = true;
        index = 0;
        seen = 0;
        continue;
      }
      if (flags & DESC_F_WRITE) {
        this.memory.check(address, length);
        chain.addWritable(address, length);
      } else {
        if (chain.writableLength > 0 || chain.writableCount > 0) throw new ChainError(`chain from ${head}: a readable descriptor after a writable one`);
        if (chain.readableLength + length > MAX_READABLE) throw new ChainError(`chain from ${head}: more than ${MAX_READABLE} readable bytes`);
        chain.addReadable(address, length);
      }
      if (!(flags & DESC_F_NEXT)) break;
      index = table.getUint16(at + 14, true);
    }
    chain.pending = true;
    return chain;
  }

  private span(address: number, length: number, what: string): Span {
    try {
      return this.memory.contiguous(address, length);
    } catch (err) {
      throw new QueueError(`${what}: ${(err as Error).message}`);
    }
  }
}

/** Readable bytes a chain keeps without allocating: FUSE requests are small, except WRITEs we refuse anyway. */
const REQUEST_BUFFER = 4096;

/**
 * One request from the driver: bytes to read, room to write, and a way to
 * hand it back. The object belongs to its head and is reused for the next
 * request on that head once this one is answered.
 */
export class DescriptorChain {
  /** Taken from the ring and not yet answered. */
  pending = false;
  readableLength = 0;
  writableLength = 0;
  writableCount = 0;
  private buffer = Buffer.allocUnsafe(REQUEST_BUFFER);
  private view = this.buffer.subarray(0, 0);
  /** The writable descriptors as guest addresses, resolved when the reply is written (the memory table may change meanwhile). */
  private readonly writableAddresses: number[] = [];
  private readonly writableLengths: number[] = [];

  constructor(
    private readonly queue: SplitQueue,
    private readonly memory: GuestMemory,
    readonly head: number,
  ) {}

  /** Counts the requests this head carried, so a late reply to an earlier one is told apart. */
  generation = 0;

  /** Starts a new request on this head. */
  begin(): void {
    this.generation++;
    this.readableLength = 0;
    this.writableLength = 0;
    this.writableCount = 0;
  }

  addReadable(address: number, length: number): void {
    const end = this.readableLength + length;
    if (end > this.buffer.length) {
      const grown = Buffer.allocUnsafe(Math.max(end, 2 * this.buffer.length));
      this.buffer.copy(grown, 0, 0, this.readableLength);
      this.buffer = grown;
    }
    this.memory.copyOut(address, length, this.buffer, this.readableLength);
    this.readableLength = end;
  }

  addWritable(address: number, length: number): void {
    this.writableAddresses[this.writableCount] = address;
    this.writableLengths[this.writableCount] = length;
    this.writableCount++;
    this.writableLength += length;
  }

  /**
   * The readable part, copied out of guest memory when the chain was taken.
   * Valid until the chain is answered (the next request on the head reuses it).
   */
  read(): Buffer {
    if (this.view.buffer !== this.buffer.buffer || this.view.byteOffset !== this.buffer.byteOffset || this.view.length !== this.readableLength) {
      this.view = this.buffer.subarray(0, this.readableLength);
    }
    return this.view;
  }

  /**
   * Writes `reply` into the writable part and returns the chain with that
   * length. Throws ChainError (and writes nothing) when it does not fit.
   */
  reply(reply: Uint8Array): void {
    if (!this.queue.isActive) return this.drop();
    if (reply.length > this.writableLength) throw new ChainError(`a reply of ${reply.length} bytes does not fit the ${this.writableLength} writable bytes of chain ${this.head}`);
    try {
      this.write(reply, 0);
    } catch (err) {
      // The memory was unplugged under the request: nothing more can reach the guest.
      if (!(err instanceof GuestMemoryError)) throw err;
      return this.done(0);
    }
    this.done(reply.length);
  }

  /**
   * The places of the writable bytes [offset, offset + length) in guest
   * memory, put in `into` (its pieces replaced), for filling them in place;
   * false when the chain has no room for them or they are too many pieces.
   * Valid only until the event loop turns: finish with replyInPlace() before
   * that.
   */
  writablePlaces(offset: number, length: number, into: Places): boolean {
    into.buffers.length = 0;
    into.count = 0;
    if (!this.queue.isActive || offset + length > this.writableLength) return false;
    try {
      let skip = offset;
      let left = length;
      for (let i = 0; i < this.writableCount && left > 0; i++) {
        const size = this.writableLengths[i];
        if (skip >= size) {
          skip -= size;
          continue;
        }
        const take = Math.min(size - skip, left);
        if (!this.memory.places(this.writableAddresses[i] + skip, take, into)) return false;
        skip = 0;
        left -= take;
      }
    } catch (err) {
      if (!(err instanceof GuestMemoryError)) throw err;
      into.count = 0;
      return false;
    }
    return true;
  }

  /** Writes `header` at the start of the writable part, whose bytes after it were filled in place, and returns the chain with `length` bytes. */
  replyInPlace(header: Uint8Array, length: number): void {
    if (!this.queue.isActive) return this.drop();
    if (length > this.writableLength) throw new ChainError(`a reply of ${length} bytes does not fit the ${this.writableLength} writable bytes of chain ${this.head}`);
    try {
      this.write(header, 0);
    } catch (err) {
      if (!(err instanceof GuestMemoryError)) throw err;
      return this.done(0);
    }
    this.done(length);
  }

  /** Returns the chain to the driver with `length` bytes written (0: nothing). */
  done(length = 0): void {
    if (!this.pending) return;
    this.pending = false;
    this.queue.complete(this.head, length);
  }

  private drop(): void {
    this.pending = false;
  }

  /** Copies `bytes` into the writable part from `offset` on (it fits: checked by the caller). */
  private write(bytes: Uint8Array, offset: number): void {
    let at = 0;
    let skip = offset;
    for (let i = 0; i < this.writableCount && at < bytes.length; i++) {
      const size = this.writableLengths[i];
      if (skip >= size) {
        skip -= size;
        continue;
      }
      const take = Math.min(size - skip, bytes.length - at);
      this.memory.copyIn(this.writableAddresses[i] + skip, at === 0 && take === bytes.length ? bytes : bytes.subarray(at, at + take));
      skip = 0;
      at += take;
    }
  }
}
