// Walks registered paths down to every directory and blob they use and
// reports what is missing or damaged, with the store paths and files that
// use it (`nixcas verify`). Only reads: the store is not changed.
import type { BlobService } from '../castore/blobservice.js';
import { type B3Digest, createBlake3, digestKey, formatDigest } from '../castore/digest.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import type { Directory } from '../castore/model.js';
import type { PathInfo } from './pathinfo.js';
import { STORE_DIR } from './storepath.js';

export interface Problem {
  kind: 'blob' | 'directory';
  digest: string;
  /** What is wrong: missing, damaged (with why), or a size other than its node's. */
  problem: string;
  /** Where it is used: /nix/store/<basename>/<file inside it>. */
  usedBy: string[];
  /** With repair: where the damaged object's bytes were moved. */
  movedTo?: string;
}

export interface VerifyReport {
  paths: number;
  directories: number;
  blobs: number;
  /** Bytes hashed (with checkContents), or whose size was checked. */
  bytes: number;
  problems: Problem[];
}

export interface VerifyOptions {
  /** Hash every blob in full (otherwise: present, with its node's size). Directories are always hashed. */
  checkContents?: boolean;
  /** Move each object found damaged out of the way (see Quarantine), so that it reads as missing. Implies checkContents. */
  repair?: boolean;
  onProgress?: (report: VerifyReport) => void;
}

/** What a store that can move damaged objects aside offers (the local store). */
interface Quarantine {
  quarantine?(digest: B3Digest): Promise<string | undefined>;
}

interface Services {
  blobs: BlobService & Quarantine;
  directories: DirectoryService & Quarantine;
}

/** `damaged`: the stored bytes themselves are wrong (not merely absent, or described wrongly by their node). */
type Outcome = { ok: true } | { ok: false; problem: string; damaged?: boolean };

export async function verifyPaths(infos: AsyncIterable<PathInfo> | Iterable<PathInfo>, services: Services, options: VerifyOptions = {}): Promise<VerifyReport> {
  const report: VerifyReport = { paths: 0, directories: 0, blobs: 0, bytes: 0, problems: [] };
  const problems = new Map<string, Problem>();
  const damaged: { problem: Problem; digest: B3Digest }[] = [];
  const directories = new Map<string, Directory | Outcome>();
  const blobs = new Map<string, Outcome>();

  const note = (kind: Problem['kind'], digest: B3Digest, outcome: Outcome, where: string) => {
    if (outcome.ok) return;
    const key = `${kind}:${digestKey(digest)}`;
    let problem = problems.get(key);
    if (!problem) {
      problem = { kind, digest: formatDigest(digest), problem: outcome.problem, usedBy: [] };
      problems.set(key, problem);
      report.problems.push(problem);
      if (outcome.damaged) damaged.push({ problem, digest });
    }
    problem.usedBy.push(where);
  };

  const checkBlob = async (digest: B3Digest, size: number, where: string) => {
    const key = digestKey(digest);
    let outcome = blobs.get(key);
    if (!outcome) {
      outcome = await blobOutcome(services.blobs, digest, size, (options.checkContents || options.repair) ?? false);
      blobs.set(key, outcome);
      report.blobs++;
      report.bytes += size;
      options.onProgress?.(report);
    }
    note('blob', digest, outcome, where);
  };

  const loadDirectory = async (digest: B3Digest): Promise<Directory | Outcome> => {
    const key = digestKey(digest);
    const known = directories.get(key);
    if (known) return known;
    let loaded: Directory | Outcome;
    try {
      loaded = (await services.directories.get(digest)) ?? { ok: false, problem: 'missing' };
    } catch (err) {
      loaded = { ok: false, problem: `damaged: ${(err as Error).message}`, damaged: true };
    }
    directories.set(key, loaded);
    report.directories++;
    return loaded;
  };

  for await (const info of infos) {
    report.paths++;
    const root = `${STORE_DIR}/${info.node.node.name.toString('latin1')}`;
    if (info.node.kind === 'file') await checkBlob(info.node.node.digest, info.node.node.size, root);
    if (info.node.kind !== 'directory') continue;
    // Depth first over this path's tree; a directory shared by several paths is loaded once, reported for each.
    const pending: { digest: B3Digest; where: string }[] = [{ digest: info.node.node.digest, where: root }];
    while (pending.length) {
      const { digest, where } = pending.pop()!;
      const loaded = await loadDirectory(digest);
      if ('ok' in loaded) {
        note('directory', digest, loaded, where);
        continue;
      }
      for (const file of loaded.files) await checkBlob(file.digest, file.size, `${where}/${file.name.toString('latin1')}`);
      for (const child of loaded.directories) pending.push({ digest: child.digest, where: `${where}/${child.name.toString('latin1')}` });
    }
    options.onProgress?.(report);
  }
  if (options.repair) {
    for (const { problem, digest } of damaged) {
      const service = problem.kind === 'blob' ? services.blobs : services.directories;
      if (!service.quarantine) throw new Error('this store cannot move damaged objects aside (only a local store can)');
      problem.movedTo = await service.quarantine(digest);
    }
  }
  return report;
}

async function blobOutcome(blobs: BlobService, digest: B3Digest, size: number, checkContents: boolean): Promise<Outcome> {
  try {
    if (!checkContents) {
      const stat = await blobs.stat(digest);
      if (!stat) return { ok: false, problem: 'missing' };
      return stat.size === size ? { ok: true } : { ok: false, problem: `has ${stat.size} bytes, its node says ${size}` };
    }
    // Hashed here whatever the store remembers of it: a full check, media corruption included.
    const stream = await blobs.readStream(digest);
    if (!stream) return { ok: false, problem: 'missing' };
    const hasher = createBlake3();
    let seen = 0;
    for await (const chunk of stream) {
      hasher.update(chunk);
      seen += chunk.length;
    }
    const found = hasher.digest();
    if (!found.equals(digest)) return { ok: false, problem: `damaged: its ${seen} bytes hash to ${formatDigest(found)}`, damaged: true };
    // Intact, but not what its node says: the directory is what is wrong.
    if (seen !== size) return { ok: false, problem: `has ${seen} bytes, its node says ${size}` };
    return { ok: true };
  } catch (err) {
    // The store refused to hand it out: it found the bytes do not match (a DataLossError) or could not read them.
    return { ok: false, problem: `damaged: ${(err as Error).message}`, damaged: (err as Error).name === 'DataLossError' };
  }
}
