// A Nix binary cache as a substituter reads it: `<hash>.narinfo` and the NAR
// file its URL names, over http(s):// or from a file:// directory (what
// `nix copy --to file://…` writes). Every request is bounded in time: an
// upstream that is down, refuses or stalls fails the request with an error
// naming the upstream, and never holds anything else up.
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { InvalidNarInfoError, type NarInfo, parseNarInfo } from './narinfo.js';

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
    return { url: url.href, body: this.base.protocol === 'file:' ? fileBody(url) : this.httpBody(url) };
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
    const signal = AbortSignal.timeout(this.options.timeoutMs);
    try {
      const response = await fetch(url, { signal, redirect: 'follow' });
      if (response.status === 404 || response.status === 403) {
        await response.body?.cancel();
        return undefined;
      }
      if (!response.ok) {
        await response.body?.cancel();
        throw new UpstreamError(`${url.href}: HTTP ${response.status} ${response.statusText}`);
      }
      const declared = Number(response.headers.get('content-length') ?? 0);
      if (declared > MAX_NARINFO_BYTES) {
        await response.body?.cancel();
        throw new UpstreamError(`${url.href}: ${declared} bytes is not a narinfo`);
      }
      let text = '';
      for await (const chunk of response.body ?? []) {
        text += Buffer.from(chunk).toString('utf8');
        if (text.length > MAX_NARINFO_BYTES) throw new UpstreamError(`${url.href}: larger than ${MAX_NARINFO_BYTES} bytes: not a narinfo`);
      }
      return text;
    } catch (err) {
      throw upstreamError(url.href, err, this.options.timeoutMs);
    }
  }

  /** The body of a GET; the time to its headers and every pause inside it are bounded by the timeout. */
  private async *httpBody(url: URL): AsyncGenerator<Uint8Array> {
    const controller = new AbortController();
    let timer = setTimeout(() => controller.abort(), this.options.timeoutMs);
    const rearm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => controller.abort(), this.options.timeoutMs);
    };
    try {
      const response = await fetch(url, { signal: controller.signal, redirect: 'follow' });
      if (!response.ok) {
        await response.body?.cancel();
        throw new UpstreamError(`${url.href}: HTTP ${response.status} ${response.statusText}`);
      }
      for await (const chunk of response.body ?? []) {
        rearm();
        yield chunk;
      }
    } catch (err) {
      throw upstreamError(url.href, err, this.options.timeoutMs);
    } finally {
      clearTimeout(timer);
      controller.abort(); // a body left unread (an early error) is not kept open
    }
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
  if (e.name === 'TimeoutError' || e.name === 'AbortError') return new UpstreamError(`${url}: no answer within ${timeoutMs / 1000} s`);
  const cause = e.cause?.code ?? e.cause?.message;
  return new UpstreamError(`${url}: ${cause ? `${e.message} (${cause})` : e.message}`);
}
