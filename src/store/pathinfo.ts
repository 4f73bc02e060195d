// PathInfo: what the store knows about one store path — its castore root
// node (named by the path's basename), its references, and the NAR facts Nix
// needs (size, SHA-256, signatures, deriver, content address).
import { checkDigestLength } from '../castore/digest.js';
import { AlreadyExistsError, InvalidInputError } from '../castore/errors.js';
import type { Node } from '../castore/model.js';
import { symlinkTargetProblem } from '../castore/validate.js';
import { HASH_PART_BYTES, type StorePath, formatBasename, formatStorePath, parseBasename } from './storepath.js';

export class InvalidPathInfoError extends InvalidInputError {}

/** tvix's CA.Hash enum, by name. */
export const CA_HASH_TYPES = [
  'NAR_SHA256', 'NAR_SHA1', 'NAR_SHA512', 'NAR_MD5', 'TEXT_SHA256', 'FLAT_SHA1', 'FLAT_MD5', 'FLAT_SHA256', 'FLAT_SHA512',
] as const;
export type CaHashType = (typeof CA_HASH_TYPES)[number];

export interface ContentAddress {
  type: CaHashType;
  digest: Buffer;
}

export interface Signature {
  /** The key name, e.g. cache.nixos.org-1. */
  name: string;
  /** 64 bytes of ed25519 signature. */
  data: Buffer;
}

export interface PathInfo {
  /** The root node; its name is the store path's basename. */
  node: Node;
  references: StorePath[];
  narSize: number;
  narSha256: Buffer;
  signatures: Signature[];
  /** The .drv that produced the path, with the .drv suffix left off its name (as tvix stores it). */
  deriver?: StorePath;
  ca?: ContentAddress;
}

const CA_DIGEST_LENGTHS: Record<string, number> = { SHA256: 32, SHA1: 20, SHA512: 64, MD5: 16 };

/**
 * What registering `incoming` for a path the store has as `existing` leaves:
 * a registered path never changes, so everything but the signatures must be
 * the same, and signatures not yet there are added. Throws
 * AlreadyExistsError naming what differs.
 */
export function reRegistration(existing: PathInfo, incoming: PathInfo): PathInfo {
  const differs = (what: string): never => {
    throw new AlreadyExistsError(`${formatStorePath(storePathOf(existing))} is registered already with another ${what}; a registered path does not change (only signatures may be added)`);
  };
  if (!sameNode(existing.node, incoming.node)) differs('root (castore node)');
  if (existing.narSize !== incoming.narSize || !existing.narSha256.equals(incoming.narSha256)) differs('NAR (NarHash, NarSize)');
  const refs = (info: PathInfo) => info.references.map((r) => formatBasename(r)).sort().join(' ');
  if (refs(existing) !== refs(incoming)) differs('References');
  if ((existing.deriver && formatBasename(existing.deriver)) !== (incoming.deriver && formatBasename(incoming.deriver))) differs('Deriver');
  const ca = (info: PathInfo) => (info.ca ? `${info.ca.type}:${info.ca.digest.toString('hex')}` : '');
  if (ca(existing) !== ca(incoming)) differs('CA');
  const signatures = [...existing.signatures];
  for (const s of incoming.signatures) {
    if (!signatures.some((kept) => kept.name === s.name && kept.data.equals(s.data))) signatures.push(s);
  }
  return { ...existing, signatures };
}

function sameNode(a: Node, b: Node): boolean {
  if (a.kind !== b.kind || !a.node.name.equals(b.node.name)) return false;
  switch (a.kind) {
    case 'directory':
      return b.kind === 'directory' && a.node.digest.equals(b.node.digest) && a.node.size === b.node.size;
    case 'file':
      return b.kind === 'file' && a.node.digest.equals(b.node.digest) && a.node.size === b.node.size && a.node.executable === b.node.executable;
    case 'symlink':
      return b.kind === 'symlink' && a.node.target.equals(b.node.target);
  }
}

export function storePathOf(info: PathInfo): StorePath {
  return parseBasename(info.node.node.name.toString('latin1'));
}

/** Throws InvalidPathInfoError naming the first problem. Returns the store path. */
export function validatePathInfo(info: PathInfo): StorePath {
  const fail = (why: string): never => {
    throw new InvalidPathInfoError(`invalid PathInfo: ${why}`);
  };
  const rawName = info.node.node.name;
  let storePath: StorePath;
  try {
    if (rawName.some((b) => b >= 0x80)) throw new Error('the name is not ASCII');
    storePath = parseBasename(rawName.toString('latin1'));
  } catch (err) {
    return fail(`root node name: ${(err as Error).message}`);
  }
  const node = info.node;
  if (node.kind === 'directory' || node.kind === 'file') {
    try {
      checkDigestLength(node.node.digest, `root ${node.kind} digest`);
    } catch (err) {
      fail((err as Error).message);
    }
  } else {
    const problem = symlinkTargetProblem(node.node.target);
    if (problem) fail(`root symlink: ${problem}`);
  }
  for (const [i, ref] of info.references.entries()) {
    if (ref.digest.length !== HASH_PART_BYTES) fail(`reference #${i} is ${ref.digest.length} bytes, not ${HASH_PART_BYTES}`);
    try {
      parseBasename(formatBasename(ref));
    } catch (err) {
      fail(`reference #${i}: ${(err as Error).message}`);
    }
  }
  if (!Number.isSafeInteger(info.narSize) || info.narSize < 0) fail(`NAR size ${info.narSize} is not a size`);
  if (info.narSha256.length !== 32) fail(`NAR SHA-256 is ${info.narSha256.length} bytes, not 32`);
  for (const sig of info.signatures) {
    if (sig.data.length !== 64) fail(`signature by ${JSON.stringify(sig.name)} is ${sig.data.length} bytes, not 64`);
    if (!sig.name || /[\s:]/.test(sig.name)) fail(`signature key name ${JSON.stringify(sig.name)} is empty or has a colon or space`);
  }
  if (info.deriver) {
    try {
      parseBasename(formatBasename(info.deriver));
    } catch (err) {
      fail(`deriver: ${(err as Error).message}`);
    }
  }
  if (info.ca) {
    const algorithm = info.ca.type.split('_')[1];
    const expected = CA_DIGEST_LENGTHS[algorithm];
    if (!CA_HASH_TYPES.includes(info.ca.type)) fail(`unknown CA type ${info.ca.type}`);
    if (info.ca.digest.length !== expected) fail(`CA ${info.ca.type} digest is ${info.ca.digest.length} bytes, not ${expected}`);
  }
  return storePath;
}

/** References as full paths, sorted, as Nix prints them. */
export function referencePaths(info: PathInfo): string[] {
  return info.references.map(formatStorePath).sort();
}
