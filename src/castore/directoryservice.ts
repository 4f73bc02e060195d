// DirectoryService: Directory messages addressed by the BLAKE3 of their canonical encoding.
import { type B3Digest, blake3, digestKey, formatDigest } from './digest.js';
import { InvalidInputError, NotFoundError } from './errors.js';
import { type Directory, directorySize, displayName, legacyDirectorySize } from './model.js';
import { validateDirectory } from './validate.js';
import { encodeDirectory } from './wire.js';

export interface DirectoryService {
  get(digest: B3Digest): Promise<Directory | undefined>;
  /**
   * The directory and everything below it: root first, then breadth-first,
   * each digest once. Throws NotFoundError when the root is absent.
   */
  getRecursive(digest: B3Digest): AsyncIterable<Directory>;
  /**
   * Stores a batch sent leaves to root: every directory after the ones it
   * references, exactly one root. All or nothing. Returns the root's digest.
   */
  put(batch: Iterable<Directory>): Promise<B3Digest>;
  close(): Promise<void>;
}

/**
 * Digests of directories as read from where they are addressed by them: a
 * directory fetched under digest D, from a store that checked D when it was
 * put, need not be encoded and hashed again to learn D. Readers must not
 * modify such a directory.
 */
const digestsOfReadDirectories = new WeakMap<Directory, B3Digest>();

/** Records that `directory` was read under (and checked against) `digest`. */
export function readUnderDigest(directory: Directory, digest: B3Digest): Directory {
  digestsOfReadDirectories.set(directory, digest);
  return directory;
}

export function directoryDigest(directory: Directory): B3Digest {
  return digestsOfReadDirectories.get(directory) ?? blake3(encodeDirectory(directory));
}

/** A directory that passed validation, with its canonical bytes and digest. */
export interface CheckedDirectory {
  directory: Directory;
  encoded: Buffer;
  digest: B3Digest;
}

/**
 * Validates a Put batch as it arrives, so a stream can be refused at the
 * first bad message. References to directories outside the batch are
 * resolved at finish() against the store.
 */
export class DirectoryBatch {
  private readonly byKey = new Map<string, CheckedDirectory>();
  private readonly referenced = new Set<string>();
  private readonly external = new Map<string, { digest: B3Digest; sizes: Set<number>; from: string }>();
  readonly ordered: CheckedDirectory[] = [];
  private received = 0;

  add(directory: Directory): CheckedDirectory {
    const position = `directory #${this.received++}`;
    try {
      validateDirectory(directory);
    } catch (err) {
      throw new InvalidInputError(`${position}: ${(err as Error).message}`);
    }
    const encoded = encodeDirectory(directory);
    const digest = blake3(encoded);
    const key = digestKey(digest);
    const existing = this.byKey.get(key);
    if (existing) return existing;
    for (const child of directory.directories) {
      const childKey = digestKey(child.digest);
      const known = this.byKey.get(childKey);
      if (known) {
        checkChildSize(child.size, known.directory, child.name, formatDigest(digest));
      } else {
        const pending = this.external.get(childKey) ?? { digest: child.digest, sizes: new Set(), from: formatDigest(digest) };
        pending.sizes.add(child.size);
        this.external.set(childKey, pending);
      }
      this.referenced.add(childKey);
    }
    const checked = { directory, encoded, digest };
    this.byKey.set(key, checked);
    this.ordered.push(checked);
    return checked;
  }

  /**
   * Checks the references to stored directories and that there is exactly
   * one root. Returns the root.
   */
  async finish(lookup: (digest: B3Digest) => Promise<Directory | undefined>): Promise<CheckedDirectory> {
    if (this.ordered.length === 0) throw new InvalidInputError('the batch holds no directories');
    for (const [key, pending] of this.external) {
      if (this.byKey.has(key)) {
        throw new InvalidInputError(
          `directory ${pending.from} was sent before its child ${formatDigest(pending.digest)}: send leaves to root`,
        );
      }
      const stored = await lookup(pending.digest);
      if (!stored) {
        throw new InvalidInputError(
          `directory ${pending.from} references ${formatDigest(pending.digest)}, which is neither earlier in the batch nor stored`,
        );
      }
      for (const size of pending.sizes) checkChildSize(size, stored, undefined, pending.from);
    }
    const roots = this.ordered.filter((d) => !this.referenced.has(digestKey(d.digest)));
    if (roots.length !== 1) {
      throw new InvalidInputError(
        `a batch must have exactly one root, this one has ${roots.length}: ${roots.map((r) => formatDigest(r.digest)).join(', ')}`,
      );
    }
    const root = roots[0]!;
    if (root !== this.ordered[this.ordered.length - 1]) {
      throw new InvalidInputError(`the root ${formatDigest(root.digest)} must be sent last (leaves to root)`);
    }
    return root;
  }
}

/** Validates a whole Put batch against `lookup`; returns the root and the directories to store, in order. */
export async function checkBatch(
  batch: Iterable<Directory>,
  lookup: (digest: B3Digest) => Promise<Directory | undefined>,
): Promise<{ root: CheckedDirectory; ordered: CheckedDirectory[] }> {
  const checked = new DirectoryBatch();
  for (const directory of batch) checked.add(directory);
  return { root: await checked.finish(lookup), ordered: checked.ordered };
}

function checkChildSize(claimed: number, child: Directory, name: Buffer | undefined, parent: string): void {
  const documented = directorySize(child);
  if (claimed === documented || claimed === legacyDirectorySize(child)) return;
  const which = name ? `entry ${displayName(name)} of ${parent}` : `a child of ${parent}`;
  throw new InvalidInputError(`${which}: size ${claimed} is wrong, the directory has size ${documented}`);
}

/** getRecursive for any service that can get() one directory. */
export async function* walkDirectories(
  get: (digest: B3Digest) => Promise<Directory | undefined>,
  root: B3Digest,
): AsyncGenerator<Directory> {
  const seen = new Set<string>([digestKey(root)]);
  const queue: B3Digest[] = [root];
  for (let i = 0; i < queue.length; i++) {
    const digest = queue[i]!;
    const directory = await get(digest);
    if (!directory) {
      if (i === 0) throw new NotFoundError(`directory ${formatDigest(digest)} not found`);
      throw new Error(`directory ${formatDigest(digest)} below ${formatDigest(root)} is missing: the store is inconsistent`);
    }
    yield directory;
    for (const child of directory.directories) {
      const key = digestKey(child.digest);
      if (!seen.has(key)) {
        seen.add(key);
        queue.push(child.digest);
      }
    }
  }
}
