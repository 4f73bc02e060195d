// PathInfoService: PathInfos keyed by the 20-byte digest of their store path.
import type { PathInfo } from './pathinfo.js';

export interface PathInfoService {
  /** The PathInfo of the store path whose hash part decodes to `digest`. */
  get(digest: Buffer): Promise<PathInfo | undefined>;
  /**
   * Validates and stores `info`. A path registered already stays as it is:
   * the same metadata again adds only signatures it did not have, other
   * metadata is refused (AlreadyExistsError). The caller must have stored
   * the node's tree first. Returns what the store has now.
   */
  put(info: PathInfo): Promise<PathInfo>;
  /**
   * Keeps a garbage collection from running until a put() that follows soon,
   * so that a tree checked before the put is still whole at it (a local
   * store: its GC lock's write lease).
   */
  holdForPut?(): Promise<void> | undefined;
  /** Every PathInfo, in no particular order. */
  list(): AsyncIterable<PathInfo>;
  close(): Promise<void>;
}
