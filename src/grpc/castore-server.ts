// gRPC handlers for BlobService and DirectoryService over any backend.
import * as grpc from '@grpc/grpc-js';
import { type BlobService, DEFAULT_CHUNK_SIZE } from '../castore/blobservice.js';
import { checkDigestLength, formatDigest } from '../castore/digest.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import { InvalidInputError, NotFoundError } from '../castore/errors.js';
import type { Directory } from '../castore/model.js';
import { type WireDirectory, directoryFromWire, directoryToWire } from './convert.js';
import { requireWellFormed } from './protos.js';
import { toServiceError } from './status.js';

/** Writes one message, waiting for the transport to drain when it asks to. */
export async function writeWithBackpressure(call: grpc.ServerWritableStream<unknown, unknown>, message: unknown): Promise<void> {
  if (call.write(message)) return;
  await new Promise<void>((resolve) => {
    const done = () => {
      call.off('drain', done);
      call.off('cancelled', done);
      call.off('close', done);
      resolve();
    };
    call.on('drain', done);
    call.on('cancelled', done);
    call.on('close', done);
  });
}

/** Tracks whether the client cut the call off, which must store nothing. */
function watchCancellation(call: grpc.ServerReadableStream<unknown, unknown>): () => boolean {
  let cancelled = false;
  call.on('cancelled', () => (cancelled = true));
  call.on('error', () => {}); // a stream the handler stops reading errors; the outcome is reported by reply()
  return () => cancelled || call.cancelled;
}

/** Answers a client-streaming call; a call the client cut off gets CANCELLED, not an error log. */
function reply(callback: grpc.sendUnaryData<unknown>, cancelled: () => boolean, work: Promise<unknown>): void {
  work.then(
    (response) => callback(null, response),
    (err) => callback(cancelled() ? { code: grpc.status.CANCELLED, details: 'cut off by the client; nothing stored' } : toServiceError(err)),
  );
}

function requestDigest(raw: Buffer | undefined, what: string): Buffer {
  const digest = raw ?? Buffer.alloc(0);
  checkDigestLength(digest, what);
  return digest;
}

export function blobServiceHandlers(blobs: BlobService, chunkSize = DEFAULT_CHUNK_SIZE): grpc.UntypedServiceImplementation {
  return {
    Stat(call: grpc.ServerUnaryCall<{ digest?: Buffer; send_chunks?: boolean }, unknown>, callback: grpc.sendUnaryData<unknown>) {
      (async () => {
        const digest = requestDigest(requireWellFormed(call.request).digest, 'Stat');
        const stat = await blobs.stat(digest);
        if (!stat) throw new NotFoundError(`blob ${formatDigest(digest)} not found`);
        // Blobs are stored whole: asked for chunks, the blob is its own single
        // chunk, which also tells a client its size without reading it.
        const chunks = call.request.send_chunks ? [{ digest, size: String(stat.size) }] : [];
        return { chunks, bao: Buffer.alloc(0) };
      })().then((response) => callback(null, response), (err) => callback(toServiceError(err)));
    },

    Read(call: grpc.ServerWritableStream<{ digest?: Buffer }, unknown>) {
      (async () => {
        const digest = requestDigest(requireWellFormed(call.request).digest, 'Read');
        const stream = await blobs.readStream(digest, chunkSize);
        if (!stream) throw new NotFoundError(`blob ${formatDigest(digest)} not found`);
        for await (const data of stream) {
          if (call.cancelled) break;
          await writeWithBackpressure(call, { data });
        }
        call.end();
      })().catch((err) => call.emit('error', toServiceError(err)));
    },

    Put(call: grpc.ServerReadableStream<{ data?: Buffer }, unknown>, callback: grpc.sendUnaryData<unknown>) {
      const cancelled = watchCancellation(call);
      const writer = blobs.openWriter();
      const work = (async () => {
        try {
          for await (const chunk of call) {
            const data = requireWellFormed(chunk as { data?: Buffer }).data;
            if (data && data.length > 0) await writer.write(data);
          }
          if (cancelled()) throw new InvalidInputError('upload cut off before it was complete');
          return { digest: await writer.close() };
        } catch (err) {
          await writer.abort();
          throw err;
        }
      })();
      reply(callback, cancelled, work);
    },
  };
}

export function directoryServiceHandlers(directories: DirectoryService): grpc.UntypedServiceImplementation {
  return {
    Get(call: grpc.ServerWritableStream<{ digest?: Buffer; recursive?: boolean }, unknown>) {
      (async () => {
        const digest = requestDigest(requireWellFormed(call.request).digest, 'Get');
        if (call.request.recursive) {
          for await (const directory of directories.getRecursive(digest)) {
            if (call.cancelled) break;
            await writeWithBackpressure(call, directoryToWire(directory));
          }
        } else {
          const directory = await directories.get(digest);
          if (!directory) throw new NotFoundError(`directory ${formatDigest(digest)} not found`);
          call.write(directoryToWire(directory));
        }
        call.end();
      })().catch((err) => call.emit('error', toServiceError(err)));
    },

    Put(call: grpc.ServerReadableStream<WireDirectory, unknown>, callback: grpc.sendUnaryData<unknown>) {
      const cancelled = watchCancellation(call);
      const work = (async () => {
        const batch: Directory[] = [];
        for await (const wire of call) batch.push(directoryFromWire(requireWellFormed(wire as WireDirectory)));
        if (cancelled()) throw new InvalidInputError('upload cut off before it was complete');
        return { root_digest: await directories.put(batch) };
      })();
      reply(callback, cancelled, work);
    },
  };
}
