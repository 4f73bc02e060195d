// What nar-bridge counts, for metrics (cli/metrics.ts reads it when scraped): responses by route
// and status, bytes sent, and a latency histogram per route, as plain numbers.
/** Upper bounds of the latency buckets, in seconds (Prometheus' le). */
export const LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30];

export interface RouteCounters {
  /** Responses by status code. */
  responses: Map<number, number>;
  bytes: number;
  /** Per bucket, the responses that took at most its bound (not cumulative); one more for +Inf. */
  latency: number[];
  seconds: number;
}

export const httpCounters = new Map<string, RouteCounters>();

/** The route a request took, as a metric label: few values whatever the URLs. */
export function routeOf(method: string | undefined, url: string | undefined): string {
  const path = (url ?? '').split('?')[0]!;
  if (path === '/nix-cache-info') return 'cache-info';
  if (/^\/[0-9a-z]{32}\.narinfo$/.test(path)) return method === 'PUT' ? 'narinfo-upload' : 'narinfo';
  if (path.startsWith('/nar/')) return method === 'PUT' ? 'nar-upload' : 'nar';
  if (path.startsWith('/castore/')) return 'castore';
  return 'other';
}

export function countExchange(route: string, status: number, bytes: number, seconds: number): void {
  let counters = httpCounters.get(route);
  if (!counters) httpCounters.set(route, (counters = { responses: new Map(), bytes: 0, latency: new Array(LATENCY_BUCKETS.length + 1).fill(0), seconds: 0 }));
  counters.responses.set(status, (counters.responses.get(status) ?? 0) + 1);
  counters.bytes += bytes;
  counters.seconds += seconds;
  let bucket = LATENCY_BUCKETS.findIndex((bound) => seconds <= bound);
  if (bucket < 0) bucket = LATENCY_BUCKETS.length;
  counters.latency[bucket]!++;
}
