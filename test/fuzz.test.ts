// Property-based runs over the parsers a peer reaches (issue #22, item 9):
// protobuf Directory decoding, narinfo parsing, HTTP Range, NAR ingestion,
// virtqueue chain walking, FUSE requests, gRPC PathInfo messages, directory
// closures another nixcas sends, vhost-user
// messages (against a running `nixcas virtiofs`).
// Inputs are random bytes and mutations of valid inputs; each parser must
// either answer or refuse with its own InvalidInputError, never throw
// anything else, and what it accepts must round-trip. Seeds are fixed
// (printed on failure, with the path to replay); FUZZ_RUNS raises the number
// of runs (`npm run fuzz`).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { MemoryBlobService, MemoryDirectoryService } from '../src/castore/backends/memory.js';
import { InvalidInputError } from '../src/castore/errors.js';
import { type Directory, type Node, directorySize } from '../src/castore/model.js';
import { blake3, digestKey } from '../src/castore/digest.js';
import { TreeFetchError, readDirectoryClosure } from '../src/store/castore-fetch.js';
import { requireWellFormed, tolerantServiceDefinition } from '../src/grpc/protos.js';
import { type WirePathInfo, pathInfoFromWire, pathInfoToWire } from '../src/grpc/store-convert.js';
import { type PathInfo, validatePathInfo } from '../src/store/pathinfo.js';
import { formatBasename } from '../src/store/storepath.js';
import { IN_HEADER_SIZE, Opcode } from '../src/fuse/abi.js';
import { FuseServer, expectsReply } from '../src/fuse/protocol.js';
import { decodeDirectory, encodeDirectory } from '../src/castore/wire.js';
import { parseRange } from '../src/narbridge/range.js';
import { NarFormatError, ingestNar } from '../src/store/nar/ingest.js';
import { ingestNarNatively, nativeIngestTarget } from '../src/store/nar/native-ingest.js';
import { narIngestAddon } from '../src/native/ingest.js';
import { narString } from './nar-samples.js';
import { readdirSync } from 'node:fs';
import { LocalStore } from '../src/castore/backends/local.js';
import { renderNar } from '../src/store/nar/render.js';
import { parseNarInfo } from '../src/store/narinfo.js';
import { GuestMemory as DeviceMemory, GuestMemoryError } from '../src/vhost-user/memory.js';
import { ChainError, SplitQueue as DeviceQueue } from '../src/vhost-user/virtqueue.js';
import { Connection, NEED_REPLY, REPLY, Req, SplitQueue, VERSION, closeEverything, closeFd, defaultGuestMemory, memTablePayload, u64, vringState } from './vhost-user-frontend.js';
import { nixcas, oneFileFilesystem, removeDir, startNixcas, tempDir } from './helpers.js';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const RUNS = Number(process.env.FUZZ_RUNS ?? 5000);
const SEED = Number(process.env.FUZZ_SEED ?? 0x22f022);
const params = { numRuns: RUNS, seed: SEED, endOnFailure: true };

/** Refusals are InvalidInputErrors; anything else (TypeError, RangeError, a crash) is a bug. */
function refusedCleanly(err: unknown): boolean {
  return err instanceof InvalidInputError;
}

/** Random bytes, and single-byte edits (flip, insert, delete, truncate) of `valid`. */
function bytesAround(valid: fc.Arbitrary<Buffer>): fc.Arbitrary<Buffer> {
  const edited = fc.tuple(valid, fc.nat(), fc.integer({ min: 0, max: 255 }), fc.constantFrom('flip', 'insert', 'delete', 'truncate')).map(([bytes, at, value, how]) => {
    if (bytes.length === 0) return Buffer.from([value]);
    const i = at % bytes.length;
    switch (how) {
      case 'flip': { const copy = Buffer.from(bytes); copy[i] ^= value || 1; return copy; }
      case 'insert': return Buffer.concat([bytes.subarray(0, i), Buffer.from([value]), bytes.subarray(i)]);
      case 'delete': return Buffer.concat([bytes.subarray(0, i), bytes.subarray(i + 1)]);
      default: return bytes.subarray(0, i);
    }
  });
  return fc.oneof(fc.uint8Array({ maxLength: 512 }).map((a) => Buffer.from(a)), edited, valid);
}

// ---------------------------------------------------------------- Directory

const nameArb = fc.uint8Array({ minLength: 1, maxLength: 12 }).map((a) => Buffer.from(a.map((b) => (b === 0 || b === 0x2f ? 0x61 : b))))
  .filter((n) => !(n.length === 1 && n[0] === 0x2e) && !(n.length === 2 && n[0] === 0x2e && n[1] === 0x2e));
const digestArb = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((a) => Buffer.from(a));

const directoryArb: fc.Arbitrary<Directory> = fc.uniqueArray(nameArb, { maxLength: 8, comparator: (a, b) => a.equals(b) }).chain((names) => {
  const sorted = [...names].sort(Buffer.compare);
  return fc.tuple(...sorted.map(() => fc.tuple(fc.constantFrom('directory', 'file', 'symlink'), digestArb, fc.nat({ max: 1 << 20 }), fc.boolean()))).map((kinds) => {
    const directory: Directory = { directories: [], files: [], symlinks: [] };
    kinds.forEach(([kind, digest, size, executable], i) => {
      const name = sorted[i]!;
      if (kind === 'directory') directory.directories.push({ name, digest, size });
      else if (kind === 'file') directory.files.push({ name, digest, size, executable });
      else directory.symlinks.push({ name, target: Buffer.from(`target-${i}`) });
    });
    return directory;
  });
});

test(`fuzz: Directory decoding answers or refuses (seed ${SEED})`, () => {
  fc.assert(
    fc.property(bytesAround(directoryArb.map(encodeDirectory)), (bytes) => {
      let decoded: Directory;
      try {
        decoded = decodeDirectory(bytes);
      } catch (err) {
        return refusedCleanly(err);
      }
      // What decodes re-encodes to a message that decodes to the same directory.
      return encodeDirectory(decodeDirectory(encodeDirectory(decoded))).equals(encodeDirectory(decoded));
    }),
    params,
  );
  fc.assert(fc.property(directoryArb, (directory) => encodeDirectory(decodeDirectory(encodeDirectory(directory))).equals(encodeDirectory(directory))), params);
});

// ---------------------------------------------------------------- narinfo

const VALID_NARINFO = [
  'StorePath: /nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello-2.12',
  'URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz',
  'Compression: xz',
  'FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3',
  'FileSize: 50088',
  'NarHash: sha256:0yzhigwjl6bws649vcs2asa4lbs8hg93hyix187gc7s7a74w5h80',
  'NarSize: 226560',
  'References: 7rjj86a15146cq1d3qy068lml7n8ykzm-hello-2.12 ycbqd7822qcnasaqy0mmiv2j9n9m62yl-glibc-2.33-123',
  'Deriver: f2b3x7b5wj14gxkmpi1g0yd3g6j1fxqy-hello-2.12.drv',
  'Sig: cache.nixos.org-1:bXsoRnTqgsCHpZbRThChiTWsiSY+qSoMzvMzRRhGzZW7W9R8MXZaUgsZuMcGYSZF3XMfUmKQQHrsCqfJzjgGAg==',
  '',
].join('\n');

test(`fuzz: narinfo parsing answers or refuses (seed ${SEED})`, () => {
  const text = fc.oneof(
    fc.string({ maxLength: 400 }),
    bytesAround(fc.constant(Buffer.from(VALID_NARINFO))).map((b) => b.toString('latin1')),
    fc.array(fc.constantFrom(...VALID_NARINFO.split('\n')), { maxLength: 14 }).map((lines) => lines.join('\n')),
  );
  fc.assert(
    fc.property(text, (input) => {
      try {
        parseNarInfo(input);
        return true;
      } catch (err) {
        return refusedCleanly(err);
      }
    }),
    params,
  );
});

// ---------------------------------------------------------------- HTTP Range

test(`fuzz: HTTP Range gives the whole, nothing, or a range inside the representation (seed ${SEED})`, () => {
  const header = fc.oneof(
    fc.string({ maxLength: 40 }),
    fc.tuple(fc.option(fc.nat()), fc.option(fc.nat())).map(([a, b]) => `bytes=${a ?? ''}-${b ?? ''}`),
    fc.tuple(fc.bigInt({ min: 0n, max: 10n ** 30n }), fc.bigInt({ min: 0n, max: 10n ** 30n })).map(([a, b]) => `bytes=${a}-${b}`),
  );
  fc.assert(
    fc.property(fc.option(header, { nil: undefined }), fc.nat({ max: 1 << 30 }), (value, size) => {
      const answer = parseRange(value, size);
      if (answer.kind !== 'partial') return true;
      const { start, end } = answer.range;
      return Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && start < end && end <= size;
    }),
    params,
  );
});

// ---------------------------------------------------------------- NAR ingestion

type Tree = { kind: 'file'; contents: Buffer; executable: boolean } | { kind: 'symlink'; target: string } | { kind: 'directory'; entries: [string, Tree][] };

const treeArb: fc.Arbitrary<Tree> = fc.letrec<{ tree: Tree }>((tie) => ({
  tree: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.record({ kind: fc.constant('file' as const), contents: fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a)), executable: fc.boolean() }),
    fc.record({ kind: fc.constant('symlink' as const), target: fc.string({ minLength: 1, maxLength: 10 }).filter((t) => !t.includes('\0')) }),
    fc.record({
      kind: fc.constant('directory' as const),
      entries: fc.uniqueArray(fc.tuple(fc.stringMatching(/^[a-z0-9._-]{1,6}$/).filter((n) => n !== '.' && n !== '..'), tie('tree')), { maxLength: 4, selector: ([name]) => name }),
    }),
  ),
})).tree;

function encodeTree(tree: Tree): Buffer[] {
  if (tree.kind === 'file') {
    return [narString('('), narString('type'), narString('regular'), ...(tree.executable ? [narString('executable'), narString('')] : []), narString('contents'), narString(tree.contents), narString(')')];
  }
  if (tree.kind === 'symlink') return [narString('('), narString('type'), narString('symlink'), narString('target'), narString(tree.target), narString(')')];
  const entries = [...tree.entries].sort(([a], [b]) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  return [
    narString('('), narString('type'), narString('directory'),
    ...entries.flatMap(([name, child]) => [narString('entry'), narString('('), narString('name'), narString(name), narString('node'), ...encodeTree(child), narString(')')]),
    narString(')'),
  ];
}

const narArb = treeArb.map((tree) => Buffer.concat([narString('nix-archive-1'), ...encodeTree(tree)]));

test(`fuzz: NAR ingestion refuses what is not a canonical NAR, and what it takes renders back byte for byte (seed ${SEED})`, async () => {
  await fc.assert(
    fc.asyncProperty(bytesAround(narArb), fc.integer({ min: 1, max: 64 }), async (nar, piece) => {
      const services = { blobs: new MemoryBlobService(), directories: new MemoryDirectoryService() };
      const chunks: Buffer[] = [];
      for (let at = 0; at < nar.length; at += piece) chunks.push(nar.subarray(at, at + piece));
      let root;
      try {
        ({ root } = await ingestNar(chunks, services));
      } catch (err) {
        return refusedCleanly(err);
      }
      const rendered: Buffer[] = [];
      for await (const chunk of renderNar(root, services)) rendered.push(chunk);
      assert.ok(Buffer.concat(rendered).equals(nar), `accepted a NAR that does not render back: ${nar.toString('hex').slice(0, 200)}`);
      return true;
    }),
    { ...params, numRuns: Math.max(1, Math.floor(RUNS / 2)) },
  );
});

test(`fuzz: the native NAR ingest accepts what the TypeScript reader accepts, with the same tree, and refuses the rest with NarFormatError (seed ${SEED})`, { skip: !narIngestAddon() && 'the nixcas_ingest addon is not built' }, async () => {
  const dir = tempDir('fuzz-native-ingest');
  const blobs = LocalStore.blobService(dir, { create: true });
  const directories = LocalStore.directoryService(dir, { create: true });
  const target = nativeIngestTarget(blobs)!;
  try {
    await fc.assert(
      fc.asyncProperty(bytesAround(narArb), fc.integer({ min: 1, max: 64 }), fc.integer({ min: 1, max: 200 }), async (nar, piece, batchBytes) => {
        const chunks: Buffer[] = [];
        for (let at = 0; at < nar.length; at += piece) chunks.push(nar.subarray(at, at + piece));
        const reference = await ingestNar(chunks, { blobs: new MemoryBlobService(), directories: new MemoryDirectoryService() }).catch((err: Error) => err);
        async function* body() {
          yield* chunks;
        }
        const native = await ingestNarNatively(body(), { compression: 'none', hashFile: false, narSizeMax: 1 << 20, tooLarge: () => new Error('too large'), blobs: target, directories, batchBytes }).catch((err: Error) => err);
        if (reference instanceof Error) {
          assert.ok(native instanceof NarFormatError, `the TypeScript reader refused (${reference.message}), the native ingest gave ${native instanceof Error ? native.message : 'a tree'}: ${nar.toString('hex').slice(0, 200)}`);
        } else {
          assert.ok(!(native instanceof Error), `the native ingest refused a NAR the TypeScript reader took: ${(native as Error).message}`);
          assert.deepEqual(native.root, reference.root);
          assert.equal(native.narSize, reference.narSize);
          assert.ok(native.narSha256.equals(reference.narSha256));
        }
        assert.deepEqual(readdirSync(join(dir, 'tmp')), [], 'no temp file left behind');
        return true;
      }),
      { ...params, numRuns: Math.max(1, Math.floor(RUNS / 4)) },
    );
  } finally {
    await blobs.close();
    await directories.close();
    removeDir(dir);
  }
});

// ---------------------------------------------------------------- virtqueue chain walking

test(`fuzz: a guest's descriptor tables are walked or refused, never trusted (seed ${SEED})`, () => {
  const QUEUE = 64;
  const guest = defaultGuestMemory('nixcas-fuzz-virtqueue');
  const driver = new SplitQueue(guest, 1, QUEUE);
  const memory = new DeviceMemory(8);
  for (const r of guest.regions) memory.add({ guestPhysAddr: Number(r.gpa), size: r.size, userAddr: Number(r.userAddr), mmapOffset: r.mmapOffset }, r.fd);
  const base = guest.regions[0]!.gpa;
  const table = guest.locate(driver.desc, 16 * QUEUE);
  // Scratch the descriptors may point at: indirect tables and buffers of random bytes.
  const scratchGpa = base + 0x40_0000n;
  const scratch = guest.locate(scratchGpa, 0x1_0000);
  // Addresses inside the scratch, elsewhere in guest memory, or nowhere.
  const addr = fc.oneof(
    fc.nat({ max: 0xfff0 }).map((o) => scratchGpa + BigInt(o)),
    fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    fc.nat({ max: 16 << 20 }).map((o) => base + BigInt(o)),
  );
  const descriptor = fc.tuple(addr, fc.oneof(fc.nat({ max: 4096 }), fc.nat()), fc.nat({ max: 7 }), fc.nat({ max: QUEUE + 4 }));
  try {
    fc.assert(
      fc.property(fc.array(descriptor, { minLength: QUEUE, maxLength: QUEUE }), fc.uint8Array({ minLength: 4096, maxLength: 4096 }), fc.nat({ max: QUEUE - 1 }), (descriptors, noise, head) => {
        descriptors.forEach(([gpa, length, flags, next], i) => {
          const at = table.offset + 16 * i;
          table.region.bytes.writeBigUInt64LE(gpa, at);
          table.region.bytes.writeUInt32LE(length >>> 0, at + 8);
          table.region.bytes.writeUInt16LE(flags, at + 12);
          table.region.bytes.writeUInt16LE(next & 0xffff, at + 14);
        });
        for (let i = 0; i < 16; i++) scratch.region.bytes.set(noise, scratch.offset + 4096 * i);
        const queue = new DeviceQueue(memory, { size: QUEUE, desc: Number(driver.desc), avail: Number(driver.avail), used: Number(driver.used), nextAvail: driver.availIdx & 0xffff, eventIdx: false, indirect: true }, () => {});
        driver.publish([head]);
        const refused: Error[] = [];
        const chain = queue.pop((err) => refused.push(err));
        queue.deactivate();
        if (!chain) return refused.length === 1 && (refused[0] instanceof ChainError || refused[0] instanceof GuestMemoryError);
        // A chain taken is one the device can read and answer within its bounds.
        return chain.read().length === chain.readableLength && chain.writableLength >= 0;
      }),
      { ...params, numRuns: Math.max(1, Math.floor(RUNS / 5)) },
    );
  } finally {
    memory.clear();
    driver.close();
    guest.free();
    closeEverything();
  }
});

// ---------------------------------------------------------------- FUSE requests

test(`fuzz: FUSE requests get one well-formed reply each, and only expected errors (seed ${SEED})`, async () => {
  const { fs } = await oneFileFilesystem();
  const logged: string[] = [];
  const server = new FuseServer(fs, { log: (m) => logged.push(m) });
  let replies = 0;
  let badReply = '';
  const sink = {
    send: (message: Buffer) => {
      replies++;
      const error = message.readInt32LE(4);
      if (message.readUInt32LE(0) !== message.length || error > 0 || error < -4095) badReply = message.subarray(0, 16).toString('hex');
    },
  };
  let unique = 0n;
  const message = (opcode: number, nodeid: number, args: Uint8Array, lengthDelta = 0) => {
    const m = Buffer.alloc(IN_HEADER_SIZE + args.length);
    m.writeUInt32LE(m.length + lengthDelta, 0);
    m.writeUInt32LE(opcode, 4);
    m.writeBigUInt64LE(++unique, 8);
    m.writeBigUInt64LE(BigInt(nodeid), 16);
    m.set(args, IN_HEADER_SIZE);
    return m;
  };
  /** Sends messages and waits, turn by turn of the event loop, until every reply they are owed has come. */
  const exchange = async (messages: Buffer[]) => {
    const owed = replies + messages.filter(expectsReply).length;
    for (const m of messages) server.handle(m, sink);
    for (let turn = 0; turn < 1000 && replies < owed; turn++) await new Promise((resolve) => setImmediate(resolve));
    return replies === owed;
  };
  const init = Buffer.alloc(64);
  init.writeUInt32LE(7, 0);
  init.writeUInt32LE(31, 4);
  init.writeUInt32LE(128 * 1024, 8);
  init.writeUInt32LE(0xffffffff, 12);
  assert.ok(await exchange([message(Opcode.INIT, 0, init)]));
  const opcodes = (Object.values(Opcode) as unknown[]).filter((v): v is number => typeof v === 'number' && v !== Opcode.INIT && v !== Opcode.DESTROY);
  const request = fc.tuple(
    fc.oneof(fc.constantFrom(...opcodes), fc.nat({ max: 100 })),
    fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.nat()),
    fc.oneof(fc.uint8Array({ maxLength: 80 }), fc.uint8Array({ minLength: 80, maxLength: 300 })),
    fc.oneof(fc.constant(0), fc.integer({ min: -8, max: 8 })),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(request, { minLength: 1, maxLength: 12 }), async (batch) => {
      const answered = await exchange(batch.filter(([opcode]) => opcode !== Opcode.INIT && opcode !== Opcode.DESTROY).map(([opcode, nodeid, args, delta]) => message(opcode, nodeid, args, delta)));
      const unexpected = logged.find((line) => /\n\s+at /.test(line));
      // The server still answers the root's attributes afterwards.
      const before = replies;
      let rootError: number | undefined;
      const probe = { send: (m: Buffer) => void (rootError = m.readInt32LE(4)) };
      server.handle(message(Opcode.GETATTR, 1, Buffer.alloc(16)), { send: (m) => { replies++; probe.send(m); } });
      for (let turn = 0; turn < 1000 && replies === before; turn++) await new Promise((resolve) => setImmediate(resolve));
      return answered && !badReply && unexpected === undefined && rootError === 0;
    }),
    { ...params, numRuns: Math.max(1, Math.floor(RUNS / 10)) },
  );
  server.handle(message(Opcode.DESTROY, 0, Buffer.alloc(0)), sink);
});

// ---------------------------------------------------------------- gRPC PathInfo

const storePathArb = fc.tuple(fc.uint8Array({ minLength: 20, maxLength: 20 }), fc.stringMatching(/^[a-z][a-z0-9.+_-]{0,20}$/))
  .map(([digest, name]) => ({ digest: Buffer.from(digest), name }));
const pathInfoArb: fc.Arbitrary<PathInfo> = fc.record({
  path: storePathArb,
  kind: fc.constantFrom('directory', 'file', 'symlink'),
  digest: digestArb,
  size: fc.nat({ max: 1 << 30 }),
  references: fc.array(storePathArb, { maxLength: 4 }),
  narSize: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
  narSha256: digestArb,
  signatures: fc.array(fc.record({ name: fc.stringMatching(/^[a-z][a-z0-9.-]{0,15}$/), data: fc.uint8Array({ minLength: 64, maxLength: 64 }).map((a) => Buffer.from(a)) }), { maxLength: 2 }),
  deriver: fc.option(storePathArb, { nil: undefined }),
  ca: fc.option(digestArb.map((digest) => ({ type: 'NAR_SHA256' as const, digest })), { nil: undefined }),
}).map(({ path, kind, digest, size, references, narSize, narSha256, signatures, deriver, ca }) => {
  const name = Buffer.from(formatBasename(path));
  const node: Node = kind === 'directory' ? { kind, node: { name, digest, size } }
    : kind === 'file' ? { kind, node: { name, digest, size, executable: size % 2 === 1 } }
    : { kind: 'symlink', node: { name, target: Buffer.from('target') } };
  return { node, references, narSize, narSha256, signatures, ...(deriver ? { deriver } : {}), ...(ca ? { ca } : {}) };
});

for (const prefix of ['tvix', 'snix'] as const) {
  test(`fuzz: gRPC PathInfoService.Put messages (${prefix}) decode to a valid PathInfo or are refused as invalid input (seed ${SEED})`, () => {
    const put = tolerantServiceDefinition(prefix, 'PathInfoService').Put!;
    const encode = (info: PathInfo) => put.requestSerialize(pathInfoToWire(info, prefix));
    const decode = (bytes: Buffer) => pathInfoFromWire(requireWellFormed(put.requestDeserialize(bytes)) as WirePathInfo, prefix);
    fc.assert(
      fc.property(bytesAround(pathInfoArb.map(encode)), (bytes) => {
        let info: PathInfo;
        try {
          info = decode(bytes);
          validatePathInfo(info);
        } catch (err) {
          return refusedCleanly(err);
        }
        // What is taken survives a round trip unchanged: the daemon stores and serves exactly it.
        assert.deepEqual(decode(encode(info)), info);
        return true;
      }),
      params,
    );
  });
}

// ---------------------------------------------------------------- castore directories from a nar-bridge

/** A directory's closure as a nar-bridge sends it: 4-byte little-endian lengths and canonical records, root first. */
function framed(directories: Directory[]): Buffer {
  return Buffer.concat(directories.flatMap((d) => {
    const encoded = encodeDirectory(d);
    const length = Buffer.alloc(4);
    length.writeUInt32LE(encoded.length);
    return [length, encoded];
  }));
}

test(`fuzz: a directory closure from another nixcas is taken whole and checked, or refused (seed ${SEED})`, async () => {
  // A root with one child directory (a leaf of files and symlinks), framed: the valid input mutated.
  const closureArb = directoryArb.filter((d) => d.directories.length === 0).map((leaf) => {
    const root: Directory = { directories: [{ name: Buffer.from('child'), digest: blake3(encodeDirectory(leaf)), size: directorySize(leaf) }], files: [], symlinks: [] };
    return { root: blake3(encodeDirectory(root)), bytes: framed([root, leaf]) };
  });
  await fc.assert(
    fc.asyncProperty(closureArb, fc.nat(), fc.constantFrom('flip', 'insert', 'delete', 'truncate', 'none'), fc.nat(), fc.integer({ min: 1, max: 64 }), async ({ root, bytes }, at, how, value, piece) => {
      const i = bytes.length ? at % bytes.length : 0;
      const input = how === 'flip' ? Buffer.from(bytes).fill(bytes[i]! ^ (value % 255 || 1), i, i + 1)
        : how === 'insert' ? Buffer.concat([bytes.subarray(0, i), Buffer.from([value & 0xff]), bytes.subarray(i)])
        : how === 'delete' ? Buffer.concat([bytes.subarray(0, i), bytes.subarray(i + 1)])
        : how === 'truncate' ? bytes.subarray(0, i) : bytes;
      async function* pieces() {
        for (let p = 0; p < input.length; p += piece) yield input.subarray(p, p + piece);
      }
      let received: Map<string, Directory>;
      try {
        received = await readDirectoryClosure(pieces(), root, 1 << 20, 'fuzz');
      } catch (err) {
        return err instanceof TreeFetchError;
      }
      // Whatever is taken is the closure: the root and every directory named, each under its own digest.
      return received.has(digestKey(root)) && [...received].every(([key, directory]) =>
        digestKey(blake3(encodeDirectory(directory))) === key && directory.directories.every((child) => received.has(digestKey(child.digest))));
    }),
    params,
  );
});

// ---------------------------------------------------------------- vhost-user messages

test(`fuzz: vhost-user messages from a front end are answered or refused, and the back end serves on (seed ${SEED})`, async () => {
  const work = tempDir('fuzz-vhost-user');
  const daemon = await (async () => {
    writeFileSync(join(work, 'file'), 'still served\n');
    assert.equal(nixcas(['import', '--store', join(work, 'store'), join(work, 'file')]).status, 0);
    return startNixcas(['virtiofs', join(work, 'fs.sock'), '--store', join(work, 'store')], 'listening on');
  })();
  try {
    const u32 = fc.nat({ max: 0xffffffff });
    // Plausible payloads (u64s, vring states and addresses, memory tables without their fds) and noise.
    const payloadArb = fc.oneof(
      fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
      fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }).map((v) => u64(v)),
      fc.tuple(fc.integer({ min: 0, max: 4 }), fc.oneof(fc.integer({ min: 0, max: 1100 }), u32)).map(([index, num]) => vringState(index, num)),
      fc.array(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), { minLength: 5, maxLength: 5 }).map((words) => Buffer.concat(words.map(u64))),
      fc.tuple(fc.integer({ min: 0, max: 40 }), fc.array(fc.tuple(fc.bigInt({ min: 0n, max: 1n << 40n }), fc.nat(), fc.bigInt({ min: 0n, max: 1n << 40n }), fc.nat()), { maxLength: 3 }))
        .map(([count, regions]) => memTablePayload(regions.map(([gpa, size, userAddr, mmapOffset]) => ({ gpa, size, userAddr, mmapOffset })), count)),
    );
    const messageArb = fc.record({
      request: fc.oneof(fc.constantFrom(...Object.values(Req)), fc.integer({ min: 0, max: 64 }), u32),
      flags: fc.oneof(fc.constant(VERSION), fc.constant(VERSION | NEED_REPLY), u32),
      payload: payloadArb,
    });
    let connections = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(messageArb, { minLength: 1, maxLength: 8 }), async (messages) => {
        const conn = await Connection.connect(join(work, 'fs.sock'));
        const id = ++connections;
        try {
          for (const { request, flags, payload } of messages) conn.send(request, payload, { flags });
          // Every back end answers GET_FEATURES; the replies before it are whatever the messages earned.
          conn.send(Req.GET_FEATURES, Buffer.alloc(0), { flags: VERSION });
          for (;;) {
            let reply;
            try {
              reply = await conn.recv(5000);
            } catch (err) {
              if (conn.closedByPeer) break; // it hung up on framing it could not follow: allowed
              throw err;
            }
            for (const fd of reply.fds) closeFd(fd);
            if (reply.request === Req.GET_FEATURES && reply.flags === (VERSION | REPLY) && reply.size === 8) break;
          }
        } finally {
          conn.close();
        }
        // Everything it logged for this connection is in once it logs the close.
        for (const deadline = Date.now() + 10_000; !daemon.output().includes(`connection ${id}: closed`); ) {
          if (Date.now() > deadline || daemon.process.exitCode !== null) assert.fail(`connection ${id} was never logged closed:\n${daemon.output().slice(-2000)}`);
          await new Promise((resolve) => setImmediate(resolve)); // lets the daemon's output in
        }
        assert.equal(daemon.process.exitCode, null, 'the back end is still running');
        assert.doesNotMatch(daemon.output(), /^\s+at /m, 'a message was refused with a stack trace, not a reason');
      }),
      { ...params, numRuns: Math.ceil(RUNS / 10) },
    );
  } finally {
    await daemon.stop();
    removeDir(work);
  }
});
