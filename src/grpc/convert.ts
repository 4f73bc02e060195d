// Plain objects as @grpc/proto-loader produces them ↔ the castore model.
import { InvalidInputError } from '../castore/errors.js';
import type { Directory } from '../castore/model.js';

/** uint64 fields arrive as decimal strings (longs: String); castore sizes must be safe integers. */
export function toSafeInteger(value: string | number | undefined, what: string): number {
  const n = typeof value === 'number' ? value : Number(value ?? 0);
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidInputError(`${what}: ${value} is not a size nixcas can represent`);
  return n;
}

interface WireNode {
  name?: Buffer;
  digest?: Buffer;
  size?: string | number;
  executable?: boolean;
  target?: Buffer;
}

export interface WireDirectory {
  directories?: WireNode[];
  files?: WireNode[];
  symlinks?: WireNode[];
}

const EMPTY = Buffer.alloc(0);

export function directoryFromWire(wire: WireDirectory): Directory {
  return {
    directories: (wire.directories ?? []).map((n) => ({
      name: n.name ?? EMPTY,
      digest: n.digest ?? EMPTY,
      size: toSafeInteger(n.size, 'directory size'),
    })),
    files: (wire.files ?? []).map((n) => ({
      name: n.name ?? EMPTY,
      digest: n.digest ?? EMPTY,
      size: toSafeInteger(n.size, 'file size'),
      executable: n.executable ?? false,
    })),
    symlinks: (wire.symlinks ?? []).map((n) => ({ name: n.name ?? EMPTY, target: n.target ?? EMPTY })),
  };
}

export function directoryToWire(directory: Directory): WireDirectory {
  return {
    directories: directory.directories.map((n) => ({ name: n.name, digest: n.digest, size: String(n.size) })),
    files: directory.files.map((n) => ({ name: n.name, digest: n.digest, size: String(n.size), executable: n.executable })),
    symlinks: directory.symlinks.map((n) => ({ name: n.name, target: n.target })),
  };
}
