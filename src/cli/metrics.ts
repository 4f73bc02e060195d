// --metrics-listen ADDR: Prometheus text at http://ADDR/metrics, with prom-client. The layers
// count in plain numbers (fuse/counters.ts, grpc's call and error counts, nar-bridge's
// counters.ts, substitution and verification counts); they are read only when Prometheus
// scrapes, so the request paths pay one increment each and nothing for prom-client.
import { createServer, type Server } from 'node:http';
import { readdirSync } from 'node:fs';
import { Counter, Gauge, Registry } from 'prom-client';
import { DataLossError } from '../castore/errors.js';

/** Sources a command has: what it loads anyway, handed in so that this module imports no layer it does not use. */
export interface MetricSources {
  fuse?: { counters: typeof import('../fuse/counters.js').fuseCounters; opcodeName: (opcode: number) => string };
  grpc?: { calls: Map<string, number>; errors: Float64Array };
  http?: typeof import('../narbridge/counters.js');
  substitution?: { fetched: number; refused: number; failed: number; objectBytesSkipped: number };
  /** Connected vhost-user front ends (VMs), read when scraped. */
  connections?: () => number;
}

const GRPC_CODES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND', 'ALREADY_EXISTS', 'PERMISSION_DENIED',
  'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];

/** A counter whose value is a running total kept elsewhere: set from it at each scrape. */
function totals(registry: Registry, name: string, help: string, labelNames: string[], read: (set: (labels: Record<string, string>, value: number) => void) => void): void {
  new Counter({
    name, help, labelNames, registers: [registry],
    collect() {
      this.reset();
      read((labels, value) => {
        if (value > 0) this.inc(labels, value);
      });
    },
  });
}

export function metricsRegistry(sources: MetricSources): Registry {
  const registry = new Registry();
  processMetrics(registry);
  totals(registry, 'nixcas_verification_failures_total', 'Content that did not match the digest it is served under (nothing of it was served)', [], (set) => set({}, DataLossError.raised));
  const { fuse, grpc, http, substitution, connections } = sources;
  if (fuse) {
    const byOpcode = (values: Float64Array) => (set: (labels: Record<string, string>, value: number) => void) =>
      values.forEach((value, opcode) => set({ opcode: fuse.opcodeName(opcode) }, value));
    totals(registry, 'nixcas_fuse_requests_total', 'FUSE requests (FUSE mount or virtio-fs), by opcode', ['opcode'], byOpcode(fuse.counters.requests));
    totals(registry, 'nixcas_fuse_errors_total', 'FUSE requests answered with an error, by opcode', ['opcode'], byOpcode(fuse.counters.errors));
    totals(registry, 'nixcas_fuse_read_bytes_total', 'File bytes answered to READ requests', [], (set) => set({}, fuse.counters.readBytes));
    totals(registry, 'nixcas_fuse_native_answers_total', "Requests virtio-fs's native path answered (GETATTR, READ; also in nixcas_fuse_requests_total)", [], (set) => set({}, fuse.counters.nativeAnswers));
    totals(registry, 'nixcas_fuse_buffered_reads_total', 'virtio-fs READs whose bytes had to be waited for (the disk, a remote store): read into a buffer and copied, not straight into the guest', [], (set) => set({}, fuse.counters.bufferedReads));
  }
  if (grpc) {
    totals(registry, 'nixcas_grpc_calls_total', 'gRPC calls, by service and method', ['method'], (set) => grpc.calls.forEach((value, method) => set({ method }, value)));
    totals(registry, 'nixcas_grpc_errors_total', 'gRPC calls that ended with an error, by status code', ['code'], (set) => grpc.errors.forEach((value, code) => set({ code: GRPC_CODES[code] ?? String(code) }, value)));
  }
  if (http) {
    totals(registry, 'nixcas_http_responses_total', 'nar-bridge responses, by route and status', ['route', 'status'], (set) =>
      http.httpCounters.forEach((c, route) => c.responses.forEach((value, status) => set({ route, status: String(status) }, value))));
    totals(registry, 'nixcas_http_sent_bytes_total', 'nar-bridge response body bytes, by route', ['route'], (set) => http.httpCounters.forEach((c, route) => set({ route }, c.bytes)));
    registry.registerMetric(httpLatency(http) as never);
  }
  if (substitution) {
    totals(registry, 'nixcas_substitutions_total', 'Store paths asked of substituters, by outcome', ['outcome'], (set) => {
      for (const outcome of ['fetched', 'refused', 'failed'] as const) set({ outcome }, substitution[outcome]);
    });
    totals(registry, 'nixcas_substitution_skipped_bytes_total', 'Blob bytes another nixcas did not send because this store had them', [], (set) => set({}, substitution.objectBytesSkipped));
  }
  if (connections) {
    new Gauge({ name: 'nixcas_vhost_user_connections', help: 'Connected vhost-user front ends (VMs)', registers: [registry], collect() { this.set(connections()); } });
  }
  return registry;
}

/**
 * The process's CPU, memory and open files, read at scrape time. prom-client's default metrics are
 * not used: their event-loop-delay monitor and GC observer run all the time, and measurably slowed
 * the virtio-fs request path (docs/benchmarks.md, "what metrics cost").
 */
function processMetrics(registry: Registry): void {
  totals(registry, 'nixcas_process_cpu_seconds_total', 'CPU time of the process, user and system', ['mode'], (set) => {
    const { user, system } = process.cpuUsage();
    set({ mode: 'user' }, user / 1e6);
    set({ mode: 'system' }, system / 1e6);
  });
  new Gauge({
    name: 'nixcas_process_memory_bytes', help: 'Memory of the process: resident set, V8 heap used, and memory outside the heap (Buffers)', labelNames: ['kind'], registers: [registry],
    collect() {
      const memory = process.memoryUsage();
      this.set({ kind: 'rss' }, memory.rss);
      this.set({ kind: 'heap_used' }, memory.heapUsed);
      this.set({ kind: 'external' }, memory.external);
    },
  });
  new Gauge({
    name: 'nixcas_process_open_fds', help: 'Open file descriptors', registers: [registry],
    collect() {
      try {
        this.set(readdirSync('/proc/self/fd').length);
      } catch {
        // not Linux: no such gauge value
      }
    },
  });
  new Gauge({ name: 'nixcas_process_start_time_seconds', help: 'When the process started, in seconds since the epoch', registers: [registry] }).set(Math.floor(Date.now() / 1000 - process.uptime()));
}

/** nar-bridge's latency histogram, from its bucket counts (prom-client's Histogram would cost every request a lookup). */
function httpLatency(http: NonNullable<MetricSources['http']>) {
  const name = 'nixcas_http_request_duration_seconds';
  const help = 'nar-bridge response times, by route';
  return {
    name, help, type: 'histogram', aggregator: 'sum',
    get: async () => {
      const values: { labels: Record<string, string | number>; value: number; metricName: string }[] = [];
      http.httpCounters.forEach((c, route) => {
        let cumulative = 0;
        http.LATENCY_BUCKETS.forEach((bound, i) => {
          cumulative += c.latency[i]!;
          values.push({ labels: { route, le: bound }, value: cumulative, metricName: `${name}_bucket` });
        });
        cumulative += c.latency[http.LATENCY_BUCKETS.length]!;
        values.push({ labels: { route, le: '+Inf' }, value: cumulative, metricName: `${name}_bucket` });
        values.push({ labels: { route }, value: c.seconds, metricName: `${name}_sum` });
        values.push({ labels: { route }, value: cumulative, metricName: `${name}_count` });
      });
      return { name, help, type: 'histogram', aggregator: 'sum', values };
    },
  };
}

/** Serves `registry` at http://ADDRESS/metrics (host:port, port 0 for a free one); resolves with the URL. */
export async function serveMetrics(address: string, registry: Registry): Promise<{ url: string; server: Server }> {
  const match = /^(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d+)$/.exec(address);
  if (!match) throw new Error(`--metrics-listen ${address}: give host:port (e.g. 127.0.0.1:9101, [::1]:9101)`);
  const host = match[1]!.replace(/^\[|\]$/g, '');
  const server = createServer((request, response) => {
    if (request.method !== 'GET' || request.url?.split('?')[0] !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('metrics are at /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => response.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: Error) => response.writeHead(500, { 'content-type': 'text/plain' }).end(`${err.message}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => reject(new Error(`--metrics-listen ${address}: ${err.code === 'EADDRINUSE' ? 'the address is in use' : err.message}`)));
    server.listen(Number(match[2]), host, resolve);
  });
  server.unref(); // metrics never keep a server alive
  const port = (server.address() as { port: number }).port;
  return { url: `http://${host.includes(':') ? `[${host}]` : host}:${port}/metrics`, server };
}

/** Starts serving metrics when the command was given --metrics-listen; says where. */
export async function startMetrics(address: string | undefined, sources: MetricSources, log: (message: string) => void): Promise<void> {
  if (!address) return;
  const { url } = await serveMetrics(address, metricsRegistry(sources));
  log(`metrics at ${url}`);
}
