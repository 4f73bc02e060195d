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
import type { BlobService } from '../castore/blobservice.js';
import { formatDigest } from '../castore/digest.js';
import { optionalNative } from '../native/index.js';
import { SendFileError, sendFileRange } from '../native/send-file-range.js';
import { whenWritable } from '../native/when-writable.js';
import type { ContentsDelivery } from '../store/nar/render.js';
import { drainedOrClosed } from './drain.js';

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

/**
 * A delivery for renderNar that sends file contents with sendfile, or
 * undefined when this store or machine cannot. `onSent` counts the bytes.
 */
export function sendfileDelivery(response: ServerResponse, blobs: BlobService, onSent: (bytes: number) => void): ContentsDelivery | undefined {
  const loaded = optionalNative();
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
        await sendFileRange(loaded, {
          out,
          in: file.fd,
          from,
          to,
          onSent,
          writable: async () => {
            await whenWritable(loaded, out, socket);
            if (socket.destroyed) throw new Error('the client went away');
          },
        });
      } catch (err) {
        if (err instanceof SendFileError) throw new Error(`sending blob ${formatDigest(node.digest)}: ${err.message}`);
        throw err;
      } finally {
        closeSync(out);
      }
      return true;
    } finally {
      await file.close();
    }
  };
}
