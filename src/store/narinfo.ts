// narinfo: the text a Nix binary cache serves for each store path, and the
// signature fingerprint Nix computes from it.
import { InvalidInputError } from '../castore/errors.js';
import { parseContentAddress, parseNixHash, parseSignature } from './closure.js';
import * as nixbase32 from './nixbase32.js';
import type { ContentAddress, PathInfo, Signature } from './pathinfo.js';
import { type StorePath, formatBasename, formatStorePath, parseBasename, parseStorePath, storePathNameProblem } from './storepath.js';

export class InvalidNarInfoError extends InvalidInputError {}

/** A narinfo as parsed: the facts of one path plus where its (maybe compressed) NAR lives. */
export interface NarInfo {
  storePath: StorePath;
  url: string;
  compression: string;
  fileSha256?: Buffer;
  fileSize?: number;
  narSha256: Buffer;
  narSize: number;
  references: StorePath[];
  /** As PathInfo keeps it: the .drv suffix left off the name. */
  deriver?: StorePath;
  signatures: Signature[];
  ca?: ContentAddress;
  /**
   * nixcas's own line, `CastoreDirectory: <hex BLAKE3>`: the path's root directory in the
   * serving store's castore, so that another nixcas can fetch only the objects it lacks
   * (castore/directories/… and castore/blob/… on the same bridge). Not signed: what is fetched
   * through it is checked against the signed NarHash before it is registered.
   */
  castoreDirectory?: Buffer;
}

/** `sha256:<nixbase32>`, the form Nix writes in narinfos and fingerprints. */
export function formatNarHash(sha256: Buffer): string {
  return `sha256:${nixbase32.encode(sha256)}`;
}

/** Nix's textual content address: fixed:r:sha256:…, fixed:sha256:…, text:sha256:…. */
export function formatContentAddress(ca: ContentAddress): string {
  const [mode, algorithm] = ca.type.split('_') as [string, string];
  const prefix = mode === 'TEXT' ? 'text:' : mode === 'NAR' ? 'fixed:r:' : 'fixed:';
  return `${prefix}${algorithm.toLowerCase()}:${nixbase32.encode(ca.digest)}`;
}

export function formatSignature(signature: Signature): string {
  return `${signature.name}:${signature.data.toString('base64')}`;
}

function derivationPath(deriver: StorePath): StorePath {
  return { digest: deriver.digest, name: `${deriver.name}.drv` };
}

/**
 * The text served for `info`. The NAR is always served uncompressed, and
 * `Compression: none` is always written: Nix reads a missing Compression as
 * bzip2.
 */
export function formatNarInfo(info: PathInfo, storePath: StorePath, url: string, extraSignatures: Signature[] = []): string {
  const lines = [
    `StorePath: ${formatStorePath(storePath)}`,
    `URL: ${url}`,
    'Compression: none',
    `NarHash: ${formatNarHash(info.narSha256)}`,
    `NarSize: ${info.narSize}`,
    `References: ${info.references.map(formatBasename).sort().join(' ')}`,
  ];
  if (info.deriver) lines.push(`Deriver: ${formatBasename(derivationPath(info.deriver))}`);
  for (const signature of [...info.signatures, ...extraSignatures]) lines.push(`Sig: ${formatSignature(signature)}`);
  if (info.ca) lines.push(`CA: ${formatContentAddress(info.ca)}`);
  if (info.node.kind === 'directory') lines.push(`CastoreDirectory: ${info.node.node.digest.toString('hex')}`);
  return lines.join('\n') + '\n';
}

/**
 * What Nix signs: `1;<store path>;sha256:<nix32 NAR hash>;<NAR size>;<sorted
 * full reference paths, comma-separated>`.
 */
export function narInfoFingerprint(storePath: StorePath, narSha256: Buffer, narSize: number, references: StorePath[]): string {
  const refs = references.map(formatStorePath).sort().join(',');
  return `1;${formatStorePath(storePath)};${formatNarHash(narSha256)};${narSize};${refs}`;
}

function parseSize(text: string, key: string): number {
  if (!/^[0-9]{1,16}$/.test(text) || !Number.isSafeInteger(Number(text))) throw new InvalidNarInfoError(`${key} ${JSON.stringify(text)} is not a size`);
  return Number(text);
}

/** Parses narinfo text strictly enough that nothing malformed is registered. */
export function parseNarInfo(text: string): NarInfo {
  const fields = new Map<string, string>();
  const signatures: Signature[] = [];
  for (const [index, line] of text.split('\n').entries()) {
    if (line === '') continue;
    const colon = line.indexOf(': ');
    if (colon <= 0) throw new InvalidNarInfoError(`narinfo line ${index + 1} is not "Key: value": ${JSON.stringify(line.slice(0, 100))}`);
    const key = line.slice(0, colon);
    const value = line.slice(colon + 2);
    if (key === 'Sig') {
      try {
        signatures.push(parseSignature(value));
      } catch (err) {
        throw new InvalidNarInfoError(`narinfo Sig: ${(err as Error).message}`);
      }
      continue;
    }
    if (fields.has(key)) throw new InvalidNarInfoError(`narinfo has ${key} twice`);
    fields.set(key, value);
  }
  const required = (key: string): string => {
    const value = fields.get(key);
    if (value === undefined) throw new InvalidNarInfoError(`narinfo has no ${key}`);
    return value;
  };
  const field = <T>(key: string, parse: (value: string) => T): T => {
    try {
      return parse(required(key));
    } catch (err) {
      if (err instanceof InvalidNarInfoError) throw err;
      throw new InvalidNarInfoError(`narinfo ${key}: ${(err as Error).message}`);
    }
  };
  const optional = <T>(key: string, parse: (value: string) => T): T | undefined => (fields.has(key) ? field(key, parse) : undefined);

  const storePath = field('StorePath', parseStorePath);
  const url = required('URL');
  if (url.length === 0 || /[\s]/.test(url)) throw new InvalidNarInfoError(`narinfo URL ${JSON.stringify(url)} is empty or has spaces`);
  const references = field('References', (value) => (value === '' ? [] : value.split(' ').map(parseBasename)));
  const deriver = optional('Deriver', (value) => {
    if (!value.endsWith('.drv')) throw new Error(`${JSON.stringify(value)} is not a .drv`);
    const drv = parseBasename(value);
    const name = drv.name.slice(0, -'.drv'.length);
    const problem = storePathNameProblem(name);
    if (problem) throw new Error(problem);
    return { digest: drv.digest, name };
  });
  return {
    storePath,
    url,
    compression: fields.get('Compression') ?? 'bzip2',
    fileSha256: optional('FileHash', (value) => parseNixHash(value, 'sha256').digest),
    fileSize: optional('FileSize', (value) => parseSize(value, 'FileSize')),
    narSha256: field('NarHash', (value) => parseNixHash(value, 'sha256').digest),
    narSize: field('NarSize', (value) => parseSize(value, 'NarSize')),
    references,
    deriver,
    signatures,
    ca: optional('CA', parseContentAddress),
    castoreDirectory: optional('CastoreDirectory', (value) => {
      if (!/^[0-9a-f]{64}$/.test(value)) throw new Error(`${JSON.stringify(value.slice(0, 100))} is not a hex BLAKE3 digest`);
      return Buffer.from(value, 'hex');
    }),
  };
}
