// File contents of a NAR sent straight from the page cache to the client's
// socket with sendfile(2): no copy through this process and no buffers to
// allocate. The system call runs on a thread-pool worker, so a disk read
// never blocks the event loop; when the socket is full the worker returns
// and the wait for the client happens on the event loop, so a slow client
// never holds a worker. Used for blobs the local store keeps as files; small
// blobs (in LMDB) and other backends stream as usual.
import { closeSync } from 'node:fs';
import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { constants } from 'node:os';
import type { BlobService } from '../castore/blobservice.js';
import { formatDigest } from '../castore/digest.js';
import { type NativeAddon, native } from '../native/index.js';
import type { ContentsDelivery } from '../store/nar/render.js';
import { drainedOrClosed } from './drain.js';

/** Bytes per worker job: large enough that the hop to the thread pool costs nothing. */
const SLICE = 16 * 1024 * 1024;
const { EAGAIN } = constants.errno;

let addon: NativeAddon | false | undefined;

function loadAddon(): NativeAddon | false {
  if (addon === undefined) {
    try {
      addon = native();
    } catch {
      addon = false; // no addon: everything streams
    }
  }
  return addon;
}

/** The kernel descriptor under a TCP socket (Node keeps it on the libuv handle). */
function socketFd(socket: Socket | null): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } } | null)?._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/** Until everything written through Node has reached the kernel. */
async function flushed(response: ServerResponse, socket: Socket): Promise<void> {
  // writeHead() only records the headers; they leave with the first write.
  if (!(response as unknown as { _headerSent: boolean })._headerSent) response.flushHeaders();
  // Node corks the socket around a response write and uncorks on the next tick.
  await new Promise((resolve) => setImmediate(resolve));
  while (socket.writableLength > 0 && !socket.destroyed) await drainedOrClosed(socket);
}

function writable(addon: NativeAddon, fd: number, socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      addon.unwatch(watch);
      socket.off('close', done);
      resolve();
    };
    const watch = addon.watch(fd, done, true);
    socket.once('close', done);
  });
}

/**
 * A delivery for renderNar that sends file contents with sendfile, or
 * undefined when this store or machine cannot. `onSent` counts the bytes.
 */
export function sendfileDelivery(response: ServerResponse, blobs: BlobService, onSent: (bytes: number) => void): ContentsDelivery | undefined {
  const loaded = loadAddon();
  if (!loaded || !blobs.openFile) return undefined;
  const openFile = blobs.openFile.bind(blobs);
  return async (node, from, to) => {
    const socket = response.socket;
    const fd = socketFd(socket);
    if (!socket || fd === undefined || response.destroyed) return false;
    const file = await openFile(node.digest);
    if (!file) return false;
    try {
      if (file.size !== node.size) return false; // streaming reports the mismatch with its path
      await flushed(response, socket);
      if (socket.destroyed) throw new Error('the client went away');
      // A duplicate, so that waiting for it to be writable is separate from Node's own watch on the socket.
      const out = loaded.dup(fd);
      if (out < 0) return false;
      try {
        let position = from;
        while (position < to) {
          const count = Math.min(SLICE, to - position);
          const n = await new Promise<number>((resolve) => loaded.sendfileAsync(out, file.fd, position, count, resolve));
          if (n > 0) {
            position += n;
            onSent(n);
          } else if (n === -EAGAIN) {
            await writable(loaded, out, socket);
            if (socket.destroyed) throw new Error('the client went away');
          } else if (n === 0) {
            throw new Error(`blob ${formatDigest(node.digest)} ended at byte ${position} of ${node.size}`);
          } else {
            throw new Error(`sending blob ${formatDigest(node.digest)}: errno ${-n}`);
          }
        }
      } finally {
        closeSync(out);
      }
      return true;
    } finally {
      await file.close();
    }
  };
}
