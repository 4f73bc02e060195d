// A Nix binary cache as a substituter reads it: `<hash>.narinfo` and the NAR
// file its URL names, over http(s):// or from a file:// directory (what
// `nix copy --to file://…` writes). Every request is bounded in time: an
// upstream that is down, refuses or stalls fails the request with an error
// naming the upstream, and never holds anything else up.
//
// HTTP goes through node:http, not fetch: undici and its web streams took
// ~170 ms of a 200 MB copy's main thread, node:http ~50 ms (docs/benchmarks.md).
import { createReadStream } from 'node:fs';
import { type IncomingMessage, request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { pipeline } from 'node:stream';
import { createBrotliDecompress, createGunzip, createInflate } from 'node:zlib';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { InvalidNarInfoError, type NarInfo, parseNarInfo } from './narinfo.js';
import { PlainHttpFallback, PlainHttpTimeout, plainHttpBody } from './http-body.js';

/** A narinfo larger than this is not one. */
const MAX_NARINFO_BYTES = 1 << 20;

export class UpstreamError extends Error {}

export interface BinaryCacheOptions {
  /** How long a narinfo request, the start of a NAR and any pause inside one may take, in ms. */
  timeoutMs: number;
}

export class BinaryCache {
  /** The cache URL without a trailing slash, as the user gave it. */
  readonly url: string;
  private readonly base: URL;

  constructor(url: string, private readonly options: BinaryCacheOptions) {
    let parsed: URL;
    try {
      parsed = new URL(url.replace(/\/+$/, '') + '/');
    } catch {
      throw new UpstreamError(`${url}: not a URL (a substituter is http://, https:// or file://)`);
    }
    if (!['http:', 'https:', 'file:'].includes(parsed.protocol)) {
      throw new UpstreamError(`${url}: a substituter is http://, https:// or file://, not ${parsed.protocol}//`);
    }
    if (parsed.search || parsed.hash) throw new UpstreamError(`${url}: a substituter URL takes no query or fragment`);
    this.url = url.replace(/\/+$/, '');
    this.base = parsed;
  }

  /** The narinfo for a hash part, or undefined when the cache does not have it (404, 403, no such file). */
  async narInfo(hashPart: string): Promise<NarInfo | undefined> {
    const url = new URL(`${hashPart}.narinfo`, this.base);
    const text = await this.fetchText(url);
    if (text === undefined) return undefined;
    try {
      return parseNarInfo(text);
    } catch (err) {
      if (err instanceof InvalidNarInfoError) throw new UpstreamError(`${url.href}: ${err.message}`);
      throw err;
    }
  }

  /** The NAR file a narinfo's URL names (relative to the cache), as it is stored (maybe compressed). */
  nar(narUrl: string): { url: string; body: AsyncIterable<Uint8Array> } {
    const url = new URL(narUrl, this.base);
    if (url.protocol !== this.base.protocol || url.host !== this.base.host) {
      throw new UpstreamError(`${this.url}: a narinfo's URL ${JSON.stringify(narUrl)} points outside the cache`);
    }
    const body = this.base.protocol === 'file:' ? fileBody(url) : url.protocol === 'http:' && !url.username && !url.password && process.env.NIXCAS_PLAIN_HTTP !== '0' ? this.plainHttpBody(url) : this.httpBody(url);
    return { url: url.href, body };
  }

  /** Whether the cache may serve castore objects (a nixcas nar-bridge does, over http(s)). */
  get servesCastore(): boolean {
    return this.base.protocol !== 'file:';
  }

  /** A castore object of a nixcas nar-bridge: castore/directories/<hex> or castore/blob/<hex>. */
  castore(path: string): AsyncIterable<Uint8Array> {
    return this.httpBody(new URL(`castore/${path}`, this.base));
  }

  private async fetchText(url: URL): Promise<string | undefined> {
    if (url.protocol === 'file:') {
      try {
        const bytes = await readFile(fileURLToPath(url));
        if (bytes.length > MAX_NARINFO_BYTES) throw new UpstreamError(`${url.href}: larger than ${MAX_NARINFO_BYTES} bytes: not a narinfo`);
        return bytes.toString('utf8');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
        throw err instanceof UpstreamError ? err : new UpstreamError(`${url.href}: ${(err as Error).message}`);
      }
    }
    let response: IncomingMessage | undefined;
    try {
      response = await httpGet(url, this.options.timeoutMs);
      if (response.statusCode === 404 || response.statusCode === 403) {
        // Read to its end (if short), so that the connection can be used again.
        let length = 0;
        for await (const chunk of response as AsyncIterable<Buffer>) if ((length += chunk.length) > MAX_NARINFO_BYTES) break;
        return undefined;
      }
      if (!ok(response)) throw new UpstreamError(`${url.href}: HTTP ${response.statusCode} ${response.statusMessage}`);
      const declared = Number(response.headers['content-length'] ?? 0);
      if (declared > MAX_NARINFO_BYTES) throw new UpstreamError(`${url.href}: ${declared} bytes is not a narinfo`);
      const chunks: Buffer[] = [];
      let length = 0;
      for await (const chunk of decodedBody(response, url)) {
        length += chunk.length;
        if (length > MAX_NARINFO_BYTES) throw new UpstreamError(`${url.href}: larger than ${MAX_NARINFO_BYTES} bytes: not a narinfo`);
        chunks.push(chunk);
      }
      return Buffer.concat(chunks).toString('utf8');
    } catch (err) {
      throw upstreamError(url.href, response && stalled.has(response) ? new NoAnswerError() : err, this.options.timeoutMs);
    } finally {
      response?.destroy(); // a no-op once the body was read to its end
    }
  }

  /**
   * A NAR's body over plain HTTP read into lent slabs (http-body.ts); through node:http when the
   * answer is not a plain 200 body, and for a URL with credentials (node:http sends them).
   * NIXCAS_PLAIN_HTTP=0 always uses node:http (to measure it).
   */
  private async *plainHttpBody(url: URL): AsyncGenerator<Uint8Array> {
    let started = false;
    try {
      for await (const view of plainHttpBody(url, this.options.timeoutMs)) {
        started = true;
        yield view;
      }
    } catch (err) {
      if (err instanceof PlainHttpFallback && !started) {
        yield* this.httpBody(url);
        return;
      }
      throw upstreamError(url.href, err instanceof PlainHttpTimeout ? new NoAnswerError() : err, this.options.timeoutMs);
    }
  }

  /** The body of a GET; the time to its headers and every pause inside it are bounded by the timeout. */
  private async *httpBody(url: URL): AsyncGenerator<Uint8Array> {
    let response: IncomingMessage | undefined;
    try {
      response = await httpGet(url, this.options.timeoutMs);
      if (!ok(response)) throw new UpstreamError(`${url.href}: HTTP ${response.statusCode} ${response.statusMessage}`);
      yield* decodedBody(response, url);
    } catch (err) {
      throw upstreamError(url.href, response && stalled.has(response) ? new NoAnswerError() : err, this.options.timeoutMs);
    } finally {
      response?.destroy(); // a body left unread (an early error) is not kept open
    }
  }
}

/** The upstream took longer than the timeout to answer, or paused longer inside a body. */
class NoAnswerError extends Error {}

/** Responses whose body paused past the timeout (the body then fails with a plain "aborted"). */
const stalled = new WeakSet<IncomingMessage>();

const MAX_REDIRECTS = 20;

/**
 * The body with its Content-Encoding undone. node:http asks for none, but a
 * cache on S3 may store narinfos compressed (Nix's `narinfo-compression`)
 * and serve them with the header set whatever was asked; Nix decodes them.
 */
function decodedBody(response: IncomingMessage, url: URL): AsyncIterable<Buffer> {
  const encoding = String(response.headers['content-encoding'] ?? '').trim().toLowerCase();
  if (encoding === '' || encoding === 'identity') return response;
  const decoder = encoding === 'gzip' || encoding === 'x-gzip' ? createGunzip() : encoding === 'deflate' ? createInflate() : encoding === 'br' ? createBrotliDecompress() : undefined;
  if (!decoder) throw new UpstreamError(`${url.href}: Content-Encoding ${JSON.stringify(encoding)} is not supported (gzip, deflate and br are)`);
  pipeline(response, decoder, () => {}); // a failure of either side fails the decoder's iteration
  return decoder;
}

function ok(response: IncomingMessage): boolean {
  return response.statusCode !== undefined && response.statusCode >= 200 && response.statusCode < 300;
}

/**
 * GETs `url`, following redirects, and resolves once the headers are in.
 * The socket's timeout bounds connecting, the wait for the headers and every
 * pause in the body that follows: the response then fails with a NoAnswerError.
 */
async function httpGet(url: URL, timeoutMs: number): Promise<IncomingMessage> {
  for (let redirects = 0; ; redirects++) {
    const response = await new Promise<IncomingMessage>((resolve, reject) => {
      let answer: IncomingMessage | undefined;
      // `timeout` (unlike setTimeout() after the fact) also bounds connecting, instead of the agent's own 5 s.
      const request = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, { method: 'GET', timeout: timeoutMs }, (response) => resolve((answer = response)));
      request.on('timeout', () => {
        if (answer) stalled.add(answer);
        request.destroy(new NoAnswerError());
      });
      request.on('error', reject);
      request.end();
    });
    const location = response.headers.location;
    if (!location || ![301, 302, 303, 307, 308].includes(response.statusCode ?? 0)) return response;
    response.destroy();
    if (redirects === MAX_REDIRECTS) throw new UpstreamError(`${url.href}: more than ${MAX_REDIRECTS} redirects`);
    const next = new URL(location, url);
    if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new UpstreamError(`${url.href}: redirected to ${next.protocol}//, which is not HTTP`);
    url = next;
  }
}

async function* fileBody(url: URL): AsyncGenerator<Uint8Array> {
  try {
    yield* createReadStream(fileURLToPath(url)) as AsyncIterable<Buffer>;
  } catch (err) {
    throw new UpstreamError(`${url.href}: ${(err as Error).message}`);
  }
}

function upstreamError(url: string, err: unknown, timeoutMs: number): Error {
  if (err instanceof UpstreamError) return err;
  const e = err as Error & { cause?: Error & { code?: string } };
  if (err instanceof NoAnswerError) return new UpstreamError(`${url}: no answer within ${timeoutMs / 1000} s`);
  const cause = e.cause?.code ?? e.cause?.message;
  return new UpstreamError(`${url}: ${cause ? `${e.message} (${cause})` : e.message}`);
}
