// One vhost-user connection: answers the front end's requests (features,
// memory table, vrings), starts and stops virtqueues, and hands the chains
// the guest makes available to a virtio device. A request that breaks the
// protocol is refused (and logged); it never takes the process down.
import { native, type Watch } from '../native/index.js';
import { closeAll, type Message, MessageChannel } from './channel.js';
import { GuestMemory, GuestMemoryError, hex, type MemoryRegion } from './memory.js';
import {
  FLAG_NEED_REPLY,
  MAX_MEM_SLOTS,
  MAX_QUEUE_SIZE,
  OFFERED_PROTOCOL_FEATURES,
  ProtocolFeature,
  REGION_SIZE,
  Request,
  requestName,
  VERSION,
  VERSION_MASK,
  VirtioFeature,
  VRING_INDEX_MASK,
  VRING_NOFD,
} from './protocol.js';
import { type DescriptorChain, NativeWait, type RingAddresses, SplitQueue } from './virtqueue.js';

/** What a virtio device (virtio-fs) gives the transport and gets from it. */
export interface VirtioDevice {
  /** How many virtqueues the device has. */
  readonly queueCount: number;
  /** Device feature bits beyond the ones the transport offers itself. */
  readonly deviceFeatures: bigint;
  /**
   * A chain the guest made available on queue `queue`: complete it exactly
   * once, now or later. Returns true when it is left waiting for a later turn
   * of the event loop (I/O, a remote store).
   */
  handle(queue: number, chain: DescriptorChain): boolean | void;
  /**
   * Optional: answers chains from the front of `ring` natively (SplitQueue.serveNatively)
   * before the next is taken for handle(); whatever it leaves comes to handle() as usual.
   */
  serveNatively?(queue: number, ring: SplitQueue): void;
  /**
   * Optional: waits for kicks on `kickFd` and answers natively what they bring
   * (SplitQueue.waitAndServeNatively), interrupting through `callFd` (-1: none);
   * undefined when it cannot (then the backend waits itself).
   */
  serveAfterKicks?(queue: number, ring: SplitQueue, kickFd: number, callFd: number): NativeWait | undefined;
  /** The device was reset, or the front end went away: drop all per-guest state. */
  reset(): void;
}

export interface BackendOptions {
  log: (message: string) => void;
  /**
   * After a turn whose requests were all answered at once, wait for the next
   * kick in poll(2) instead of a turn of the event loop (see service()).
   */
  waitForKicks?: boolean;
  /**
   * With waitForKicks: how long to wait on the CPU for a busy driver's next request (one that
   * had several in flight) before sleeping in poll(2); 0 never (default SPIN_NS).
   */
  pollMaxNs?: number;
  /** Called once the connection is gone and everything it held is released. */
  onClosed?: (reason: string) => void;
}

/** The transport's own features: the ring layouts we implement, and vhost-user's protocol features. */
const TRANSPORT_FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.INDIRECT_DESC | VirtioFeature.EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES;

/** A request the front end got wrong: answered with a failure ack, logged, and otherwise ignored. */
class ProtocolError extends Error {}

interface Vring {
  size: number;
  /** Front-end virtual addresses from SET_VRING_ADDR. */
  addresses?: { desc: number; avail: number; used: number };
  nextAvail: number;
  kickFd?: number;
  kickWatch?: Watch;
  callFd?: number;
  errFd?: number;
  enabled: boolean;
  /** Set while the ring runs: from SET_VRING_KICK until GET_VRING_BASE or a reset. */
  queue?: SplitQueue;
}

/** Kicks waited for in one turn before the event loop gets its turn anyway (promises, ticks). */
const MAX_WAITS_IN_A_TURN = 1024;
/** How long to wait on the CPU for a busy driver's next request before sleeping: about what a wake-up costs here. */
const SPIN_NS = 50_000;
/** How long GET_VRING_BASE waits for the requests in flight before dropping their replies. */
const STOP_TIMEOUT_MS = 5000;

export class VhostUserBackend {
  private readonly channel: MessageChannel;
  private readonly memory = new GuestMemory(MAX_MEM_SLOTS);
  private readonly vrings: Vring[];
  private ackedFeatures = 0n;
  /** Per queue: what a chain that breaks the rules is reported through. */
  private readonly onRejected: ((error: Error) => void)[] = [];
  private ackedProtocolFeatures = 0n;
  private status = 0n;
  private closed = false;

  constructor(
    socket: number,
    private readonly device: VirtioDevice,
    private readonly options: BackendOptions,
  ) {
    this.vrings = Array.from({ length: device.queueCount }, () => newVring());
    this.channel = new MessageChannel(socket, {
      message: (message) => this.receive(message),
      closed: (reason) => this.release(reason),
    });
  }

  get offeredFeatures(): bigint {
    return TRANSPORT_FEATURES | this.device.deviceFeatures;
  }

  /** Hangs up on the front end and releases everything. */
  close(reason = 'closed by the back end'): void {
    this.channel.close(reason);
  }

  private get replyAck(): boolean {
    return (this.ackedProtocolFeatures & ProtocolFeature.REPLY_ACK) !== 0n;
  }

  private receive(message: Message): void {
    const name = requestName(message.request);
    const refused = (err: unknown) => {
      closeAll(message.fds.splice(0));
      if (err instanceof ProtocolError || err instanceof GuestMemoryError) this.options.log(`${name} refused: ${err.message}`);
      else this.options.log(`${name} failed: ${(err as Error)?.stack ?? err}`);
    };
    const answer = (body: Buffer | undefined, failed: boolean) => {
      if (body !== undefined) this.channel.reply(message.request, body);
      else if (REPLY_REQUIRED.has(message.request)) this.channel.reply(message.request, Buffer.alloc(0)); // an empty reply is how failure is said
      else if (this.replyAck && message.flags & FLAG_NEED_REPLY) this.channel.reply(message.request, u64(failed ? 1n : 0n));
    };
    let result: Buffer | undefined | Promise<Buffer>;
    try {
      if ((message.flags & VERSION_MASK) !== VERSION) throw new ProtocolError(`version ${message.flags & VERSION_MASK}, not 1`);
      result = this.dispatch(message);
    } catch (err) {
      refused(err);
      return answer(undefined, true);
    }
    if (!(result instanceof Promise)) return answer(result, false);
    // Only GET_VRING_BASE waits (for the requests in flight); the front end waits for its reply.
    result.then(
      (body) => answer(body, false),
      (err: unknown) => {
        refused(err);
        answer(undefined, true);
      },
    );
  }

  /** Handles one request; returns the reply body of requests that have one. Fds not kept are closed. */
  private dispatch(m: Message): Buffer | undefined | Promise<Buffer> {
    const fds = m.fds;
    if (!FD_REQUESTS.has(m.request) && fds.length > 0) throw new ProtocolError(`${fds.length} unexpected file descriptor(s)`);
    switch (m.request) {
      case Request.GET_FEATURES:
        return u64(this.offeredFeatures);
      case Request.SET_FEATURES: {
        const features = readU64(m.payload, 8);
        const unknown = features & ~this.offeredFeatures;
        if (unknown) throw new ProtocolError(`features ${hex(unknown)} were never offered`);
        this.ackedFeatures = features;
        return undefined;
      }
      case Request.GET_PROTOCOL_FEATURES:
        return u64(OFFERED_PROTOCOL_FEATURES);
      case Request.SET_PROTOCOL_FEATURES: {
        const features = readU64(m.payload, 8);
        const unknown = features & ~OFFERED_PROTOCOL_FEATURES;
        if (unknown) throw new ProtocolError(`protocol features ${hex(unknown)} were never offered`);
        this.ackedProtocolFeatures = features;
        return undefined;
      }
      case Request.SET_OWNER:
        return undefined;
      case Request.RESET_OWNER:
      case Request.RESET_DEVICE:
        this.reset();
        return undefined;
      case Request.GET_QUEUE_NUM:
        return u64(BigInt(this.vrings.length));
      case Request.GET_MAX_MEM_SLOTS:
        return u64(BigInt(MAX_MEM_SLOTS));
      case Request.SET_MEM_TABLE:
        this.setMemTable(m.payload, fds);
        return undefined;
      case Request.ADD_MEM_REG:
        this.addMemoryRegion(m.payload, fds);
        return undefined;
      case Request.REM_MEM_REG:
        this.removeMemoryRegion(m.payload, fds);
        return undefined;
      case Request.SET_VRING_NUM: {
        const { vring, value } = this.vringState(m.payload);
        if (vring.queue) throw new ProtocolError('the ring is running');
        if (value === 0 || value > MAX_QUEUE_SIZE || (value & (value - 1)) !== 0) throw new ProtocolError(`queue size ${value} (must be a power of two up to ${MAX_QUEUE_SIZE})`);
        vring.size = value;
        return undefined;
      }
      case Request.SET_VRING_ADDR:
        this.setVringAddr(m.payload);
        return undefined;
      case Request.SET_VRING_BASE: {
        const { vring, value } = this.vringState(m.payload);
        if (vring.queue) throw new ProtocolError('the ring is running');
        if (value > 0xffff) throw new ProtocolError(`base ${value} is not a 16-bit ring index`);
        vring.nextAvail = value;
        return undefined;
      }
      case Request.GET_VRING_BASE: {
        const { index, vring } = this.vringState(m.payload);
        return this.stopVring(vring).then(() => {
          const reply = Buffer.alloc(8);
          reply.writeUInt32LE(index, 0);
          reply.writeUInt32LE(vring.nextAvail, 4);
          return reply;
        });
      }
      case Request.SET_VRING_KICK:
        this.setVringKick(m.payload, fds);
        return undefined;
      case Request.SET_VRING_CALL: {
        const { vring, fd } = this.vringFd(m.payload, fds);
        replaceFd(vring.callFd);
        vring.callFd = fd;
        return undefined;
      }
      case Request.SET_VRING_ERR: {
        // We never report ring errors through it, but keep it as the front end expects.
        const { vring, fd } = this.vringFd(m.payload, fds);
        replaceFd(vring.errFd);
        vring.errFd = fd;
        return undefined;
      }
      case Request.SET_VRING_ENABLE: {
        const { index, vring, value } = this.vringState(m.payload);
        if (value > 1) throw new ProtocolError(`enable ${value}`);
        if (!(this.ackedFeatures & VirtioFeature.PROTOCOL_FEATURES)) throw new ProtocolError('SET_VRING_ENABLE before PROTOCOL_FEATURES was acked');
        vring.enabled = value === 1;
        if (vring.enabled) this.service(index);
        return undefined;
      }
      case Request.SET_STATUS:
        this.status = readU64(m.payload, 8);
        if (this.status === 0n) this.reset();
        return undefined;
      case Request.GET_STATUS:
        return u64(this.status);
      default:
        // Everything we did not offer: logs, inflight tracking, config space, back-end requests, device state.
        throw new ProtocolError('not supported by this back end');
    }
  }

  private setMemTable(payload: Buffer, fds: number[]): void {
    if (payload.length < 8) throw new ProtocolError(`payload of ${payload.length} bytes`);
    const count = payload.readUInt32LE(0);
    if (count > MAX_MEM_SLOTS || payload.length !== 8 + count * REGION_SIZE) throw new ProtocolError(`${count} regions in ${payload.length} bytes`);
    if (fds.length !== count) throw new ProtocolError(`${count} regions but ${fds.length} file descriptors`);
    const regions = Array.from({ length: count }, (_, i) => readRegion(payload, 8 + i * REGION_SIZE));
    this.memory.clear();
    try {
      regions.forEach((region, i) => this.memory.add(region, fds[i]));
    } finally {
      closeAll(fds.splice(0));
      this.rebindQueues();
    }
  }

  /**
   * Rings keep running across a new memory table (hotplug): find them in the
   * new mappings. Chains in flight write their replies there too.
   */
  private rebindQueues(): void {
    this.vrings.forEach((vring, index) => {
      if (!vring.queue) return;
      try {
        vring.queue.rebind(this.ringAddresses(vring));
      } catch (err) {
        this.options.log(`queue ${index} stopped: after the memory table changed, ${(err as Error).message}`);
        this.detachQueue(vring);
      }
    });
  }

  private addMemoryRegion(payload: Buffer, fds: number[]): void {
    if (payload.length !== 8 + REGION_SIZE) throw new ProtocolError(`payload of ${payload.length} bytes`);
    if (fds.length !== 1) throw new ProtocolError(`${fds.length} file descriptors, not 1`);
    try {
      this.memory.add(readRegion(payload, 8), fds[0]);
    } finally {
      closeAll(fds.splice(0));
    }
  }

  private removeMemoryRegion(payload: Buffer, fds: number[]): void {
    // Some front ends send the region's fd along; it is not needed.
    closeAll(fds.splice(0));
    if (payload.length !== 8 + REGION_SIZE) throw new ProtocolError(`payload of ${payload.length} bytes`);
    this.memory.remove(readRegion(payload, 8));
    this.rebindQueues();
  }

  private setVringAddr(payload: Buffer): void {
    if (payload.length !== 40) throw new ProtocolError(`payload of ${payload.length} bytes`);
    const vring = this.vring(payload.readUInt32LE(0));
    if (vring.queue) throw new ProtocolError('the ring is running');
    // {u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log}; flags only concern dirty logging.
    const desc = toNumber(payload.readBigUInt64LE(8), 'descriptor table address');
    const used = toNumber(payload.readBigUInt64LE(16), 'used ring address');
    const avail = toNumber(payload.readBigUInt64LE(24), 'avail ring address');
    vring.addresses = { desc, used, avail };
  }

  private setVringKick(payload: Buffer, fds: number[]): void {
    const { index, vring, fd } = this.vringFd(payload, fds);
    if (fd === undefined) throw new ProtocolError('polling mode (no kick fd) is not supported');
    this.unwatchKick(vring);
    this.detachQueue(vring);
    vring.kickFd = fd;
    const error = native().setNonBlocking(fd);
    if (error < 0) throw new ProtocolError(`the kick fd: errno ${-error}`);
    // The addon drains the eventfd's counter before each call; then take whatever the driver added.
    vring.kickWatch = native().watch(fd, () => this.service(index, true), false, true);
    this.startVring(index);
  }

  /** Makes the ring's SplitQueue from its size, addresses and base; the kick fd starts it. */
  private startVring(index: number): void {
    const vring = this.vrings[index];
    if (vring.kickFd === undefined) return;
    if (!vring.addresses) throw new ProtocolError(`ring ${index} started before SET_VRING_ADDR`);
    if (this.memory.regionCount === 0) {
      throw new ProtocolError(
        `ring ${index} started, but the front end shared no guest memory: give the VM shared memory ` +
          '(QEMU: -object memory-backend-memfd,id=mem,size=…,share=on -numa node,memdev=mem; cloud-hypervisor: --memory shared=on)',
      );
    }
    const layout = {
      size: vring.size,
      ...this.ringAddresses(vring),
      nextAvail: vring.nextAvail,
      eventIdx: (this.ackedFeatures & VirtioFeature.EVENT_IDX) !== 0n,
      indirect: (this.ackedFeatures & VirtioFeature.INDIRECT_DESC) !== 0n,
    };
    try {
      vring.queue = new SplitQueue(this.memory, layout, () => vring.callFd !== undefined && native().signal(vring.callFd));
    } catch (err) {
      throw new ProtocolError(`ring ${index}: ${(err as Error).message}`);
    }
    // Without PROTOCOL_FEATURES a ring is enabled as soon as it starts.
    if (!(this.ackedFeatures & VirtioFeature.PROTOCOL_FEATURES)) vring.enabled = true;
    this.service(index);
  }

  /** The ring's parts as guest physical addresses (SET_VRING_ADDR gives front-end addresses). */
  private ringAddresses(vring: Vring): RingAddresses {
    const { size, addresses } = vring;
    if (!addresses) throw new ProtocolError('no SET_VRING_ADDR yet');
    return {
      desc: this.memory.guestAddressOf(addresses.desc, 16 * size),
      avail: this.memory.guestAddressOf(addresses.avail, 6 + 2 * size),
      used: this.memory.guestAddressOf(addresses.used, 6 + 8 * size),
    };
  }

  /**
   * Takes every chain the driver made available on a running, enabled ring.
   * Then, while every request it took was answered at once, it waits for
   * the next kick in poll(2) right here rather than through another turn of
   * the event loop, which costs a small request more than the request itself;
   * anything else the loop watches (another VM, the control socket, a timer,
   * I/O finishing) ends the wait, and so does a request that has to wait.
   * Only from the kick's own callback (`fromKick`): a control message is
   * answered after this returns.
   */
  private service(index: number, fromKick = false): void {
    const vring = this.vrings[index];
    let before = vring.queue?.takenCount ?? 0;
    for (let round = 0; this.take(index) && fromKick && round < MAX_WAITS_IN_A_TURN; round++) {
      const queue = vring.queue;
      const kickFd = vring.kickFd;
      if (!queue || kickFd === undefined || this.closed || !this.options.waitForKicks) return;
      queue.flushInterrupt(); // the end-of-turn interrupt would come only after the wait
      // A driver that had several requests in flight is likely to post the next within
      // microseconds: wait for it on the CPU. One with a single request waits for our answer.
      const taken = queue.takenCount - before;
      before = queue.takenCount;
      const spin = this.options.pollMaxNs ?? SPIN_NS;
      if (taken > 1 && spin > 0 && queue.spinForChains(spin)) continue;
      // One request at a time: the device may wait for the next kicks and answer them itself.
      const why = taken <= 1 ? this.device.serveAfterKicks?.(index, queue, kickFd, vring.callFd ?? -1) : undefined;
      if (why !== undefined) {
        if (why === NativeWait.ForJavaScript || why === NativeWait.Busy) continue;
        return; // the event loop has work, or the device waited its share
      }
      if (native().waitKick(kickFd) !== 1) return;
    }
  }

  /** Takes what the ring has; true when every request was answered at once. */
  private take(index: number): boolean {
    const vring = this.vrings[index];
    const queue = vring.queue;
    if (!queue || !vring.enabled || this.closed) return false;
    const rejected = (this.onRejected[index] ??= (error: Error) => this.options.log(`queue ${index}: request rejected: ${error.message}`));
    let waiting = false;
    do {
      queue.disableNotification();
      for (;;) {
        this.device.serveNatively?.(index, queue);
        const chain = queue.pop(rejected);
        if (!chain) break;
        try {
          if (this.device.handle(index, chain)) waiting = true;
        } catch (err) {
          this.options.log(`queue ${index}: request failed: ${(err as Error)?.stack ?? err}`);
          chain.done(0);
        }
      }
    } while (queue.enableNotification());
    if (queue.broken) {
      this.options.log(`queue ${index} stopped until the front end resets it: ${queue.broken}`);
      this.detachQueue(vring);
      return false;
    }
    return !waiting;
  }

  /**
   * Stops the ring (GET_VRING_BASE): it takes no more chains, the ones in
   * flight are answered (for at most a few seconds), then nothing more is
   * written for it. Its kick fd goes.
   */
  private async stopVring(vring: Vring): Promise<void> {
    this.unwatchKick(vring);
    const queue = vring.queue;
    if (queue) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, STOP_TIMEOUT_MS)));
      await Promise.race([queue.idle(), timeout]);
      clearTimeout(timer);
    }
    if (vring.queue === queue) this.detachQueue(vring);
  }

  private unwatchKick(vring: Vring): void {
    if (vring.kickWatch) native().unwatch(vring.kickWatch);
    replaceFd(vring.kickFd);
    vring.kickWatch = undefined;
    vring.kickFd = undefined;
  }

  /** Forgets the ring's SplitQueue, remembering where the driver was. */
  private detachQueue(vring: Vring): void {
    if (!vring.queue) return;
    vring.nextAvail = vring.queue.availIndex;
    vring.queue.deactivate();
    vring.queue = undefined;
  }

  private reset(): void {
    for (const vring of this.vrings) this.resetVring(vring);
    this.ackedFeatures = 0n;
    this.status = 0n;
    this.device.reset();
  }

  private resetVring(vring: Vring): void {
    this.unwatchKick(vring);
    this.detachQueue(vring);
    replaceFd(vring.callFd);
    replaceFd(vring.errFd);
    Object.assign(vring, newVring());
  }

  private release(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    for (const vring of this.vrings) this.resetVring(vring);
    this.memory.clear();
    this.device.reset();
    this.options.onClosed?.(reason);
  }

  private vring(index: number): Vring {
    const vring = this.vrings[index];
    if (!vring) throw new ProtocolError(`queue ${index} does not exist (the device has ${this.vrings.length})`);
    return vring;
  }

  /** A vhost_vring_state payload: {u32 index, u32 num}. */
  private vringState(payload: Buffer): { index: number; vring: Vring; value: number } {
    if (payload.length !== 8) throw new ProtocolError(`payload of ${payload.length} bytes`);
    const index = payload.readUInt32LE(0);
    return { index, vring: this.vring(index), value: payload.readUInt32LE(4) };
  }

  /** A SET_VRING_KICK/CALL/ERR payload: the index, and an fd unless the no-fd bit is set. */
  private vringFd(payload: Buffer, fds: number[]): { index: number; vring: Vring; fd?: number } {
    const value = readU64(payload, 8);
    const index = Number(value & VRING_INDEX_MASK);
    const vring = this.vring(index);
    const noFd = (value & VRING_NOFD) !== 0n;
    if (fds.length !== (noFd ? 0 : 1)) throw new ProtocolError(`${fds.length} file descriptors with${noFd ? ' the no-fd bit' : 'out the no-fd bit'}`);
    return { index, vring, fd: noFd ? undefined : fds.splice(0)[0] };
  }
}

/** Requests whose reply has a body: an empty one when they fail. */
const REPLY_REQUIRED: ReadonlySet<number> = new Set([
  Request.GET_FEATURES,
  Request.GET_PROTOCOL_FEATURES,
  Request.GET_VRING_BASE,
  Request.GET_QUEUE_NUM,
  Request.GET_CONFIG,
  Request.GET_INFLIGHT_FD,
  Request.GET_MAX_MEM_SLOTS,
  Request.GET_STATUS,
]);

/** Requests that may carry file descriptors; any other message with fds is refused. */
const FD_REQUESTS: ReadonlySet<number> = new Set([
  Request.SET_MEM_TABLE,
  Request.ADD_MEM_REG,
  Request.REM_MEM_REG,
  Request.SET_LOG_BASE,
  Request.SET_LOG_FD,
  Request.SET_VRING_KICK,
  Request.SET_VRING_CALL,
  Request.SET_VRING_ERR,
  Request.SET_BACKEND_REQ_FD,
  Request.SET_INFLIGHT_FD,
]);

function newVring(): Vring {
  return { size: 0, nextAvail: 0, enabled: false };
}

function replaceFd(fd: number | undefined): void {
  if (fd !== undefined) closeAll([fd]);
}

function u64(value: bigint): Buffer {
  const out = Buffer.alloc(8);
  out.writeBigUInt64LE(value);
  return out;
}

/** The payload as one u64; it must be exactly `size` (8) bytes. */
function readU64(payload: Buffer, size: number): bigint {
  if (payload.length !== size) throw new ProtocolError(`payload of ${payload.length} bytes, expected ${size}`);
  return payload.readBigUInt64LE(0);
}

function readRegion(payload: Buffer, offset: number): MemoryRegion {
  const field = (at: number, name: string) => toNumber(payload.readBigUInt64LE(offset + at), name);
  return {
    guestPhysAddr: field(0, 'guest address'),
    size: field(8, 'size'),
    userAddr: field(16, 'front-end address'),
    mmapOffset: field(24, 'mmap offset'),
  };
}

function toNumber(value: bigint, what: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`${what} ${hex(value)} is out of range`);
  return Number(value);
}
