// Ingests a filesystem tree (a directory, file or symlink) into castore.
//
// Metadata calls and reads of small files use the synchronous fs API: here a
// synchronous read of a small file takes ~15 µs against ~330 µs through
// libuv's thread pool (measured), and a tree of thousands of small files is
// the common case. Large files are streamed asynchronously in chunks.
//
// An optional TreeObserver sees the tree in sorted order as it is read (the
// store layer uses it to compute the NAR hash in the same pass).
import { type Stats, closeSync, fstatSync, lstatSync, openSync, readSync, readdirSync, readlinkSync } from 'node:fs';
import { open } from 'node:fs/promises';
import type { BlobService } from './blobservice.js';
import type { DirectoryService } from './directoryservice.js';
import { InvalidInputError } from './errors.js';
import type { Node } from './model.js';
import { LENT_SLAB_SIZE, type LentSlab, lentSlabs } from './lent-slabs.js';
import { BlobWriteWindow, type PendingNode, finishTree } from './tree-builder.js';
import { nameProblem, symlinkTargetProblem } from './validate.js';

/** Sees a tree in sorted (NAR) order while it is imported. */
export interface TreeObserver {
  directoryStart(): void;
  entryStart(name: Buffer): void;
  entryEnd(): void;
  directoryEnd(): void;
  fileStart(executable: boolean, size: number): void;
  /**
   * The chunk is the caller's again once this returns: an observer that
   * keeps it holds its lent slab (lent-slabs.ts) if it has one, or copies it.
   */
  fileData(chunk: Uint8Array): void;
  fileEnd(): void;
  symlink(target: Buffer): void;
  /**
   * A promise when the observer needs the walk to wait (one working on
   * another thread has fallen behind); asked after each file and each chunk
   * of a large one.
   */
  ready?(): Promise<void> | undefined;
}

export interface ImportOptions {
  observer?: TreeObserver;
  /** Called after each file with the bytes read so far. */
  onProgress?: (bytes: number, files: number) => void;
}

const SMALL_FILE = 1024 * 1024;

export class ImportError extends InvalidInputError {}

function readSmallFile(path: Buffer, expectedSize: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    if (size !== expectedSize) throw new ImportError(`${path}: changed while being imported`);
    const data = Buffer.allocUnsafe(size);
    let filled = 0;
    while (filled < size) {
      const n = readSync(fd, data, filled, size - filled, filled);
      if (n === 0) throw new ImportError(`${path}: shrank while being imported`);
      filled += n;
    }
    return data;
  } finally {
    closeSync(fd);
  }
}

/**
 * A large file in chunks of up to LENT_SLAB_SIZE, each a view into a lent
 * slab (lent-slabs.ts) that the consumers may hold; the generator gives up
 * its own hold on a chunk's slab when asked for the next one.
 */
async function* readLargeFile(path: Buffer, size: number): AsyncGenerator<Buffer> {
  const handle = await open(path, 'r');
  const readChunk = async (position: number): Promise<{ slab: LentSlab; chunk: Buffer }> => {
    const slab = lentSlabs.take();
    try {
      const chunk = slab.bytes.subarray(0, Math.min(LENT_SLAB_SIZE, size - position));
      for (let filled = 0; filled < chunk.length; ) {
        const { bytesRead } = await handle.read(chunk, filled, chunk.length - filled, position + filled);
        if (bytesRead === 0) throw new ImportError(`${path}: shrank while being imported`);
        filled += bytesRead;
      }
      return { slab, chunk };
    } catch (err) {
      slab.release();
      throw err;
    }
  };
  // One chunk read ahead: the disk (or page cache copy) works while the caller hashes the last one.
  let next: Promise<{ slab: LentSlab; chunk: Buffer }> | undefined;
  try {
    for (let position = 0; position < size; ) {
      const { slab, chunk } = await (next ?? readChunk(position));
      position += chunk.length;
      next = position < size ? readChunk(position) : undefined;
      next?.catch(() => {}); // awaited on the next turn, or dropped with the generator
      try {
        yield chunk;
      } finally {
        slab.release();
      }
    }
    if ((await handle.stat()).size !== size) throw new ImportError(`${path}: changed while being imported`);
  } finally {
    await next?.then(({ slab }) => slab.release(), () => {});
    await handle.close();
  }
}

/** Imports the tree at `path`; the returned node is named `name`. */
export async function importTree(
  path: string,
  name: Buffer,
  services: { blobs: BlobService; directories: DirectoryService },
  options: ImportOptions = {},
): Promise<Node> {
  const observer = options.observer;
  const window = new BlobWriteWindow();
  let bytes = 0;
  let files = 0;

  async function file(filePath: Buffer, nodeName: Buffer, stats: Stats): Promise<PendingNode> {
    const executable = (stats.mode & 0o100) !== 0;
    const size = stats.size;
    observer?.fileStart(executable, size);
    const writer = services.blobs.openWriter();
    try {
      if (size <= SMALL_FILE) {
        const data = readSmallFile(filePath, size);
        observer?.fileData(data);
        await writer.write(data);
      } else {
        for await (const chunk of readLargeFile(filePath, size)) {
          observer?.fileData(chunk);
          await writer.write(chunk);
          await observer?.ready?.();
        }
      }
    } catch (err) {
      await writer.abort();
      throw err;
    }
    observer?.fileEnd();
    await observer?.ready?.();
    const { digest } = await window.finish(writer, size);
    bytes += size;
    options.onProgress?.(bytes, ++files);
    return { kind: 'file', name: nodeName, size, executable, digest };
  }

  async function visit(nodePath: Buffer, nodeName: Buffer): Promise<PendingNode> {
    const stats = lstatSync(nodePath);
    if (stats.isFile()) return file(nodePath, nodeName, stats);
    if (stats.isSymbolicLink()) {
      const target = readlinkSync(nodePath, { encoding: 'buffer' });
      const problem = symlinkTargetProblem(target);
      if (problem) throw new ImportError(`${nodePath}: ${problem}`);
      observer?.symlink(target);
      return { kind: 'symlink', name: nodeName, target };
    }
    if (stats.isDirectory()) {
      observer?.directoryStart();
      const names = readdirSync(nodePath, { encoding: 'buffer' }).sort(Buffer.compare);
      const entries: PendingNode[] = [];
      const prefix = Buffer.concat([nodePath, Buffer.from('/')]);
      for (const childName of names) {
        const problem = nameProblem(childName);
        if (problem) throw new ImportError(`${Buffer.concat([prefix, childName])}: ${problem}`);
        observer?.entryStart(childName);
        entries.push(await visit(Buffer.concat([prefix, childName]), childName));
        observer?.entryEnd();
      }
      observer?.directoryEnd();
      return { kind: 'directory', name: nodeName, entries };
    }
    throw new ImportError(`${nodePath}: cannot import a ${stats.isSocket() ? 'socket' : stats.isFIFO() ? 'FIFO' : 'device file'}`);
  }

  try {
    const pending = await visit(Buffer.from(path), name);
    await window.drain();
    return await finishTree(pending, services.directories);
  } catch (err) {
    await window.drain().catch(() => {});
    throw err;
  }
}
