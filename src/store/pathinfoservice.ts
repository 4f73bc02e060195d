// PathInfoService: PathInfos keyed by the 20-byte digest of their store path.
import type { PathInfo } from './pathinfo.js';

export interface PathInfoService {
  /** The PathInfo of the store path whose hash part decodes to `digest`. */
  get(digest: Buffer): Promise<PathInfo | undefined>;
  /**
   * Validates and stores `info`; replaces an existing entry for the same
   * path. The caller must have stored the node's tree first. Returns what
   * was stored.
   */
  put(info: PathInfo): Promise<PathInfo>;
  /** Every PathInfo, in no particular order. */
  list(): AsyncIterable<PathInfo>;
  close(): Promise<void>;
}
