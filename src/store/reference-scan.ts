// Which store paths a NAR can refer to. Nix finds a path's references by
// searching its NAR for the 32-character hash parts of candidate paths; a
// claimed reference whose hash part is nowhere in the NAR is not one. The
// candidates are not known while an upload streams in, so this keeps every
// run of 32 or more nixbase32 characters, and answers afterwards.

const ALPHABET = '0123456789abcdfghijklmnpqrsvwxyz';
const HASH_LENGTH = 32;
const IS_NIXBASE32 = new Uint8Array(256);
for (const c of ALPHABET) IS_NIXBASE32[c.charCodeAt(0)] = 1;

/** A run still growing at the end of a chunk is carried over, up to this length, then recorded in pieces. */
const MAX_CARRY = 64 * 1024;
const EMPTY = Buffer.alloc(0);

export class ReferenceScanner {
  private readonly runs = new Set<string>();
  private keptBytes = 0;
  private carry: Buffer = EMPTY;
  /** True when the runs outgrew `maxBytes`: the answer to contains() is then unknown. */
  overflowed = false;

  constructor(private readonly maxBytes = 8 * 1024 * 1024) {}

  private record(run: Buffer): void {
    if (this.overflowed) return;
    const text = run.toString('latin1');
    if (this.runs.has(text)) return;
    this.keptBytes += text.length;
    if (this.keptBytes > this.maxBytes) {
      this.overflowed = true;
      this.runs.clear();
      return;
    }
    this.runs.add(text);
  }

  /**
   * Scans the next bytes. Only every 32nd byte is looked at unless it is a
   * nixbase32 character: a run of 32 must contain one of the probed bytes.
   */
  update(chunk: Uint8Array): void {
    if (this.overflowed) return;
    const data = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    let classified = 0; // bytes before this are known to be outside any unrecorded run
    if (this.carry.length) {
      // A run from the previous chunk goes on through this one's leading nixbase32 bytes.
      while (classified < data.length && IS_NIXBASE32[data[classified]!]) classified++;
      this.carry = Buffer.concat([this.carry, data.subarray(0, classified)]);
      if (classified === data.length) return this.boundCarry();
      if (this.carry.length >= HASH_LENGTH) this.record(this.carry);
      this.carry = EMPTY;
    }
    let probe = classified + HASH_LENGTH - 1;
    while (probe < data.length) {
      if (!IS_NIXBASE32[data[probe]!]) {
        probe += HASH_LENGTH;
        continue;
      }
      let start = probe;
      while (start > classified && IS_NIXBASE32[data[start - 1]!]) start--;
      let end = probe + 1;
      while (end < data.length && IS_NIXBASE32[data[end]!]) end++;
      if (end === data.length) {
        classified = start;
        break;
      }
      if (end - start >= HASH_LENGTH) this.record(data.subarray(start, end));
      classified = end;
      probe = end + HASH_LENGTH;
    }
    // Whatever run reaches the end of the chunk may continue in the next one.
    let tail = data.length;
    while (tail > classified && IS_NIXBASE32[data[tail - 1]!]) tail--;
    this.carry = Buffer.from(data.subarray(tail));
    this.boundCarry();
  }

  /** A very long run is recorded as it is so far; its last 31 bytes stay, to join what follows. */
  private boundCarry(): void {
    if (this.carry.length <= MAX_CARRY) return;
    this.record(this.carry);
    this.carry = Buffer.from(this.carry.subarray(this.carry.length - (HASH_LENGTH - 1)));
  }

  /** Records a run that reaches the end of the stream. Call once, after the last update(). */
  finish(): void {
    if (this.carry.length >= HASH_LENGTH) this.record(this.carry);
    this.carry = EMPTY;
  }

  /** Whether `hashPart` (32 nixbase32 characters) occurs in what was scanned; undefined after an overflow. */
  contains(hashPart: string): boolean | undefined {
    if (this.overflowed) return undefined;
    for (const run of this.runs) if (run.includes(hashPart)) return true;
    return false;
  }
}
