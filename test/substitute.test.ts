// Substitution from binary caches Nix 2.8 wrote itself (`nix copy --to
// file://…` with xz, zstd, bzip2 and no compression, signed), served by
// Debian's nginx on loopback: `nixcas copy --from`, a FUSE mount that fetches
// a path on lookup (and a second mount that needs no upstream request),
// nar-bridge as a pull-through cache for `nix copy --from`, and every way an
// upstream can be wrong: an untrusted or missing signature, a narinfo for
// another path, a NAR that does not hash to its NarHash, a path no cache has,
// and an upstream that accepts and never answers.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { gzipSync } from 'node:zlib';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { CLI, ROOT, buildClosureFixture, type Daemon, nix, nixcas, nixcasBytes, removeDir, seededBytes, settledAccessLog, startDaemon, startNixcas, tempDir } from './helpers.js';
import { type Nginx, startNginx, stopNginx } from './nginx.js';

const NGINX = '/usr/sbin/nginx';
const PYTHON = '/usr/bin/python3'; // Debian's, where python3-grpcio lives
const COMPRESSIONS = ['xz', 'zstd', 'bzip2', 'none'] as const;
const NIX_OPTIONS = ['--extra-experimental-features', 'nix-command', '--option', 'substituters', ''];

let work: string;
let nginx: Nginx;
let paths: string[]; // the closure of `mid`: leaf, just-a-file, mid
let mid: string;
let publicKey: string;
let secretFile: string;

function basenameOf(path: string): string {
  return path.replace('/nix/store/', '');
}

function hashPart(path: string): string {
  return basenameOf(path).slice(0, 32);
}

function makeKey(name: string): { secretFile: string; publicKey: string } {
  const secret = join(work, `${name}.sk`);
  const pub = join(work, `${name}.pk`);
  nix('nix-store', ['--generate-binary-cache-key', name, secret, pub]);
  return { secretFile: secret, publicKey: readFileSync(pub, 'utf8').trim() };
}

/** Requests nginx has logged for this path's narinfo. */
function narinfoRequests(path: string): number {
  return nginx.requests().filter((line) => line.includes(`/${hashPart(path)}.narinfo `)).length;
}

function copyFrom(store: string, from: string[], wanted: string[], extra: string[] = ['--trusted-public-key', publicKey]) {
  return nixcas(['copy', '--store', store, ...from.flatMap((url) => ['--from', url]), ...extra, ...wanted]);
}

function assertSameNar(store: string, path: string): void {
  assert.deepEqual(nixcasBytes(['nar', '--store', store, path]), nix('nix-store', ['--dump', path]), `${path}: the substituted NAR differs from Nix's`);
}

before(() => {
  work = tempDir('nixcas-substitute-');
  const attrs = buildClosureFixture(join(work, 'closure.json'));
  paths = (JSON.parse(readFileSync(attrs, 'utf8')).closure as { path: string }[]).map((e) => e.path);
  mid = paths.find((p) => p.endsWith('-mid'))!;
  ({ publicKey, secretFile } = makeKey('upstream-1'));
  for (const compression of COMPRESSIONS) {
    const run = spawnSync('nix', [...NIX_OPTIONS, 'copy', '--to', `file://${join(work, 'caches', compression)}?compression=${compression}&secret-key=${secretFile}`, mid], { encoding: 'utf8', env: { ...process.env, HOME: work } });
    assert.equal(run.status, 0, `nix copy --to file:// (${compression}) failed: ${run.stderr}`);
  }
});

before(async () => {
  nginx = await startNginx(NGINX, join(work, 'nginx'), join(work, 'caches'), { accessLog: true });
});

after(async () => {
  await stopNginx(nginx);
  removeDir(work);
});

test('copy --from fetches a closure Nix wrote with each compression, verified, the same NARs as Nix', () => {
  for (const compression of COMPRESSIONS) {
    const store = join(work, `store-${compression}`);
    const run = copyFrom(store, [`${nginx.base}/${compression}`], [mid]);
    assert.equal(run.status, 0, `copy --from ${compression}: ${run.stderr}`);
    assert.match(run.stderr, /3 paths fetched .* 1 of 1 requested now in the store/);
    for (const path of paths) assertSameNar(store, path);
  }
});

test('copy --from asks for each narinfo once, even when a path is both wanted and a reference; a second copy asks for nothing', () => {
  const store = join(work, 'store-once');
  const file = paths.find((p) => p.endsWith('-just-a-file'))!;
  const before = nginx.requests().length;
  const run = copyFrom(store, [`${nginx.base}/zstd`], [mid, file]);
  assert.equal(run.status, 0, run.stderr);
  const made = nginx.requests().slice(before);
  for (const path of paths) assert.equal(made.filter((l) => l.includes(`/${hashPart(path)}.narinfo `)).length, 1, `${path}: ${made.join('\n')}`);
  assert.equal(made.filter((l) => l.includes('/nar/')).length, 3, made.join('\n'));
  const again = nginx.requests().length;
  assert.equal(copyFrom(store, [`${nginx.base}/zstd`], [mid, file]).status, 0);
  assert.equal(nginx.requests().length, again, 'a path in the store is not asked for again');
});

test('a FUSE mount with --substituter fetches a path on lookup; a second mount of the same store needs no upstream request', { skip: process.getuid?.() !== 0 && 'mounts as root' }, async () => {
  const store = join(work, 'store-mount');
  const mountpoint = join(work, 'mnt');
  mkdirSync(mountpoint, { recursive: true });
  const start = () => startNixcas(['mount', '--store', store, '--substituter', `${nginx.base}/xz`, '--trusted-public-key', publicKey, '--list-root', mountpoint], 'mounted at');
  let daemon: Daemon = await start();
  try {
    const leaf = paths.find((p) => p.endsWith('-leaf'))!;
    assert.deepEqual(readdirSync(mountpoint), [], 'nothing is in the store before a lookup');
    const before = narinfoRequests(mid);
    assert.equal(readFileSync(join(mountpoint, basenameOf(mid), 'uses-leaf'), 'utf8'), readFileSync(join(mid, 'uses-leaf'), 'utf8'));
    assert.equal(narinfoRequests(mid), before + 1);
    // Its references were fetched (and registered) before it: the leaf is there with no new request.
    const leafBefore = narinfoRequests(leaf);
    assert.equal(readFileSync(join(mountpoint, basenameOf(leaf), 'share/hello'), 'utf8'), 'hello\n');
    assert.equal(narinfoRequests(leaf), leafBefore);
    const run = spawnSync(join(mountpoint, basenameOf(leaf), 'bin/run'), { encoding: 'utf8' });
    assert.equal(run.stdout, 'hi\n', run.stderr);
    await daemon.stop();
    const requests = nginx.requests().length;
    daemon = await start();
    assert.equal(readFileSync(join(mountpoint, basenameOf(mid), 'uses-leaf'), 'utf8'), readFileSync(join(mid, 'uses-leaf'), 'utf8'));
    assert.deepEqual(readdirSync(mountpoint).sort(), paths.map(basenameOf).sort());
    assert.equal(nginx.requests().length, requests, 'the second mount made upstream requests');
  } finally {
    await daemon.stop();
  }
});

test('nar-bridge with --substituter is a pull-through cache: nix copy --from it, signed with its own key, verifies', async () => {
  const store = join(work, 'store-bridge');
  const own = makeKey('bridge-1');
  const bridge = await startNixcas(['nar-bridge', '--store', store, '--listen', '127.0.0.1:0', '--sign-key', own.secretFile, '--substituter', `${nginx.base}/zstd`, '--trusted-public-key', publicKey], 'listening on');
  try {
    const base = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(bridge.output())![1]!;
    const root = join(work, 'nix-root');
    const pulled = spawnSync('nix', [...NIX_OPTIONS, '--option', 'narinfo-cache-negative-ttl', '0', 'copy', '--from', base, '--store', root, '--option', 'require-sigs', 'true', '--option', 'trusted-public-keys', own.publicKey, mid], { encoding: 'utf8', env: { ...process.env, HOME: work } });
    assert.equal(pulled.status, 0, `nix copy --from the bridge: ${pulled.stderr}\n${bridge.output()}`);
    const verified = spawnSync('nix', [...NIX_OPTIONS, 'store', 'verify', '--store', root, '--option', 'trusted-public-keys', own.publicKey, '-r', mid], { encoding: 'utf8', env: { ...process.env, HOME: work } });
    assert.equal(verified.status, 0, `nix store verify: ${verified.stderr}`);
    const requests = nginx.requests().length;
    const narinfo = await fetch(`${base}/${hashPart(mid)}.narinfo`);
    assert.equal(narinfo.status, 200);
    assert.match(await narinfo.text(), /^Sig: bridge-1:/m);
    assert.equal(nginx.requests().length, requests, 'a path the bridge has fetched is served without asking upstream');
  } finally {
    await bridge.stop();
  }
});

test('daemon with --substituter: Python grpcio PathInfoService.Get of a path only upstream has returns it; one nobody has is NOT_FOUND', async () => {
  const generated = join(work, 'generated');
  const protos = join(ROOT, 'protos');
  const protoc = spawnSync(PYTHON, [
    '-c', 'import os,sys; os.makedirs(sys.argv[1], exist_ok=True); from grpc_tools import protoc; sys.exit(protoc.main(["protoc", "-I", sys.argv[2], "--python_out=" + sys.argv[1], "--grpc_python_out=" + sys.argv[1]] + sys.argv[3:]))',
    generated, protos, join(protos, 'tvix/castore/v1/castore.proto'), join(protos, 'tvix/store/v1/pathinfo.proto'), join(protos, 'tvix/store/v1/rpc_pathinfo.proto'),
  ], { encoding: 'utf8' });
  assert.equal(protoc.status, 0, protoc.stderr);
  const socket = join(work, 'daemon.sock');
  const daemon = await startDaemon(['--store', join(work, 'store-daemon'), '--listen', socket, '--substituter', `${nginx.base}/bzip2`, '--trusted-public-key', publicKey]);
  try {
    const script = `
import sys, grpc
sys.path.insert(0, sys.argv[2])
from tvix.store.v1 import rpc_pathinfo_pb2 as rpc, rpc_pathinfo_pb2_grpc as stub
ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
def decode(text):
    out = bytearray(len(text) * 5 // 8)
    for n, char in enumerate(reversed(text)):
        digit, bit = ALPHABET.index(char), n * 5
        i, shift = bit // 8, bit % 8
        out[i] |= (digit << shift) & 0xFF
        if i + 1 < len(out): out[i + 1] |= digit >> (8 - shift)
    return bytes(out)
client = stub.PathInfoServiceStub(grpc.insecure_channel("unix://" + sys.argv[1]))
info = client.Get(rpc.GetPathInfoRequest(by_output_hash=decode(sys.argv[3][:32])), timeout=60)
print("name", info.node.directory.name.decode(), "refs", len(info.references), "narsize", info.narinfo.nar_size)
try:
    client.Get(rpc.GetPathInfoRequest(by_output_hash=bytes(20)), timeout=60)
    print("found a path nobody has")
except grpc.RpcError as e:
    print("missing", e.code().name)
`;
    const run = spawnSync(PYTHON, ['-c', script, socket, generated, basenameOf(mid)], { encoding: 'utf8', timeout: 120_000 });
    assert.equal(run.status, 0, `${run.stderr}\n${daemon.output()}`);
    const narSize = nix('nix-store', ['--dump', mid]).length;
    // mid refers to itself, the leaf and just-a-file.
    assert.equal(run.stdout, `name ${basenameOf(mid)} refs 3 narsize ${narSize}\nmissing NOT_FOUND\n`);
  } finally {
    await daemon.stop();
  }
});

test('nix+http:// as the path info service: a path only the cache has is read from castore services it was substituted into', () => {
  const cache = `nix+${nginx.base}/xz?trusted-public-keys=${encodeURIComponent(publicKey)}`;
  const services = ['--blob-service-addr', 'memory://', '--directory-service-addr', 'memory://', '--path-info-service-addr', cache];
  const self = nixcasBytes(['cat', ...services, `${mid}/self`]);
  assert.equal(self.toString(), readFileSync(`${mid}/self`, 'utf8'));
  const info = nixcas(['path-info', '--json', ...services, mid]);
  assert.equal(info.status, 0, info.stderr);
  assert.equal(JSON.parse(info.stdout)[0].narSize, JSON.parse(nix('nix', [...NIX_OPTIONS, 'path-info', '--json', mid]).toString())[0].narSize);
  const unsigned = nixcas(['path-info', ...services.slice(0, 4), '--path-info-service-addr', `nix+${nginx.base}/xz`, mid]);
  assert.equal(unsigned.status, 1);
  assert.match(unsigned.stderr, /give the keys its paths must be signed with, as \?trusted-public-keys=/);
  const wrongKey = nixcas(['path-info', ...services.slice(0, 4), '--path-info-service-addr', `nix+${nginx.base}/xz?trusted-public-keys=${encodeURIComponent(makeKey('other-1').publicKey)}`, mid]);
  assert.equal(wrongKey.status, 1);
  assert.match(wrongKey.stderr, /no valid signature by a trusted key/);
});

test('copy --from an HTTPS cache (nginx with a self-signed certificate the client is told to trust); untrusted, it fails naming the upstream', async () => {
  const dir = join(work, 'nginx-tls');
  mkdirSync(dir, { recursive: true });
  const run = spawnSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-days', '2'], { encoding: 'utf8' });
  assert.equal(run.status, 0, run.stderr);
  const secure = await startNginx(NGINX, dir, join(work, 'caches'), { tls: { cert: join(dir, 'cert.pem'), key: join(dir, 'key.pem') } });
  try {
    assert.match(secure.base, /^https:/);
    const untrusted = nixcas(['copy', '--store', join(work, 'store-https-untrusted'), '--from', `${secure.base}/xz`, '--trusted-public-key', publicKey, mid]);
    assert.equal(untrusted.status, 1);
    assert.match(untrusted.stderr, new RegExp(`substituter ${secure.base}/xz: .*(certificate|self.signed)`, 'i'));
    const store = join(work, 'store-https');
    const trusted = nixcas(['copy', '--store', store, '--from', `${secure.base}/xz`, '--trusted-public-key', publicKey, mid], { env: { NODE_EXTRA_CA_CERTS: join(dir, 'cert.pem') } });
    assert.equal(trusted.status, 0, trusted.stderr);
    for (const path of paths) assertSameNar(store, path);
  } finally {
    await stopNginx(secure);
  }
});

test('an untrusted or missing signature, a narinfo for another path and a NAR that does not match are refused: nothing registered, one line naming upstream and path', () => {
  // Signed by a key nobody trusts.
  const other = makeKey('other-1');
  let run = copyFrom(join(work, 'store-untrusted'), [`${nginx.base}/xz`], [mid], ['--trusted-public-key', other.publicKey]);
  assert.equal(run.status, 1);
  assert.match(run.stderr, new RegExp(`substituter ${nginx.base}/xz: ${mid}: refused: no valid signature by a trusted key \\(signed by upstream-1\\)`));
  assert.notEqual(nixcas(['nar', '--store', join(work, 'store-untrusted'), mid]).status, 0, 'a refused path is not registered');
  // No trusted key at all is an error up front, unless signatures are explicitly not required.
  run = copyFrom(join(work, 'store-nokey'), [`${nginx.base}/xz`], [mid], []);
  assert.equal(run.status, 1);
  assert.match(run.stderr, /need at least one --trusted-public-key/);
  run = copyFrom(join(work, 'store-nosigs'), [`${nginx.base}/xz`], [mid], ['--no-require-sigs']);
  assert.equal(run.status, 0, run.stderr);
  assertSameNar(join(work, 'store-nosigs'), mid);

  // A narinfo served for mid's hash that describes another path.
  const lying = join(work, 'caches', 'lying');
  cpSync(join(work, 'caches', 'xz'), lying, { recursive: true });
  const leaf = paths.find((p) => p.endsWith('-leaf'))!;
  writeFileSync(join(lying, `${hashPart(mid)}.narinfo`), readFileSync(join(lying, `${hashPart(leaf)}.narinfo`)));
  run = copyFrom(join(work, 'store-lying'), [`${nginx.base}/lying`], [mid]);
  assert.equal(run.status, 1);
  assert.match(run.stderr, new RegExp(`: refused: the narinfo for ${hashPart(mid)} is for ${leaf}`));

  // mid's NAR with one byte changed (same size): its NarHash does not match.
  const tampered = join(work, 'caches', 'tampered');
  cpSync(join(work, 'caches', 'none'), tampered, { recursive: true });
  const url = /^URL: (.*)$/m.exec(readFileSync(join(tampered, `${hashPart(mid)}.narinfo`), 'utf8'))![1]!;
  const nar = readFileSync(join(tampered, url));
  const at = nar.indexOf('leaf');
  nar[at] ^= 0x20;
  writeFileSync(join(tampered, url), nar);
  const store = join(work, 'store-tampered');
  run = copyFrom(store, [`${nginx.base}/tampered`], [mid]);
  assert.equal(run.status, 1);
  assert.match(run.stderr, new RegExp(`substituter ${nginx.base}/tampered: ${mid}: the NAR hashes to sha256:\\S+, its narinfo's NarHash says sha256:`));
  assert.notEqual(nixcas(['nar', '--store', store, mid]).status, 0, 'a path whose NAR did not match is not registered');
  // Its references were fine, and are kept.
  assertSameNar(store, leaf);

  // mid's .nar.zst cut in half: the decoder (libzstd in process, or the zstd program) refuses it.
  const truncated = join(work, 'caches', 'truncated');
  cpSync(join(work, 'caches', 'zstd'), truncated, { recursive: true });
  const zstUrl = /^URL: (.*)$/m.exec(readFileSync(join(truncated, `${hashPart(mid)}.narinfo`), 'utf8'))![1]!;
  const zst = readFileSync(join(truncated, zstUrl));
  writeFileSync(join(truncated, zstUrl), zst.subarray(0, zst.length >> 1));
  run = copyFrom(join(work, 'store-truncated'), [`${nginx.base}/truncated`], [mid]);
  assert.equal(run.status, 1);
  assert.match(run.stderr, new RegExp(`substituter ${nginx.base}/truncated: ${mid}: (the body is not valid zstd|NAR is truncated)`));
  assert.notEqual(nixcas(['nar', '--store', join(work, 'store-truncated'), mid]).status, 0);
});

test('a path no cache has fails with 404 as not there; an upstream that never answers, or stops inside a NAR, fails after --substituter-timeout, and the next cache is tried', async () => {
  const store = join(work, 'store-faults');
  const missing = '/nix/store/00000000000000000000000000000000-not-anywhere';
  let run = copyFrom(store, [`${nginx.base}/xz`], [missing]);
  assert.equal(run.status, 1);
  assert.match(run.stderr, new RegExp(`${missing}: not copied`));

  const sockets: net.Socket[] = [];
  const stalled = net.createServer((socket) => sockets.push(socket)); // accepts, reads nothing, answers nothing
  await new Promise<void>((resolve) => stalled.listen(0, '127.0.0.1', resolve));
  const stalledUrl = `http://127.0.0.1:${(stalled.address() as net.AddressInfo).port}`;
  try {
    const started = Date.now();
    // Asynchronously: the stalled server lives in this process.
    run = await nixcasAsync(['copy', '--store', store, '--from', stalledUrl, '--from', `${nginx.base}/xz`, '--trusted-public-key', publicKey, '--substituter-timeout', '1', mid]);
    const seconds = (Date.now() - started) / 1000;
    assert.equal(run.status, 0, run.stderr);
    assert.match(run.stderr, new RegExp(`substituter ${stalledUrl}: ${hashPart(mid)}: ${stalledUrl}/${hashPart(mid)}.narinfo: no answer within 1 s`));
    assert.ok(seconds < 20, `took ${seconds} s`);
    assertSameNar(store, mid);
  } finally {
    for (const socket of sockets) socket.destroy();
    stalled.close();
  }

  // An upstream that answers the narinfos gzip-encoded (as an S3 cache written with Nix's
  // narinfo-compression does, whatever was asked for), except one it stops sending halfway, and
  // stops sending each NAR halfway (its full Content-Length promised): every such fetch fails after
  // the timeout and the next cache serves the path.
  const cacheDir = join(work, 'caches', 'xz');
  const leaf = paths.find((p) => p.endsWith('-leaf'))!;
  const halfway = http.createServer((request, response) => {
    let bytes: Buffer;
    try {
      bytes = readFileSync(join(cacheDir, new URL(request.url!, 'http://upstream').pathname));
    } catch {
      response.writeHead(404).end();
      return;
    }
    if (request.url!.endsWith('.narinfo') && !request.url!.includes(hashPart(leaf))) {
      return void response.writeHead(200, { 'content-encoding': 'gzip' }).end(gzipSync(bytes));
    }
    response.writeHead(200, { 'content-length': bytes.length });
    response.write(bytes.subarray(0, bytes.length >> 1));
  });
  await new Promise<void>((resolve) => halfway.listen(0, '127.0.0.1', resolve));
  const halfwayUrl = `http://127.0.0.1:${(halfway.address() as net.AddressInfo).port}`;
  try {
    const other = join(work, 'store-faults-halfway');
    run = await nixcasAsync(['copy', '--store', other, '--from', halfwayUrl, '--from', `${nginx.base}/xz`, '--trusted-public-key', publicKey, '--substituter-timeout', '1', mid]);
    assert.equal(run.status, 0, run.stderr);
    const narUrl = /^URL: (.*)$/m.exec(readFileSync(join(cacheDir, `${hashPart(mid)}.narinfo`), 'utf8'))![1]!;
    assert.match(run.stderr, new RegExp(`substituter ${halfwayUrl}: ${mid}: ${halfwayUrl}/${narUrl}: no answer within 1 s`));
    assert.match(run.stderr, new RegExp(`substituter ${halfwayUrl}: ${hashPart(leaf)}: ${halfwayUrl}/${hashPart(leaf)}.narinfo: no answer within 1 s`));
    assertSameNar(other, mid);
  } finally {
    halfway.closeAllConnections();
    halfway.close();
  }
});

/** `nixcas ARGS…` without blocking this process's event loop. */
async function nixcasAsync(args: string[]): Promise<{ status: number | null; stderr: string }> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const status = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  return { status, stderr };
}

test('copy --from another nixcas nar-bridge fetches only the blobs the store lacks (castore objects, not the NAR); a bridge that sends a wrong blob gets the NAR fetched instead', async () => {
  const upstream = join(work, 'store-upstream-nixcas');
  const first = join(work, 'objects-first');
  mkdirSync(join(first, 'share'), { recursive: true });
  writeFileSync(join(first, 'large'), seededBytes(300_000, 23)); // a blob file, not a small blob
  writeFileSync(join(first, 'share', 'small'), 'shared small file\n');
  const second = join(work, 'objects-second');
  cpSync(first, second, { recursive: true });
  writeFileSync(join(second, 'share', 'new'), seededBytes(5000, 29)); // the one blob the local store lacks
  const [firstPath, secondPath] = [first, second].map((tree) => {
    const run = nixcas(['import', '--store', upstream, tree]);
    assert.equal(run.status, 0, run.stderr);
    return run.stdout.trim();
  });
  const own = makeKey('objects-1');
  const bridge = await startNixcas(['nar-bridge', '--store', upstream, '--listen', '127.0.0.1:0', '--sign-key', own.secretFile], 'listening on');
  const base = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(bridge.output())![1]!;
  const lying = await tamperingProxy(base, (path) => path.startsWith('/castore/blob/'));
  try {
    const narinfo = await (await fetch(`${base}/${hashPart(secondPath!)}.narinfo`)).text();
    assert.match(narinfo, /^CastoreDirectory: [0-9a-f]{64}$/m);
    const gets = (prefix: string) => bridge.output().split('\n').filter((line) => line.includes(`"GET ${prefix}`)).length;
    const logged = () => settledAccessLog(base, bridge.output);

    const local = join(work, 'store-objects-local');
    assert.equal(nixcas(['import', '--store', local, first]).stdout.trim(), firstPath);
    const run = copyFrom(local, [base], [secondPath!], ['--trusted-public-key', own.publicKey]);
    assert.equal(run.status, 0, run.stderr);
    await logged();
    assert.equal(gets("/castore/directories/"), 1, bridge.output() + run.stderr);
    assert.equal(gets('/castore/blob/'), 1, bridge.output());
    assert.equal(gets('/nar/'), 0, 'no NAR was fetched');
    assert.deepEqual(nixcasBytes(['nar', '--store', local, secondPath!]), nixcasBytes(['nar', '--store', upstream, secondPath!]));

    // Through a proxy that flips a byte of every blob: the objects are refused, the NAR is fetched and checked.
    const fooled = join(work, 'store-objects-fooled');
    assert.equal(nixcas(['import', '--store', fooled, first]).status, 0);
    const refused = await nixcasAsync(['copy', '--store', fooled, '--from', lying.url, '--trusted-public-key', own.publicKey, secondPath!]);
    assert.equal(refused.status, 0, refused.stderr);
    await logged();
    assert.match(refused.stderr, new RegExp(`substituter ${lying.url}: ${secondPath}: fetching its objects failed \\(${lying.url}/castore/blob/[0-9a-f]{64}: the bytes sent hash to .*\\); fetching the NAR instead`));
    assert.equal(gets('/nar/'), 1);
    assert.deepEqual(nixcasBytes(['nar', '--store', fooled, secondPath!]), nixcasBytes(['nar', '--store', upstream, secondPath!]));
    const verify = nixcas(['verify', '--store', fooled]);
    assert.equal(verify.status, 0, verify.stdout + verify.stderr);
    // What the store lacks is 404, and only exact hex digests are routes.
    for (const route of [`castore/blob/${'0'.repeat(64)}`, `castore/directories/${'0'.repeat(64)}`, `castore/blob/${'A'.repeat(64)}`, 'castore/blob/../x']) {
      const response = await fetch(`${base}/${route}`);
      assert.ok([400, 404].includes(response.status), `${route}: ${response.status}`);
      await response.arrayBuffer();
    }
  } finally {
    lying.close();
    await bridge.stop();
  }
});

/** An HTTP proxy in front of `base` that flips the first byte of the body of every response whose path `tamper` picks. */
async function tamperingProxy(base: string, tamper: (path: string) => boolean): Promise<{ url: string; close: () => void }> {
  const server = http.createServer(async (request, response) => {
    const upstream = await fetch(`${base}${request.url}`);
    const body = Buffer.from(await upstream.arrayBuffer());
    if (tamper(request.url ?? '') && body.length > 0) body[0] ^= 0xff;
    response.writeHead(upstream.status, { 'Content-Type': upstream.headers.get('content-type') ?? 'application/octet-stream', 'Content-Length': body.length });
    response.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`, close: () => server.close() };
}
