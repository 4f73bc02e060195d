// Plain objects as @grpc/proto-loader produces them ↔ PathInfo and Node.
import { InvalidInputError } from '../castore/errors.js';
import type { Node } from '../castore/model.js';
import { CA_HASH_TYPES, type CaHashType, type PathInfo } from '../store/pathinfo.js';
import { type StorePath, formatBasename, parseBasename } from '../store/storepath.js';
import { toSafeInteger } from './convert.js';
import type { PackagePrefix } from './protos.js';

interface WireNodeBody {
  name?: Buffer;
  digest?: Buffer;
  size?: string | number;
  executable?: boolean;
  target?: Buffer;
}

export type WireNode = { directory?: WireNodeBody | null; file?: WireNodeBody | null; symlink?: WireNodeBody | null };

interface WireStorePath {
  name?: string;
  digest?: Buffer;
}

export interface WirePathInfo {
  node?: WireNode | null;
  entry?: WireNode | null;
  references?: Buffer[];
  narinfo?: {
    nar_size?: string | number;
    nar_sha256?: Buffer;
    signatures?: { name?: string; data?: Buffer }[];
    reference_names?: string[];
    deriver?: WireStorePath | null;
    ca?: { type?: string | number; digest?: Buffer } | null;
  } | null;
}

const EMPTY = Buffer.alloc(0);

/** tvix calls PathInfo's field 1 `node`; snix calls it `entry`. */
export function nodeField(prefix: PackagePrefix): 'node' | 'entry' {
  return prefix === 'tvix' ? 'node' : 'entry';
}

export function nodeFromWire(wire: WireNode | null | undefined): Node {
  if (wire?.directory) {
    const n = wire.directory;
    return { kind: 'directory', node: { name: n.name ?? EMPTY, digest: n.digest ?? EMPTY, size: toSafeInteger(n.size, 'directory size') } };
  }
  if (wire?.file) {
    const n = wire.file;
    return {
      kind: 'file',
      node: { name: n.name ?? EMPTY, digest: n.digest ?? EMPTY, size: toSafeInteger(n.size, 'file size'), executable: n.executable ?? false },
    };
  }
  if (wire?.symlink) return { kind: 'symlink', node: { name: wire.symlink.name ?? EMPTY, target: wire.symlink.target ?? EMPTY } };
  throw new InvalidInputError('the node is empty: it must be a directory, file or symlink');
}

export function nodeToWire(node: Node): WireNode {
  switch (node.kind) {
    case 'directory': return { directory: { name: node.node.name, digest: node.node.digest, size: String(node.node.size) } };
    case 'file': return { file: { name: node.node.name, digest: node.node.digest, size: String(node.node.size), executable: node.node.executable } };
    case 'symlink': return { symlink: { name: node.node.name, target: node.node.target } };
  }
}

function storePathFromWire(wire: WireStorePath, what: string): StorePath {
  const digest = wire.digest ?? EMPTY;
  if (digest.length !== 20) throw new InvalidInputError(`${what}: digest is ${digest.length} bytes, not 20`);
  return { digest, name: wire.name ?? '' };
}

function caTypeFromWire(type: string | number | undefined): CaHashType {
  const name = typeof type === 'number' ? CA_HASH_TYPES[type] : (type ?? 'NAR_SHA256');
  if (!name || !CA_HASH_TYPES.includes(name as CaHashType)) throw new InvalidInputError(`unknown CA hash type ${type}`);
  return name as CaHashType;
}

/** Converts, checking what the wire form alone can get wrong; validatePathInfo does the rest. */
export function pathInfoFromWire(wire: WirePathInfo, prefix: PackagePrefix): PathInfo {
  const node = nodeFromWire(wire[nodeField(prefix)]);
  const narinfo = wire.narinfo;
  if (!narinfo) throw new InvalidInputError('invalid PathInfo: narinfo is missing');
  const rawReferences = wire.references ?? [];
  const names = narinfo.reference_names ?? [];
  if (names.length !== rawReferences.length) {
    throw new InvalidInputError(`invalid PathInfo: ${rawReferences.length} references but ${names.length} reference names`);
  }
  const references = rawReferences.map((digest, i) => {
    const parsed = parseBasename(names[i]!);
    if (!parsed.digest.equals(digest)) {
      throw new InvalidInputError(`invalid PathInfo: reference #${i} does not match its name ${JSON.stringify(names[i])}`);
    }
    return parsed;
  });
  return {
    node,
    references,
    narSize: toSafeInteger(narinfo.nar_size, 'NAR size'),
    narSha256: narinfo.nar_sha256 ?? EMPTY,
    signatures: (narinfo.signatures ?? []).map((s) => ({ name: s.name ?? '', data: s.data ?? EMPTY })),
    ...(narinfo.deriver ? { deriver: storePathFromWire(narinfo.deriver, 'deriver') } : {}),
    ...(narinfo.ca ? { ca: { type: caTypeFromWire(narinfo.ca.type), digest: narinfo.ca.digest ?? EMPTY } } : {}),
  };
}

export function pathInfoToWire(info: PathInfo, prefix: PackagePrefix): WirePathInfo {
  return {
    [nodeField(prefix)]: nodeToWire(info.node),
    references: info.references.map((r) => r.digest),
    narinfo: {
      nar_size: String(info.narSize),
      nar_sha256: info.narSha256,
      signatures: info.signatures.map((s) => ({ name: s.name, data: s.data })),
      reference_names: info.references.map(formatBasename),
      deriver: info.deriver ? { name: info.deriver.name, digest: info.deriver.digest } : null,
      ca: info.ca ? { type: info.ca.type, digest: info.ca.digest } : null,
    },
  };
}
