// Reading inside a store path without mounting it (`nixcas ls`, `nixcas cat`):
// a path below the PathInfo's root node found through the DirectoryService,
// listings in the order and shape of `nix store ls`, and a file's contents
// streamed from the BlobService.
import type { BlobService } from '../castore/blobservice.js';
import { digestKey, formatDigest } from '../castore/digest.js';
import { type DirectoryService, directoryDigest } from '../castore/directoryservice.js';
import { NotFoundError } from '../castore/errors.js';
import { type Directory, type DirectoryNode, type FileNode, type Node, sortedEntries } from '../castore/model.js';

/** A path inside a store path that is not there (or passes through a file or symlink). */
export class NoSuchPathError extends NotFoundError {}

/** The directories of one store path, each fetched once. */
export class TreeReader {
  private readonly cache = new Map<string, Directory>();

  constructor(private readonly directories: DirectoryService) {}

  /** Fetches everything below `node` in one request (what a recursive listing reads anyway). */
  async prefetch(node: DirectoryNode): Promise<void> {
    for await (const directory of this.directories.getRecursive(node.digest)) {
      this.cache.set(digestKey(directoryDigest(directory)), directory);
    }
  }

  async directory(node: DirectoryNode, where: string): Promise<Directory> {
    const key = digestKey(node.digest);
    let directory = this.cache.get(key);
    if (!directory) {
      directory = await this.directories.get(node.digest);
      if (!directory) throw new NotFoundError(`${where}: directory ${formatDigest(node.digest)} is missing from the store`);
      this.cache.set(key, directory);
    }
    return directory;
  }

  /**
   * The node at `components` below `root`; `where(i)` names the path of the
   * first i components for messages. Symlinks on the way are not followed,
   * as `nix store ls` does not follow them.
   */
  async lookup(root: Node, components: Buffer[], where: (depth: number) => string): Promise<Node> {
    let node = root;
    for (const [i, name] of components.entries()) {
      if (node.kind !== 'directory') {
        throw new NoSuchPathError(`${where(i + 1)} does not exist: ${where(i)} is a ${node.kind === 'file' ? 'file' : 'symlink'}, not a directory`);
      }
      const directory = await this.directory(node.node, where(i));
      const entry = sortedEntries(directory).find((e) => e.node.name.equals(name));
      if (!entry) throw new NoSuchPathError(`${where(i + 1)} does not exist`);
      node = entry;
    }
    return node;
  }
}

/** One line of a listing: the node and its path relative to where the listing started. */
export interface ListedNode {
  node: Node;
  path: Buffer;
}

const SLASH = Buffer.from('/');

/**
 * What `nix store ls` lists for `node`, in its order: a directory's entries
 * (sorted by name bytes) or the node itself, `.`-relative for a directory
 * and named `name` otherwise; with `recursive`, every directory's contents
 * after it; with `directoryItself`, the directory as one entry.
 */
export async function* listNodes(
  tree: TreeReader, node: Node, name: Buffer, { recursive = false, directoryItself = false } = {},
): AsyncGenerator<ListedNode> {
  if (recursive && node.kind === 'directory') await tree.prefetch(node.node);
  async function* entries(directory: DirectoryNode, path: Buffer): AsyncGenerator<ListedNode> {
    for (const entry of sortedEntries(await tree.directory(directory, path.toString('latin1')))) {
      yield* show(entry, Buffer.concat([path, SLASH, entry.node.name]));
    }
  }
  async function* show(entry: Node, path: Buffer): AsyncGenerator<ListedNode> {
    yield { node: entry, path };
    if (recursive && entry.kind === 'directory') yield* entries(entry.node, path);
  }
  if (node.kind !== 'directory') yield* show(node, name);
  else if (directoryItself) yield* show(node, Buffer.from('.'));
  else yield* entries(node.node, Buffer.from('.'));
}

/**
 * A JSON string of raw bytes, escaped as Nix escapes it: each byte one
 * character (latin1), so the text encodes back to the same bytes; `"`, `\`,
 * \n, \r and \t escaped short, other control bytes as \u00XX, the rest as is.
 */
function jsonBytes(bytes: Buffer): string {
  let out = '"';
  for (const byte of bytes) {
    if (byte === 0x22) out += '\\"';
    else if (byte === 0x5c) out += '\\\\';
    else if (byte === 0x0a) out += '\\n';
    else if (byte === 0x0d) out += '\\r';
    else if (byte === 0x09) out += '\\t';
    else if (byte < 0x20) out += `\\u${byte.toString(16).padStart(4, '0')}`;
    else out += String.fromCharCode(byte);
  }
  return `${out}"`;
}

/**
 * `nix store ls --json` of `node`, as latin1 text (write it with
 * Buffer.from(text, 'latin1') so names keep their bytes). Entries are in
 * name-byte order; without `recursive` a directory's entries are `{}`.
 */
export async function listingJson(tree: TreeReader, node: Node, recursive: boolean): Promise<string> {
  if (recursive && node.kind === 'directory') await tree.prefetch(node.node);
  const render = async (entry: Node, where: string): Promise<string> => {
    switch (entry.kind) {
      case 'file':
        return `{"type":"regular","size":${entry.node.size}${entry.node.executable ? ',"executable":true' : ''}}`;
      case 'symlink':
        return `{"type":"symlink","target":${jsonBytes(entry.node.target)}}`;
      case 'directory': {
        const parts: string[] = [];
        for (const child of sortedEntries(await tree.directory(entry.node, where))) {
          const value = recursive ? await render(child, `${where}/${child.node.name.toString('latin1')}`) : '{}';
          parts.push(`${jsonBytes(child.node.name)}:${value}`);
        }
        return `{"type":"directory","entries":{${parts.join(',')}}}`;
      }
    }
  };
  return render(node, '.');
}

/**
 * A file's contents as chunks, checked against the size its node gives
 * (blob services check the digest as they read). Throws NotFoundError when
 * the blob is missing.
 */
export async function* fileContents(blobs: BlobService, file: FileNode, where: string): AsyncGenerator<Buffer> {
  if (file.size === 0) return;
  const stream = await blobs.readStream(file.digest);
  if (!stream) throw new NotFoundError(`${where}: blob ${formatDigest(file.digest)} is missing from the store`);
  let seen = 0;
  for await (const chunk of stream) {
    seen += chunk.length;
    if (seen > file.size) throw new Error(`${where}: blob ${formatDigest(file.digest)} is longer than the ${file.size} bytes its node says`);
    yield chunk;
  }
  if (seen < file.size) throw new Error(`${where}: blob ${formatDigest(file.digest)} has ${seen} bytes, its node says ${file.size}`);
}
