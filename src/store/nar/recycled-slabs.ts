// Slabs for the NAR encoder that are used again once their bytes are
// written. Touching a fresh 1 MiB buffer costs 256 page faults; a cold
// render of 5000 small files spent 30–40 ms of its ~140 ms on them.
import type { SlabSource } from './encoder.js';

/** How many idle slabs are kept; more are dropped for the GC. */
const KEEP_IDLE = 4;

export class RecycledSlabs implements SlabSource {
  private readonly idle: Buffer[] = [];
  /** Retired slabs in NAR order, each with the offset its last byte comes before. */
  private readonly retired: { slab: Buffer; end: number }[] = [];

  /**
   * `written`: how many bytes of the NAR the consumer has finished with (written
   * to its descriptor, say); a slab is reused only once that passes its end.
   */
  constructor(
    private readonly slabSize: number,
    private readonly written: () => number,
  ) {}

  take(size: number): Buffer {
    this.reclaim();
    if (size <= this.slabSize) {
      const slab = this.idle.pop();
      if (slab) return slab;
    }
    return Buffer.allocUnsafe(Math.max(size, this.slabSize));
  }

  retire(slab: Buffer, end: number): void {
    // An oversized slab (a string longer than a slab) is left to the GC.
    if (slab.length === this.slabSize) this.retired.push({ slab, end });
  }

  private reclaim(): void {
    const written = this.written();
    while (this.retired.length && this.retired[0]!.end <= written) {
      const { slab } = this.retired.shift()!;
      if (this.idle.length < KEEP_IDLE) this.idle.push(slab);
    }
  }
}
