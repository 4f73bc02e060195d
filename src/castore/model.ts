// The castore data model: a Merkle tree of directories, files and symlinks.
// Names and symlink targets are raw bytes (Buffers), never strings, so that
// non-UTF-8 names survive every round trip.
import type { B3Digest } from './digest.js';

export interface DirectoryNode {
  name: Buffer;
  /** Digest of the child Directory message. */
  digest: B3Digest;
  /** Number of entries below the child directory (see directorySize). */
  size: number;
}

export interface FileNode {
  name: Buffer;
  /** Digest of the file contents (a blob). */
  digest: B3Digest;
  size: number;
  executable: boolean;
}

export interface SymlinkNode {
  name: Buffer;
  target: Buffer;
}

/** One directory: three lists, each strictly sorted by name, names unique across all three. */
export interface Directory {
  directories: DirectoryNode[];
  files: FileNode[];
  symlinks: SymlinkNode[];
}

/** A node standing on its own, as the root of a store path. */
export type Node =
  | { kind: 'directory'; node: DirectoryNode }
  | { kind: 'file'; node: FileNode }
  | { kind: 'symlink'; node: SymlinkNode };

/** The same node under another name (a store path's root is named by its basename). */
export function withName(node: Node, name: Buffer): Node {
  return { kind: node.kind, node: { ...node.node, name } } as Node;
}

export function emptyDirectory(): Directory {
  return { directories: [], files: [], symlinks: [] };
}

/** A directory's entries merged into one list sorted by name bytes (NAR order, readdir order). */
export function sortedEntries(directory: Directory): Node[] {
  const entries: Node[] = [
    ...directory.directories.map((node) => ({ kind: 'directory', node }) as const),
    ...directory.files.map((node) => ({ kind: 'file', node }) as const),
    ...directory.symlinks.map((node) => ({ kind: 'symlink', node }) as const),
  ];
  const lists = [directory.directories, directory.files, directory.symlinks].filter((list) => list.length > 0).length;
  if (lists > 1) entries.sort((a, b) => Buffer.compare(a.node.name, b.node.name));
  return entries;
}

export function entryCount(directory: Directory): number {
  return directory.directories.length + directory.files.length + directory.symlinks.length;
}

/**
 * The `size` a DirectoryNode pointing at `directory` must carry, by the
 * documented rule: the number of entries plus the sizes of the child
 * directories. This is the rule nixcas always writes.
 */
export function directorySize(directory: Directory): number {
  let size = entryCount(directory);
  for (const child of directory.directories) size += child.size;
  return size;
}

/**
 * The size tvix's Rust implementation computes since 2024-08: every entry
 * counted twice, plus the child directories' sizes. Accepted on Put for
 * compatibility, never written (see docs/compat.md).
 */
export function legacyDirectorySize(directory: Directory): number {
  return directorySize(directory) + entryCount(directory);
}

/** A name for messages: printable ASCII as is, every other byte as \xNN. */
export function displayName(name: Uint8Array): string {
  let out = '';
  for (const byte of name) {
    out += byte >= 0x20 && byte < 0x7f && byte !== 0x5c ? String.fromCharCode(byte) : '\\x' + byte.toString(16).padStart(2, '0');
  }
  return JSON.stringify(out).replace(/\\\\/g, '\\');
}
