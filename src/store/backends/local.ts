// PathInfos in the local store's LMDB environment, next to the directories,
// keyed by the 20-byte digest. Values are msgpack (lmdb's own encoding,
// which keeps Buffers as binary), tagged with a format version.
import type { Database } from 'lmdb';
import { LocalStore, type OpenOptions, committed } from '../../castore/backends/local.js';
import type { WriteLease } from '../../castore/backends/gc-lock.js';
import { type PathInfo, reRegistration, validatePathInfo } from '../pathinfo.js';
import type { PathInfoService } from '../pathinfoservice.js';
import { formatStorePath } from '../storepath.js';

const FORMAT_VERSION = 1;

interface StoredPathInfo {
  v: number;
  info: PathInfo;
  /** When the path was registered here, in seconds since the epoch (absent in records written before nixcas kept it). */
  t?: number;
}

function revive(stored: StoredPathInfo | undefined): PathInfo | undefined {
  if (!stored) return undefined;
  if (stored.v !== FORMAT_VERSION) throw new Error(`stored PathInfo has format ${stored.v}, this nixcas reads ${FORMAT_VERSION}`);
  return stored.info;
}

export class LocalPathInfoService implements PathInfoService {
  private readonly db: Database<StoredPathInfo, Buffer>;
  private readonly release: () => Promise<void>;
  private readonly lease?: WriteLease;
  private closed = false;

  constructor(private readonly root: string, options: OpenOptions = {}) {
    const { db, release, lease } = LocalStore.metadataDb<StoredPathInfo>(root, 'pathinfos', { encoding: 'msgpack', ...options });
    this.db = db;
    this.release = release;
    this.lease = lease;
  }

  async get(digest: Buffer) {
    return revive(this.db.get(digest));
  }

  async put(info: PathInfo) {
    const path = validatePathInfo(info);
    await this.lease?.hold();
    // Compared and written in one transaction, so two processes registering the same path cannot both win.
    return committed(this.root, `the path info of ${formatStorePath(path)}`, this.db.transaction(() => {
      const record = this.db.get(path.digest);
      const existing = revive(record);
      const stored = existing ? reRegistration(existing, info) : info;
      if (existing && stored.signatures.length === existing.signatures.length) return existing;
      // Signatures added later leave the registration time as it was.
      const t = record ? record.t : Math.floor(Date.now() / 1000);
      this.db.put(path.digest, t === undefined ? { v: FORMAT_VERSION, info: stored } : { v: FORMAT_VERSION, info: stored, t });
      return stored;
    }));
  }

  holdForPut() {
    return this.lease?.hold();
  }

  /**
   * Unregisters paths, all in one transaction. Only for a collection, which
   * holds the GC lock exclusively and has checked that nothing kept refers to them.
   */
  async remove(digests: Buffer[]): Promise<void> {
    await committed(this.root, `the removal of ${digests.length} path infos`, this.db.transaction(() => {
      for (const digest of digests) this.db.removeSync(digest);
    }));
  }

  /** Every PathInfo with when it was registered (seconds since the epoch), where the store knows. */
  async *listWithTimes(): AsyncIterable<{ info: PathInfo; registeredAt?: number }> {
    for (const { value } of this.db.getRange()) {
      const info = revive(value);
      if (info) yield { info, registeredAt: value.t };
    }
  }

  async *list() {
    for (const { value } of this.db.getRange()) {
      const info = revive(value);
      if (info) yield info;
    }
  }

  async close() {
    if (this.closed) return;
    this.closed = true;
    await this.release();
  }
}
