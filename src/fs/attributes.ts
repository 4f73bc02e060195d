// File attributes as the store shows them: everything is read-only and owned
// by root, with the mtime of 1 that Nix gives every store path.
import type { Node } from '../castore/model.js';

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;

/** How long the kernel may cache what never changes: the contents of a store path. */
export const IMMUTABLE_TIMEOUT = 365 * 24 * 3600;
/** The root changes whenever a store path is registered. */
export const ROOT_ATTRIBUTE_TIMEOUT = 1;

export const BLOCK_SIZE = 4096;

export interface Attributes {
  ino: number;
  size: number;
  /** In 512-byte units, as stat(2) counts them. */
  blocks: number;
  /** File type and permission bits. */
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch; atime and ctime are 0. */
  mtime: number;
  blksize: number;
}

/** What a lookup returns: the child's inode and how long the kernel may keep it. */
export interface Entry {
  attributes: Attributes;
  /** Seconds the name → inode binding stays valid. */
  entryTimeout: number;
  /** Seconds the attributes stay valid. */
  attributeTimeout: number;
}

/** What the attributes of a directory need from its contents. */
export interface DirectoryCounts {
  entries: number;
  subdirectories: number;
}

function attributes(ino: number, mode: number, size: number, nlink: number, mtime: number): Attributes {
  return { ino, size, blocks: Math.ceil(size / 512), mode, nlink, uid: 0, gid: 0, mtime, blksize: BLOCK_SIZE };
}

export function rootAttributes(ino: number): Attributes {
  return attributes(ino, S_IFDIR | 0o555, 0, 2, 1);
}

/**
 * The attributes of a node. A directory's size is its number of entries and
 * its link count 2 + its subdirectories, as on a disk filesystem.
 */
export function nodeAttributes(ino: number, node: Node, counts?: DirectoryCounts): Attributes {
  switch (node.kind) {
    case 'file':
      return attributes(ino, S_IFREG | (node.node.executable ? 0o555 : 0o444), node.node.size, 1, 1);
    case 'symlink':
      return attributes(ino, S_IFLNK | 0o444, node.node.target.length, 1, 1);
    case 'directory':
      return attributes(ino, S_IFDIR | 0o555, counts?.entries ?? 0, 2 + (counts?.subdirectories ?? 0), 1);
  }
}
