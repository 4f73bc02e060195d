// The FUSE protocol layer fed request messages directly: what the kernel
// never sends (malformed, truncated, out of order) must be answered, not crash.
import assert from 'node:assert/strict';
import { constants } from 'node:os';
import { test } from 'node:test';
import { IN_HEADER_SIZE, InitFlag, Opcode } from '../src/fuse/abi.js';
import { limitLog } from '../src/fuse/log-limit.js';
import { FuseServer } from '../src/fuse/protocol.js';
import { oneFileFilesystem } from './helpers.js';

const { errno } = constants;

interface Reply {
  error: number;
  unique: bigint;
  body: Buffer;
}

async function setup() {
  const { fs, file } = await oneFileFilesystem();
  const logged: string[] = [];
  const server = new FuseServer(fs, { log: (m) => logged.push(m) });
  const replies: Reply[] = [];
  const sink = {
    send: (message: Buffer) => {
      assert.equal(message.readUInt32LE(0), message.length, 'reply length field');
      // The server reuses its buffers once send returns: keep a copy.
      replies.push({ error: message.readInt32LE(4), unique: message.readBigUInt64LE(8), body: Buffer.from(message.subarray(16)) });
    },
  };
  let unique = 0n;
  /** Sends one request and waits for its reply (if any). */
  const send = async (opcode: number, nodeid: number, args: Buffer = Buffer.alloc(0), lengthField?: number): Promise<Reply | undefined> => {
    const message = Buffer.alloc(IN_HEADER_SIZE + args.length);
    message.writeUInt32LE(lengthField ?? message.length, 0);
    message.writeUInt32LE(opcode, 4);
    message.writeBigUInt64LE(++unique, 8);
    message.writeBigUInt64LE(BigInt(nodeid), 16);
    args.copy(message, IN_HEADER_SIZE);
    const before = replies.length;
    server.handle(message, sink);
    await new Promise((r) => setTimeout(r, 5));
    assert.ok(replies.length <= before + 1, 'at most one reply per request');
    const reply = replies[before];
    if (reply) assert.equal(reply.unique, unique, 'the reply carries the request id');
    return reply;
  };
  const init = (major: number, minor: number, flags = 0xffffffff) => {
    const args = Buffer.alloc(64);
    args.writeUInt32LE(major, 0);
    args.writeUInt32LE(minor, 4);
    args.writeUInt32LE(128 * 1024, 8);
    args.writeUInt32LE(flags >>> 0, 12);
    return send(Opcode.INIT, 0, args);
  };
  return { send, init, logged, file, server };
}

test('INIT: version negotiation', async () => {
  const { init, send, server } = await setup();
  assert.equal((await send(Opcode.GETATTR, 1, Buffer.alloc(16)))?.error, -errno.EIO, 'requests before INIT fail');
  const newer = await init(8, 0);
  assert.equal(newer?.error, 0);
  assert.equal(newer?.body.readUInt32LE(0), 7, 'a newer major gets ours, so the kernel retries');
  assert.equal((await init(7, 26))?.error, -errno.EPROTO, 'too old a minor is refused');
  const ok = await init(7, 31, 0);
  assert.equal(ok?.error, 0);
  assert.equal(ok?.body.length, 64);
  assert.equal(ok?.body.readUInt32LE(4), 31, 'the older minor of the two wins');
  assert.equal(ok?.body.readUInt32LE(12), 0, 'no flag the kernel did not offer');
  assert.equal(server.negotiatedMinor, 31);
  const latest = await init(7, 44);
  assert.equal(latest?.body.readUInt32LE(4), 38);
});

test('malformed requests are answered EINVAL and the server keeps serving', async () => {
  const { init, send, logged, file } = await setup();
  await init(7, 38, 0); // a kernel without NO_OPEN_SUPPORT: files are opened
  assert.equal((await send(Opcode.LOOKUP, 1, Buffer.from('no-terminating-nul')))?.error, -errno.EINVAL);
  assert.equal((await send(Opcode.READ, 1, Buffer.alloc(3)))?.error, -errno.EINVAL);
  assert.equal((await send(Opcode.GETATTR, 1, Buffer.alloc(16), 999))?.error, -errno.EINVAL, 'a length field that lies');
  const count = Buffer.alloc(8);
  count.writeUInt32LE(1000, 0);
  assert.equal(await send(Opcode.BATCH_FORGET, 0, count), undefined, 'BATCH_FORGET never gets a reply');
  assert.ok(logged.some((m) => /BATCH_FORGET/.test(m)));
  assert.equal((await send(999, 1))?.error, -errno.ENOSYS);
  assert.equal((await send(Opcode.MKDIR, 1, Buffer.from('x\0')))?.error, -errno.EROFS);
  assert.equal((await send(Opcode.GETATTR, 12345, Buffer.alloc(16)))?.error, -errno.ENOENT, 'an inode never handed out');
  const read = Buffer.alloc(40);
  read.writeUInt32LE(4096, 16);
  read.writeBigUInt64LE(7n, 0);
  assert.equal((await send(Opcode.READ, 2, read))?.error, -errno.EBADF, 'a handle never opened');
  // Still serving: a lookup and a read work.
  const entry = await send(Opcode.LOOKUP, 1, Buffer.concat([file.node.name, Buffer.from([0])]));
  assert.equal(entry?.error, 0);
  const ino = Number(entry!.body.readBigUInt64LE(0));
  const open = await send(Opcode.OPEN, ino, Buffer.alloc(8));
  assert.equal(open?.error, 0);
  read.writeBigUInt64LE(open!.body.readBigUInt64LE(0), 0);
  const data = await send(Opcode.READ, ino, read);
  assert.equal(data?.body.toString(), 'hello\n');
  assert.equal((await send(Opcode.OPEN, ino, Buffer.from([2, 0, 0, 0, 0, 0, 0, 0])))?.error, -errno.EROFS, 'opening for writing');
});

test('with NO_OPEN_SUPPORT, OPEN is answered ENOSYS and files are read by inode', async () => {
  const { init, send, file } = await setup();
  await init(7, 38, InitFlag.NO_OPEN_SUPPORT);
  const entry = await send(Opcode.LOOKUP, 1, Buffer.concat([file.node.name, Buffer.from([0])]));
  const ino = Number(entry!.body.readBigUInt64LE(0));
  assert.equal((await send(Opcode.OPEN, ino, Buffer.alloc(8)))?.error, -errno.ENOSYS);
  assert.equal((await send(Opcode.OPEN, ino, Buffer.from([2, 0, 0, 0, 0, 0, 0, 0])))?.error, -errno.EROFS, 'opening for writing');
  const read = Buffer.alloc(40);
  read.writeUInt32LE(4096, 16);
  const data = await send(Opcode.READ, ino, read); // handle 0
  assert.equal(data?.error, 0);
  assert.equal(data?.body.toString(), 'hello\n');
  read.writeBigUInt64LE(3n, 8); // at an offset
  assert.equal((await send(Opcode.READ, ino, read))?.body.toString(), 'lo\n');
  assert.equal((await send(Opcode.READ, 1, read))?.error, -errno.EISDIR, 'the root is no file');
  assert.equal((await send(Opcode.READ, 4242, read))?.error, -errno.ENOENT, 'an inode never handed out');
});

test('lookups are counted and forgotten inodes are dropped', async () => {
  const { init, send, file } = await setup();
  await init(7, 38);
  const name = Buffer.concat([file.node.name, Buffer.from([0])]);
  const first = await send(Opcode.LOOKUP, 1, name);
  const second = await send(Opcode.LOOKUP, 1, name);
  const ino = Number(first!.body.readBigUInt64LE(0));
  assert.equal(Number(second!.body.readBigUInt64LE(0)), ino, 'a name keeps its inode');
  const forget = Buffer.alloc(8);
  forget.writeBigUInt64LE(1n, 0);
  await send(Opcode.FORGET, ino, forget);
  assert.equal((await send(Opcode.GETATTR, ino, Buffer.alloc(16)))?.error, 0, 'one reference left');
  await send(Opcode.FORGET, ino, forget);
  assert.equal((await send(Opcode.GETATTR, ino, Buffer.alloc(16)))?.error, -errno.ENOENT, 'gone after the last forget');
});

test('the log limit: a burst, then the refill rate, then one line counting what was dropped', async () => {
  const lines: string[] = [];
  let clock = 0;
  const log = limitLog((message) => lines.push(message), { burst: 5, perSecond: 2, now: () => clock });
  for (let i = 0; i < 20; i++) log(`bad request ${i}`);
  assert.deepEqual(lines, ['bad request 0', 'bad request 1', 'bad request 2', 'bad request 3', 'bad request 4'], 'the burst, in order');
  clock += 1000; // two tokens back
  for (let i = 20; i < 25; i++) log(`bad request ${i}`);
  assert.deepEqual(lines.slice(5), ['bad request 20', 'bad request 21']);
  await new Promise((resolve) => setTimeout(resolve, 1100));
  assert.deepEqual(lines.slice(7), ['18 more messages not logged (more than 2 a second)'], 'one line with the count, a second after the first drop');
  clock += 60_000; // a quiet minute fills the bucket, and no more than the burst
  for (let i = 0; i < 8; i++) log('again');
  assert.equal(lines.length, 8 + 5);
});
