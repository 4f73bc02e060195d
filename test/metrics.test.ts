// --metrics-listen against a real Prometheus (Debian's prometheus): it scrapes nar-bridge, a
// daemon, a FUSE mount and virtio-fs, and a query through its HTTP API sees the counters move
// after a workload: NAR and narinfo GETs, a PathInfo Get over gRPC, a file read through the mount,
// a QEMU guest that boots with the store over virtio-fs and reads from it.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { freePort, nixcas, removeDir, startDaemon, startNixcas, tempDir, type Daemon } from './helpers.js';
import { bootGuest, buildInitramfs, ensureVmPackages } from '../vmtest/harness.js';


const metricsUrl = (server: Daemon) => /metrics at http:\/\/(127\.0\.0\.1:\d+)\/metrics/.exec(server.output())![1]!;

/** Asks Prometheus for `query` until it has a value of at least `atLeast`, for at most 30 s (it scrapes every second). */
async function eventually(prometheus: string, query: string, atLeast: number): Promise<number> {
  const deadline = Date.now() + 30_000;
  let last = NaN;
  for (;;) {
    const response = await fetch(`${prometheus}/api/v1/query?query=${encodeURIComponent(query)}`).catch(() => undefined);
    if (response?.ok) {
      const body = (await response.json()) as { data: { result: { value: [number, string] }[] } };
      last = body.data.result.length ? Number(body.data.result[0]!.value[1]) : NaN;
      if (last >= atLeast) return last;
    }
    if (Date.now() > deadline) assert.fail(`Prometheus never saw ${query} >= ${atLeast} (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, 250)); // polling a server that scrapes on its own clock
  }
}

/** Debian's Prometheus scraping `targets` every second; returns its API base and the process. */
async function startPrometheus(work: string, targets: string[]): Promise<{ api: string; process: ChildProcess }> {
  const port = await freePort();
  writeFileSync(join(work, 'prometheus.yml'), `global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: nixcas\n    static_configs:\n      - targets: ${JSON.stringify(targets)}\n`);
  const process = spawn('/usr/bin/prometheus', [
    `--config.file=${join(work, 'prometheus.yml')}`, `--storage.tsdb.path=${join(work, 'tsdb')}`, `--web.listen-address=127.0.0.1:${port}`,
  ], { stdio: 'ignore' });
  return { api: `http://127.0.0.1:${port}`, process };
}

test('Prometheus scrapes nar-bridge, the daemon and a FUSE mount, and sees their counters move', { skip: process.getuid?.() !== 0 && 'mounts as root' }, async () => {
  const work = tempDir('metrics');
  const servers: Daemon[] = [];
  let prometheus: ChildProcess | undefined;
  try {
    const store = join(work, 'store');
    writeFileSync(join(work, 'file'), 'measured\n');
    const path = nixcas(['import', '--store', store, join(work, 'file')]).stdout.trim();
    const metrics = ['--metrics-listen', '127.0.0.1:0'];
    const bridge = await startNixcas(['nar-bridge', '--store', store, '--listen', '127.0.0.1:0', ...metrics], 'metrics at');
    servers.push(bridge);
    const socket = join(work, 'daemon.sock');
    const daemon = await startDaemon(['--store', store, '--listen', socket, ...metrics]);
    servers.push(daemon);
    assert.match(daemon.output(), /metrics at/);
    mkdirSync(join(work, 'mnt'));
    const mount = await startNixcas(['mount', '--store', store, join(work, 'mnt'), ...metrics], 'mounted at');
    servers.push(mount);

    const started = await startPrometheus(work, [bridge, daemon, mount].map(metricsUrl));
    prometheus = started.process;
    const { api } = started;

    const base = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(bridge.output())![1]!;
    const hash = path.slice('/nix/store/'.length, '/nix/store/'.length + 32);
    const narinfo = await fetch(`${base}/${hash}.narinfo`);
    assert.equal(narinfo.status, 200);
    const nar = await fetch(`${base}/${/^URL: (.*)$/m.exec(await narinfo.text())![1]}`);
    assert.equal(nar.status, 200);
    await nar.arrayBuffer();
    const grpc = `grpc+unix://${socket}`;
    assert.equal(nixcas(['path-info', '--blob-service-addr', grpc, '--directory-service-addr', grpc, '--path-info-service-addr', grpc, path]).status, 0);
    assert.equal(readFileSync(join(work, 'mnt', path.slice('/nix/store/'.length))).toString(), 'measured\n');

    assert.equal(await eventually(api, 'up{job="nixcas"} == 1', 1), 1);
    await eventually(api, 'sum(nixcas_http_responses_total{route="narinfo",status="200"})', 1);
    await eventually(api, 'sum(nixcas_http_responses_total{route="nar",status="200"})', 1);
    await eventually(api, 'sum(nixcas_grpc_calls_total{method="PathInfoService/Get"})', 1);
    await eventually(api, 'sum(nixcas_fuse_requests_total{opcode="READ"})', 1);
    await eventually(api, 'sum(nixcas_fuse_read_bytes_total)', 9);
    await eventually(api, 'count(nixcas_process_cpu_seconds_total{mode="user"})', 3);
    await eventually(api, 'min(nixcas_process_memory_bytes{kind="rss"})', 1e6);
  } finally {
    prometheus?.kill();
    for (const server of servers.reverse()) await server.stop();
    removeDir(work);
  }
});

test('Prometheus scrapes nixcas virtiofs while a QEMU guest boots from it: its requests and reads are counted', { skip: process.getuid?.() !== 0 && 'boots QEMU as root' }, async () => {
  ensureVmPackages();
  const work = tempDir('metrics-virtiofs');
  let prometheus: ChildProcess | undefined;
  let server: Daemon | undefined;
  try {
    const store = join(work, 'store');
    writeFileSync(join(work, 'file'), 'read by a guest\n');
    const path = nixcas(['import', '--store', store, join(work, 'file')]).stdout.trim();
    const socket = join(work, 'fs.sock');
    server = await startNixcas(['virtiofs', socket, '--store', store, '--metrics-listen', '127.0.0.1:0'], 'metrics at');
    const target = metricsUrl(server);
    const started = await startPrometheus(work, [target]);
    prometheus = started.process;
    const initramfs = buildInitramfs({ guestScript: `set -e\nmkdir -p /nix/store\ncapture mount mount -t virtiofs -o ro nixstore /nix/store\ncapture read cat ${path}` });
    const guest = await bootGuest({ initramfs, virtiofsSocket: socket, memoryMiB: 512, timeoutMs: 120_000 });
    assert.equal(guest.exitStatus, 0, guest.output);
    assert.equal(guest.results['read.out'], 'read by a guest');
    const instance = `instance="${target}"`;
    await eventually(started.api, `up{${instance}} == 1`, 1);
    await eventually(started.api, `sum(nixcas_fuse_requests_total{${instance},opcode="INIT"})`, 1);
    await eventually(started.api, `sum(nixcas_fuse_requests_total{${instance},opcode="LOOKUP"})`, 1);
    await eventually(started.api, `sum(nixcas_fuse_read_bytes_total{${instance}})`, 'read by a guest\n'.length);
  } finally {
    prometheus?.kill();
    await server?.stop();
    removeDir(work);
  }
});
