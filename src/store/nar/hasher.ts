// The NAR of a tree being imported, hashed as it is walked and never kept:
// its SHA-256 (computed on the hashing thread) and size.
import type { TreeObserver } from '../../castore/import.js';
import { OffThreadSha256 } from '../sha256-off-thread.js';
import { NarEncoder } from './encoder.js';

export class NarHasher extends NarEncoder implements TreeObserver {
  private readonly sha256: OffThreadSha256;

  constructor() {
    const sha256 = new OffThreadSha256();
    super((chunk) => sha256.update(chunk));
    this.sha256 = sha256;
  }

  ready(): Promise<void> | undefined {
    return this.sha256.ready();
  }

  /** The NAR's SHA-256 and size, once the walk is over. */
  async finish(): Promise<{ narSha256: Buffer; narSize: number }> {
    this.flush();
    return { narSha256: await this.sha256.digest(), narSize: this.size };
  }

  /** Forgets the hash of a walk that failed. */
  abandon(): void {
    this.sha256.drop();
  }
}
