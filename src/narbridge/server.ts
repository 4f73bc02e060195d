// nar-bridge: the store as an HTTP Nix binary cache. Reads render NARs from
// castore as they are sent; uploads are stored in castore as they arrive and
// become visible only when their narinfo is registered.
import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import { AlreadyExistsError, InvalidInputError, isStorageFull } from '../castore/errors.js';
import { type Node, withName } from '../castore/model.js';
import { encodeDirectory } from '../castore/wire.js';
import { type CastoreServices, renderNar } from '../store/nar/render.js';
import { formatNarHash, formatNarInfo, narInfoFingerprint, parseNarInfo } from '../store/narinfo.js';
import * as nixbase32 from '../store/nixbase32.js';
import { type PathInfo, type Signature, storePathOf } from '../store/pathinfo.js';
import type { PathInfoService } from '../store/pathinfoservice.js';
import { type SigningKey, signFingerprint } from '../store/signing.js';
import { type StorePath, STORE_DIR, formatBasename, formatStorePath, hashPart } from '../store/storepath.js';
import { type LoggedRequest, formatAccessLine } from './access-log.js';
import { countExchange, routeOf } from './counters.js';
import type { Credentials } from './credentials.js';
import { DecompressionError, DecompressorMissingError } from '../store/nar/decompress.js';
import { drainedOrClosed } from './drain.js';
import { parseRange } from './range.js';
import { BadRequestError, type Route, narUrl, parseRoute } from './routes.js';
import { sendfileDelivery } from './sendfile.js';
import { ReceivedNars, receiveNar } from './uploads.js';

export interface NarBridgeOptions {
  services: CastoreServices & { pathInfos: PathInfoService };
  /** Priority in /nix-cache-info: Nix tries caches with lower numbers first. */
  priority: number;
  signingKey?: SigningKey;
  allowUpload: boolean;
  /** When set, uploads need HTTP Basic credentials from this list. */
  credentials?: Credentials;
  /** Where access log lines go; none when undefined. */
  accessLog?: (line: string) => void;
  /** Where errors worth an operator's attention go. */
  errorLog: (line: string) => void;
  /** The largest NAR an upload may expand to, counted as it arrives (default DEFAULT_MAX_NAR_SIZE). */
  maxNarSize?: number;
  /** How long a client may take to send a request's headers (default 10 s). */
  headersTimeoutMs?: number;
  /** Connections at once, from everyone and from one client address (defaults 1024 and 64). */
  maxConnections?: number;
  maxConnectionsPerClient?: number;
}

/** Larger than the NARs a binary cache serves (a CUDA toolkit is ~10 GiB); small enough to stop a decompression bomb. */
export const DEFAULT_MAX_NAR_SIZE = 32 * 1024 ** 3;

/** tvix's limit: a narinfo is a few hundred bytes; even one with thousands of references is far below this. */
const MAX_NARINFO_BYTES = 2 * 1024 * 1024;
/** A refused upload this small is read and dropped, keeping the connection; a larger one closes it. */
const DRAIN_LIMIT = 64 * 1024;

const TEXT = 'text/plain; charset=utf-8';
/** NARs and castore objects are addressed by their contents: they never change. */
const IMMUTABLE = 'public, max-age=31536000, immutable';
const IDLE_TIMEOUT_MS = 5 * 60 * 1000;

/** Per request: what the access log needs, and whether the client waits for 100 Continue. */
interface Exchange {
  request: IncomingMessage;
  response: ServerResponse;
  log: LoggedRequest;
  expectsContinue: boolean;
  bodyRead: boolean;
}

function methodsFor(route: Route): string[] {
  switch (route.kind) {
    case 'cache-info':
    case 'nar':
    case 'castore-directories':
    case 'castore-blob':
      return ['GET', 'HEAD'];
    case 'narinfo':
    case 'upload':
    case 'unsupported-compression':
      return ['GET', 'HEAD', 'PUT'];
  }
}

/** Wrong credentials one client address may send in a minute before it is refused (429) for the rest of it. */
const FAILED_LOGINS_ALLOWED = 10;
const FAILED_LOGIN_WINDOW_S = 60;

/** Recent failed logins per client address, bounded in how many addresses it remembers. */
class FailedLogins {
  private readonly byAddress = new Map<string, number[]>();

  blocked(address: string): boolean {
    return this.recent(address).length >= FAILED_LOGINS_ALLOWED;
  }

  add(address: string): void {
    const times = this.recent(address);
    times.push(Date.now());
    this.byAddress.delete(address);
    this.byAddress.set(address, times);
    // The oldest addresses go first once too many are remembered.
    for (const old of this.byAddress.keys()) {
      if (this.byAddress.size <= 10_000) break;
      this.byAddress.delete(old);
    }
  }

  private recent(address: string): number[] {
    const since = Date.now() - FAILED_LOGIN_WINDOW_S * 1000;
    const times = (this.byAddress.get(address) ?? []).filter((t) => t > since);
    if (times.length === 0) this.byAddress.delete(address);
    return times;
  }
}

export class NarBridge {
  private readonly received = new ReceivedNars();
  private readonly failedLogins = new FailedLogins();
  readonly server: Server;

  constructor(private readonly options: NarBridgeOptions) {
    // An upload may take longer than Node's default 5-minute request limit; a connection idle for 5 minutes, though, is dropped.
    // Headers, though, must come quickly (requestTimeout 0 would otherwise switch that deadline off too),
    // checked every second; and no client address may hold more than its share of connections.
    this.server = createServer({
      requestTimeout: 0,
      headersTimeout: options.headersTimeoutMs ?? 10_000,
      connectionsCheckingInterval: 1000,
      keepAliveTimeout: 30_000,
    });
    this.server.setTimeout(IDLE_TIMEOUT_MS);
    this.server.maxConnections = options.maxConnections ?? 1024;
    const perClient = options.maxConnectionsPerClient ?? 64;
    const open = new Map<string, number>();
    this.server.on('connection', (socket) => {
      const address = socket.remoteAddress ?? '';
      const count = (open.get(address) ?? 0) + 1;
      if (count > perClient) {
        socket.destroy();
        return;
      }
      open.set(address, count);
      socket.once('close', () => {
        const left = (open.get(address) ?? 1) - 1;
        if (left > 0) open.set(address, left);
        else open.delete(address);
      });
    });
    this.server.on('request', (request, response) => this.dispatch(request, response, false));
    this.server.on('checkContinue', (request, response) => this.dispatch(request, response, true));
    this.server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      // Said, then closed at once: a client that ignores our end of the connection must not keep it.
      const timedOut = err.code === 'ERR_HTTP_REQUEST_TIMEOUT';
      if (socket.writable) socket.write(`HTTP/1.1 ${timedOut ? '408 Request Timeout' : '400 Bad Request'}\r\nConnection: close\r\n\r\n`);
      socket.destroy();
    });
  }

  private dispatch(request: IncomingMessage, response: ServerResponse, expectsContinue: boolean): void {
    const exchange: Exchange = {
      request,
      response,
      expectsContinue,
      bodyRead: false,
      log: { request, remoteAddress: request.socket?.remoteAddress, status: 0, bodyBytes: 0, startedAt: process.hrtime.bigint(), incomplete: false },
    };
    response.once('close', () => {
      exchange.log.status = response.statusCode;
      exchange.log.incomplete = !response.writableFinished;
      const seconds = Number(process.hrtime.bigint() - exchange.log.startedAt) / 1e9;
      countExchange(routeOf(request.method, request.url), response.statusCode, exchange.log.bodyBytes, seconds);
      this.options.accessLog?.(formatAccessLine(exchange.log));
    });
    this.handle(exchange).catch((err: Error) => this.fail(exchange, err));
  }

  private fail(exchange: Exchange, err: Error): void {
    const { response } = exchange;
    let status = 500;
    if (err instanceof BadRequestError) status = err.status;
    else if (err instanceof InvalidInputError || err instanceof DecompressionError) status = 400;
    else if (err instanceof AlreadyExistsError) status = 409; // a registered path does not change
    else if (err instanceof DecompressorMissingError) status = 415;
    else if (isStorageFull(err)) status = 507; // nothing of the upload was kept; the bridge goes on serving
    else if (exchange.request.destroyed && !exchange.bodyRead) status = 400; // the client went away mid-upload
    if (status === 500) this.options.errorLog(`nixcas nar-bridge: ${exchange.request.method} ${exchange.request.url}: ${err.stack ?? err.message}`);
    if (status === 507) this.options.errorLog(`nixcas nar-bridge: ${exchange.request.method} ${exchange.request.url}: ${err.message}`);
    if (response.headersSent) {
      response.destroy(err); // a body cut short: its Content-Length tells the client
      return;
    }
    // A client is told why its request was refused, never the internals of a failure on our side.
    this.send(exchange, status, status === 500 ? 'internal error: see the nar-bridge log\n' : `${err.message}\n`);
  }

  private send(exchange: Exchange, status: number, body: string, headers: Record<string, string | number> = {}): void {
    const { request, response } = exchange;
    if (response.destroyed) return;
    const bytes = Buffer.from(body);
    if (!exchange.bodyRead && request.method === 'PUT' && !request.complete) this.refuseBody(exchange);
    response.writeHead(status, { 'Content-Type': TEXT, 'Content-Length': bytes.length, ...headers });
    if (request.method === 'HEAD') {
      response.end();
      return;
    }
    exchange.log.bodyBytes += bytes.length;
    response.end(bytes);
  }

  /** Answers without reading an upload's body: a small one is drained, a large one ends the connection. */
  private refuseBody(exchange: Exchange): void {
    const length = Number(exchange.request.headers['content-length'] ?? Number.POSITIVE_INFINITY);
    if (!exchange.expectsContinue && length <= DRAIN_LIMIT) exchange.request.resume();
    else exchange.response.setHeader('Connection', 'close');
  }

  private async handle(exchange: Exchange): Promise<void> {
    const { request, response } = exchange;
    const route = parseRoute(request.url ?? '');
    if (!route) return this.send(exchange, 404, 'not found\n');
    const allowed = methodsFor(route);
    if (!allowed.includes(request.method ?? '')) return this.send(exchange, 405, 'method not allowed\n', { Allow: allowed.join(', ') });
    if (request.method === 'PUT') {
      if (!this.authorizeUpload(exchange)) return;
      if (exchange.expectsContinue) response.writeContinue();
      switch (route.kind) {
        case 'narinfo': return this.putNarInfo(exchange, route.hashPart);
        case 'upload': return this.putNar(exchange, route);
        case 'unsupported-compression':
          return this.send(exchange, 415, `NARs compressed as ${route.suffix} are not accepted: upload with compression=none, xz or zstd\n`);
        default: return;
      }
    }
    switch (route.kind) {
      case 'cache-info': return this.send(exchange, 200, this.cacheInfo(), { 'Content-Type': 'text/x-nix-cache-info' });
      case 'narinfo': return this.getNarInfo(exchange, route.digest);
      case 'nar': return this.getNar(exchange, route);
      case 'upload': return this.getUploaded(exchange, route);
      case 'unsupported-compression': return this.send(exchange, 404, 'not found\n');
      case 'castore-directories': return this.getDirectories(exchange, route.digest);
      case 'castore-blob': return this.getBlob(exchange, route.digest);
    }
  }

  private cacheInfo(): string {
    return `StoreDir: ${STORE_DIR}\nWantMassQuery: 1\nPriority: ${this.options.priority}\n`;
  }

  /** False (and the answer sent) when uploads are off or the credentials are missing or wrong. */
  private authorizeUpload(exchange: Exchange): boolean {
    if (!this.options.allowUpload) {
      this.send(exchange, 403, 'uploads are off: start nar-bridge with --allow-upload\n');
      return false;
    }
    const { credentials } = this.options;
    if (!credentials) return true;
    const address = exchange.request.socket?.remoteAddress ?? '';
    if (this.failedLogins.blocked(address)) {
      this.send(exchange, 429, `too many wrong credentials from ${address}: try again in a minute\n`, { 'Retry-After': String(FAILED_LOGIN_WINDOW_S) });
      return false;
    }
    const given = exchange.request.headers.authorization;
    const user = credentials.check(given);
    if (user === undefined) {
      if (given !== undefined) this.failedLogins.add(address); // no credentials at all is a client asking how to log in
      this.send(exchange, 401, 'uploads need valid credentials (HTTP Basic, e.g. from Nix\'s netrc-file)\n', {
        'WWW-Authenticate': 'Basic realm="nixcas nar-bridge", charset="UTF-8"',
      });
      return false;
    }
    exchange.log.user = user;
    return true;
  }

  private signaturesFor(info: PathInfo, storePath: StorePath): Signature[] {
    const key = this.options.signingKey;
    if (!key || info.signatures.some((signature) => signature.name === key.name)) return [];
    return [signFingerprint(key, narInfoFingerprint(storePath, info.narSha256, info.narSize, info.references))];
  }

  private async getNarInfo(exchange: Exchange, digest: Buffer): Promise<void> {
    const info = await this.options.services.pathInfos.get(digest);
    if (!info) return this.send(exchange, 404, 'not found\n');
    const storePath = storePathOf(info);
    const text = formatNarInfo(info, storePath, narUrl(hashPart(storePath), info.narSha256), this.signaturesFor(info, storePath));
    this.send(exchange, 200, text, { 'Content-Type': 'text/x-nix-narinfo' });
  }

  private async getNar(exchange: Exchange, route: Extract<Route, { kind: 'nar' }>): Promise<void> {
    const info = await this.options.services.pathInfos.get(route.digest);
    // The NAR hash in the URL pins the content: a path registered again with other contents is a different URL.
    if (!info || !info.narSha256.equals(route.narSha256)) return this.send(exchange, 404, 'not found\n');
    await this.streamNar(exchange, info.node, info.narSize, info.narSha256);
  }

  /** An uploaded NAR that no narinfo has claimed yet: HEAD tells Nix not to upload it again. */
  private async getUploaded(exchange: Exchange, route: Extract<Route, { kind: 'upload' }>): Promise<void> {
    const nar = this.received.byUpload(route.compression, route.fileSha256);
    if (!nar) return this.send(exchange, 404, 'not found\n');
    if (exchange.request.method === 'HEAD' && route.compression !== 'none') return this.send(exchange, 200, '', { 'Content-Type': 'application/x-nix-nar' });
    if (route.compression !== 'none') return this.send(exchange, 404, 'compressed uploads are stored uncompressed: fetch the URL in the narinfo\n');
    await this.streamNar(exchange, nar.root, nar.narSize, nar.narSha256);
  }

  private async streamNar(exchange: Exchange, root: Node, narSize: number, narSha256: Buffer): Promise<void> {
    const { request, response } = exchange;
    const etag = `"${nixbase32.encode(narSha256)}"`;
    const ifRange = request.headers['if-range'];
    const answer = ifRange !== undefined && ifRange !== etag ? { kind: 'whole' as const } : parseRange(request.headers.range, narSize);
    const headers: Record<string, string | number> = {
      'Content-Type': 'application/x-nix-nar',
      'Accept-Ranges': 'bytes',
      ETag: etag,
      'Cache-Control': IMMUTABLE,
    };
    if (answer.kind === 'unsatisfiable') return this.send(exchange, 416, 'range not satisfiable\n', { ...headers, 'Content-Type': TEXT, 'Content-Range': `bytes */${narSize}` });
    const range = answer.kind === 'partial' ? answer.range : { start: 0, end: narSize };
    if (answer.kind === 'partial') headers['Content-Range'] = `bytes ${range.start}-${range.end - 1}/${narSize}`;
    response.writeHead(answer.kind === 'partial' ? 206 : 200, { ...headers, 'Content-Length': range.end - range.start });
    if (request.method === 'HEAD') return void response.end();

    let sent = 0;
    const count = (bytes: number) => {
      sent += bytes;
      exchange.log.bodyBytes += bytes;
      if (sent > range.end - range.start) throw new Error(`the NAR rendered is longer than the ${narSize} bytes its PathInfo says`);
    };
    const deliver = sendfileDelivery(response, this.options.services.blobs, count);
    const chunks = renderNar(root, this.options.services, { range: answer.kind === 'partial' ? range : undefined, deliver });
    try {
      for await (const chunk of chunks) {
        if (response.destroyed) return; // the client went away; `return` closes the blob readers
        count(chunk.length);
        if (!response.write(chunk)) await drainedOrClosed(response);
      }
    } finally {
      await chunks.return(undefined);
    }
    if (sent !== range.end - range.start) throw new Error(`the NAR rendered is ${sent} bytes, not the ${range.end - range.start} its PathInfo says`);
    response.end();
  }

  /**
   * A directory and every directory below it, root first, each digest once: each as a 4-byte
   * little-endian length and the canonical encoding its BLAKE3 digest is of. The reader checks
   * every one against a digest it already holds (castore/remote-bridge.ts).
   */
  private async getDirectories(exchange: Exchange, digest: Buffer): Promise<void> {
    const { request, response } = exchange;
    const { directories } = this.options.services;
    if (!(await directories.get(digest))) return this.send(exchange, 404, 'not found\n');
    response.writeHead(200, { 'Content-Type': 'application/x-nixcas-directories', 'Cache-Control': IMMUTABLE });
    if (request.method === 'HEAD') return void response.end();
    for await (const directory of directories.getRecursive(digest)) {
      if (response.destroyed) return;
      const encoded = encodeDirectory(directory);
      const frame = Buffer.allocUnsafe(4 + encoded.length);
      frame.writeUInt32LE(encoded.length, 0);
      encoded.copy(frame, 4);
      exchange.log.bodyBytes += frame.length;
      if (!response.write(frame)) await drainedOrClosed(response);
    }
    response.end();
  }

  /** A blob's bytes, read verified. */
  private async getBlob(exchange: Exchange, digest: Buffer): Promise<void> {
    const { request, response } = exchange;
    const { blobs } = this.options.services;
    const stat = await blobs.stat(digest);
    const chunks = stat && request.method !== 'HEAD' ? await blobs.readStream(digest) : undefined;
    if (!stat || (request.method !== 'HEAD' && !chunks)) return this.send(exchange, 404, 'not found\n');
    response.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': stat.size, 'Cache-Control': IMMUTABLE });
    if (!chunks) return void response.end();
    for await (const chunk of chunks) {
      if (response.destroyed) return;
      exchange.log.bodyBytes += chunk.length;
      if (!response.write(chunk)) await drainedOrClosed(response);
    }
    response.end();
  }

  private async readSmallBody(exchange: Exchange, limit: number): Promise<Buffer> {
    const declared = Number(exchange.request.headers['content-length'] ?? 0);
    if (declared > limit) throw new BadRequestError(`the body is ${declared} bytes, more than ${limit}`, 413);
    const chunks: Buffer[] = [];
    let length = 0;
    for await (const chunk of exchange.request) {
      length += (chunk as Buffer).length;
      if (length > limit) throw new BadRequestError(`the body is more than ${limit} bytes`, 413);
      chunks.push(chunk as Buffer);
    }
    exchange.bodyRead = true;
    return Buffer.concat(chunks);
  }

  private async putNar(exchange: Exchange, route: Extract<Route, { kind: 'upload' }>): Promise<void> {
    const nar = await receiveNar(exchange.request, route.compression, route.fileSha256, this.options.services, this.options.maxNarSize ?? DEFAULT_MAX_NAR_SIZE);
    exchange.bodyRead = true;
    this.received.add(route.compression, route.fileSha256, nar);
    this.send(exchange, 200, `received ${nar.narSize} bytes of NAR, ${formatNarHash(nar.narSha256)}\n`);
  }

  private async putNarInfo(exchange: Exchange, urlHashPart: string): Promise<void> {
    const narinfo = parseNarInfo((await this.readSmallBody(exchange, MAX_NARINFO_BYTES)).toString('utf8'));
    const { storePath } = narinfo;
    const fail = (why: string): never => {
      throw new BadRequestError(`${formatStorePath(storePath)}: ${why}`);
    };
    if (hashPart(storePath) !== urlHashPart) fail(`the narinfo is for ${hashPart(storePath)}, but was uploaded to ${urlHashPart}.narinfo`);
    const { pathInfos } = this.options.services;
    const existing = await pathInfos.get(storePath.digest);
    const sameNar = existing && existing.narSha256.equals(narinfo.narSha256) && existing.narSize === narinfo.narSize;
    const nar = this.received.byHash(narinfo.narSha256);
    let root: Node;
    if (nar) {
      if (nar.narSize !== narinfo.narSize) fail(`NarSize is ${narinfo.narSize}, but the NAR with NarHash ${formatNarHash(narinfo.narSha256)} is ${nar.narSize} bytes`);
      if (nar.references.overflowed) {
        this.options.errorLog(`nixcas nar-bridge: ${formatStorePath(storePath)}: its NAR has too much nixbase32 text to keep; its references are not checked against it`);
      }
      for (const reference of narinfo.references) {
        if (nar.references.contains(hashPart(reference)) === false) {
          fail(`References lists ${formatBasename(reference)}, but the NAR does not contain its hash part`);
        }
      }
      root = nar.root;
    } else if (existing && sameNar) {
      root = existing.node; // a narinfo sent again, e.g. to add signatures
    } else {
      return fail(`no NAR with NarHash ${formatNarHash(narinfo.narSha256)} has been uploaded: PUT it to /nar/${nixbase32.encode(narinfo.narSha256)}.nar first`);
    }
    if (existing && !sameNar) {
      throw new AlreadyExistsError(`${formatStorePath(storePath)}: the store already has this path with a different NAR; a registered path does not change`);
    }
    for (const reference of narinfo.references) {
      if (reference.digest.equals(storePath.digest)) continue;
      if (!(await pathInfos.get(reference.digest))) fail(`its reference ${formatStorePath(reference)} is not in the store: upload a path's references before the path`);
    }
    const signatures = [...(sameNar ? existing!.signatures : [])];
    for (const signature of narinfo.signatures) {
      if (!signatures.some((kept) => kept.name === signature.name && kept.data.equals(signature.data))) signatures.push(signature);
    }
    await pathInfos.put({
      node: withName(root, Buffer.from(formatBasename(storePath))),
      references: narinfo.references,
      narSize: narinfo.narSize,
      narSha256: narinfo.narSha256,
      signatures,
      deriver: narinfo.deriver,
      ca: narinfo.ca,
    });
    this.send(exchange, 200, `registered ${formatStorePath(storePath)}\n`);
  }
}
