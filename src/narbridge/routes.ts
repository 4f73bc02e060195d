// The URLs nar-bridge answers, parsed strictly: anything that is not exactly
// one of these shapes is refused before it reaches the store, so there is
// nothing to traverse and nothing to escape.
import { InvalidInputError } from '../castore/errors.js';
import * as nixbase32 from '../store/nixbase32.js';

export type Compression = 'none' | 'xz' | 'zstd';

/** File name suffix → compression, as Nix names uploaded NARs (nar/<file hash>.nar<suffix>). */
const SUFFIXES: Record<string, Compression> = { '': 'none', '.xz': 'xz', '.zst': 'zstd' };

export type Route =
  | { kind: 'cache-info' }
  | { kind: 'narinfo'; hashPart: string; digest: Buffer }
  /** The NAR of a registered path, as the narinfos we serve name it: nar/<hash part>/<nar hash>.nar. */
  | { kind: 'nar'; hashPart: string; digest: Buffer; narSha256: Buffer }
  /** An uploaded NAR file, by the SHA-256 of its (maybe compressed) bytes: nar/<file hash>.nar[.xz|.zst]. */
  | { kind: 'upload'; fileSha256: Buffer; compression: Compression }
  | { kind: 'unsupported-compression'; suffix: string }
  /** castore objects by BLAKE3 digest, for another nixcas that fetches only what it lacks: castore/directories/<hex> is a directory's closure, castore/blob/<hex> a blob. */
  | { kind: 'castore-directories'; digest: Buffer }
  | { kind: 'castore-blob'; digest: Buffer };

export class BadRequestError extends Error {
  constructor(message: string, readonly status = 400) {
    super(message);
  }
}

const HASH_PART = '[0-9a-df-np-sv-z]{32}';
const NAR_HASH = '[0-9a-df-np-sv-z]{52}';
const NARINFO = new RegExp(`^/(${HASH_PART})\\.narinfo$`);
const REGISTERED_NAR = new RegExp(`^/nar/(${HASH_PART})/(${NAR_HASH})\\.nar$`);
const UPLOADED_NAR = new RegExp(`^/nar/(${NAR_HASH})\\.nar(\\.[a-z0-9]+)?$`);
const CASTORE = /^\/castore\/(directories|blob)\/([0-9a-f]{64})$/;

/** The route for a request target (path and query), or undefined when there is none (404). */
export function parseRoute(target: string): Route | undefined {
  try {
    return routeOf(target);
  } catch (err) {
    if (err instanceof InvalidInputError) throw new BadRequestError((err as Error).message); // a hash with bits beyond its length
    throw err;
  }
}

function routeOf(target: string): Route | undefined {
  const query = target.indexOf('?');
  const path = query === -1 ? target : target.slice(0, query);
  if (path.includes('%') || path.includes('..') || path.includes('//') || path.includes('\\')) {
    throw new BadRequestError(`malformed path ${JSON.stringify(path.slice(0, 200))}`);
  }
  if (path === '/nix-cache-info') return { kind: 'cache-info' };
  let match = NARINFO.exec(path);
  if (match) return { kind: 'narinfo', hashPart: match[1]!, digest: nixbase32.decode(match[1]!) };
  match = REGISTERED_NAR.exec(path);
  if (match) return { kind: 'nar', hashPart: match[1]!, digest: nixbase32.decode(match[1]!), narSha256: nixbase32.decode(match[2]!) };
  match = UPLOADED_NAR.exec(path);
  if (match) {
    const suffix = match[2] ?? '';
    const compression = SUFFIXES[suffix];
    if (!compression) return { kind: 'unsupported-compression', suffix };
    return { kind: 'upload', fileSha256: nixbase32.decode(match[1]!), compression };
  }
  match = CASTORE.exec(path);
  if (match) return { kind: match[1] === 'blob' ? 'castore-blob' : 'castore-directories', digest: Buffer.from(match[2]!, 'hex') };
  return undefined;
}

/** The URL a served narinfo names for the NAR of `hashPart`. */
export function narUrl(hashPart: string, narSha256: Buffer): string {
  return `nar/${hashPart}/${nixbase32.encode(narSha256)}.nar`;
}
