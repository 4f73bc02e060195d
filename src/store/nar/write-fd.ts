// Writes a NAR to a file descriptor (what `nixcas nar` does to stdout).
// Framing and small files are gathered into 1 MiB writes, one in flight on
// the thread pool while the next is rendered, in slabs reused once written.
// Contents of blobs the local store keeps as files go with sendfile(2): from
// the page cache straight to the pipe, file or /dev/null, never copied
// through this process.
import { writev } from 'node:fs';
import { constants } from 'node:os';
import { formatDigest } from '../../castore/digest.js';
import type { Node } from '../../castore/model.js';
import { type NativeAddon, optionalNative } from '../../native/index.js';
import { SendFileError, sendFileRange } from '../../native/send-file-range.js';
import { whenWritable } from '../../native/when-writable.js';
import { RecycledSlabs } from './recycled-slabs.js';
import { type CastoreServices, type ContentsDelivery, renderNar } from './render.js';

const BATCH = 1024 * 1024;
const { EINVAL, ENOSYS, EOPNOTSUPP, EPIPE } = constants.errno;

const readerGone = (written: number) => new Error(`the reader went away after ${written} bytes of the NAR (broken pipe)`);

/** Until `fd` takes more after EAGAIN: the event loop watches it when it can, else a short sleep. */
function writable(fd: number, addon: NativeAddon | undefined): Promise<void> {
  return addon ? whenWritable(addon, fd) : new Promise((resolve) => setTimeout(resolve, 2));
}

function writevOnce(fd: number, buffers: Buffer[]): Promise<number> {
  return new Promise((resolve, reject) => writev(fd, buffers, (err, written) => (err ? reject(err) : resolve(written))));
}

/** Buffers gathered into batches, each written whole (a non-blocking fd is waited for). */
class BatchedOutput {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private inFlight: Promise<void> = Promise.resolve();
  written = 0;

  constructor(
    private readonly fd: number,
    private readonly addon: NativeAddon | undefined,
  ) {}

  /** Queues `chunk`; the caller must then await room() when `full`. */
  push(chunk: Buffer): void {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
  }

  get full(): boolean {
    return this.pendingBytes >= BATCH;
  }

  /** Starts writing the pending batch once the one in flight is done, and waits for that one. */
  async room(): Promise<void> {
    const batch = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    const previous = this.inFlight;
    this.inFlight = previous.then(() => this.writeAll(batch));
    this.inFlight.catch(() => {}); // seen by whoever awaits it next
    await previous;
  }

  /** Until everything pushed has been written. */
  async settle(): Promise<void> {
    await this.room();
    await this.inFlight;
  }

  private async writeAll(buffers: Buffer[]): Promise<void> {
    while (buffers.length) {
      let n: number;
      try {
        n = await writevOnce(this.fd, buffers.slice(0, 1024)); // IOV_MAX
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EPIPE') throw readerGone(this.written);
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
        await writable(this.fd, this.addon);
        continue;
      }
      this.written += n;
      while (n > 0) {
        const first = buffers[0]!;
        if (n >= first.length) {
          n -= first.length;
          buffers.shift();
        } else {
          buffers[0] = first.subarray(n);
          n = 0;
        }
      }
    }
  }
}

/** Contents by sendfile, for blobs kept as files; false (stream them) wherever that cannot work. */
function sendfileDelivery(services: CastoreServices, fd: number, output: BatchedOutput): ContentsDelivery | undefined {
  const addon = optionalNative();
  const openFile = services.blobs.openFile?.bind(services.blobs);
  if (!addon || !openFile) return undefined;
  let refused = false; // e.g. an O_APPEND file: sendfile says EINVAL before sending anything
  return async (node, from, to) => {
    if (refused) return false;
    const file = await openFile(node.digest);
    if (!file) return false;
    try {
      if (file.size !== node.size) return false; // streaming reports the mismatch with its path
      await output.settle();
      try {
        await sendFileRange(addon, { out: fd, in: file.fd, from, to, writable: () => writable(fd, addon), onSent: (n) => (output.written += n) });
      } catch (err) {
        if (!(err instanceof SendFileError)) throw err;
        if (err.sent === 0 && [EINVAL, ENOSYS, EOPNOTSUPP].includes(err.errno)) {
          refused = true;
          return false;
        }
        if (err.errno === EPIPE) throw readerGone(output.written);
        throw new Error(`blob ${formatDigest(node.digest)}: ${err.message}`);
      }
      return true;
    } finally {
      await file.close();
    }
  };
}

/** Writes the NAR of `root` to `fd`; resolves to the bytes written. */
export async function writeNarToFd(root: Node, services: CastoreServices, fd: number): Promise<number> {
  const addon = optionalNative();
  // A pipe holds 64 KiB unless asked for more: every write or sendfile would stop there and wait
  // for the reader. 1 MiB (the unprivileged maximum) took 1 GiB through `| cat` from 1.4 to 0.2 s.
  // Refused or not a pipe: nothing changes.
  addon?.widenPipe(fd, BATCH);
  const output = new BatchedOutput(fd, addon);
  const slabs = new RecycledSlabs(BATCH, () => output.written);
  for await (const chunk of renderNar(root, services, { deliver: sendfileDelivery(services, fd, output), chunkSize: BATCH, slabs })) {
    output.push(chunk);
    if (output.full) await output.room();
  }
  await output.settle();
  return output.written;
}
