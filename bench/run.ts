// `npm run bench`: each capability measured side by side with its peer in
// one run, reported as a ratio (ours / peer; higher is better).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { blake3Implementations } from '../src/castore/digest.js';
import { clientConstructor } from '../src/grpc/protos.js';
import { type Row, benchNix, median } from './nix.js';
import { benchFuse } from './fuse.js';
import { benchVirtiofs } from './virtiofs.js';
import { benchVirtiofsRequests, cpuNs } from './virtiofs-requests.js';
import { benchNarBridge } from './narbridge.js';
import { benchSubstitute } from './substitute.js';
import { benchGc } from './gc.js';
import { benchNixVmtest } from './nix-vmtest.js';
import { makeCertificates } from '../test/certificates.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
/** The built command (npm run build). */
const CLI = join(ROOT, 'dist/cli/nixcas.cjs');
const BLOB_BYTES = Number(process.env.BENCH_BLOB_MIB ?? 256) * 1024 * 1024;
const REPEATS = Number(process.env.BENCH_REPEATS ?? 3);
const CHUNK = 1024 * 1024;

const rows: Row[] = [];

// Some machines (this project's among them) set NODE_EXTRA_CA_CERTS, which makes
// every Node process parse a CA bundle before it runs a line: 70 ms each here.
// nixcas opens no TLS connection, so that is not nixcas's start-up; it is
// measured once, reported, and kept out of the rows.
if (process.env.NODE_EXTRA_CA_CERTS) {
  const startOf = (env: NodeJS.ProcessEnv) => {
    const times: number[] = [];
    for (let i = 0; i < 7; i++) {
      const start = process.hrtime.bigint();
      spawnSync(process.execPath, ['-e', '0'], { env });
      times.push(Number(process.hrtime.bigint() - start) / 1e6);
    }
    return median(times);
  };
  const withCerts = startOf(process.env);
  delete process.env.NODE_EXTRA_CA_CERTS;
  console.error(`bench: NODE_EXTRA_CA_CERTS is set: \`node -e 0\` takes ${withCerts.toFixed(0)} ms with it, ${startOf(process.env).toFixed(0)} ms without; the benchmarks run without it`);
}

function startServer(args: string[], label: string): Promise<ChildProcess & { output: () => string }> {
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  return new Promise((resolve, reject) => {
    child.stderr!.on('data', (d) => {
      err += d;
      if (err.includes('listening on')) resolve(Object.assign(child, { output: () => err }));
    });
    child.once('exit', (code) => reject(new Error(`${label} exited with ${code}: ${err}`)));
  });
}

type Client = grpc.Client & Record<string, (...a: unknown[]) => unknown>;

/** A BlobService client of a unix socket path, or of host:port (over TLS with `credentials`). */
function blobClient(address: string, credentials = grpc.credentials.createInsecure()): Client {
  const C = clientConstructor('tvix', 'BlobService');
  // The test certificate also names localhost: checked under that name, Node does not warn about an IP as TLS server name.
  return new C(address.includes('/') ? `unix://${address}` : address, credentials, { 'grpc.max_receive_message_length': 64 << 20, 'grpc.ssl_target_name_override': 'localhost' }) as unknown as Client;
}

/**
 * Put then Read of BLOB_BYTES through each client, REPEATS times, alternating which client goes
 * first; with the server's CPU (all its threads) for each, in ms.
 */
async function putAndRead(clients: Client[], serverPids: number[], seedBase: number): Promise<Throughput[]> {
  const results = clients.map(() => ({ put: [] as number[], read: [] as number[], putCpu: [] as number[], readCpu: [] as number[] }));
  const cpuMs = (at: number) => cpuNs(serverPids[at]!) / 1e6;
  for (let i = 0; i < REPEATS; i++) {
    const order = clients.map((_, at) => at);
    if (i % 2 === 1) order.reverse(); // neither always gets the warmer machine
    for (const at of order) {
      let before = cpuMs(at);
      const { mbps, digest } = await putThroughput(clients[at]!, seedBase + i * clients.length + at); // distinct blobs: nothing deduplicates
      results[at]!.putCpu.push(cpuMs(at) - before);
      results[at]!.put.push(mbps);
      before = cpuMs(at);
      results[at]!.read.push(await readThroughput(clients[at]!, digest));
      results[at]!.readCpu.push(cpuMs(at) - before);
    }
  }
  return results;
}

/** Uploads `bytes` of distinct content (so nothing deduplicates); returns MB/s. */
async function putThroughput(client: Client, seed: number): Promise<{ mbps: number; digest: Buffer }> {
  const chunk = Buffer.alloc(CHUNK);
  const start = process.hrtime.bigint();
  const digest = await new Promise<Buffer>((resolve, reject) => {
    const call = client.Put!((err: Error | null, res: { digest: Buffer }) => (err ? reject(err) : resolve(res.digest))) as grpc.ClientWritableStream<unknown>;
    let sent = 0;
    const pump = () => {
      while (sent < BLOB_BYTES) {
        chunk.writeUInt32LE(seed, 0);
        chunk.writeUInt32LE(sent / CHUNK, 4);
        sent += CHUNK;
        if (!call.write({ data: Buffer.from(chunk) })) return void call.once('drain', pump);
      }
      call.end();
    };
    pump();
  });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  return { mbps: BLOB_BYTES / 1e6 / seconds, digest };
}

async function readThroughput(client: Client, digest: Buffer): Promise<number> {
  const start = process.hrtime.bigint();
  let received = 0;
  const call = client.Read!({ digest }) as grpc.ClientReadableStream<{ data: Buffer }>;
  for await (const message of call) received += (message as { data: Buffer }).data.length;
  if (received !== BLOB_BYTES) throw new Error(`read ${received} bytes, expected ${BLOB_BYTES}`);
  return BLOB_BYTES / 1e6 / (Number(process.hrtime.bigint() - start) / 1e9);
}

async function benchBlobs(): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-'));
  const oursSocket = join(work, 'nixcas.sock');
  const bareSocket = join(work, 'bare.sock');
  const oursServer = await startServer([CLI, 'daemon', '--store', join(work, 'store'), '--listen', oursSocket], 'nixcas daemon');
  const bareServer = await startServer(['--import', 'tsx', join(ROOT, 'bench/bare-blob-server.ts'), bareSocket, String(BLOB_BYTES)], 'bare server');
  // What metrics cost is measured on stores in memory (/dev/shm): on disk, the fsyncs' swings
  // hide a difference of a few per cent in the daemon's own work.
  const memory = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'nixcas-bench-'));
  const withoutMetrics0 = await startServer([CLI, 'daemon', '--store', join(memory, 'store'), '--listen', join(work, 'nixcas-memory.sock')], 'nixcas daemon');
  const metricsSocket = join(work, 'nixcas-metrics.sock');
  const withMetrics = await startServer([CLI, 'daemon', '--store', join(memory, 'store-metrics'), '--listen', metricsSocket, '--metrics-listen', '127.0.0.1:0'], 'nixcas daemon --metrics-listen');
  const certs = makeCertificates(work);
  const tls = ['--tls-cert', certs.serverCert, '--tls-key', certs.serverKey, '--tls-client-ca', certs.ca];
  const plainTcp = await startServer([CLI, 'daemon', '--store', join(work, 'store-tcp'), '--listen', '127.0.0.1:0'], 'nixcas daemon on TCP');
  const overTls = await startServer([CLI, 'daemon', '--store', join(work, 'store-tls'), '--listen', '127.0.0.1:0', ...tls], 'nixcas daemon over TLS');
  const tcpAddress = (server: { output: () => string }) => /listening on (127\.0\.0\.1:\d+)/.exec(server.output())![1]!;
  const scraper = spawn(process.execPath, ['-e', `setInterval(() => fetch(${JSON.stringify(/metrics at (http:\S+)/.exec(withMetrics.output())?.[1])}).then((r) => r.text()).catch(() => {}), 1000)`], { stdio: 'ignore' });
  const clients: Client[] = [];
  try {
    const read = (path: string) => readFileSync(path);
    clients.push(blobClient(oursSocket), blobClient(bareSocket), blobClient(metricsSocket), blobClient(tcpAddress(plainTcp)),
      blobClient(tcpAddress(overTls), grpc.credentials.createSsl(read(certs.ca), read(certs.clientKey), read(certs.clientCert))), blobClient(join(work, 'nixcas-memory.sock')));
    // Three comparisons, each a pair of sides alternating (a five-way rotation let one side's
    // disk writeback land on whichever came next: 25 % more CPU per Put that a paired run never showed).
    const pids = [oursServer, bareServer, withMetrics, plainTcp, overTls, withoutMetrics0].map((server) => server.pid!);
    const pair = (a: number, b: number) => putAndRead([clients[a]!, clients[b]!], [pids[a]!, pids[b]!], 1000 * (a * 8 + b)) as Promise<[Throughput, Throughput]>;
    const [ours, bare] = await pair(0, 1);
    const [withoutMetrics, metrics] = await pair(5, 2);
    const [tcp, secure] = await pair(3, 4);
    const mib = BLOB_BYTES / 1024 / 1024;
    rows.push({ capability: `blob Put, ${mib} MiB over a unix socket`, ours: median(ours.put), peer: median(bare.put), unit: 'MB/s', peerName: 'bare grpc-js, no storage', target: 0.7 });
    rows.push({ capability: `blob Read, ${mib} MiB over a unix socket`, ours: median(ours.read), peer: median(bare.read), unit: 'MB/s', peerName: 'bare grpc-js, from memory', target: 0.7 });
    rows.push({ capability: `what metrics cost: blob Put, ${mib} MiB into a store in memory, with --metrics-listen (scraped every second)`, ours: median(metrics.put), peer: median(withoutMetrics.put), unit: 'MB/s', peerName: 'the daemon without it', target: 0.97 });
    rows.push({ capability: `what metrics cost: blob Read, ${mib} MiB from a store in memory, with --metrics-listen (scraped every second)`, ours: median(metrics.read), peer: median(withoutMetrics.read), unit: 'MB/s', peerName: 'the daemon without it', target: 0.97 });
    // The daemon's own CPU, which the disk's swings do not move as they move the rates.
    for (const [what, withIt, without] of [['Put', metrics.putCpu, withoutMetrics.putCpu], ['Read', metrics.readCpu, withoutMetrics.readCpu]] as const) {
      const ratio = median(withIt) / median(without);
      rows.push({ capability: `what metrics cost: daemon CPU per blob ${what} of ${mib} MiB, with --metrics-listen`, ours: median(withIt), peer: median(without), unit: 'ms', peerName: 'the daemon without it', lowerIsBetter: true, note: ratio <= 1.03 ? 'met (within 3 %)' : 'MISSED (within 3 %)' });
    }
    rows.push({ capability: `blob Put, ${mib} MiB over TLS with client certificates (127.0.0.1)`, ours: median(secure.put), peer: median(tcp.put), unit: 'MB/s', peerName: 'plain TCP (127.0.0.1)' });
    rows.push({ capability: `blob Read, ${mib} MiB over TLS with client certificates (127.0.0.1)`, ours: median(secure.read), peer: median(tcp.read), unit: 'MB/s', peerName: 'plain TCP (127.0.0.1)' });
  } finally {
    for (const client of clients) client.close();
    scraper.kill();
    for (const server of [oursServer, bareServer, withMetrics, plainTcp, overTls, withoutMetrics0]) server.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 300));
    rmSync(work, { recursive: true, force: true });
    rmSync(memory, { recursive: true, force: true });
  }
}

type Throughput = { put: number[]; read: number[]; putCpu: number[]; readCpu: number[] };

function benchBlake3(): void {
  const data = Buffer.alloc(BLOB_BYTES);
  for (let i = 0; i < data.length; i += 4096) data[i] = i & 0xff;
  const measure = (create: () => { update(d: Uint8Array): void; digest(): Buffer }) => {
    const samples: number[] = [];
    for (let r = 0; r < REPEATS; r++) {
      const hasher = create();
      const start = process.hrtime.bigint();
      for (let off = 0; off < data.length; off += CHUNK) hasher.update(data.subarray(off, off + CHUNK));
      hasher.digest();
      samples.push(data.length / 1e6 / (Number(process.hrtime.bigint() - start) / 1e9));
    }
    return median(samples);
  };
  const native = blake3Implementations.native();
  const wasm = blake3Implementations.wasm();
  rows.push({ capability: 'BLAKE3 hashing, 1 MiB updates', ours: measure(native.create), peer: measure(wasm.create), unit: 'MB/s', peerName: 'blake3-wasm (fallback)' });
}

const only = process.env.BENCH_ONLY; // e.g. BENCH_ONLY=nix (blobs, blake3, nix, fuse, virtiofs, virtiofs-requests, narbridge, substitute, gc, nix-vmtest)
if (!only || only === 'blobs') await benchBlobs();
if (!only || only === 'blake3') benchBlake3();
if (!only || only === 'nix') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-nix-'));
  try {
    await benchNix(rows, work, REPEATS, CLI);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'fuse') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-fuse-'));
  try {
    await benchFuse(rows, work, REPEATS, CLI);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'virtiofs') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-virtiofs-'));
  try {
    await benchVirtiofs(rows, work, REPEATS, CLI);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'virtiofs-requests') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-virtiofs-requests-'));
  try {
    await benchVirtiofsRequests(rows, work, REPEATS, CLI);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'narbridge') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-narbridge-'));
  try {
    await benchNarBridge(rows, work, REPEATS, CLI);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'substitute') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-substitute-'));
  try {
    await benchSubstitute(rows, work, REPEATS, CLI);
  } finally {
    spawnSync('chmod', ['-R', 'u+w', work]);
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'gc') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-gc-'));
  try {
    await benchGc(rows, work, REPEATS, CLI);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (!only || only === 'nix-vmtest') {
  const work = mkdtempSync(join(tmpdir(), 'nixcas-bench-nix-vmtest-'));
  try {
    await benchNixVmtest(rows, work, REPEATS);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

console.log('\n| capability | nixcas | peer | ratio | target |');
console.log('|---|---|---|---|---|');
for (const r of rows) {
  // Latency rows give peer ÷ ours, so that there too a higher ratio is better.
  const ratio = r.peerOverOurs ? r.peer / r.ours : r.ours / r.peer;
  const verdict = r.note ?? (r.target === undefined ? '' : `${ratio >= r.target ? 'met' : 'MISSED'} (≥ ${r.target})`);
  const value = (v: number) => (Number.isFinite(v) ? `${v.toFixed(0)} ${r.unit}` : '—'); // NaN: a skipped bench
  console.log(`| ${r.capability} | ${value(r.ours)} | ${value(r.peer)} (${r.peerName}) | ${Number.isFinite(ratio) ? ratio.toFixed(2) : '—'} | ${verdict} |`);
}
