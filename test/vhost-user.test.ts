// `nixcas virtiofs` against scripted vhost-user front ends (test/vhost-user-frontend.ts):
// cloud-hypervisor's negotiation replayed message by message, a QEMU-like one
// with two request queues, the high-priority queue, malformed messages and
// malformed rings, and front ends that hang up with requests in flight.
//
// What cloud-hypervisor's vhost-user-fs front end does (cloud-hypervisor main,
// mid 2026, with rust-vmm vhost 0.17), replayed exactly below:
//
// * Connect (virtio-devices/src/vhost_user/vu_common_ctrl.rs, connect_vhost_user;
//   virtio-devices/src/vhost_user/fs.rs, Fs::new): SET_OWNER, GET_FEATURES,
//   then (negotiate_features_vhost_user) GET_PROTOCOL_FEATURES and
//   SET_PROTOCOL_FEATURES, sent only if the backend offered PROTOCOL_FEATURES
//   (bit 30) among the features the VMM supports; then GET_QUEUE_NUM when MQ
//   was acked (else it assumes 2 queues). It fails the device if the backend
//   has fewer queues than 1 + num_queues (hiprio + request queues).
// * The protocol features it offers (fs.rs): MQ, CONFIGURE_MEM_SLOTS,
//   REPLY_ACK, INFLIGHT_SHMFD, LOG_SHMFD, DEVICE_STATE. It acks the
//   intersection with what the backend offers; no CONFIG, no BACKEND_REQ.
// * NEED_REPLY: none of the messages up to and including SET_PROTOCOL_FEATURES
//   carry it. Right after SET_PROTOCOL_FEATURES, if REPLY_ACK was acked, it sets
//   NEED_REPLY as a header flag for every later message on the connection
//   (Frontend::set_hdr_flags in vu_common_ctrl.rs). rust-vmm's frontend
//   (vhost/src/vhost_user/frontend.rs) then waits for a u64 ack (0 = success)
//   after every message without a reply body, and for messages that have one
//   (GET_QUEUE_NUM, GET_VRING_BASE, GET_FEATURES) it reads that one reply only:
//   an extra ack from the backend would be taken as the next reply.
// * Virtio features: DEFAULT_VIRTIO_FEATURES (vhost_user/mod.rs: INDIRECT_DESC,
//   EVENT_IDX, VERSION_1, IN_ORDER, ORDER_PLATFORM, NOTIFICATION_DATA,
//   PROTOCOL_FEATURES, LOG_ALL) are offered to the guest; SET_FEATURES sends
//   what the guest acked plus PROTOCOL_FEATURES, masked by the backend's
//   features (setup_vhost_user).
// * Activation (setup_vhost_user in vu_common_ctrl.rs, called from
//   VhostUserCommon::activate in mod.rs when the guest driver is ready):
//   SET_FEATURES; SET_MEM_TABLE with every guest RAM region (one fd each; the
//   regions' user addresses are CH's own mappings); SET_VRING_NUM for every
//   queue (the size the guest driver chose, at most queue_size, default 1024,
//   vm_config.rs default_fsconfig_queue_size; num_queues defaults to 1,
//   default_fsconfig_num_queues); GET_INFLIGHT_FD + SET_INFLIGHT_FD only if
//   INFLIGHT_SHMFD was acked; then for each queue in turn SET_VRING_ADDR (ring
//   addresses translated to CH's virtual addresses, flags 0, log 0),
//   SET_VRING_BASE (the avail index read from guest memory), SET_VRING_CALL
//   (the queue's irqfd) and SET_VRING_KICK (its ioeventfd); finally
//   SET_VRING_ENABLE(1) for every queue. No SET_BACKEND_REQ_FD for fs.
// * Memory hotplug (add_memory_region in mod.rs / vu_common_ctrl.rs): one
//   ADD_MEM_REG with the new region's fd when CONFIGURE_MEM_SLOTS was acked,
//   otherwise a whole new SET_MEM_TABLE. It never sends GET_MAX_MEM_SLOTS.
// * Device reset (reset_vhost_user): for each queue SET_VRING_ENABLE(0) then
//   GET_VRING_BASE; a later activation repeats the whole setup on the same
//   connection.
// * Reconnect (VhostUserEpollHandler::reconnect in mod.rs): on EPOLLHUP it
//   connects again, retrying every 100 ms for up to 60 s, then sends SET_OWNER,
//   GET_FEATURES, SET_PROTOCOL_FEATURES with the previously acked set (no
//   GET_PROTOCOL_FEATURES, no GET_QUEUE_NUM; reinitialize_vhost_user and
//   set_protocol_features_vhost_user), turns NEED_REPLY back on, and replays
//   the activation above with the same guest memory and rings, SET_VRING_BASE
//   being the avail index it finds in guest memory (or, with IN_ORDER and no
//   inflight tracking, the used index, kicking queues with work pending).
//
// QEMU (hw/virtio/vhost-user.c, vhost.c) for comparison, replayed in the second
// test: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM
// (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_OWNER, GET_FEATURES, a
// SET_VRING_CALL per queue with a masked notifier; at start SET_FEATURES, the
// memory as ADD_MEM_REG messages when CONFIGURE_MEM_SLOTS was acked, per queue
// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL,
// then SET_VRING_ENABLE per queue. NEED_REPLY only on SET_MEM_TABLE/ADD_MEM_REG/
// REM_MEM_REG and SET_VRING_ENABLE (plus SET_FEATURES/SET_VRING_ADDR when
// dirty logging, which we do not offer); at stop GET_VRING_BASE per queue.
//
// What the backend does with bad input, as these tests pin down:
// * a malformed message is logged and refused: with REPLY_ACK and NEED_REPLY
//   the ack is non-zero, fds it carried are closed, and the connection stays
//   usable; a message whose header announces more than 4 KiB of payload ends
//   the connection (its framing cannot be trusted);
// * a malformed chain is logged and returned on the used ring with length 0;
//   the queue goes on;
// * an avail index more than the queue size ahead (or an avail entry naming a
//   descriptor beyond the table) stops that queue until the front end restarts
//   it (GET_VRING_BASE, SET_VRING_ADDR/BASE, SET_VRING_KICK); other queues and
//   connections go on.
// * a new memory table (hotplug) keeps the rings running: chains in flight are
//   answered into the new mappings.
// * a region longer than its fd is refused (mapping it would raise SIGBUS later).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type Daemon, freePort, nixcas, removeDir, startNixcas, tempDir } from './helpers.js';
import {
  closeEverything,
  closeFd,
  Connection,
  DESC_F_INDIRECT,
  DESC_F_NEXT,
  DESC_F_WRITE,
  Device,
  defaultGuestMemory,
  Feature,
  FUSE_IN_HEADER,
  type FuseReply,
  GuestMemory,
  NEED_REPLY,
  ProtocolFeature,
  Req,
  batchForgetArgs,
  forgetArgs,
  fuseRequest,
  getattrArgs,
  initArgs,
  memRegPayload,
  memTablePayload,
  nameArg,
  openArgs,
  parseAttr,
  parseDirentPlus,
  parseEntry,
  parseFuseReply,
  readArgs,
  reqName,
  releaseArgs,
  u64,
  VERSION,
  VRING_NOFD,
  vringState,
} from './vhost-user-frontend.js';
import { native } from '../src/native/index.js';

const Op = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, READLINK: 5, OPEN: 14, READ: 15, RELEASE: 18, INIT: 26, OPENDIR: 27,
  RELEASEDIR: 29, BATCH_FORGET: 42, READDIRPLUS: 44,
} as const;

const NR = VERSION | NEED_REPLY;
const BIG_SIZE = 300_000;
const HUGE_SIZE = 2 * 1024 * 1024 + 777;

/** What nixcas virtiofs offers (the brief of the backend; see the reference sheet). */
const BACKEND_FEATURES = Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX | Feature.PROTOCOL_FEATURES;
const BACKEND_PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS;

/** cloud-hypervisor's DEFAULT_VIRTIO_FEATURES (virtio-devices/src/vhost_user/mod.rs). */
const CH_VIRTIO_FEATURES =
  Feature.INDIRECT_DESC | Feature.EVENT_IDX | Feature.VERSION_1 | Feature.IN_ORDER | Feature.ORDER_PLATFORM |
  Feature.NOTIFICATION_DATA | Feature.PROTOCOL_FEATURES | Feature.LOG_ALL;
/** The protocol features cloud-hypervisor's fs device offers (virtio-devices/src/vhost_user/fs.rs). */
const CH_PROTOCOL_FEATURES =
  ProtocolFeature.MQ | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD |
  ProtocolFeature.LOG_SHMFD | ProtocolFeature.DEVICE_STATE;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

let work: string;
let store: string;
let tree: string;
let storeName: string;
let daemon: Daemon; // --num-request-queues 1 (the default)
let daemon2: Daemon; // --num-request-queues 2
let socket: string;
let socket2: string;
/** Each daemon's fd count when idle, after a first connection came and went. */
const baseline = new Map<Daemon, number>();

function fdCount(d: Daemon): number {
  return readdirSync(`/proc/${d.process.pid}/fd`).length;
}

/** Mappings of test guest memory (memfds named nixcas-test-guest*) in the daemon. */
function guestMappings(d: Daemon): number {
  return readFileSync(`/proc/${d.process.pid}/maps`, 'utf8').split('\n').filter((l) => l.includes('memfd:nixcas-test-guest')).length;
}

/** Waits until the daemon's fds and guest mappings are back to the baseline. */
async function settles(d: Daemon, what: string): Promise<void> {
  const deadline = Date.now() + 3000;
  for (;;) {
    const now = { fds: fdCount(d), maps: guestMappings(d) };
    if (now.fds === baseline.get(d) && now.maps === 0) return;
    if (Date.now() > deadline) assert.deepEqual(now, { fds: baseline.get(d), maps: 0 }, `${what}: the daemon's fds and guest mappings return to the baseline`);
    await sleep(20);
  }
}

/** Runs `body`; returns where the daemon's output stood before, for `assertLogged`. */
async function logged(d: Daemon, body: () => Promise<void>): Promise<{ d: Daemon; since: number }> {
  const since = d.output().length;
  await body();
  return { d, since };
}

/** Waits (up to 3 s: stderr travels through a pipe) for a "nixcas virtiofs:" line matching `pattern` since `mark`. */
async function assertLogged(mark: { d: Daemon; since: number }, pattern: RegExp, what: string): Promise<void> {
  const deadline = Date.now() + 3000;
  for (;;) {
    const text = mark.d.output().slice(mark.since);
    if (text.split('\n').some((line) => line.startsWith('nixcas virtiofs:') && pattern.test(line))) return;
    if (Date.now() > deadline) assert.fail(`${what}: expected a "nixcas virtiofs:" log line matching ${pattern}, got:\n${text}`);
    await sleep(10);
  }
}

// --- negotiation scripts ---------------------------------------------------------

async function acked(conn: Connection, request: number, payload: Buffer, fds: number[] = []): Promise<void> {
  conn.send(request, payload, { flags: NR, fds });
  assert.equal(await conn.expectAck(request), 0n, `${reqName(request)} is acked with 0`);
}

async function refused(conn: Connection, request: number, payload: Buffer = Buffer.alloc(0), options: { fds?: number[]; flags?: number; size?: number } = {}): Promise<void> {
  conn.send(request, payload, { flags: NR, ...options });
  assert.notEqual(await conn.expectAck(request), 0n, `${reqName(request)} (malformed) gets a non-zero ack`);
}

/** cloud-hypervisor at connect (Fs::new): returns what the backend said. */
async function chConnect(conn: Connection): Promise<{ features: bigint; protocolFeatures: bigint; queueNum: bigint }> {
  conn.send(Req.SET_OWNER);
  const features = await conn.getU64(Req.GET_FEATURES);
  assert.ok((CH_VIRTIO_FEATURES & features) & Feature.PROTOCOL_FEATURES, 'PROTOCOL_FEATURES offered');
  const protocolFeatures = await conn.getU64(Req.GET_PROTOCOL_FEATURES);
  conn.send(Req.SET_PROTOCOL_FEATURES, u64(CH_PROTOCOL_FEATURES & protocolFeatures));
  // From here on every message carries NEED_REPLY.
  const queueNum = await conn.getU64(Req.GET_QUEUE_NUM, NR);
  return { features, protocolFeatures, queueNum };
}

/** cloud-hypervisor's setup_vhost_user: every step with NEED_REPLY, each acked 0. */
async function chActivate(conn: Connection, device: Device, features: bigint): Promise<void> {
  await acked(conn, Req.SET_FEATURES, u64(features));
  await acked(conn, Req.SET_MEM_TABLE, memTablePayload(device.memory.descriptions()), device.memory.fds());
  for (const q of device.queues) await acked(conn, Req.SET_VRING_NUM, vringState(q.index, q.size));
  for (const q of device.queues) {
    await acked(conn, Req.SET_VRING_ADDR, q.addrPayload());
    // The avail index as the guest left it (0 on a fresh ring).
    const availIdx = device.memory.view(q.avail + 2n, 2).readUInt16LE(0);
    await acked(conn, Req.SET_VRING_BASE, vringState(q.index, availIdx));
    await acked(conn, Req.SET_VRING_CALL, u64(q.index), [q.callFd]);
    await acked(conn, Req.SET_VRING_KICK, u64(q.index), [q.kickFd]);
  }
  for (const q of device.queues) await acked(conn, Req.SET_VRING_ENABLE, vringState(q.index, 1));
}

/** A connected, activated device the cloud-hypervisor way; INIT done on queue 1. */
async function chDevice(path: string, options: { queues?: number; queueSize?: number; memory?: GuestMemory; init?: boolean } = {}): Promise<Device> {
  const conn = await Connection.connect(path);
  const { features, queueNum } = await chConnect(conn);
  const device = new Device(conn, options.memory ?? defaultGuestMemory(), options.queues ?? Number(queueNum), options.queueSize ?? 1024);
  await chActivate(conn, device, CH_VIRTIO_FEATURES & features);
  if (options.init ?? true) assert.equal((await device.call(1, Op.INIT, 0, initArgs()))?.error, 0);
  return device;
}

function closeDevice(device: Device): void {
  device.conn.close();
  device.close();
  device.memory.free();
}

// --- the FUSE conversation -------------------------------------------------------

function entryOf(reply: FuseReply, what: string): ReturnType<typeof parseEntry> {
  assert.equal(reply.error, 0, `${what}: error ${reply.error}`);
  assert.equal(reply.body.length, 128, `${what}: fuse_entry_out is 128 bytes`);
  return parseEntry(reply.body);
}

async function lookup(device: Device, queue: number, parent: bigint | number, name: string, options = {}): Promise<ReturnType<typeof parseEntry>> {
  return entryOf(await device.call(queue, Op.LOOKUP, parent, nameArg(name), [16, 128], options), `LOOKUP ${name}`);
}

async function open(device: Device, queue: number, nodeid: bigint): Promise<bigint> {
  const reply = await device.call(queue, Op.OPEN, nodeid, openArgs(0), [16 + 16]);
  assert.equal(reply.error, 0);
  return reply.body.readBigUInt64LE(0);
}

// --- fixtures ----------------------------------------------------------------------

before(async () => {
  work = tempDir('vhost-user');
  store = join(work, 'store');
  tree = join(work, 'vhost-user-tree');
  mkdirSync(join(tree, 'sub'), { recursive: true });
  writeFileSync(join(tree, 'hello.txt'), 'hello from the store\n');
  writeFileSync(join(tree, 'big'), randomBytes(BIG_SIZE));
  writeFileSync(join(tree, 'huge'), randomBytes(HUGE_SIZE));
  writeFileSync(join(tree, 'sub', 'a'), 'a\n');
  symlinkSync('hello.txt', join(tree, 'link'));
  const run = nixcas(['import', '--store', store, tree]);
  assert.equal(run.status, 0, run.stderr);
  storeName = run.stdout.trim().replace('/nix/store/', '');
  socket = join(work, 'fs.sock');
  socket2 = join(work, 'fs2.sock');
  [daemon, daemon2] = await Promise.all([
    startNixcas(['virtiofs', socket, '--store', store, '--list-root'], 'listening on'),
    startNixcas(['virtiofs', socket2, '--store', store, '--num-request-queues', '2'], 'listening on'),
  ]);
  // One full connection first, so lazily opened fds (thread pool, store files) are in the baseline.
  for (const [d, path] of [[daemon, socket], [daemon2, socket2]] as const) {
    const device = await chDevice(path);
    await lookup(device, 1, 1, storeName);
    closeDevice(device);
    await sleep(100);
    baseline.set(d, fdCount(d));
    assert.equal(guestMappings(d), 0, 'no guest memory mapped once the front end is gone');
  }
});

after(async () => {
  closeEverything();
  const codes = await Promise.all([daemon?.stop('SIGTERM'), daemon2?.stop('SIGINT')]);
  removeDir(work);
  assert.deepEqual(codes, [0, 0], 'SIGTERM and SIGINT stop nixcas virtiofs with status 0');
});

describe('nixcas virtiofs', () => {
  test('cloud-hypervisor: negotiation replayed exactly, FUSE requests, reset, hotplug and reconnect', async () => {
    const conn = await Connection.connect(socket);
    // Connect.
    const { features, protocolFeatures, queueNum } = await chConnect(conn);
    assert.equal(features, BACKEND_FEATURES, `features 0x${features.toString(16)}: VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES`);
    assert.equal(protocolFeatures, BACKEND_PROTOCOL_FEATURES, `protocol features 0x${protocolFeatures.toString(16)}: MQ, REPLY_ACK, CONFIGURE_MEM_SLOTS`);
    assert.equal(protocolFeatures & ProtocolFeature.CONFIG, 0n, 'never CONFIG');
    assert.equal(queueNum, 2n, 'hiprio + 1 request queue');
    await conn.expectSilence(); // nothing stray: SET_OWNER and SET_PROTOCOL_FEATURES had no NEED_REPLY
    // Activation, 1024-entry queues as cloud-hypervisor's default.
    const memory = defaultGuestMemory();
    const device = new Device(conn, memory, 2, 1024);
    const ackedFeatures = CH_VIRTIO_FEATURES & features;
    assert.equal(ackedFeatures, BACKEND_FEATURES);
    await chActivate(conn, device, ackedFeatures);
    await conn.expectSilence();

    // INIT, split across region 1 (above 4 GiB) and region 0.
    const init = await device.call(1, Op.INIT, 0, initArgs(7, 38), [16, 64], { split: [FUSE_IN_HEADER], regions: [1, 0, 1, 0] });
    assert.equal(init.error, 0);
    assert.equal(init.len, 16 + 64, 'fuse_init_out of 64 bytes');
    assert.deepEqual([init.body.readUInt32LE(0), init.body.readUInt32LE(4)], [7, 38]);
    await device.queues[1].waitCall(); // EVENT_IDX with used_event 0: the first completion interrupts

    const dir = await lookup(device, 1, 1, storeName);
    assert.equal(dir.attr.mode & 0o170000, 0o040000, 'a store path directory');
    const attr = await device.call(1, Op.GETATTR, dir.nodeid, getattrArgs(), [16 + 104]);
    assert.equal(attr.error, 0);
    assert.equal(attr.body.length, 104, 'fuse_attr_out');
    assert.equal(parseAttr(attr.body, 16).ino, dir.attr.ino);

    const big = await lookup(device, 1, dir.nodeid, 'big');
    assert.equal(big.attr.size, BigInt(BIG_SIZE));
    assert.equal(big.attr.mode & 0o170000, 0o100000);
    const fh = await open(device, 1, big.nodeid);
    const content = readFileSync(join(tree, 'big'));

    // READ: the request split over two regions, the reply over four writable descriptors.
    const read = await device.call(1, Op.READ, big.nodeid, readArgs(fh, 1000, 131072), [16, 4096, 60000, 80000], {
      split: [FUSE_IN_HEADER],
      regions: [0, 1, 0, 1, 0, 1],
    });
    assert.equal(read.error, 0);
    assert.equal(read.len, 16 + 131072, 'the reply is exactly header + size');
    assert.ok(read.body.equals(content.subarray(1000, 1000 + 131072)), 'READ data');
    // READ through an indirect table (in region 1), a short read at the end of the file.
    const tail = await device.call(1, Op.READ, big.nodeid, readArgs(fh, BIG_SIZE - 5000, 65536), [16, 3000, 70000], { indirect: true, split: [FUSE_IN_HEADER], regions: [1, 1, 1, 0] });
    assert.equal(tail.error, 0);
    assert.equal(tail.len, 16 + 5000);
    assert.ok(tail.body.equals(content.subarray(BIG_SIZE - 5000)), 'short READ data');
    assert.equal((await device.call(1, Op.RELEASE, big.nodeid, releaseArgs(fh), [16])).error, 0);

    // READLINK, READDIRPLUS
    const link = await lookup(device, 1, dir.nodeid, 'link', { indirect: true });
    const target = await device.call(1, Op.READLINK, link.nodeid, Buffer.alloc(0), [16 + 100]);
    assert.equal(target.body.toString(), 'hello.txt');
    const opendir = await device.call(1, Op.OPENDIR, dir.nodeid, openArgs(0), [32]);
    assert.equal(opendir.error, 0);
    const dfh = opendir.body.readBigUInt64LE(0);
    const listing = await device.call(1, Op.READDIRPLUS, dir.nodeid, readArgs(dfh, 0, 8192), [16, 1000, 7192], { indirect: true });
    assert.equal(listing.error, 0);
    const entries = parseDirentPlus(listing.body);
    assert.deepEqual(entries.map((e) => e.name).filter((n) => n !== '.' && n !== '..').sort(), ['big', 'hello.txt', 'huge', 'link', 'sub']);
    assert.equal(entries.find((e) => e.name === 'big')?.nodeid, big.nodeid, 'READDIRPLUS entries carry the same inode as LOOKUP');
    assert.equal((await device.call(1, Op.RELEASEDIR, dir.nodeid, releaseArgs(dfh), [16])).error, 0);

    // EVENT_IDX: the device asks for the next kick (avail_event = next avail index) ...
    const q1 = device.queues[1];
    assert.equal(q1.availEvent, q1.availIdx, 'used->avail_event is the next avail index');
    // ... and honours used_event: a completion short of it does not interrupt.
    await sleep(20); // the interrupt for the last reply may trail its used entry
    q1.takeCall();
    const unique = device.nextUnique();
    const quiet = device.post(1, fuseRequest(Op.GETATTR, unique, 1, getattrArgs()), [120], { kick: false });
    q1.autoUsedEvent = false;
    q1.setUsedEvent(q1.usedIdx + 5);
    q1.kick();
    const { used } = await device.reply(1, quiet);
    assert.equal(used.len, 16 + 104);
    await sleep(50);
    assert.equal(q1.takeCall(), false, 'no interrupt before used_event is passed');
    q1.autoUsedEvent = true;
    q1.setUsedEvent(q1.usedIdx);
    q1.checkGuards();

    // Device reset (guest reboot): SET_VRING_ENABLE(0) + GET_VRING_BASE per queue.
    const bases: number[] = [];
    for (const q of device.queues) {
      await acked(conn, Req.SET_VRING_ENABLE, vringState(q.index, 0));
      conn.send(Req.GET_VRING_BASE, vringState(q.index, 0), { flags: NR });
      const base = await conn.expectReply(Req.GET_VRING_BASE, 8);
      assert.equal(base.readUInt32LE(0), q.index);
      bases.push(base.readUInt32LE(4));
    }
    assert.deepEqual(bases, [0, q1.availIdx], 'GET_VRING_BASE: the next avail index of each ring');
    await conn.expectSilence(); // no ack after GET_VRING_BASE's reply
    // A stopped ring is left alone: a request posted now is not taken.
    const ignored = device.post(1, fuseRequest(Op.GETATTR, device.nextUnique(), 1, getattrArgs()), [120]);
    await sleep(100);
    assert.equal(q1.deviceUsedIdx, q1.usedIdx, 'nothing used on a stopped ring');
    q1.release(ignored);

    // Re-activation on the same connection with new guest memory and fresh rings (the rebooted guest).
    const memory2 = defaultGuestMemory();
    const device2 = new Device(conn, memory2, 2, 1024);
    await chActivate(conn, device2, ackedFeatures);
    memory.free(); // the old memory is gone on our side; the backend must use only the new table
    device.close();
    assert.equal((await device2.call(1, Op.INIT, 0, initArgs())).error, 0);
    const dirAgain = await lookup(device2, 1, 1, storeName);

    // Memory hotplug: ADD_MEM_REG with NEED_REPLY, then a request whose buffers live only there.
    const hot = memory2.addRegion({ gpa: 0x2_0000_0000n, size: 1 << 20, userAddr: 0x6000_0000_0000n, mmapOffset: 4096 }, 'nixcas-test-guest-hotplug');
    await acked(conn, Req.ADD_MEM_REG, memRegPayload(hot), [hot.fd]);
    const hotReply = await device2.call(1, Op.LOOKUP, dirAgain.nodeid, nameArg('hello.txt'), [16, 128], { regions: [2, 2, 2] });
    assert.equal(hotReply.error, 0);
    await conn.expectSilence();

    // Reconnect (as after a backend restart): same memory and rings, no GET_PROTOCOL_FEATURES, no GET_QUEUE_NUM.
    const q = device2.queues[1];
    const usedBefore = q.deviceUsedIdx;
    conn.close();
    await sleep(50);
    const conn2 = await Connection.connect(socket);
    conn2.send(Req.SET_OWNER);
    assert.equal(await conn2.getU64(Req.GET_FEATURES), BACKEND_FEATURES);
    conn2.send(Req.SET_PROTOCOL_FEATURES, u64(CH_PROTOCOL_FEATURES & protocolFeatures));
    device2.conn = conn2;
    const device3 = device2;
    await chActivate(conn2, device3, ackedFeatures);
    await conn2.expectSilence();
    // The backend carries on from used->idx in guest memory (it reloads it on SET_VRING_ADDR).
    const afterReconnect = await device3.call(1, Op.INIT, 0, initArgs());
    assert.equal(afterReconnect.error, 0);
    assert.equal(q.deviceUsedIdx, (usedBefore + 1) & 0xffff, 'the used index continues from the one in guest memory');
    const again = await lookup(device3, 1, 1, storeName);
    assert.equal(again.attr.mode & 0o170000, 0o040000);
    conn2.close();
    device2.close();
    memory2.free();
    await settles(daemon, 'after the cloud-hypervisor session');
  });

  test('QEMU-like negotiation with two request queues: requests complete on both', async () => {
    const conn = await Connection.connect(socket2);
    // vhost_user_backend_init
    const features = await conn.getU64(Req.GET_FEATURES);
    assert.equal(features, BACKEND_FEATURES);
    const protocolFeatures = await conn.getU64(Req.GET_PROTOCOL_FEATURES);
    assert.equal(protocolFeatures & ProtocolFeature.CONFIG, 0n, 'QEMU 7.1–8.0 crash on CONFIG for vhost-user-fs');
    conn.send(Req.SET_PROTOCOL_FEATURES, u64(protocolFeatures)); // QEMU takes everything it knows
    assert.equal(await conn.getU64(Req.GET_QUEUE_NUM), 3n, 'hiprio + 2 request queues');
    const slots = await conn.getU64(Req.GET_MAX_MEM_SLOTS);
    assert.ok(slots >= 8n, `GET_MAX_MEM_SLOTS ${slots}: at least QEMU's 8`);
    conn.send(Req.SET_OWNER);
    assert.equal(await conn.getU64(Req.GET_FEATURES), features);
    // vhost_virtqueue_init: a call fd per queue (the masked notifier), replaced at start.
    const masked = [0, 1, 2].map(() => native().eventfd());
    masked.forEach((fd, i) => conn.send(Req.SET_VRING_CALL, u64(i), { fds: [fd] }));
    masked.forEach(closeFd);
    // vhost_dev_start, 128-entry queues (QEMU's default queue-size), no EVENT_IDX this time.
    const memory = defaultGuestMemory();
    const device = new Device(conn, memory, 3, 128);
    conn.send(Req.SET_FEATURES, u64(Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.PROTOCOL_FEATURES));
    for (const region of memory.regions) await acked(conn, Req.ADD_MEM_REG, memRegPayload(region), [region.fd]);
    for (const q of device.queues) {
      conn.send(Req.SET_VRING_NUM, vringState(q.index, q.size));
      conn.send(Req.SET_VRING_BASE, vringState(q.index, 0));
      conn.send(Req.SET_VRING_ADDR, q.addrPayload());
      conn.send(Req.SET_VRING_KICK, u64(q.index), { fds: [q.kickFd] });
      conn.send(Req.SET_VRING_CALL, u64(q.index), { fds: [q.callFd] });
    }
    for (const q of device.queues) await acked(conn, Req.SET_VRING_ENABLE, vringState(q.index, 1));
    await conn.expectSilence();

    // INIT with every flag a Linux guest offers, NO_OPEN_SUPPORT among them.
    assert.equal((await device.call(1, Op.INIT, 0, initArgs(7, 38, 128 * 1024, 0xffffffff))).error, 0);
    await device.queues[1].waitCall();
    // Both request queues at once: posted before either is answered.
    const u1 = device.nextUnique();
    const u2 = device.nextUnique();
    const p1 = device.post(1, fuseRequest(Op.LOOKUP, u1, 1, nameArg(storeName)), [144]);
    const p2 = device.post(2, fuseRequest(Op.LOOKUP, u2, 1, nameArg(storeName)), [16, 128], { indirect: true });
    const [r1, r2] = await Promise.all([device.reply(1, p1), device.reply(2, p2)]);
    assert.deepEqual([r1.reply.unique, r1.reply.error, r1.used.len], [u1, 0, 144]);
    assert.deepEqual([r2.reply.unique, r2.reply.error, r2.used.len], [u2, 0, 144]);
    assert.equal(parseEntry(r1.reply.body).nodeid, parseEntry(r2.reply.body).nodeid, 'one inode, whichever queue asked');
    await device.queues[2].waitCall();
    const dir = parseEntry(r2.reply.body).nodeid;
    const hello = await lookup(device, 2, dir, 'hello.txt');
    // With NO_OPEN_SUPPORT the kernel takes ENOSYS for OPEN as "no open needed" and reads with handle 0.
    assert.equal((await device.call(1, Op.OPEN, hello.nodeid, openArgs(0), [32])).error, -38, 'OPEN: ENOSYS (no open needed)');
    const data = await device.call(2, Op.READ, hello.nodeid, readArgs(0n, 0, 4096), [16, 5, 4096]);
    assert.equal(data.body.toString(), 'hello from the store\n');
    // Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses the interrupt.
    const q2 = device.queues[2];
    q2.takeCall();
    device.memory.view(q2.avail, 2).writeUInt16LE(1);
    await device.call(2, Op.GETATTR, 1, getattrArgs(), [120]);
    await sleep(50);
    assert.equal(q2.takeCall(), false, 'no interrupt with VRING_AVAIL_F_NO_INTERRUPT');
    device.memory.view(q2.avail, 2).writeUInt16LE(0);
    await device.call(2, Op.GETATTR, 1, getattrArgs(), [120]);
    await q2.waitCall();

    // A disabled ring is not processed; enabling it again takes what was posted meanwhile.
    await acked(conn, Req.SET_VRING_ENABLE, vringState(2, 0));
    const waiting = device.post(2, fuseRequest(Op.GETATTR, device.nextUnique(), 1, getattrArgs()), [120]);
    await sleep(100);
    assert.equal(q2.deviceUsedIdx, q2.usedIdx, 'nothing taken from a disabled ring');
    await acked(conn, Req.SET_VRING_ENABLE, vringState(2, 1));
    assert.equal((await device.reply(2, waiting)).reply.error, 0, 'served once enabled');

    // vhost_dev_stop: GET_VRING_BASE per queue (no NEED_REPLY), the next avail index of each.
    for (const q of device.queues) {
      conn.send(Req.GET_VRING_BASE, vringState(q.index, 0));
      const reply = await conn.expectReply(Req.GET_VRING_BASE, 8);
      assert.deepEqual([reply.readUInt32LE(0), reply.readUInt32LE(4)], [q.index, q.availIdx]);
    }
    // Memory hot-unplug with CONFIGURE_MEM_SLOTS: REM_MEM_REG.
    await acked(conn, Req.REM_MEM_REG, memRegPayload(memory.regions[1]));
    await conn.expectSilence();
    closeDevice(device);
    // The replaced masked-notifier call fds, the kick and call fds and the memory are all released.
    await settles(daemon2, 'after the QEMU-like session');
  });

  test('hiprio queue: FORGET and BATCH_FORGET are consumed with used len 0; two devices at once', async () => {
    const a = await chDevice(socket);
    const b = await chDevice(socket);
    const dir = await lookup(a, 1, 1, storeName);
    const big = await lookup(a, 1, dir.nodeid, 'big');
    assert.equal((await lookup(a, 1, dir.nodeid, 'big')).nodeid, big.nodeid); // two lookups of big
    const hello = await lookup(b, 1, 1, storeName); // the other device, its own session
    const q0 = a.queues[0];
    const forget = q0.build([{ data: fuseRequest(Op.FORGET, 0n, big.nodeid, forgetArgs(1)) }]);
    // BATCH_FORGET split over two descriptors, plus a writable buffer nothing may be written to.
    const batch = fuseRequest(Op.BATCH_FORGET, 0n, 0, batchForgetArgs([{ nodeid: big.nodeid, nlookup: 1n }, { nodeid: 12345n, nlookup: 3n }]));
    const batchChain = q0.build([{ data: batch.subarray(0, 40) }, { data: batch.subarray(40) }, { writable: 64 }]);
    const scribble = a.memory.view(batchChain.writable[0].gpa, 64).fill(0x5a);
    q0.publish([forget.head, batchChain.head]);
    q0.kick();
    const used = await q0.waitUsed(2);
    assert.deepEqual(used, [{ id: forget.head, len: 0 }, { id: batchChain.head, len: 0 }]);
    assert.ok(scribble.every((x) => x === 0x5a), 'nothing written for a FORGET');
    q0.checkGuards();
    // They were acted on: both lookups of big are forgotten, so its inode is gone.
    assert.equal((await a.call(1, Op.GETATTR, big.nodeid, getattrArgs(), [120])).error, -2, 'ENOENT after FORGET + BATCH_FORGET');
    // Both devices still answer.
    assert.equal((await a.call(1, Op.GETATTR, dir.nodeid, getattrArgs(), [120])).error, 0);
    assert.equal((await b.call(1, Op.GETATTR, hello.nodeid, getattrArgs(), [120])).error, 0);
    closeDevice(a);
    closeDevice(b);
  });

  test('GETATTR and READ answered once are answered natively after that, byte for byte the same; not after FORGET', async () => {
    const port = await freePort();
    const path = join(work, 'native.sock');
    const server = await startNixcas(['virtiofs', path, '--store', store, '--metrics-listen', `127.0.0.1:${port}`], 'listening on');
    const answeredNatively = async () => {
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      return Number(/^nixcas_fuse_native_answers_total (\d+)/m.exec(text)?.[1]);
    };
    // The blob files read once, whole: the native path answers only from the page cache, and a
    // page marked for readahead counts as not there (RWF_NOWAIT), which a plain read clears.
    for (const dir of readdirSync(join(store, 'blobs'))) for (const name of readdirSync(join(store, 'blobs', dir))) readFileSync(join(store, 'blobs', dir, name));
    try {
      // As Linux with NO_OPEN_SUPPORT: READs then come by inode, with no file handle.
      const device = await chDevice(path, { init: false });
      assert.equal((await device.call(1, Op.INIT, 0, initArgs(7, 38, 128 * 1024, 0xffffffff)))?.error, 0);
      const dir = await lookup(device, 1, 1, storeName);
      const big = await lookup(device, 1, dir.nodeid, 'big');
      const hello = await lookup(device, 1, dir.nodeid, 'hello.txt');
      const bytes = readFileSync(join(tree, 'big'));
      const getattr = () => device.call(1, Op.GETATTR, big.nodeid, getattrArgs(), [120]);
      const read = (offset: number, size: number, parts: number[], options = {}) => device.call(1, Op.READ, big.nodeid, readArgs(0n, offset, size), parts, options);
      const first = { attr: await getattr(), read: await read(4096, 8192, [16 + 8192]) };
      assert.equal(first.attr.error, 0);
      assert.deepEqual(first.read.body, bytes.subarray(4096, 4096 + 8192));
      assert.equal(await answeredNatively(), 0, 'the FUSE layer answers an inode first');
      const same = (reply: FuseReply, expected: FuseReply, what: string) => assert.deepEqual({ ...reply, unique: 0n }, { ...expected, unique: 0n }, what);
      same(await getattr(), first.attr, 'GETATTR again: the same reply');
      same(await read(4096, 8192, [16 + 8192]), first.read, 'READ again: the same reply');
      assert.equal(await answeredNatively(), 2);
      // Replies split over descriptors as Linux makes them (out header, then pages), through an
      // indirect table; a READ at the end of the file is short, one past it is empty.
      assert.deepEqual((await read(100_000, 3 * 4096, [16, 4096, 4096, 4096], { indirect: true })).body, bytes.subarray(100_000, 100_000 + 3 * 4096));
      assert.deepEqual((await read(BIG_SIZE - 100, 4096, [16 + 4096])).body, bytes.subarray(BIG_SIZE - 100));
      assert.equal((await read(BIG_SIZE + 10, 4096, [16 + 4096])).body.length, 0);
      assert.equal(await answeredNatively(), 5);
      // What the native path does not take goes to the FUSE layer, which says what is wrong.
      assert.equal((await read(0, 8192, [16 + 4096])).error, -5, 'a READ whose reply does not fit its chain: EIO, from the FUSE layer');
      assert.equal((await device.call(1, Op.READ, hello.nodeid, readArgs(0n, 0, 4096), [16 + 4096])).body.toString(), 'hello from the store\n');
      assert.equal((await device.call(1, Op.READ, hello.nodeid, readArgs(0n, 0, 4096), [16 + 4096])).body.toString(), 'hello from the store\n');
      assert.equal(await answeredNatively(), 5, 'a small blob (kept in LMDB, checked per read) is never read natively');
      // Once the kernel forgets the inode, neither is answered natively any more.
      const q0 = device.queues[0];
      const forget = q0.build([{ data: fuseRequest(Op.FORGET, 0n, big.nodeid, forgetArgs(1)) }]);
      q0.publish([forget.head]);
      q0.kick();
      await q0.waitUsed(1);
      assert.equal((await getattr()).error, -2, 'ENOENT after FORGET');
      assert.equal((await read(0, 4096, [16 + 4096])).error !== 0, true, 'READ of a forgotten inode fails');
      assert.equal(await answeredNatively(), 5);
      closeDevice(device);
    } finally {
      await server.stop('SIGTERM');
    }
  });

  test('ring indices wrap around at 65536', async () => {
    const conn = await Connection.connect(socket);
    const { features } = await chConnect(conn);
    const device = new Device(conn, defaultGuestMemory(), 2, 8);
    // A driver that has been running for a while: both indices just short of the wrap.
    const q = device.queues[1];
    q.availIdx = 65530;
    q.setAvailIdx(65530);
    q.setDeviceUsedIdx(65530);
    q.setUsedEvent(65530);
    await chActivate(conn, device, CH_VIRTIO_FEATURES & features);
    assert.equal((await device.call(1, Op.INIT, 0, initArgs())).error, 0);
    for (let i = 0; i < 11; i++) assert.equal((await device.call(1, Op.GETATTR, 1, getattrArgs(), [120])).error, 0);
    assert.deepEqual([q.availIdx, q.deviceUsedIdx, q.availEvent], [6, 6, 6], 'both indices wrapped');
    // Several at once across the wrap of the (8-entry) ring.
    const posted = Array.from({ length: 6 }, () => q.build([{ data: fuseRequest(Op.GETATTR, device.nextUnique(), 1, getattrArgs()) }, { writable: 120 }], { indirect: true }));
    q.publish(posted.map((p) => p.head));
    q.kick();
    const used = await q.waitUsed(6);
    assert.deepEqual(used.map((u) => u.id).sort(), posted.map((p) => p.head).sort());
    assert.ok(used.every((u) => u.len === 120));
    closeDevice(device);
  });

  test('malformed messages are refused with a non-zero ack, fds are closed, and the daemon keeps serving', async () => {
    closeEverything(); // whatever a failed test before left open
    const conn = await Connection.connect(socket);
    const { features } = await chConnect(conn);
    const memory = defaultGuestMemory();
    const device = new Device(conn, memory, 2, 256);
    const ev = () => native().eventfd();
    const fdsBefore = fdCount(daemon);

    const log = await logged(daemon, async () => {
      // Wrong numbers of fds.
      await refused(conn, Req.SET_VRING_KICK, u64(1)); // no fd, no no-fd bit
      const two = [ev(), ev()];
      await refused(conn, Req.SET_VRING_CALL, u64(1), { fds: two }); // two fds
      two.forEach(closeFd);
      const one = [memory.regions[0].fd];
      await refused(conn, Req.SET_MEM_TABLE, memTablePayload(memory.descriptions()), { fds: one }); // 2 regions, 1 fd
      await refused(conn, Req.SET_MEM_TABLE, memTablePayload(memory.descriptions(), 3), { fds: memory.fds() }); // count says 3
      const stray = ev();
      await refused(conn, Req.SET_VRING_NUM, vringState(1, 256), { fds: [stray] }); // fds on a message that takes none
      await refused(conn, Req.SET_OWNER, Buffer.alloc(0), { fds: [stray] });
      closeFd(stray);
      await refused(conn, Req.ADD_MEM_REG, memRegPayload(memory.regions[0])); // no fd
      // Bad ring sizes and indices.
      await refused(conn, Req.SET_VRING_NUM, vringState(1, 0));
      await refused(conn, Req.SET_VRING_NUM, vringState(1, 100));
      await refused(conn, Req.SET_VRING_NUM, vringState(1, 65536));
      await refused(conn, Req.SET_VRING_NUM, vringState(2, 256)); // queue 2 of 2
      await refused(conn, Req.SET_VRING_ADDR, Buffer.concat([vringState(7, 0), Buffer.alloc(32)]));
      await refused(conn, Req.SET_VRING_ENABLE, vringState(200, 1));
      await refused(conn, Req.SET_VRING_NUM, vringState(1, 256).subarray(0, 6)); // short payload
      // Unknown and unoffered requests.
      await refused(conn, 99, u64(0));
      await refused(conn, Req.SET_CONFIG, Buffer.alloc(12 + 4)); // CONFIG was not offered
      const logFd = ev();
      await refused(conn, Req.SET_LOG_BASE, Buffer.alloc(16), { fds: [logFd] }); // LOG_SHMFD was not offered
      closeFd(logFd);
      // A malformed message without NEED_REPLY: no reply at all, just the log.
      conn.send(Req.SET_VRING_NUM, vringState(9, 256));
      await conn.expectSilence();
    });
    for (const name of ['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_MEM_TABLE', 'SET_VRING_NUM', 'SET_OWNER', 'ADD_MEM_REG', 'SET_VRING_ADDR', 'SET_VRING_ENABLE']) {
      await assertLogged(log, new RegExp(name), `refused ${name}`);
    }
    assert.equal(fdCount(daemon), fdsBefore, 'every fd that came with a refused message is closed');

    // A GET_ request that fails still gets its reply (the front end blocks on it), unmistakably not a valid one.
    conn.send(Req.GET_VRING_BASE, vringState(5, 0), { flags: NR });
    const base = await conn.expectReply(Req.GET_VRING_BASE);
    assert.notEqual(base.length, 8, 'GET_VRING_BASE of a queue that does not exist: no vring state');
    conn.send(Req.GET_CONFIG, Buffer.alloc(12 + 44), { flags: NR }); // CONFIG was not offered
    assert.notEqual((await conn.expectReply(Req.GET_CONFIG)).length, 12 + 44, 'GET_CONFIG: no config space');
    await conn.expectSilence();

    // SET_VRING_NUM at the largest size is fine; the ring is then set up properly and works.
    await acked(conn, Req.SET_VRING_NUM, vringState(1, 32768));
    await chActivate(conn, device, CH_VIRTIO_FEATURES & features);
    assert.equal((await device.call(1, Op.INIT, 0, initArgs())).error, 0, 'the connection still works after the refused messages');
    // A kick fd with the no-fd bit (polling) is not supported: refused, the running ring is untouched.
    await refused(conn, Req.SET_VRING_KICK, u64(1n | BigInt(VRING_NOFD)));
    // Ring addresses outside guest memory: refused when set or at the latest when the ring starts.
    const bogus = Buffer.alloc(40);
    bogus.writeUInt32LE(1, 0);
    bogus.writeBigUInt64LE(0x1234_0000_0000n, 8);
    bogus.writeBigUInt64LE(0x1234_0001_0000n, 16);
    bogus.writeBigUInt64LE(0x1234_0002_0000n, 24);
    conn.send(Req.GET_VRING_BASE, vringState(1, 0), { flags: NR });
    await conn.expectReply(Req.GET_VRING_BASE, 8);
    conn.send(Req.SET_VRING_ADDR, bogus, { flags: NR });
    const addrAck = await conn.expectAck(Req.SET_VRING_ADDR);
    const kick = ev();
    conn.send(Req.SET_VRING_KICK, u64(1), { flags: NR, fds: [kick] });
    closeFd(kick);
    const kickAck = await conn.expectAck(Req.SET_VRING_KICK);
    assert.ok(addrAck !== 0n || kickAck !== 0n, 'a ring outside guest memory is refused');

    // A header announcing a huge payload: the framing is lost, the connection is closed.
    const closing = await logged(daemon, async () => {
      conn.send(Req.SET_FEATURES, u64(0), { flags: NR, size: 1 << 20 });
      await conn.waitClosed();
    });
    await assertLogged(closing, /1048576|payload/i, 'the oversized message');
    device.close();
    memory.free();

    // A version-2 header and garbage on a fresh connection.
    const garbage = await Connection.connect(socket);
    await chConnect(garbage);
    garbage.send(Req.SET_VRING_NUM, vringState(1, 128), { flags: 0x2 | NEED_REPLY });
    assert.notEqual(await garbage.expectAck(Req.SET_VRING_NUM), 0n, 'a message of protocol version 2 is refused');
    garbage.close();

    // A new connection works fully.
    const fresh = await chDevice(socket);
    await lookup(fresh, 1, 1, storeName);
    closeDevice(fresh);
    assert.equal(daemon.process.exitCode, null, 'the daemon is still running');
    await settles(daemon, 'after the malformed messages');
  });

  describe('malformed rings', () => {
    const SIZE = 64;
    let device: Device;
    let dirNode: bigint;

    before(async () => {
      device = await chDevice(socket, { queueSize: SIZE });
      dirNode = (await lookup(device, 1, 1, storeName)).nodeid;
    });

    after(() => closeDevice(device));

    /** Writes raw descriptors into free slots (`next` fields are slot-relative: i means slots[i]). */
    function rawChain(queue: number, descs: { addr: bigint; len: number; flags: number; next?: number; nextRaw?: number }[]): { head: number; slots: number[] } {
      const q = device.queues[queue];
      const slots = q.takeDescriptors(descs.length);
      descs.forEach((d, i) => q.writeDescriptor(q.desc, slots[i], { addr: d.addr, len: d.len, flags: d.flags, next: d.nextRaw ?? slots[d.next ?? 0] }));
      return { head: slots[0], slots };
    }

    /** A good GETATTR posted after a bad chain: both come back, the bad one with len 0 and nothing written. */
    async function rejectedThenServed(queue: number, bad: { head: number; slots: number[] }, what: string): Promise<void> {
      const q = device.queues[queue];
      const text = await logged(daemon, async () => {
        q.publish([bad.head]);
        const unique = device.nextUnique();
        const good = q.build([{ data: fuseRequest(Op.GETATTR, unique, dirNode, getattrArgs()) }, { writable: 120 }]);
        q.publish([good.head]);
        q.kick();
        const used = await q.waitUsed(2);
        assert.deepEqual(used[0], { id: bad.head, len: 0 }, `${what}: the bad chain comes back unused`);
        assert.equal(used[1].id, good.head);
        const reply = parseFuseReply(q.written(good, used[1].len));
        assert.deepEqual([reply.unique, reply.error, used[1].len], [unique, 0, 120], `${what}: the next request is answered`);
        q.release(good);
        q.release({ head: bad.head, writable: [], descriptors: bad.slots });
        q.checkGuards();
      });
      await assertLogged(text, /queue 1\b/, what);
    }

    function request(opcode = Op.GETATTR, args = getattrArgs()): { gpa: bigint; len: number } {
      const data = fuseRequest(opcode, device.nextUnique(), dirNode, args);
      const gpa = device.memory.alloc(data.length);
      device.memory.write(gpa, data);
      return { gpa, len: data.length };
    }

    function replyArea(len: number): bigint {
      return device.memory.alloc(len);
    }

    test('a descriptor outside guest memory', async () => {
      const r = request();
      await rejectedThenServed(1, rawChain(1, [{ addr: r.gpa, len: r.len, flags: DESC_F_NEXT, next: 1 }, { addr: 0x3_0000_0000n, len: 120, flags: DESC_F_WRITE }]), 'writable descriptor in a hole');
      const region0End = device.memory.regions[0].gpa + BigInt(device.memory.regions[0].size);
      await rejectedThenServed(1, rawChain(1, [{ addr: region0End - 8n, len: 64, flags: 0 }]), 'readable descriptor straddling a region end');
      const region1End = device.memory.regions[1].gpa + BigInt(device.memory.regions[1].size);
      await rejectedThenServed(1, rawChain(1, [{ addr: r.gpa, len: r.len, flags: DESC_F_NEXT, next: 1 }, { addr: region1End - 16n, len: 120, flags: DESC_F_WRITE }]), 'writable descriptor running past the last region');
      await rejectedThenServed(1, rawChain(1, [{ addr: 0xffff_ffff_ffff_f000n, len: 0x2000, flags: 0 }]), 'an address that wraps around');
    });

    test('chains that loop, run past the table or are too long', async () => {
      const r = request();
      const reply = replyArea(120);
      await rejectedThenServed(1, rawChain(1, [{ addr: r.gpa, len: r.len, flags: DESC_F_NEXT, next: 1 }, { addr: reply, len: 60, flags: DESC_F_WRITE | DESC_F_NEXT, next: 0 }]), 'a loop');
      await rejectedThenServed(1, rawChain(1, [{ addr: r.gpa, len: r.len, flags: DESC_F_NEXT, nextRaw: SIZE + 3 }]), 'next beyond the queue');
      // An indirect table whose entries loop, and one whose next leaves the table.
      const q = device.queues[1];
      const loopTable = device.memory.alloc(16 * 3, 16);
      q.writeDescriptor(loopTable, 0, { addr: r.gpa, len: r.len, flags: DESC_F_NEXT, next: 1 });
      q.writeDescriptor(loopTable, 1, { addr: reply, len: 8, flags: DESC_F_WRITE | DESC_F_NEXT, next: 2 });
      q.writeDescriptor(loopTable, 2, { addr: reply + 8n, len: 8, flags: DESC_F_WRITE | DESC_F_NEXT, next: 1 });
      await rejectedThenServed(1, rawChain(1, [{ addr: loopTable, len: 48, flags: DESC_F_INDIRECT }]), 'a loop inside an indirect table');
      const outTable = device.memory.alloc(16 * 2, 16);
      q.writeDescriptor(outTable, 0, { addr: r.gpa, len: r.len, flags: DESC_F_NEXT, next: 1 });
      q.writeDescriptor(outTable, 1, { addr: reply, len: 120, flags: DESC_F_WRITE | DESC_F_NEXT, next: 2 });
      await rejectedThenServed(1, rawChain(1, [{ addr: outTable, len: 32, flags: DESC_F_INDIRECT }]), 'next beyond an indirect table');
      // A direct chain longer than the queue revisits descriptors: 62 distinct ones, then round again.
      const long = Array.from({ length: 62 }, (_, i) => ({ addr: r.gpa, len: 8, flags: DESC_F_NEXT, next: (i + 1) % 62 }));
      await rejectedThenServed(1, rawChain(1, long), 'a chain longer than the queue');
    });

    test('indirect descriptors used wrongly', async () => {
      const q = device.queues[1];
      const r = request();
      const reply = replyArea(120);
      const inner = device.memory.alloc(16 * 2, 16);
      q.writeDescriptor(inner, 0, { addr: r.gpa, len: r.len, flags: DESC_F_NEXT, next: 1 });
      q.writeDescriptor(inner, 1, { addr: reply, len: 120, flags: DESC_F_WRITE, next: 0 });
      const outer = device.memory.alloc(16, 16);
      q.writeDescriptor(outer, 0, { addr: inner, len: 32, flags: DESC_F_INDIRECT, next: 0 });
      await rejectedThenServed(1, rawChain(1, [{ addr: outer, len: 16, flags: DESC_F_INDIRECT }]), 'an indirect descriptor inside an indirect table');
      await rejectedThenServed(1, rawChain(1, [{ addr: inner, len: 32, flags: DESC_F_INDIRECT | DESC_F_NEXT, next: 1 }, { addr: reply, len: 16, flags: DESC_F_WRITE }]), 'INDIRECT together with NEXT');
      await rejectedThenServed(1, rawChain(1, [{ addr: inner, len: 24, flags: DESC_F_INDIRECT }]), 'an indirect table of 24 bytes');
      await rejectedThenServed(1, rawChain(1, [{ addr: inner, len: 0, flags: DESC_F_INDIRECT }]), 'an empty indirect table');
      await rejectedThenServed(1, rawChain(1, [{ addr: 0x3_0000_0000n, len: 32, flags: DESC_F_INDIRECT }]), 'an indirect table outside guest memory');
      // A readable descriptor after a writable one.
      await rejectedThenServed(1, rawChain(1, [{ addr: reply, len: 120, flags: DESC_F_WRITE | DESC_F_NEXT, next: 1 }, { addr: r.gpa, len: r.len, flags: 0 }]), 'readable after writable');
    });

    test('requests too short, replies that do not fit', async () => {
      const q = device.queues[1];
      // A readable part shorter than fuse_in_header: never a success.
      const short = q.build([{ data: fuseRequest(Op.GETATTR, device.nextUnique(), dirNode, getattrArgs()).subarray(0, 20) }, { writable: 120 }]);
      q.publish([short.head]);
      q.kick();
      const [shortUsed] = await q.waitUsed(1);
      assert.equal(shortUsed.id, short.head);
      if (shortUsed.len > 0) assert.ok(parseFuseReply(q.written(short, shortUsed.len)).error < 0, 'a truncated request is not answered with success');
      q.release(short);
      // A length field that lies (says 200, 56 bytes sent).
      const liar = q.build([{ data: fuseRequest(Op.GETATTR, device.nextUnique(), dirNode, getattrArgs(), 200) }, { writable: 120 }]);
      q.publish([liar.head]);
      q.kick();
      const [liarUsed] = await q.waitUsed(1);
      if (liarUsed.len > 0) assert.ok(parseFuseReply(q.written(liar, liarUsed.len)).error < 0, 'a request whose length field lies is not answered with success');
      q.release(liar);

      // GETATTR needs 16 + 104 bytes; give it 16 + 40: a failure header at most, nothing past the buffer.
      const unique = device.nextUnique();
      const small = q.build([{ data: fuseRequest(Op.GETATTR, unique, dirNode, getattrArgs()) }, { writable: 16 }, { writable: 40 }]);
      q.publish([small.head]);
      q.kick();
      const [smallUsed] = await q.waitUsed(1);
      assert.equal(smallUsed.id, small.head);
      assert.ok(smallUsed.len === 0 || smallUsed.len === 16, `used len ${smallUsed.len}: nothing, or just a failure header`);
      if (smallUsed.len === 16) {
        const reply = parseFuseReply(q.written(small, 16));
        assert.deepEqual([reply.len, reply.unique], [16, unique]);
        assert.ok(reply.error < 0, 'the failure header carries an error');
      }
      q.release(small);
      // Room for less than a header: nothing written at all.
      const tiny = q.build([{ data: fuseRequest(Op.GETATTR, device.nextUnique(), dirNode, getattrArgs()) }, { writable: 8 }]);
      q.publish([tiny.head]);
      q.kick();
      assert.deepEqual(await q.waitUsed(1), [{ id: tiny.head, len: 0 }]);
      q.release(tiny);
      q.checkGuards();
      // Still serving.
      assert.equal((await device.call(1, Op.GETATTR, dirNode, getattrArgs(), [120])).error, 0);
    });

    test('an avail index more than the queue size ahead stops that queue until it is restarted', async () => {
      // On a second device, so that the ring restart does not disturb the other tests.
      const other = await chDevice(socket, { queueSize: SIZE });
      const q = other.queues[1];
      const text = await logged(daemon, async () => {
        q.setAvailIdx(q.availIdx + SIZE + 1);
        q.kick();
        await sleep(50);
      });
      await assertLogged(text, /queue 1\b/, 'a bogus avail index');
      assert.equal(q.deviceUsedIdx, q.usedIdx, 'nothing used from a bogus avail index');
      // The queue is stopped: a good request is not taken ...
      q.setAvailIdx(q.availIdx);
      const unique = other.nextUnique();
      const pending = other.post(1, fuseRequest(Op.GETATTR, unique, 1, getattrArgs()), [120]);
      await sleep(100);
      assert.equal(q.deviceUsedIdx, q.usedIdx, 'the broken queue takes nothing');
      // ... but the device, other devices and the hiprio queue carry on.
      const hiprio = other.queues[0];
      const forget = hiprio.build([{ data: fuseRequest(Op.FORGET, 0n, 1, forgetArgs(1)) }]);
      hiprio.publish([forget.head]);
      hiprio.kick();
      assert.deepEqual(await hiprio.waitUsed(1), [{ id: forget.head, len: 0 }]);
      assert.equal((await device.call(1, Op.GETATTR, dirNode, getattrArgs(), [120])).error, 0);
      // The front end restarts the ring: GET_VRING_BASE, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_KICK.
      other.conn.send(Req.GET_VRING_BASE, vringState(1, 0), { flags: NR });
      const base = (await other.conn.expectReply(Req.GET_VRING_BASE, 8)).readUInt32LE(4);
      assert.equal(base, (q.availIdx - 1) & 0xffff, 'the ring stopped before the pending request');
      await acked(other.conn, Req.SET_VRING_ADDR, q.addrPayload());
      await acked(other.conn, Req.SET_VRING_BASE, vringState(1, base));
      const kick = native().eventfd();
      await acked(other.conn, Req.SET_VRING_KICK, u64(1), [kick]);
      writeEventfd(kick);
      const { reply } = await other.reply(1, pending);
      assert.deepEqual([reply.unique, reply.error], [unique, 0], 'the restarted ring serves the pending request');
      closeFd(kick);
      closeDevice(other);
    });

    test('an avail entry naming a descriptor beyond the table', async () => {
      const other = await chDevice(socket, { queueSize: SIZE });
      const q = other.queues[1];
      const text = await logged(daemon, async () => {
        q.setAvailEntry(q.availIdx, SIZE + 5);
        q.availIdx = (q.availIdx + 1) & 0xffff;
        q.setAvailIdx(q.availIdx);
        q.kick();
        await sleep(50);
      });
      await assertLogged(text, /queue 1\b/, 'an avail entry out of range');
      for (const e of q.collect()) assert.ok(e.id < SIZE, `used id ${e.id} is a descriptor of the queue`);
      assert.equal((await device.call(1, Op.GETATTR, dirNode, getattrArgs(), [120])).error, 0, 'other devices carry on');
      closeDevice(other);
    });

    test('a guest flooding bad chains gets at most a burst of log lines, then a count; other guests are still logged', async () => {
      const other = await chDevice(socket, { queueSize: SIZE });
      const q = other.queues[1];
      const ROUNDS = 40;
      const PER_ROUND = 32;
      const rejected = (text: string) => text.split('\n').filter((line) => /queue 1: request rejected/.test(line)).length;
      const flood = await logged(daemon, async () => {
        for (let round = 0; round < ROUNDS; round++) {
          const heads = q.takeDescriptors(PER_ROUND);
          for (const head of heads) q.writeDescriptor(q.desc, head, { addr: 0x3_0000_0000n, len: 64, flags: 0, next: 0 });
          q.publish(heads);
          q.kick();
          const used = await q.waitUsed(PER_ROUND);
          assert.ok(used.every((e) => e.len === 0), 'every bad chain comes back unused');
          q.release({ head: heads[0], writable: [], descriptors: heads });
        }
      });
      await assertLogged(flood, /more messages not logged/, 'the count of what the limit dropped');
      const lines = rejected(daemon.output().slice(flood.since));
      assert.ok(lines >= 50 && lines <= 110, `${ROUNDS * PER_ROUND} bad chains logged ${lines} lines: the burst of 100, and no more than the refill of 10 a second adds`);
      // The flooding guest is still served, and another guest's trouble still reaches the log.
      assert.equal((await other.call(1, Op.GETATTR, 1, getattrArgs(), [120])).error, 0, 'the flooding guest is still served');
      const mine = device.queues[1];
      const [head] = mine.takeDescriptors(1);
      mine.writeDescriptor(mine.desc, head, { addr: 0x3_0000_0000n, len: 64, flags: 0, next: 0 });
      const after = await logged(daemon, async () => {
        mine.publish([head]);
        mine.kick();
        assert.deepEqual(await mine.waitUsed(1), [{ id: head, len: 0 }]);
        mine.release({ head, writable: [], descriptors: [head] });
      });
      await assertLogged(after, /queue 1: request rejected/, "another guest's bad chain, after the flood");
      closeDevice(other);
    });
  });

  // Replies of chains in flight when SET_MEM_TABLE (or REM_MEM_REG) arrives must still arrive,
  // or those guest requests never end.
  test('a new memory table while requests are in flight: every request still completes', async () => {
    const device = await chDevice(socket);
    try {
      const dir = await lookup(device, 1, 1, storeName);
      const huge = await lookup(device, 1, dir.nodeid, 'huge');
      const fh = await open(device, 1, huge.nodeid);
      const content = readFileSync(join(tree, 'huge'));
      const q = device.queues[1];
      for (let round = 0; round < 3; round++) {
        const posted = [];
        for (let i = 0; i < 16; i++) {
          const offset = ((round * 16 + i) * 65536) % (HUGE_SIZE - 65536);
          const p = q.build([{ data: fuseRequest(Op.READ, device.nextUnique(), huge.nodeid, readArgs(fh, offset, 65536)) }, { writable: 16 + 65536, region: i % 2 }]);
          posted.push({ p, offset });
        }
        q.publish(posted.map(({ p }) => p.head));
        q.kick();
        // The same regions again, as a front end without CONFIGURE_MEM_SLOTS sends on memory hotplug.
        device.conn.send(Req.SET_MEM_TABLE, memTablePayload(device.memory.descriptions()), { flags: NR, fds: device.memory.fds() });
        assert.equal(await device.conn.expectAck(Req.SET_MEM_TABLE), 0n);
        const used = await q.waitUsed(16, 3000);
        for (const u of used) {
          const { p, offset } = posted.find(({ p }) => p.head === u.id)!;
          const reply = parseFuseReply(q.written(p, u.len));
          assert.equal(reply.error, 0);
          assert.ok(reply.body.equals(content.subarray(offset, offset + 65536)), `round ${round}: READ at ${offset}`);
          q.release(p);
        }
      }
    } finally {
      closeDevice(device);
    }
  });

  // A region whose fd is shorter than mmap_offset + size would map fine, and the first access
  // past the fd's end would kill the daemon (SIGBUS).
  test('a memory region larger than its fd is refused and does not take the daemon down', async () => {
    const path = join(work, 'fs3.sock');
    const d = await startNixcas(['virtiofs', path, '--store', store], 'listening on');
    try {
      const conn = await Connection.connect(path);
      await chConnect(conn);
      await acked(conn, Req.SET_FEATURES, u64(BACKEND_FEATURES));
      const memory = defaultGuestMemory();
      const short = native().memfd('nixcas-test-guest-short', 65536);
      const ackOrClosed = async (request: number, payload: Buffer, fds: number[] = []): Promise<bigint | 'closed'> => {
        if (conn.closedByPeer) return 'closed';
        try {
          conn.send(request, payload, { flags: NR, fds });
          return await conn.expectAck(request);
        } catch {
          return 'closed';
        }
      };
      // Region 0 claims 8 MiB; its fd has 64 KiB.
      const memAck = await ackOrClosed(Req.SET_MEM_TABLE, memTablePayload(memory.descriptions()), [short, memory.regions[1].fd]);
      // A hotplugged region that starts past the end of its fd.
      const addAck = await ackOrClosed(Req.ADD_MEM_REG, memRegPayload({ gpa: 0x2_0000_0000n, size: 1 << 20, userAddr: 0x6000_0000_0000n, mmapOffset: 1 << 20 }), [short]);
      closeFd(short);
      // Whatever the acks said, rings past the fd's end must not crash the daemon.
      memory.alloc(128 * 1024);
      const device = new Device(conn, memory, 2, 256);
      for (const q of device.queues) {
        await ackOrClosed(Req.SET_VRING_NUM, vringState(q.index, q.size));
        await ackOrClosed(Req.SET_VRING_ADDR, q.addrPayload());
        await ackOrClosed(Req.SET_VRING_BASE, vringState(q.index, 0));
        await ackOrClosed(Req.SET_VRING_CALL, u64(q.index), [q.callFd]);
        await ackOrClosed(Req.SET_VRING_KICK, u64(q.index), [q.kickFd]);
        await ackOrClosed(Req.SET_VRING_ENABLE, vringState(q.index, 1));
        q.kick();
      }
      await sleep(100);
      closeDevice(device);
      assert.deepEqual([d.process.exitCode, d.process.signalCode], [null, null], 'the daemon is still running');
      assert.ok(memAck !== 0n && memAck !== 'closed', `SET_MEM_TABLE with a region past the end of its fd is refused (got ${memAck})`);
      assert.ok(addAck !== 0n && addAck !== 'closed', `ADD_MEM_REG with a region past the end of its fd is refused (got ${addAck})`);
      const fresh = await chDevice(path);
      await lookup(fresh, 1, 1, storeName);
      closeDevice(fresh);
    } finally {
      await d.stop();
    }
  });

  test('front ends that hang up mid-request or mid-setup leave no fds or mappings behind', async () => {
    closeEverything();
    await settles(daemon, 'before');
    // Requests in flight: 16 READs of 128 KiB of a 2 MiB file, then the socket and memory go away at once.
    for (let round = 0; round < 3; round++) {
      const device = await chDevice(socket);
      const dir = await lookup(device, 1, 1, storeName);
      const huge = await lookup(device, 1, dir.nodeid, 'huge');
      const fh = await open(device, 1, huge.nodeid);
      const q = device.queues[1];
      for (let i = 0; i < 16; i++) {
        const posted = q.build([{ data: fuseRequest(Op.READ, device.nextUnique(), huge.nodeid, readArgs(fh, i * 131072, 131072)) }, { writable: 16 + 131072, region: i % 2 }]);
        q.publish([posted.head]);
      }
      q.kick();
      if (round === 1) await sleep(1); // some answered, some not
      closeDevice(device);
    }
    // Hanging up in the middle of the setup: after SET_MEM_TABLE, after a kick fd, mid-message.
    for (const stage of ['mem', 'kick', 'partial']) {
      const conn = await Connection.connect(socket);
      await chConnect(conn);
      const memory = defaultGuestMemory();
      const device = new Device(conn, memory, 2, 128);
      await acked(conn, Req.SET_FEATURES, u64(BACKEND_FEATURES));
      conn.send(Req.SET_MEM_TABLE, memTablePayload(memory.descriptions()), { flags: NR, fds: memory.fds() });
      if (stage !== 'mem') {
        await conn.expectAck(Req.SET_MEM_TABLE);
        await acked(conn, Req.SET_VRING_NUM, vringState(1, 128));
        await acked(conn, Req.SET_VRING_ADDR, device.queues[1].addrPayload());
        conn.send(Req.SET_VRING_KICK, u64(1), { flags: NR, fds: [device.queues[1].kickFd] });
      }
      if (stage === 'partial') {
        await conn.expectAck(Req.SET_VRING_KICK);
        conn.sendBytes(Buffer.from([Req.SET_VRING_CALL, 0, 0, 0, 9]), [device.queues[1].callFd]); // 5 of 12 header bytes, with an fd
      }
      closeDevice(device);
    }
    await settles(daemon, 'after the hang-ups');
    // And it still serves.
    const device = await chDevice(socket);
    const dir = await lookup(device, 1, 1, storeName);
    const hello = await lookup(device, 1, dir.nodeid, 'hello.txt');
    const fh = await open(device, 1, hello.nodeid);
    assert.equal((await device.call(1, Op.READ, hello.nodeid, readArgs(fh, 0, 100), [200])).body.toString(), 'hello from the store\n');
    closeDevice(device);
    await settles(daemon, 'at the end');
  });
});

function writeEventfd(fd: number): void {
  assert.equal(native().writev(fd, [u64(1)]), 8);
}

