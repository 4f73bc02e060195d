// The sendfile(2) loop shared by every zero-copy writer: a byte range of a
// file goes to a descriptor in slices run on the thread pool, waiting for the
// descriptor whenever it is full. Mechanism only: the caller says how to wait
// and what a short file means.
import { constants } from 'node:os';
import type { NativeAddon } from './index.js';

/** Bytes per worker job: large enough that the hop to the thread pool costs nothing. */
const SLICE = 16 * 1024 * 1024;
const { EAGAIN } = constants.errno;

export class SendFileError extends Error {
  constructor(
    message: string,
    /** The errno, or 0 when the file ended early. */
    readonly errno: number,
    /** Bytes already sent when it failed. */
    readonly sent: number,
  ) {
    super(message);
  }
}

export interface SendFileRange {
  out: number;
  in: number;
  from: number;
  to: number;
  /** Resolves once `out` may take more (it returned EAGAIN); throw to give up. */
  writable(): Promise<void>;
  onSent?(bytes: number): void;
}

/** Sends `[from, to)` of `in` to `out`; throws SendFileError on a system error or a file shorter than `to`. */
export async function sendFileRange(addon: NativeAddon, range: SendFileRange): Promise<void> {
  let position = range.from;
  while (position < range.to) {
    const count = Math.min(SLICE, range.to - position);
    const n = await new Promise<number>((resolve) => addon.sendfileAsync(range.out, range.in, position, count, resolve));
    if (n > 0) {
      position += n;
      range.onSent?.(n);
    } else if (n === -EAGAIN) {
      await range.writable();
    } else if (n === 0) {
      throw new SendFileError(`the file ended at byte ${position}, before ${range.to}`, 0, position - range.from);
    } else {
      throw new SendFileError(`sendfile: errno ${-n}`, -n, position - range.from);
    }
  }
}
