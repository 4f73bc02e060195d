// Closure descriptions Nix writes: the `exportReferencesGraph` entries of a
// structured-attrs `.attrs.json`, and `nix path-info --json --recursive`
// output (a list in Nix ≤ 2.18, an object keyed by path since).
import { InvalidInputError } from '../castore/errors.js';
import * as nixbase32 from './nixbase32.js';
import type { CaHashType, ContentAddress, Signature } from './pathinfo.js';
import { type StorePath, formatStorePath, parseStorePath } from './storepath.js';

export interface ClosureEntry {
  path: StorePath;
  narSha256: Buffer;
  narSize: number;
  references: StorePath[];
  signatures: Signature[];
  deriver?: StorePath;
  ca?: ContentAddress;
}

const HASH_LENGTHS: Record<string, number> = { md5: 16, sha1: 20, sha256: 32, sha512: 64 };

/** Parses a Nix hash: `algo:<nixbase32|hex|base64>` or SRI `algo-<base64>`. */
export function parseNixHash(text: string, expectedAlgorithm?: string): { algorithm: string; digest: Buffer } {
  const match = /^(md5|sha1|sha256|sha512)([:-])(.+)$/.exec(text);
  if (!match) throw new InvalidInputError(`${JSON.stringify(text)} is not a Nix hash (sha256:… or sha256-…)`);
  const [, algorithm, separator, body] = match as unknown as [string, string, string, string];
  const length = HASH_LENGTHS[algorithm]!;
  let digest: Buffer | undefined;
  if (separator === '-') digest = Buffer.from(body, 'base64');
  else if (body.length === length * 2 && /^[0-9a-f]+$/.test(body)) digest = Buffer.from(body, 'hex');
  else if (body.length === nixbase32.encodedLength(length)) digest = nixbase32.decode(body);
  else digest = Buffer.from(body, 'base64');
  if (digest.length !== length) throw new InvalidInputError(`${JSON.stringify(text)}: not a ${algorithm} digest`);
  if (expectedAlgorithm && algorithm !== expectedAlgorithm) {
    throw new InvalidInputError(`${JSON.stringify(text)}: expected a ${expectedAlgorithm} hash`);
  }
  return { algorithm, digest };
}

/** Parses Nix's textual content address (fixed:r:sha256:…, fixed:sha256:…, text:sha256:…). */
export function parseContentAddress(text: string): ContentAddress {
  const recursive = text.startsWith('fixed:r:');
  const match = /^(text|fixed):(?:r:)?(.+)$/.exec(text);
  if (!match) throw new InvalidInputError(`${JSON.stringify(text)} is not a content address`);
  const { algorithm, digest } = parseNixHash(match[2]!);
  const mode = match[1] === 'text' ? 'TEXT' : recursive ? 'NAR' : 'FLAT';
  const type = `${mode}_${algorithm.toUpperCase()}` as CaHashType;
  if (mode === 'TEXT' && algorithm !== 'sha256') throw new InvalidInputError(`${JSON.stringify(text)}: text content addresses are sha256`);
  return { type, digest };
}

/** Parses `<key name>:<base64 signature>`. */
export function parseSignature(text: string): Signature {
  const colon = text.indexOf(':');
  const data = Buffer.from(text.slice(colon + 1), 'base64');
  if (colon <= 0 || data.length !== 64) throw new InvalidInputError(`${JSON.stringify(text)} is not a Nix signature (name:base64 of 64 bytes)`);
  return { name: text.slice(0, colon), data };
}

function looksLikeEntry(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && 'narHash' in value;
}

function entryFrom(raw: Record<string, unknown>, pathFromKey?: string): ClosureEntry {
  const pathText = (raw.path as string | undefined) ?? pathFromKey;
  if (typeof pathText !== 'string') throw new InvalidInputError(`closure entry without a path: ${JSON.stringify(raw).slice(0, 200)}`);
  try {
    const path = parseStorePath(pathText);
    const narSize = raw.narSize;
    if (typeof narSize !== 'number' || !Number.isSafeInteger(narSize) || narSize < 0) throw new InvalidInputError(`narSize ${JSON.stringify(narSize)} is not a size`);
    if (typeof raw.narHash !== 'string') throw new InvalidInputError('narHash is missing');
    const references = raw.references ?? [];
    if (!Array.isArray(references)) throw new InvalidInputError('references is not a list');
    const signatures = raw.signatures ?? [];
    if (!Array.isArray(signatures)) throw new InvalidInputError('signatures is not a list');
    let deriver: StorePath | undefined;
    if (typeof raw.deriver === 'string' && raw.deriver) {
      const drv = parseStorePath(raw.deriver);
      deriver = { digest: drv.digest, name: drv.name.replace(/\.drv$/, '') };
    }
    return {
      path,
      narSha256: parseNixHash(raw.narHash, 'sha256').digest,
      narSize,
      references: references.map((r) => parseStorePath(String(r))),
      signatures: signatures.map((s) => parseSignature(String(s))),
      deriver,
      ca: typeof raw.ca === 'string' && raw.ca ? parseContentAddress(raw.ca) : undefined,
    };
  } catch (err) {
    throw err instanceof InvalidInputError ? err : new InvalidInputError((err as Error).message);
  }
}

export interface ParsedClosure {
  entries: ClosureEntry[];
  /** Entries that could not be parsed, by the path they name (or their position). */
  problems: { path: string; error: Error }[];
}

/**
 * The entries of a closure description, each path once. Accepts a
 * structured-attrs file (every top-level list of entries is taken), a
 * path-info list, or a path-info object keyed by path. An entry that does
 * not parse is reported in `problems` and does not stop the others.
 */
export function parseClosure(json: unknown): ParsedClosure {
  const raws: { raw: Record<string, unknown>; key?: string }[] = [];
  const take = (list: unknown[]) => {
    for (const item of list) if (looksLikeEntry(item)) raws.push({ raw: item });
  };
  if (Array.isArray(json)) {
    take(json);
  } else if (typeof json === 'object' && json !== null) {
    for (const [key, value] of Object.entries(json)) {
      if (Array.isArray(value)) take(value);
      else if (looksLikeEntry(value) && key.startsWith('/')) raws.push({ raw: value, key });
    }
  }
  if (raws.length === 0) {
    throw new InvalidInputError('no closure entries found: expected exportReferencesGraph entries or `nix path-info --json` output');
  }
  const byPath = new Map<string, ClosureEntry>();
  const problems: ParsedClosure['problems'] = [];
  for (const [index, { raw, key }] of raws.entries()) {
    try {
      const entry = entryFrom(raw, key);
      byPath.set(formatStorePath(entry.path), entry);
    } catch (err) {
      const named = (raw.path as string | undefined) ?? key;
      problems.push({ path: typeof named === 'string' ? named : `entry #${index}`, error: err as Error });
    }
  }
  return { entries: [...byPath.values()], problems };
}
