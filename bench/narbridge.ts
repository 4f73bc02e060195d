// `nixcas nar-bridge` (the HTTP binary cache) against Debian's nginx serving
// the same bytes as static files: the NAR that `nixcas nar` renders, at the
// path the narinfo's `URL:` line names, and the narinfo text nar-bridge
// returned, at /<hash>.narinfo. nginx runs in the foreground with a generated
// configuration (one worker, sendfile on, no access log) and everything it
// needs inside the bench's temporary directory.
//
// 1. NAR GET: one tree of about 512 MiB (a few large files of random bytes and
//    ~1000 small ones) imported once; each repeat downloads the whole NAR with
//    curl from both servers, page cache warm (one untimed GET per side first,
//    which also checks the body's SHA-256 against `nixcas nar`).
// 2. narinfo GET: wrk with 64 connections on two threads, requests/s and the
//    50 % / 99 % latencies; the same for a narinfo that is not there (404).
//
// Both sides run in the same process lifetime and alternate who goes first.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, createReadStream, existsSync, mkdirSync, openSync, readFileSync, readdirSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import * as http from 'node:http';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { encode as nixbase32 } from '../src/store/nixbase32.js';
import { type Row, median } from './nix.js';
import { type Nginx, collectStderr, freePort, killIfNginx, startNginx, stopProcess } from '../test/nginx.js';

const MIB = 1024 * 1024;
const PEER_NAME = 'nginx';
type Side = 'ours' | 'peer';
const SIDE_NAME: Record<Side, string> = { ours: 'nar-bridge', peer: 'nginx' };

/** A row whose ratio is peer ÷ ours (for latencies: above 1, nixcas answers faster). */

// ---------------------------------------------------------------- tools

function which(tool: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(':').concat(['/usr/sbin', '/usr/bin', '/sbin'])) {
    if (dir && existsSync(join(dir, tool))) return join(dir, tool);
  }
  return undefined;
}

/** Runs a command to completion; throws with its stderr if it fails. */
function run(command: string, args: string[], options: { stdoutFile?: string } = {}): string {
  const out = options.stdoutFile === undefined ? 'pipe' : openSync(options.stdoutFile, 'w');
  const result = spawnSync(command, args, { stdio: ['ignore', out, 'pipe'], encoding: 'utf8', maxBuffer: 64 * MIB });
  if (typeof out === 'number') closeSync(out);
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr || result.error?.message}`);
  return result.stdout ?? '';
}

/** Like run, but without blocking the event loop (so memory sampling timers keep firing). */
function runAsync(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`${command} ${args.join(' ')} exited with ${code}: ${stderr}`))));
  });
}

// ---------------------------------------------------------------- the tree

/** A few large files of random bytes (written 1 MiB at a time) and many small ones; returns the bytes of file contents. */
function makeTree(root: string, largeFiles: number, largeMib: number, smallFiles: number): number {
  let bytes = 0;
  mkdirSync(join(root, 'large'), { recursive: true });
  for (let f = 0; f < largeFiles; f++) {
    const fd = openSync(join(root, 'large', `blob-${f}.bin`), 'w');
    for (let i = 0; i < largeMib; i++) {
      const chunk = randomBytes(MIB);
      for (let at = 0; at < chunk.length; ) at += writeSync(fd, chunk, at);
    }
    closeSync(fd);
    bytes += largeMib * MIB;
  }
  for (let i = 0; i < smallFiles; i++) {
    const dir = join(root, 'small', `d${i % 20}`);
    mkdirSync(dir, { recursive: true });
    const size = 1024 + ((i * 7919) % (15 * 1024));
    writeFileSync(join(dir, `f${i}`), randomBytes(size), { mode: i % 10 === 0 ? 0o755 : 0o644 });
    if (i % 50 === 0) symlinkSync(`f${i}`, join(dir, `link-${i}`));
    bytes += size;
  }
  return bytes;
}

function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path, { highWaterMark: MIB }).on('data', (d) => hash.update(d)).on('error', reject).on('end', () => resolve(hash.digest('hex')));
  });
}

// ---------------------------------------------------------------- servers

type Server = Pick<Nginx, 'child' | 'base' | 'stderr'>;

async function startNarBridge(cli: string, store: string): Promise<Server> {
  const child = spawn(process.execPath, [cli, 'nar-bridge', '--store', store, '--listen', '127.0.0.1:0', '--no-access-log'], { stdio: ['ignore', 'ignore', 'pipe'] });
  const stderr = collectStderr(child);
  const base = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`nixcas nar-bridge did not say where it listens within 20 s: ${stderr()}`));
    }, 20_000);
    const onData = () => {
      const match = /nixcas nar-bridge: listening on (http:\/\/\S+)/.exec(stderr());
      if (!match) return;
      clearTimeout(timer);
      child.stderr!.off('data', onData);
      child.off('exit', onExit);
      resolve(match[1]!.replace(/\/+$/, ''));
    };
    const onExit = (code: number | null) => {
      clearTimeout(timer);
      reject(new Error(`nixcas nar-bridge exited with ${code}: ${stderr()}`));
    };
    child.stderr!.on('data', onData);
    child.once('exit', onExit);
  });
  return { child, base, stderr };
}

async function stop(server: Server | undefined, extraPids: number[] = []): Promise<void> {
  if (!server) return;
  await stopProcess(server.child);
  for (const pid of extraPids) killIfNginx(pid);
}

// ---------------------------------------------------------------- memory

function statusKb(pid: number, field: string): number {
  try {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) : 0;
  } catch {
    return 0;
  }
}

/** Direct children of `pid` (nginx's worker). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(Number(entry));
    } catch {
      // gone
    }
  }
  return out;
}

// ---------------------------------------------------------------- clients

interface Download {
  status: number;
  bytes: number;
  seconds: number;
}

/** One GET with curl (to /dev/null): status, size and curl's time_total. */
async function curlGet(url: string): Promise<Download> {
  const out = await runAsync('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code} %{size_download} %{time_total}', url]);
  const [status, bytes, seconds] = out.trim().split(/\s+/).map(Number);
  return { status: status!, bytes: bytes!, seconds: seconds! };
}

interface NodeResponse extends Download {
  headers: http.IncomingHttpHeaders;
  sha256: string;
  body?: Buffer;
}

/** One GET with Node's http client, hashing the body as it arrives; keeps the body if asked. */
function nodeGet(url: string, keepBody = false): Promise<NodeResponse> {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    http.get(url, { agent: false }, (res) => {
      const hash = createHash('sha256');
      const chunks: Buffer[] = [];
      let bytes = 0;
      res.on('data', (d: Buffer) => {
        hash.update(d);
        bytes += d.length;
        if (keepBody) chunks.push(d);
      });
      res.once('error', reject);
      res.once('end', () => resolve({
        status: res.statusCode ?? 0,
        bytes,
        seconds: Number(process.hrtime.bigint() - started) / 1e9,
        headers: res.headers,
        sha256: hash.digest('hex'),
        body: keepBody ? Buffer.concat(chunks) : undefined,
      }));
    }).once('error', reject);
  });
}

interface WrkResult {
  requestsPerSecond: number;
  p50us: number;
  p99us: number;
  requests: number;
  non2xx: number;
  socketErrors: string;
}

function toMicroseconds(text: string): number {
  const match = /^([\d.]+)(us|ms|s|m|h)$/.exec(text);
  if (!match) throw new Error(`wrk latency ${JSON.stringify(text)} not understood`);
  const scale = { us: 1, ms: 1e3, s: 1e6, m: 60e6, h: 3600e6 }[match[2] as 'us'];
  return Number(match[1]) * scale;
}

async function wrk(url: string, duration: string): Promise<WrkResult> {
  const out = await runAsync('wrk', ['-t2', '-c64', `-d${duration}`, '--latency', url]);
  const number = (re: RegExp) => {
    const match = re.exec(out);
    if (!match) throw new Error(`wrk output without ${re}:\n${out}`);
    return match[1]!;
  };
  return {
    requestsPerSecond: Number(number(/Requests\/sec:\s+([\d.]+)/)),
    p50us: toMicroseconds(number(/^\s+50%\s+(\S+)/m)),
    p99us: toMicroseconds(number(/^\s+99%\s+(\S+)/m)),
    requests: Number(number(/(\d+) requests in/)),
    non2xx: Number(/Non-2xx or 3xx responses:\s+(\d+)/.exec(out)?.[1] ?? 0),
    socketErrors: /Socket errors:[^\n]*/.exec(out)?.[0] ?? '',
  };
}

// ---------------------------------------------------------------- the bench

function skip(rows: Row[], why: string): void {
  console.error(`bench narbridge: skipped: ${why}`);
  rows.push({ capability: 'nar-bridge against nginx', ours: NaN, peer: NaN, unit: '', peerName: PEER_NAME, note: `skipped: ${why}` });
}

export async function benchNarBridge(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  const started = performance.now();
  const nginx = which('nginx');
  const missing = [nginx ? undefined : 'nginx', which('wrk') ? undefined : 'wrk'].filter(Boolean);
  if (missing.length > 0) return skip(rows, `install nginx-light wrk (no ${missing.join(', no ')} found)`);
  const haveCurl = which('curl') !== undefined;
  const largeFiles = Number(process.env.BENCH_NARBRIDGE_LARGE_FILES ?? 4);
  const largeMib = Number(process.env.BENCH_NARBRIDGE_LARGE_MIB ?? 126);
  const smallFiles = Number(process.env.BENCH_NARBRIDGE_SMALL_FILES ?? 1000);
  const duration = process.env.BENCH_NARBRIDGE_WRK_DURATION ?? '10s';

  console.error(`bench narbridge: writing the tree (${largeFiles} × ${largeMib} MiB, ${smallFiles} small files)`);
  const tree = join(work, 'tree');
  const contentBytes = makeTree(tree, largeFiles, largeMib, smallFiles);
  const store = join(work, 'store');
  const storePath = run(process.execPath, [cli, 'import', '--store', store, tree]).trim();
  if (!/^\/nix\/store\/[0-9a-z]{32}-/.test(storePath)) throw new Error(`nixcas import printed ${JSON.stringify(storePath)}`);
  const hash = storePath.slice('/nix/store/'.length, '/nix/store/'.length + 32);
  const narFile = join(work, 'reference.nar');
  run(process.execPath, [cli, 'nar', '--store', store, storePath], { stdoutFile: narFile });
  const narSize = statSync(narFile).size;
  const narSha256 = await sha256File(narFile);

  const servers: Partial<Record<Side, Server>> = {};
  let nginxWorkers: number[] = [];
  const cleanUp = () => {
    for (const server of Object.values(servers)) if (server?.child.exitCode === null) server.child.kill('SIGKILL');
    for (const pid of nginxWorkers) killIfNginx(pid);
  };
  const onSignal = (signal: NodeJS.Signals) => {
    cleanUp();
    process.kill(process.pid, signal);
  };
  process.once('exit', cleanUp);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    servers.ours = await startNarBridge(cli, store);
    const ours = servers.ours;

    // What nar-bridge says about the path, and where it puts the NAR.
    const narinfoResponse = await nodeGet(`${ours.base}/${hash}.narinfo`, true);
    const narinfo = narinfoResponse.body!.toString('utf8');
    if (narinfoResponse.status !== 200) throw new Error(`GET /${hash}.narinfo from nar-bridge: ${narinfoResponse.status}\n${narinfo}`);
    const field = (name: string) => new RegExp(`^${name}: (.*)$`, 'm').exec(narinfo)?.[1];
    const narUrl = field('URL');
    if (!narUrl) throw new Error(`narinfo without a URL line:\n${narinfo}`);
    const expected: Record<string, string> = {
      StorePath: storePath, NarSize: String(narSize), NarHash: `sha256:${nixbase32(Buffer.from(narSha256, 'hex'))}`,
    };
    for (const [name, value] of Object.entries(expected)) {
      if (field(name) !== value) throw new Error(`narinfo ${name} is ${JSON.stringify(field(name))}, expected ${value}:\n${narinfo}`);
    }
    const compression = field('Compression') ?? 'none';
    if (compression !== 'none') throw new Error(`narinfo says Compression: ${compression}; this bench compares uncompressed NARs`);
    const narPath = `/${narUrl.replace(/^\/+/, '')}`;

    // nginx's copy of the same files, at the same URL paths.
    const nginxDir = join(work, 'nginx');
    const root = join(nginxDir, 'root');
    const narCopy = join(root, decodeURIComponent(narPath.split('?')[0]!));
    mkdirSync(dirname(narCopy), { recursive: true });
    run(process.execPath, [cli, 'nar', '--store', store, storePath], { stdoutFile: narCopy });
    writeFileSync(join(root, `${hash}.narinfo`), narinfoResponse.body!);
    servers.peer = await startNginx(nginx!, nginxDir, root);
    nginxWorkers = childrenOf(servers.peer.child.pid!);
    const base: Record<Side, string> = { ours: ours.base, peer: servers.peer.base };
    console.error(`bench narbridge: ${storePath}, NAR ${narSize} bytes at ${narPath}; nar-bridge on ${base.ours}, nginx on ${base.peer}`);

    // 1. NAR GET. The first GET per side warms the page cache and checks the body.
    const headers: Partial<Record<Side, http.IncomingHttpHeaders>> = {};
    const order = (i: number) => (i % 2 === 0 ? (['ours', 'peer'] as const) : (['peer', 'ours'] as const));
    for (const side of order(0)) {
      const got = await nodeGet(`${base[side]}${narPath}`);
      headers[side] = got.headers;
      if (got.status !== 200 || got.bytes !== narSize || got.sha256 !== narSha256) {
        throw new Error(`NAR from ${SIDE_NAME[side]}: status ${got.status}, ${got.bytes} bytes, sha256 ${got.sha256}; expected 200, ${narSize} bytes, sha256 ${narSha256} (nixcas nar)`);
      }
      console.error(`bench narbridge: NAR from ${SIDE_NAME[side]} checked (sha256 ${narSha256}); ${(narSize / 1e6 / got.seconds).toFixed(0)} MB/s with Node's http client`);
    }
    const ourPid = ours.child.pid!;
    let peakAnonKb = 0;
    const sampler = setInterval(() => (peakAnonKb = Math.max(peakAnonKb, statusKb(ourPid, 'RssAnon'))), 20);
    const narMbps: Record<Side, number[]> = { ours: [], peer: [] };
    try {
      for (let i = 0; i < repeats; i++) {
        for (const side of order(i)) {
          const url = `${base[side]}${narPath}`;
          const got = haveCurl ? await curlGet(url) : await nodeGet(url);
          if (got.status !== 200 || got.bytes !== narSize) throw new Error(`NAR GET from ${SIDE_NAME[side]}: status ${got.status}, ${got.bytes} bytes, expected 200 and ${narSize}`);
          narMbps[side].push(narSize / 1e6 / got.seconds);
        }
      }
    } finally {
      clearInterval(sampler);
    }
    const narHwmKb = statusKb(ourPid, 'VmHWM');
    const nginxHwmKb = Math.max(0, ...nginxWorkers.map((pid) => statusKb(pid, 'VmHWM')));
    console.error(`bench narbridge: NAR GET MB/s nar-bridge ${narMbps.ours.map((v) => v.toFixed(0)).join(' ')}, nginx ${narMbps.peer.map((v) => v.toFixed(0)).join(' ')}`);

    // 2. narinfo GET under 64 connections, then a narinfo that is not there.
    const missingHash = nixbase32(randomBytes(20));
    const paths = { hit: `/${hash}.narinfo`, miss: `/${missingHash}.narinfo` };
    const checks: Partial<Record<Side, string>> = {};
    for (const side of order(0)) {
      const got = await nodeGet(`${base[side]}${paths.hit}`, true);
      if (got.status !== 200 || !got.body!.equals(narinfoResponse.body!)) throw new Error(`narinfo from ${SIDE_NAME[side]}: ${got.status}\n${got.body}`);
      const miss = await nodeGet(`${base[side]}${paths.miss}`, true);
      if (miss.status !== 404) throw new Error(`GET ${paths.miss} from ${SIDE_NAME[side]} gave ${miss.status}, expected 404`);
      checks[side] = `narinfo: ${got.headers['content-type']}, ${got.bytes} bytes; 404: ${miss.headers['content-type']}, ${miss.bytes} bytes`;
    }
    const results: Record<'hit' | 'miss', Record<Side, WrkResult[]>> = { hit: { ours: [], peer: [] }, miss: { ours: [], peer: [] } };
    for (let i = 0; i < repeats; i++) {
      for (const kind of ['hit', 'miss'] as const) {
        for (const side of order(i)) {
          const result = await wrk(`${base[side]}${paths[kind]}`, duration);
          const wrong = kind === 'hit' ? result.non2xx : result.requests - result.non2xx;
          if (wrong > 0 || result.socketErrors) console.error(`bench narbridge: wrk ${kind} on ${SIDE_NAME[side]}: ${wrong} unexpected statuses; ${result.socketErrors}`);
          results[kind][side].push(result);
        }
      }
      console.error(`bench narbridge: wrk repeat ${i + 1}/${repeats} done`);
    }
    const finalHwmKb = statusKb(ourPid, 'VmHWM');
    const stat = (kind: 'hit' | 'miss', side: Side, key: 'requestsPerSecond' | 'p50us' | 'p99us') => median(results[kind][side].map((r) => r[key]));

    const mb = narSize / 1e6;
    const wrkLabel = `wrk -t2 -c64 -d${duration}`;
    const pushRow = (row: Row) => rows.push(row);
    pushRow({ capability: `NAR GET, ${mb.toFixed(0)} MB NAR (curl, warm page cache)`, ours: median(narMbps.ours), peer: median(narMbps.peer), unit: 'MB/s', peerName: 'nginx, sendfile', target: 0.5 });
    pushRow({ capability: `narinfo GET, 64 connections (${wrkLabel})`, ours: stat('hit', 'ours', 'requestsPerSecond'), peer: stat('hit', 'peer', 'requestsPerSecond'), unit: 'req/s', peerName: PEER_NAME });
    pushRow({ capability: 'narinfo GET p50 latency, 64 connections (ratio nginx ÷ nixcas)', ours: stat('hit', 'ours', 'p50us'), peer: stat('hit', 'peer', 'p50us'), unit: 'µs', peerName: PEER_NAME, lowerIsBetter: true, peerOverOurs: true });
    pushRow({ capability: 'narinfo GET p99 latency, 64 connections (ratio nginx ÷ nixcas)', ours: stat('hit', 'ours', 'p99us'), peer: stat('hit', 'peer', 'p99us'), unit: 'µs', peerName: PEER_NAME, lowerIsBetter: true, peerOverOurs: true });
    pushRow({ capability: `narinfo GET of a missing path (404), 64 connections (${wrkLabel})`, ours: stat('miss', 'ours', 'requestsPerSecond'), peer: stat('miss', 'peer', 'requestsPerSecond'), unit: 'req/s', peerName: PEER_NAME });
    pushRow({
      capability: `peak RSS (VmHWM) of the server after the NAR GETs (nar-bridge: ${(peakAnonKb / 1024).toFixed(0)} MB private at most)`,
      ours: narHwmKb / 1024, peer: nginxHwmKb / 1024, unit: 'MB', peerName: 'nginx worker', lowerIsBetter: true, note: 'lower is better; no target',
    });

    console.log(`\nnar-bridge: ${storePath}; tree ${(contentBytes / 1e6).toFixed(0)} MB of file contents (${largeFiles} × ${largeMib} MiB, ${smallFiles} small files), NAR ${narSize} bytes; ${repeats} repeats, medians (range)\n`);
    console.log('| run | nar-bridge | nginx | ratio |');
    console.log('|---|---|---|---|');
    const range = (values: number[], digits = 0) => `${median(values).toFixed(digits)} (${Math.min(...values).toFixed(digits)}–${Math.max(...values).toFixed(digits)})`;
    console.log(`| NAR GET, MB/s (${haveCurl ? 'curl' : "Node's http client"}) | ${range(narMbps.ours)} | ${range(narMbps.peer)} | ${(median(narMbps.ours) / median(narMbps.peer)).toFixed(2)} |`);
    for (const kind of ['hit', 'miss'] as const) {
      const of = (side: Side, key: 'requestsPerSecond' | 'p50us' | 'p99us') => results[kind][side].map((r) => r[key]);
      const what = kind === 'hit' ? 'narinfo' : 'missing narinfo (404)';
      console.log(`| ${what}, req/s | ${range(of('ours', 'requestsPerSecond'))} | ${range(of('peer', 'requestsPerSecond'))} | ${(stat(kind, 'ours', 'requestsPerSecond') / stat(kind, 'peer', 'requestsPerSecond')).toFixed(2)} |`);
      console.log(`| ${what}, p50 µs | ${range(of('ours', 'p50us'))} | ${range(of('peer', 'p50us'))} | ${(stat(kind, 'peer', 'p50us') / stat(kind, 'ours', 'p50us')).toFixed(2)} (nginx ÷ ours) |`);
      console.log(`| ${what}, p99 µs | ${range(of('ours', 'p99us'))} | ${range(of('peer', 'p99us'))} | ${(stat(kind, 'peer', 'p99us') / stat(kind, 'ours', 'p99us')).toFixed(2)} (nginx ÷ ours) |`);
    }
    console.log(`\nnar-bridge peak RSS (VmHWM): ${(narHwmKb / 1024).toFixed(0)} MB after the NAR GETs (peak RssAnon sampled every 20 ms: ${(peakAnonKb / 1024).toFixed(0)} MB), ${(finalHwmKb / 1024).toFixed(0)} MB after wrk; nginx worker ${(nginxHwmKb / 1024).toFixed(0)} MB`);
    for (const side of ['ours', 'peer'] as const) {
      const h = headers[side]!;
      console.log(`${SIDE_NAME[side]} NAR response: content-type ${h['content-type']}, content-length ${h['content-length']}, transfer-encoding ${h['transfer-encoding'] ?? '-'}; ${checks[side]}`);
    }
    const ourStderr = ours.stderr().split('\n').filter((line) => line && !line.includes('listening on'));
    if (ourStderr.length > 0) console.log(`nar-bridge wrote on stderr:\n${ourStderr.slice(-20).join('\n')}`);
  } finally {
    await stop(servers.ours);
    await stop(servers.peer, nginxWorkers);
    process.off('exit', cleanUp);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    console.error(`bench narbridge: ${((performance.now() - started) / 1000).toFixed(0)} s in all`);
  }
}
