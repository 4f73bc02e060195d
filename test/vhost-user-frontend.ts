// A small scripted vhost-user front end for tests: it plays the VMM's part
// (cloud-hypervisor, QEMU) against a vhost-user-fs back end over a unix
// socket. It sends any message, well-formed or not, creates guest memory in
// memfds, lays out split virtqueues in it, posts descriptor chains (direct,
// split, indirect, or raw bytes for malformed ones), kicks, and reads the used
// ring back. Plus FUSE request building and reply parsing.
//
// Guest memory is set up so that the three address spaces differ on purpose:
// guest physical addresses (what descriptors hold), front-end virtual addresses
// (what SET_VRING_ADDR carries; invented here, never dereferenced) and offsets
// in the memfd (mmap_offset, non-zero for some regions). A back end that mixes
// them up reads the wrong bytes or fails its bounds checks.
import { closeSync, writeSync } from 'node:fs';
import { constants } from 'node:os';
import { native } from '../src/native/index.js';

const { errno } = constants;

// --- the vhost-user protocol --------------------------------------------------

export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SET_BACKEND_REQ_FD: 21,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

const REQ_NAMES = new Map<number, string>(Object.entries(Req).map(([name, value]) => [value, name]));
export function reqName(request: number): string {
  return REQ_NAMES.get(request) ?? `request ${request}`;
}

export const VERSION = 0x1;
export const REPLY = 0x4;
export const NEED_REPLY = 0x8;
export const HEADER_SIZE = 12;
/** Bit 8 of the u64 of SET_VRING_KICK/CALL/ERR: no fd attached. */
export const VRING_NOFD = 0x100;

/** Virtio feature bits (as bigints: they pass 2^31). */
export const Feature = {
  INDIRECT_DESC: 1n << 28n,
  EVENT_IDX: 1n << 29n,
  PROTOCOL_FEATURES: 1n << 30n,
  LOG_ALL: 1n << 26n,
  VERSION_1: 1n << 32n,
  ACCESS_PLATFORM: 1n << 33n,
  RING_PACKED: 1n << 34n,
  IN_ORDER: 1n << 35n,
  ORDER_PLATFORM: 1n << 36n,
  NOTIFICATION_DATA: 1n << 38n,
} as const;

export const ProtocolFeature = {
  MQ: 1n << 0n,
  LOG_SHMFD: 1n << 1n,
  RARP: 1n << 2n,
  REPLY_ACK: 1n << 3n,
  MTU: 1n << 4n,
  BACKEND_REQ: 1n << 5n,
  CROSS_ENDIAN: 1n << 6n,
  CRYPTO_SESSION: 1n << 7n,
  PAGEFAULT: 1n << 8n,
  CONFIG: 1n << 9n,
  BACKEND_SEND_FD: 1n << 10n,
  HOST_NOTIFIER: 1n << 11n,
  INFLIGHT_SHMFD: 1n << 12n,
  RESET_DEVICE: 1n << 13n,
  INBAND_NOTIFICATIONS: 1n << 14n,
  CONFIGURE_MEM_SLOTS: 1n << 15n,
  STATUS: 1n << 16n,
  DEVICE_STATE: 1n << 19n,
} as const;

export interface Message {
  request: number;
  flags: number;
  size: number;
  payload: Buffer;
  fds: number[];
}

export function u64(value: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(value));
  return b;
}

/** {u32 index, u32 num}: SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE. */
export function vringState(index: number, num: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(index >>> 0, 0);
  b.writeUInt32LE(num >>> 0, 4);
  return b;
}

export interface RegionDescription {
  gpa: bigint;
  size: number;
  userAddr: bigint;
  mmapOffset: number;
}

/** One VhostUserMemoryRegion (32 bytes). */
export function regionBytes(r: RegionDescription): Buffer {
  const b = Buffer.alloc(32);
  b.writeBigUInt64LE(r.gpa, 0);
  b.writeBigUInt64LE(BigInt(r.size), 8);
  b.writeBigUInt64LE(r.userAddr, 16);
  b.writeBigUInt64LE(BigInt(r.mmapOffset), 24);
  return b;
}

/** The SET_MEM_TABLE payload: u32 nregions, u32 padding, the regions. */
export function memTablePayload(regions: RegionDescription[], count = regions.length): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32LE(count, 0);
  return Buffer.concat([head, ...regions.map(regionBytes)]);
}

/** The ADD_MEM_REG / REM_MEM_REG payload: u64 padding, one region. */
export function memRegPayload(region: RegionDescription): Buffer {
  return Buffer.concat([Buffer.alloc(8), regionBytes(region)]);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function check(result: number, what: string): number {
  if (result < 0) throw new Error(`${what} failed: errno ${-result}`);
  return result;
}

/** Everything this module opened and not yet closed: a failed test's leftovers. */
const live = new Set<{ close(): void }>();

/** Closes every connection, guest memory and queue still open (after a failed test). */
export function closeEverything(): void {
  for (const thing of [...live]) thing.close();
}

/** Closes an fd this module (or the caller) owns; ignores EBADF. */
export function closeFd(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // already closed
  }
}

/**
 * One front-end connection. Messages go out with `send` (any header fields,
 * any fds); replies come back through `recv`, which checks nothing, or
 * `expectReply`, which checks what QEMU's and rust-vmm's front ends check.
 */
export class Connection {
  private input = Buffer.alloc(0);
  private pendingFds: number[] = [];
  private eof = false;
  private closedHere = false;
  private readonly scratch = Buffer.alloc(65536);
  /** Every message sent, for error messages. */
  readonly sent: string[] = [];

  private constructor(readonly fd: number) {
    live.add(this);
  }

  static async connect(path: string, timeoutMs = 5000): Promise<Connection> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const fd = native().connectUnix(path);
      if (fd >= 0) {
        check(native().setNonBlocking(fd), 'setNonBlocking');
        return new Connection(fd);
      }
      if (Date.now() > deadline) throw new Error(`cannot connect to ${path}: errno ${-fd}`);
      await sleep(20);
    }
  }

  /**
   * Sends one message. `size` overrides the header's size field (the payload
   * sent is still `payload`), for malformed messages.
   */
  send(request: number, payload: Buffer = Buffer.alloc(0), options: { flags?: number; fds?: number[]; size?: number } = {}): void {
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32LE(request >>> 0, 0);
    header.writeUInt32LE((options.flags ?? VERSION) >>> 0, 4);
    header.writeUInt32LE((options.size ?? payload.length) >>> 0, 8);
    this.sent.push(`${reqName(request)} flags=0x${(options.flags ?? VERSION).toString(16)} size=${payload.length} fds=${options.fds?.length ?? 0}`);
    this.sendBytes(Buffer.concat([header, payload]), options.fds ?? []);
  }

  /** Sends raw bytes (fds travel with the first byte). Throws if the peer is gone. */
  sendBytes(bytes: Buffer, fds: number[] = []): void {
    let offset = 0;
    let first = true;
    const deadline = Date.now() + 5000;
    while (offset < bytes.length) {
      const n = native().sendmsg(this.fd, [bytes.subarray(offset)], first ? fds : []);
      if (n === -errno.EAGAIN) {
        if (Date.now() > deadline) throw new Error('sendmsg: the back end does not read');
        // A busy wait is fine here: only huge malformed payloads fill the socket buffer.
        continue;
      }
      if (n < 0) throw new Error(`sendmsg failed: errno ${-n}`);
      first = false;
      offset += n;
    }
  }

  /** True once the back end has closed its end (EOF seen by a recv). */
  get closedByPeer(): boolean {
    return this.eof;
  }

  /** Pulls whatever the socket has into the input buffer; false when nothing was there. */
  private pump(): boolean {
    if (this.eof) return false;
    const [n, ...fds] = native().recvmsg(this.fd, this.scratch);
    if (n > 0) {
      this.input = Buffer.concat([this.input, this.scratch.subarray(0, n)]);
      this.pendingFds.push(...fds);
      return true;
    }
    for (const fd of fds) closeFd(fd);
    if (n === 0 || n === -errno.ECONNRESET) {
      this.eof = true;
      return false;
    }
    if (n === -errno.EAGAIN) return false;
    throw new Error(`recvmsg failed: errno ${-n}`);
  }

  private parse(): Message | undefined {
    if (this.input.length < HEADER_SIZE) return undefined;
    const size = this.input.readUInt32LE(8);
    if (this.input.length < HEADER_SIZE + size) return undefined;
    const message: Message = {
      request: this.input.readUInt32LE(0),
      flags: this.input.readUInt32LE(4),
      size,
      payload: Buffer.from(this.input.subarray(HEADER_SIZE, HEADER_SIZE + size)),
      fds: this.pendingFds,
    };
    this.pendingFds = [];
    this.input = this.input.subarray(HEADER_SIZE + size);
    return message;
  }

  /** The next message from the back end; throws on EOF or timeout. */
  async recv(timeoutMs = 5000): Promise<Message> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const message = this.parse();
      if (message) return message;
      if (!this.pump()) {
        if (this.eof) throw new Error(`the back end closed the connection (after: ${this.sent.slice(-3).join('; ')})`);
        if (Date.now() > deadline) throw new Error(`no reply within ${timeoutMs} ms (after: ${this.sent.slice(-3).join('; ')})`);
        await sleep(1);
      }
    }
  }

  /**
   * The reply to `request`: flags must be exactly VERSION|REPLY (QEMU refuses
   * anything else), the request number must match (QEMU and rust-vmm check),
   * and the payload must have `size` bytes when given.
   */
  async expectReply(request: number, size?: number, timeoutMs = 5000): Promise<Buffer> {
    const reply = await this.recv(timeoutMs);
    if (reply.flags !== (VERSION | REPLY)) throw new Error(`reply to ${reqName(request)} has flags 0x${reply.flags.toString(16)}, not 0x5`);
    if (reply.request !== request) throw new Error(`expected a reply to ${reqName(request)}, got one to ${reqName(reply.request)}`);
    if (size !== undefined && reply.size !== size) throw new Error(`reply to ${reqName(request)} has ${reply.size} payload bytes, not ${size}`);
    for (const fd of reply.fds) closeFd(fd);
    if (reply.fds.length > 0) throw new Error(`reply to ${reqName(request)} carried ${reply.fds.length} fds`);
    return reply.payload;
  }

  /** The u64 of a REPLY_ACK (0 = success). */
  async expectAck(request: number, timeoutMs = 5000): Promise<bigint> {
    return (await this.expectReply(request, 8, timeoutMs)).readBigUInt64LE(0);
  }

  /** Sends a request with a u64 reply (GET_FEATURES and friends) and returns the value. */
  async getU64(request: number, flags = VERSION): Promise<bigint> {
    this.send(request, Buffer.alloc(0), { flags });
    return (await this.expectReply(request, 8)).readBigUInt64LE(0);
  }

  /** Asserts that nothing arrives for `ms` (no stray reply, no close). Returns what arrived otherwise. */
  async expectSilence(ms = 50): Promise<void> {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      this.pump();
      const message = this.parse();
      if (message) throw new Error(`unexpected message from the back end: ${reqName(message.request)} flags 0x${message.flags.toString(16)} size ${message.size}`);
      if (this.eof) throw new Error(`the back end closed the connection (after: ${this.sent.slice(-3).join('; ')})`);
      await sleep(2);
    }
  }

  /** Waits until the back end closes the connection; returns the messages it sent before. */
  async waitClosed(timeoutMs = 5000): Promise<Message[]> {
    const deadline = Date.now() + timeoutMs;
    const messages: Message[] = [];
    while (!this.eof) {
      if (!this.pump()) {
        if (Date.now() > deadline) throw new Error(`the back end did not close the connection within ${timeoutMs} ms`);
        await sleep(2);
      }
      for (let m = this.parse(); m; m = this.parse()) messages.push(m);
    }
    for (let m = this.parse(); m; m = this.parse()) messages.push(m);
    return messages;
  }

  close(): void {
    if (this.closedHere) return;
    this.closedHere = true;
    live.delete(this);
    for (const fd of this.pendingFds) closeFd(fd);
    closeFd(this.fd);
  }
}

// --- guest memory ---------------------------------------------------------------

export interface RegionLayout {
  gpa: bigint;
  size: number;
  /** The front end's virtual address of the region (what SET_MEM_TABLE tells). */
  userAddr: bigint;
  /** Where the region starts in its memfd (page aligned). */
  mmapOffset?: number;
}

export interface Region extends RegionDescription {
  fd: number;
  bytes: Buffer;
  arrayBuffer: ArrayBuffer;
  /** Bump allocator: next free offset in the region. */
  next: number;
}

/** Guest RAM in memfds, mapped here; the back end maps the same fds. */
export class GuestMemory {
  readonly regions: Region[] = [];

  constructor(layout: RegionLayout[], name = 'nixcas-test-guest') {
    for (const l of layout) this.addRegion(l, name);
    live.add(this.closer);
  }

  private readonly closer = { close: () => this.free() };

  addRegion(l: RegionLayout, name = 'nixcas-test-guest'): Region {
    const mmapOffset = l.mmapOffset ?? 0;
    const fd = check(native().memfd(name, mmapOffset + l.size), 'memfd');
    const mapped = native().mmap(fd, l.size, mmapOffset, true);
    if (typeof mapped === 'number') throw new Error(`mmap failed: errno ${-mapped}`);
    const region: Region = { gpa: l.gpa, size: l.size, userAddr: l.userAddr, mmapOffset, fd, arrayBuffer: mapped, bytes: Buffer.from(mapped), next: 0 };
    this.regions.push(region);
    return region;
  }

  /** The region holding [gpa, gpa + length), and the offset in it. */
  locate(gpa: bigint, length = 1): { region: Region; offset: number } {
    for (const region of this.regions) {
      if (gpa >= region.gpa && gpa + BigInt(length) <= region.gpa + BigInt(region.size)) return { region, offset: Number(gpa - region.gpa) };
    }
    throw new Error(`guest address 0x${gpa.toString(16)} (+${length}) is not in guest memory`);
  }

  /** The front-end virtual address of a guest physical address. */
  va(gpa: bigint): bigint {
    const { region, offset } = this.locate(gpa);
    return region.userAddr + BigInt(offset);
  }

  /** A view of guest memory (writes go to the shared mapping). */
  view(gpa: bigint, length: number): Buffer {
    const { region, offset } = this.locate(gpa, length);
    return region.bytes.subarray(offset, offset + length);
  }

  write(gpa: bigint, data: Buffer): void {
    data.copy(this.view(gpa, data.length));
  }

  read(gpa: bigint, length: number): Buffer {
    return Buffer.from(this.view(gpa, length));
  }

  /** Allocates `size` bytes in region `index` (bump allocator), zeroed. */
  alloc(size: number, align = 16, index = 0): bigint {
    const region = this.regions[index];
    const at = (region.next + align - 1) & ~(align - 1);
    if (at + size > region.size) throw new Error(`guest region ${index} is full`);
    region.next = at + size;
    region.bytes.fill(0, at, at + size);
    return region.gpa + BigInt(at);
  }

  descriptions(): RegionDescription[] {
    return this.regions.map(({ gpa, size, userAddr, mmapOffset }) => ({ gpa, size, userAddr, mmapOffset }));
  }

  fds(): number[] {
    return this.regions.map((r) => r.fd);
  }

  /** Unmaps and closes everything (the back end keeps its own mappings until it drops them). */
  free(): void {
    live.delete(this.closer);
    for (const region of this.regions) {
      if (region.arrayBuffer.byteLength > 0) native().munmap(region.arrayBuffer);
      closeFd(region.fd);
    }
    this.regions.length = 0;
  }
}

/**
 * The default test layout: two regions with gpa ≠ user address ≠ memfd
 * offset. Region 0 (8 MiB at gpa 1 MiB) holds rings and small buffers;
 * region 1 (4 MiB at gpa 4 GiB + 64 KiB, mapped at memfd offset 2 MiB) sits
 * above 4 GiB so 32-bit truncation of addresses is caught too.
 */
export function defaultGuestMemory(name?: string): GuestMemory {
  return new GuestMemory(
    [
      { gpa: 0x10_0000n, size: 8 << 20, userAddr: 0x7f12_3400_0000n, mmapOffset: 0 },
      { gpa: 0x1_0001_0000n, size: 4 << 20, userAddr: 0x5555_8000_0000n, mmapOffset: 2 << 20 },
    ],
    name,
  );
}

// --- split virtqueues -----------------------------------------------------------

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;

export interface Descriptor {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** A buffer of a chain: readable bytes, or a writable area of `len` bytes. */
export type Segment = { data: Buffer; region?: number } | { writable: number; region?: number };

export interface Posted {
  head: number;
  /** The writable areas, in chain order. */
  writable: { gpa: bigint; len: number }[];
  /** Descriptor indices taken from the ring's table (freed when the used entry is collected). */
  descriptors: number[];
}

export interface UsedEntry {
  id: number;
  len: number;
}

/** Bytes put before and after every writable area, to catch writes outside it. */
const GUARD = 64;
const GUARD_BYTE = 0xa5;

export class SplitQueue {
  readonly desc: bigint;
  readonly avail: bigint;
  readonly used: bigint;
  readonly kickFd: number;
  readonly callFd: number;
  /** The next avail index the driver will publish. */
  availIdx = 0;
  /** Used entries already collected. */
  usedIdx = 0;
  /** Whether collecting used entries asks for an interrupt at the next one (used_event, EVENT_IDX). */
  autoUsedEvent = true;
  private readonly free: number[] = [];
  private readonly guards: { gpa: bigint; len: number }[] = [];

  constructor(
    readonly memory: GuestMemory,
    readonly index: number,
    readonly size: number,
  ) {
    this.desc = memory.alloc(16 * size, 16);
    this.avail = memory.alloc(6 + 2 * size, 2);
    this.used = memory.alloc(6 + 8 * size, 4);
    this.kickFd = check(native().eventfd(), 'eventfd');
    this.callFd = check(native().eventfd(), 'eventfd');
    for (let i = 0; i < size; i++) this.free.push(i);
    live.add(this);
  }

  /** The SET_VRING_ADDR payload: ring addresses as front-end virtual addresses. */
  addrPayload(flags = 0, log = 0n): Buffer {
    const b = Buffer.alloc(40);
    b.writeUInt32LE(this.index, 0);
    b.writeUInt32LE(flags, 4);
    b.writeBigUInt64LE(this.memory.va(this.desc), 8);
    b.writeBigUInt64LE(this.memory.va(this.used), 16);
    b.writeBigUInt64LE(this.memory.va(this.avail), 24);
    b.writeBigUInt64LE(log, 32);
    return b;
  }

  writeDescriptor(tableGpa: bigint, i: number, d: Descriptor): void {
    const b = this.memory.view(tableGpa + BigInt(16 * i), 16);
    b.writeBigUInt64LE(d.addr, 0);
    b.writeUInt32LE(d.len >>> 0, 8);
    b.writeUInt16LE(d.flags, 12);
    b.writeUInt16LE(d.next, 14);
  }

  /** Takes `count` descriptor slots from the ring's table. */
  takeDescriptors(count: number): number[] {
    if (this.free.length < count) throw new Error(`queue ${this.index}: out of descriptors`);
    return this.free.splice(0, count);
  }

  /** Places the segments' buffers in guest memory (writable ones fenced by guard bytes). */
  private place(segments: Segment[], defaultRegion: number): { addr: bigint; len: number; write: boolean }[] {
    return segments.map((s) => {
      const region = s.region ?? defaultRegion;
      if ('data' in s) {
        const gpa = this.memory.alloc(s.data.length || 1, 8, region);
        this.memory.write(gpa, s.data);
        return { addr: gpa, len: s.data.length, write: false };
      }
      const start = this.memory.alloc(s.writable + 2 * GUARD, 8, region);
      this.memory.view(start, s.writable + 2 * GUARD).fill(GUARD_BYTE);
      this.guards.push({ gpa: start, len: GUARD }, { gpa: start + BigInt(GUARD + s.writable), len: GUARD });
      return { addr: start + BigInt(GUARD), len: s.writable, write: true };
    });
  }

  /**
   * Writes a chain into the descriptor table (not yet published). With
   * `indirect`, the buffers go into an indirect table and the ring gets one
   * descriptor pointing at it.
   */
  build(segments: Segment[], options: { indirect?: boolean; region?: number } = {}): Posted {
    const buffers = this.place(segments, options.region ?? 0);
    const writable = buffers.filter((b) => b.write).map((b) => ({ gpa: b.addr, len: b.len }));
    if (options.indirect) {
      const table = this.memory.alloc(16 * buffers.length, 16, options.region ?? 0);
      buffers.forEach((b, i) =>
        this.writeDescriptor(table, i, {
          addr: b.addr,
          len: b.len,
          flags: (b.write ? DESC_F_WRITE : 0) | (i + 1 < buffers.length ? DESC_F_NEXT : 0),
          next: i + 1 < buffers.length ? i + 1 : 0,
        }),
      );
      const [head] = this.takeDescriptors(1);
      this.writeDescriptor(this.desc, head, { addr: table, len: 16 * buffers.length, flags: DESC_F_INDIRECT, next: 0 });
      return { head, writable, descriptors: [head] };
    }
    const slots = this.takeDescriptors(buffers.length);
    buffers.forEach((b, i) =>
      this.writeDescriptor(this.desc, slots[i], {
        addr: b.addr,
        len: b.len,
        flags: (b.write ? DESC_F_WRITE : 0) | (i + 1 < buffers.length ? DESC_F_NEXT : 0),
        next: i + 1 < buffers.length ? slots[i + 1] : 0,
      }),
    );
    return { head: slots[0], writable, descriptors: slots };
  }

  /** Publishes heads in the avail ring (entries first, then idx), without kicking. */
  publish(heads: number[]): void {
    for (const head of heads) {
      this.memory.view(this.avail + BigInt(4 + 2 * (this.availIdx % this.size)), 2).writeUInt16LE(head);
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
    this.setAvailIdx(this.availIdx);
  }

  /** Writes avail->idx directly (for bogus values too). */
  setAvailIdx(value: number): void {
    this.memory.view(this.avail + 2n, 2).writeUInt16LE(value & 0xffff);
  }

  /** Writes avail->ring[slot] directly. */
  setAvailEntry(slot: number, head: number): void {
    this.memory.view(this.avail + BigInt(4 + 2 * (slot % this.size)), 2).writeUInt16LE(head);
  }

  /** avail->used_event (EVENT_IDX): ask for a notification once the device passes it. */
  setUsedEvent(value: number): void {
    this.memory.view(this.avail + BigInt(4 + 2 * this.size), 2).writeUInt16LE(value & 0xffff);
  }

  get deviceUsedIdx(): number {
    return this.memory.view(this.used + 2n, 2).readUInt16LE(0);
  }

  /** used->avail_event, written by the device with EVENT_IDX. */
  get availEvent(): number {
    return this.memory.view(this.used + BigInt(4 + 8 * this.size), 2).readUInt16LE(0);
  }

  /** Sets used->idx as a front end restoring a ring would find it (before SET_VRING_ADDR). */
  setDeviceUsedIdx(value: number): void {
    this.memory.view(this.used + 2n, 2).writeUInt16LE(value & 0xffff);
    this.usedIdx = value & 0xffff;
  }

  kick(): void {
    writeSync(this.kickFd, u64(1));
  }

  /** Reads the call eventfd: true if the device signalled since the last read. */
  takeCall(): boolean {
    const n = native().read(this.callFd, Buffer.alloc(8));
    if (n === 8) return true;
    if (n === -errno.EAGAIN) return false;
    throw new Error(`reading the call eventfd failed: ${n}`);
  }

  /** Waits for the call eventfd to fire. */
  async waitCall(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.takeCall()) {
      if (Date.now() > deadline) throw new Error(`queue ${this.index}: no call (interrupt) within ${timeoutMs} ms`);
      await sleep(1);
    }
  }

  /** Entries the device has added to the used ring since the last collect (without waiting). */
  collect(): UsedEntry[] {
    const entries: UsedEntry[] = [];
    const deviceIdx = this.deviceUsedIdx;
    while (this.usedIdx !== deviceIdx) {
      const e = this.memory.view(this.used + BigInt(4 + 8 * (this.usedIdx % this.size)), 8);
      entries.push({ id: e.readUInt32LE(0), len: e.readUInt32LE(4) });
      this.usedIdx = (this.usedIdx + 1) & 0xffff;
    }
    if (entries.length > 0 && this.autoUsedEvent) this.setUsedEvent(this.usedIdx);
    return entries;
  }

  /** Waits until `count` more used entries are there (or times out), then returns them. */
  async waitUsed(count: number, timeoutMs = 5000): Promise<UsedEntry[]> {
    const deadline = Date.now() + timeoutMs;
    const entries: UsedEntry[] = [];
    for (;;) {
      entries.push(...this.collect());
      if (entries.length >= count) return entries;
      if (Date.now() > deadline) {
        throw new Error(`queue ${this.index}: ${entries.length} of ${count} used entries within ${timeoutMs} ms`);
      }
      await sleep(1);
    }
  }

  /** Returns descriptor slots to the free list once their chain is used. */
  release(posted: Posted): void {
    this.free.push(...posted.descriptors);
  }

  /** The bytes the device wrote: the writable areas in order, `len` bytes in all. */
  written(posted: Posted, len: number): Buffer {
    const parts: Buffer[] = [];
    let left = len;
    for (const w of posted.writable) {
      const n = Math.min(left, w.len);
      parts.push(this.memory.read(w.gpa, n));
      left -= n;
    }
    if (left > 0) throw new Error(`used len ${len} exceeds the ${len - left} writable bytes of the chain`);
    return Buffer.concat(parts);
  }

  /** Throws if any guard area around a writable buffer was written. */
  checkGuards(): void {
    for (const g of this.guards) {
      const bytes = this.memory.view(g.gpa, g.len);
      const bad = bytes.findIndex((b) => b !== GUARD_BYTE);
      if (bad >= 0) throw new Error(`queue ${this.index}: the device wrote outside a writable buffer at gpa 0x${(g.gpa + BigInt(bad)).toString(16)}`);
    }
  }

  close(): void {
    if (!live.delete(this)) return;
    closeFd(this.kickFd);
    closeFd(this.callFd);
  }
}

// --- FUSE -----------------------------------------------------------------------

export const FUSE_IN_HEADER = 40;
export const FUSE_OUT_HEADER = 16;

export interface FuseReply {
  len: number;
  error: number;
  unique: bigint;
  body: Buffer;
}

/** fuse_in_header + args; `length` overrides the len field. */
export function fuseRequest(opcode: number, unique: bigint, nodeid: bigint | number, args: Buffer = Buffer.alloc(0), length?: number): Buffer {
  const b = Buffer.alloc(FUSE_IN_HEADER + args.length);
  b.writeUInt32LE(length ?? b.length, 0);
  b.writeUInt32LE(opcode, 4);
  b.writeBigUInt64LE(unique, 8);
  b.writeBigUInt64LE(BigInt(nodeid), 16);
  // uid, gid, pid: root, as the kernel says for a root process
  b.writeUInt32LE(1, 32);
  args.copy(b, FUSE_IN_HEADER);
  return b;
}

export function parseFuseReply(bytes: Buffer): FuseReply {
  if (bytes.length < FUSE_OUT_HEADER) throw new Error(`a FUSE reply of ${bytes.length} bytes`);
  return { len: bytes.readUInt32LE(0), error: bytes.readInt32LE(4), unique: bytes.readBigUInt64LE(8), body: bytes.subarray(FUSE_OUT_HEADER) };
}

/** FUSE_NO_OPEN_SUPPORT and FUSE_NO_OPENDIR_SUPPORT: the server may answer OPEN/OPENDIR with ENOSYS. */
export const INIT_NO_OPEN = (1 << 17) | (1 << 24);

/** fuse_init_in; by default every flag but the no-open ones, so OPEN returns handles. */
export function initArgs(major = 7, minor = 38, maxReadahead = 128 * 1024, flags = 0xffffffff & ~INIT_NO_OPEN): Buffer {
  const b = Buffer.alloc(64); // fuse_init_in with flags2 and the unused words
  b.writeUInt32LE(major, 0);
  b.writeUInt32LE(minor, 4);
  b.writeUInt32LE(maxReadahead, 8);
  b.writeUInt32LE(flags >>> 0, 12);
  return b;
}

export function nameArg(name: string | Buffer): Buffer {
  return Buffer.concat([Buffer.from(name), Buffer.from([0])]);
}

export function getattrArgs(fh = 0n, flags = 0): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32LE(flags, 0);
  b.writeBigUInt64LE(fh, 8);
  return b;
}

export function openArgs(flags = 0): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(flags, 0);
  return b;
}

/** fuse_read_in (READ, READDIR, READDIRPLUS). */
export function readArgs(fh: bigint, offset: bigint | number, size: number): Buffer {
  const b = Buffer.alloc(40);
  b.writeBigUInt64LE(fh, 0);
  b.writeBigUInt64LE(BigInt(offset), 8);
  b.writeUInt32LE(size, 16);
  return b;
}

/** fuse_release_in (RELEASE, RELEASEDIR). */
export function releaseArgs(fh: bigint): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(fh, 0);
  return b;
}

export function forgetArgs(nlookup: bigint | number): Buffer {
  return u64(nlookup);
}

export function batchForgetArgs(entries: { nodeid: bigint; nlookup: bigint }[]): Buffer {
  const b = Buffer.alloc(8 + 16 * entries.length);
  b.writeUInt32LE(entries.length, 0);
  entries.forEach((e, i) => {
    b.writeBigUInt64LE(e.nodeid, 8 + 16 * i);
    b.writeBigUInt64LE(e.nlookup, 16 + 16 * i);
  });
  return b;
}

/** fuse_attr fields the tests look at (at `at` in a reply body). */
export function parseAttr(b: Buffer, at = 0): { ino: bigint; size: bigint; mode: number; nlink: number } {
  return { ino: b.readBigUInt64LE(at), size: b.readBigUInt64LE(at + 8), mode: b.readUInt32LE(at + 60), nlink: b.readUInt32LE(at + 64) };
}

/** fuse_entry_out (128 bytes). */
export function parseEntry(b: Buffer, at = 0): { nodeid: bigint; attr: ReturnType<typeof parseAttr> } {
  return { nodeid: b.readBigUInt64LE(at), attr: parseAttr(b, at + 40) };
}

/** The entries of a READDIRPLUS reply body: fuse_entry_out + fuse_dirent each, 8-byte aligned. */
export function parseDirentPlus(b: Buffer): { nodeid: bigint; ino: bigint; off: bigint; type: number; name: string }[] {
  const out = [];
  let at = 0;
  while (at < b.length) {
    const nodeid = b.readBigUInt64LE(at);
    const d = at + 128;
    const ino = b.readBigUInt64LE(d);
    const off = b.readBigUInt64LE(d + 8);
    const namelen = b.readUInt32LE(d + 16);
    const type = b.readUInt32LE(d + 20);
    const name = b.subarray(d + 24, d + 24 + namelen).toString('latin1');
    out.push({ nodeid, ino, off, type, name });
    at = d + ((24 + namelen + 7) & ~7);
  }
  if (at !== b.length) throw new Error(`READDIRPLUS body of ${b.length} bytes does not end on an entry (${at})`);
  return out;
}

// --- a device: memory, queues and FUSE round trips ----------------------------

/**
 * A virtio-fs device as a front end drives it: guest memory, queues, and
 * request helpers. The negotiation itself is scripted by the tests (they
 * assert each step); this class carries the state.
 */
export class Device {
  readonly queues: SplitQueue[] = [];
  private unique = 0n;

  constructor(
    /** The connection; a front end that reconnects swaps it and keeps memory and rings. */
    public conn: Connection,
    readonly memory: GuestMemory,
    queueCount: number,
    queueSize: number,
  ) {
    for (let i = 0; i < queueCount; i++) this.queues.push(new SplitQueue(memory, i, queueSize));
  }

  nextUnique(): bigint {
    this.unique += 2n; // the kernel's uniques are even (odd ones mark interrupts)
    return this.unique;
  }

  /**
   * Posts one FUSE request on `queue`: the readable part split as `split`
   * says (sizes of the pieces; the rest goes in the last), the writable part
   * as `replyParts` (sizes), optionally through an indirect table. Kicks.
   */
  post(queue: number, request: Buffer, replyParts: number[], options: { split?: number[]; indirect?: boolean; regions?: number[]; kick?: boolean } = {}): Posted {
    const q = this.queues[queue];
    const segments: Segment[] = [];
    let at = 0;
    for (const piece of options.split ?? []) {
      segments.push({ data: request.subarray(at, at + piece), region: options.regions?.[segments.length] });
      at += piece;
    }
    if (at < request.length || segments.length === 0) segments.push({ data: request.subarray(at), region: options.regions?.[segments.length] });
    for (const part of replyParts) segments.push({ writable: part, region: options.regions?.[segments.length] });
    const posted = q.build(segments, { indirect: options.indirect });
    q.publish([posted.head]);
    if (options.kick ?? true) q.kick();
    return posted;
  }

  /** Waits for the used entry of `posted` and returns the reply it carries. */
  async reply(queue: number, posted: Posted, timeoutMs = 5000): Promise<{ used: UsedEntry; reply: FuseReply; bytes: Buffer }> {
    const q = this.queues[queue];
    const [used] = await q.waitUsed(1, timeoutMs);
    if (used.id !== posted.head) throw new Error(`queue ${queue}: used id ${used.id}, expected head ${posted.head}`);
    q.release(posted);
    const bytes = q.written(posted, used.len);
    return { used, reply: parseFuseReply(bytes), bytes };
  }

  /** One request/reply round trip; checks used len == reply len and the unique. */
  async call(queue: number, opcode: number, nodeid: bigint | number, args: Buffer = Buffer.alloc(0), replyParts: number[] = [4096], options: { split?: number[]; indirect?: boolean; regions?: number[] } = {}): Promise<FuseReply> {
    const unique = this.nextUnique();
    const posted = this.post(queue, fuseRequest(opcode, unique, nodeid, args), replyParts, options);
    const { used, reply } = await this.reply(queue, posted);
    if (reply.unique !== unique) throw new Error(`reply unique ${reply.unique}, expected ${unique}`);
    if (reply.len !== used.len) throw new Error(`used len ${used.len} but the reply header says ${reply.len}`);
    this.queues[queue].checkGuards();
    return reply;
  }

  close(): void {
    for (const q of this.queues) q.close();
  }
}
