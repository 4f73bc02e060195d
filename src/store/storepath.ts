// Store paths: /nix/store/<nixbase32 of 20 bytes>-<name>, and how Nix
// computes them for content-addressed ("source") paths.
import { createHash } from 'node:crypto';
import { InvalidInputError } from '../castore/errors.js';
import * as nixbase32 from './nixbase32.js';

export const STORE_DIR = '/nix/store';
export const HASH_PART_BYTES = 20;
export const HASH_PART_LENGTH = nixbase32.encodedLength(HASH_PART_BYTES); // 32
export const MAX_NAME_LENGTH = 211;

export class InvalidStorePathError extends InvalidInputError {}

/** A parsed store path: the 20-byte digest of its hash part, and its name. */
export interface StorePath {
  digest: Buffer;
  name: string;
}

const NAME_CHARACTERS = /^[A-Za-z0-9+\-._?=]+$/;

/** Why `name` cannot be a store path name, or undefined. Nix's rules (path.cc). */
export function storePathNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'the name is empty';
  if (name.length > MAX_NAME_LENGTH) return `the name is longer than ${MAX_NAME_LENGTH} characters`;
  if (!NAME_CHARACTERS.test(name)) {
    const bad = [...name].find((c) => !NAME_CHARACTERS.test(c))!;
    return `the name contains ${JSON.stringify(bad)}, allowed are A-Z a-z 0-9 and + - . _ ? =`;
  }
  if (name === '.' || name === '..') return `the name is ${JSON.stringify(name)}`;
  return undefined;
}

/** Parses `<hash>-<name>` (a store path's basename). */
export function parseBasename(basename: string): StorePath {
  const hashPart = basename.slice(0, HASH_PART_LENGTH);
  if (basename.length < HASH_PART_LENGTH + 2 || basename[HASH_PART_LENGTH] !== '-') {
    throw new InvalidStorePathError(`${JSON.stringify(basename)} is not a store path basename (<32-character hash>-<name>)`);
  }
  if (!nixbase32.isNixbase32(hashPart)) {
    throw new InvalidStorePathError(`${JSON.stringify(basename)}: the hash part is not nixbase32`);
  }
  const name = basename.slice(HASH_PART_LENGTH + 1);
  const problem = storePathNameProblem(name);
  if (problem) throw new InvalidStorePathError(`${JSON.stringify(basename)}: ${problem}`);
  return { digest: nixbase32.decode(hashPart), name };
}

/** Parses an absolute store path, /nix/store/<hash>-<name>, with nothing after it. */
export function parseStorePath(path: string): StorePath {
  const prefix = STORE_DIR + '/';
  if (!path.startsWith(prefix)) throw new InvalidStorePathError(`${JSON.stringify(path)} is not in ${STORE_DIR}`);
  const basename = path.slice(prefix.length);
  if (basename.includes('/')) throw new InvalidStorePathError(`${JSON.stringify(path)} is inside a store path, not a store path`);
  return parseBasename(basename);
}

export function hashPart(path: StorePath): string {
  return nixbase32.encode(path.digest);
}

export function formatBasename(path: StorePath): string {
  return `${hashPart(path)}-${path.name}`;
}

export function formatStorePath(path: StorePath): string {
  return `${STORE_DIR}/${formatBasename(path)}`;
}

/** Folds a hash to `size` bytes by XOR, as Nix's compressHash does. */
export function compressHash(hash: Uint8Array, size: number): Buffer {
  const out = Buffer.alloc(size);
  for (let i = 0; i < hash.length; i++) out[i % size] ^= hash[i];
  return out;
}

/**
 * Nix's makeStorePath: the path for a fingerprint
 * `<type>:sha256:<hex of innerHash>:/nix/store:<name>`.
 */
export function makeStorePath(type: string, innerSha256: Uint8Array, name: string): StorePath {
  const problem = storePathNameProblem(name);
  if (problem) throw new InvalidStorePathError(`cannot make a store path named ${JSON.stringify(name)}: ${problem}`);
  const fingerprint = `${type}:sha256:${Buffer.from(innerSha256).toString('hex')}:${STORE_DIR}:${name}`;
  const digest = compressHash(createHash('sha256').update(fingerprint).digest(), HASH_PART_BYTES);
  return { digest, name };
}

/**
 * The path `nix-store --add` (and `builtins.path`, `src = ./.`) gives a tree
 * whose NAR has SHA-256 `narSha256`: type "source", followed by its
 * references (full paths, sorted) and ":self" when it refers to itself.
 */
export function makeSourcePath(narSha256: Uint8Array, name: string, references: string[] = [], selfReference = false): StorePath {
  const type = ['source', ...[...references].sort(), ...(selfReference ? ['self'] : [])].join(':');
  return makeStorePath(type, narSha256, name);
}
