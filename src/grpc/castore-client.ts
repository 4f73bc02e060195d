// BlobService and DirectoryService backed by a remote castore over gRPC:
// just another backend of the same interfaces.
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { type BlobReader, type BlobService, type BlobWriter, verifiedStream } from '../castore/blobservice.js';
import { type B3Digest, checkDigestLength, digestKey, formatDigest } from '../castore/digest.js';
import { type DirectoryService, directoryDigest, readUnderDigest } from '../castore/directoryservice.js';
import { InvalidInputError, NotFoundError } from '../castore/errors.js';
import type { Directory } from '../castore/model.js';
import { validateDirectory } from '../castore/validate.js';
import { type WireDirectory, directoryFromWire, directoryToWire } from './convert.js';
import { type PackagePrefix, clientConstructor } from './protos.js';
import { fromServiceError, isNotFound } from './status.js';

type Client = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

/** Parses `grpc+unix:///path` and `grpc+http://host:port[?package=snix]`. */
export function parseGrpcUrl(url: string): { target: string; prefix: PackagePrefix; credentials: grpc.ChannelCredentials } {
  const parsed = new URL(url);
  const prefix = (parsed.searchParams.get('package') ?? 'tvix') as PackagePrefix;
  if (prefix !== 'tvix' && prefix !== 'snix') throw new Error(`${url}: package must be tvix or snix`);
  if (parsed.protocol === 'grpc+unix:') {
    if (!parsed.pathname || parsed.pathname === '/') throw new Error(`${url}: no socket path`);
    return { target: `unix://${decodeURIComponent(parsed.pathname)}`, prefix, credentials: grpc.credentials.createInsecure() };
  }
  if (parsed.protocol === 'grpc+http:' || parsed.protocol === 'grpc+https:') {
    if (!parsed.port) throw new Error(`${url}: a port is required`);
    const credentials = parsed.protocol === 'grpc+https:' ? tlsCredentials(url, parsed.searchParams) : grpc.credentials.createInsecure();
    return { target: parsed.host, prefix, credentials };
  }
  throw new Error(`${url}: not a grpc+unix://, grpc+http:// or grpc+https:// address`);
}

/**
 * TLS for grpc+https://, as snix spells its parameters: tls-ca-cert-path (else the system's
 * roots), and tls-client-cert-path with tls-client-key-path for a server that asks for one.
 */
function tlsCredentials(url: string, params: URLSearchParams): grpc.ChannelCredentials {
  const file = (name: string) => {
    const path = params.get(name);
    if (!path) return undefined;
    try {
      return readFileSync(path);
    } catch (err) {
      throw new Error(`${url}: ${name} ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
    }
  };
  const cert = file('tls-client-cert-path');
  const key = file('tls-client-key-path');
  if (Boolean(cert) !== Boolean(key)) throw new Error(`${url}: tls-client-cert-path and tls-client-key-path go together`);
  return grpc.credentials.createSsl(file('tls-ca-cert-path') ?? null, key ?? null, cert ?? null);
}

const CLIENT_OPTIONS: grpc.ClientOptions = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
};

function makeClient(url: string, service: string): Client {
  const { target, prefix, credentials } = parseGrpcUrl(url);
  const Constructor = clientConstructor(prefix, service);
  return new Constructor(target, credentials, CLIENT_OPTIONS) as unknown as Client;
}

function unary<T>(client: Client, method: string, request: unknown): Promise<T> {
  return new Promise((resolve, reject) => {
    client[method]!(request, (err: grpc.ServiceError | null, response: T) => (err ? reject(err) : resolve(response)));
  });
}

/** Writes to a client stream, waiting for it to drain when it asks to. */
async function writeMessage(call: grpc.ClientWritableStream<unknown>, message: unknown): Promise<void> {
  if (!call.write(message)) await new Promise((resolve) => call.once('drain', resolve));
}

export class GrpcBlobService implements BlobService {
  private readonly client: Client;

  constructor(private readonly url: string) {
    this.client = makeClient(url, 'BlobService');
  }

  async has(digest: B3Digest) {
    checkDigestLength(digest, 'blob');
    try {
      await unary(this.client, 'Stat', { digest });
      return true;
    } catch (err) {
      if (isNotFound(err)) return false;
      throw fromServiceError(err, this.url);
    }
  }

  async stat(digest: B3Digest) {
    checkDigestLength(digest, 'blob');
    let response: { chunks?: { size: string }[] };
    try {
      response = await unary(this.client, 'Stat', { digest, send_chunks: true });
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw fromServiceError(err, this.url);
    }
    // nixcas answers send_chunks with the blob's size; other servers list
    // chunks only for chunked blobs, so otherwise the size costs a full read.
    if (response.chunks?.length) return { size: response.chunks.reduce((sum, c) => sum + Number(c.size), 0) };
    let size = 0;
    const stream = await this.readStream(digest);
    if (!stream) return undefined;
    for await (const chunk of stream) size += chunk.length;
    return { size };
  }

  async readStream(digest: B3Digest): Promise<AsyncIterable<Buffer> | undefined> {
    checkDigestLength(digest, 'blob');
    const call = this.client.Read!({ digest }) as grpc.ClientReadableStream<{ data: Buffer }>;
    const iterator = call[Symbol.asyncIterator]();
    let first: IteratorResult<{ data: Buffer }>;
    try {
      first = await iterator.next();
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw fromServiceError(err, this.url);
    }
    const url = this.url;
    const chunks = (async function* () {
      try {
        if (first.done) return;
        yield first.value.data;
        for (;;) {
          const next = await iterator.next();
          if (next.done) return;
          yield next.value.data;
        }
      } catch (err) {
        throw fromServiceError(err, url);
      } finally {
        call.cancel();
      }
    })();
    return verifiedStream(chunks, digest, `the blob service at ${this.url}`);
  }

  async openReader(digest: B3Digest): Promise<BlobReader | undefined> {
    const stat = await this.stat(digest);
    if (!stat) return undefined;
    return new SequentialGrpcReader(this, digest, stat.size);
  }

  openWriter(): BlobWriter {
    let settle!: { resolve: (d: B3Digest) => void; reject: (e: unknown) => void };
    const response = new Promise<B3Digest>((resolve, reject) => (settle = { resolve, reject }));
    response.catch(() => {}); // observed by close(); an aborted upload's error is expected
    const call = this.client.Put!((err: grpc.ServiceError | null, res: { digest: Buffer }) =>
      err ? settle.reject(fromServiceError(err, this.url)) : settle.resolve(res.digest),
    ) as grpc.ClientWritableStream<unknown>;
    return {
      write: (data) => writeMessage(call, { data: Buffer.from(data) }),
      close: async () => {
        call.end();
        return response;
      },
      abort: async () => call.cancel(),
    };
  }

  async close() {
    this.client.close();
  }
}

/**
 * Random access over a streaming Read: sequential reads continue one stream,
 * a seek backwards or far forwards starts a new one.
 */
class SequentialGrpcReader implements BlobReader {
  private stream?: AsyncIterator<Buffer>;
  private streamPosition = 0;
  private pending: Buffer = Buffer.alloc(0);

  constructor(private readonly service: GrpcBlobService, private readonly digest: B3Digest, readonly size: number) {}

  async read(target: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    if (position >= this.size || length === 0) return 0;
    if (!this.stream || position < this.streamPosition) await this.restart();
    while (this.streamPosition + this.pending.length <= position || this.pending.length === 0) {
      this.streamPosition += this.pending.length;
      const next = await this.stream!.next();
      if (next.done) return 0;
      this.pending = next.value;
    }
    const start = position - this.streamPosition;
    const n = Math.min(length, this.pending.length - start);
    this.pending.copy(target, offset, start, start + n);
    return n;
  }

  private async restart() {
    await this.stream?.return?.();
    const stream = await this.service.readStream(this.digest);
    if (!stream) throw new NotFoundError(`blob ${formatDigest(this.digest)} disappeared`);
    this.stream = stream[Symbol.asyncIterator]();
    this.streamPosition = 0;
    this.pending = Buffer.alloc(0);
  }

  async close() {
    await this.stream?.return?.();
  }
}

export class GrpcDirectoryService implements DirectoryService {
  private readonly client: Client;

  constructor(private readonly url: string) {
    this.client = makeClient(url, 'DirectoryService');
  }

  async get(digest: B3Digest): Promise<Directory | undefined> {
    for await (const directory of this.fetch(digest, false)) return directory;
    return undefined;
  }

  getRecursive(digest: B3Digest): AsyncIterable<Directory> {
    return this.fetch(digest, true);
  }

  /** Streams Get, checking that the server sends exactly what was asked for. */
  private async *fetch(root: B3Digest, recursive: boolean): AsyncGenerator<Directory> {
    checkDigestLength(root, 'directory');
    const expected = new Set([digestKey(root)]);
    const call = this.client.Get!({ digest: root, recursive }) as grpc.ClientReadableStream<WireDirectory>;
    try {
      for await (const wire of call) {
        const directory = directoryFromWire(wire as WireDirectory);
        validateDirectory(directory);
        const digest = directoryDigest(directory);
        if (!expected.delete(digestKey(digest))) {
          throw new InvalidInputError(`server sent directory ${formatDigest(digest)}, which was not asked for`);
        }
        readUnderDigest(directory, digest);
        for (const child of directory.directories) expected.add(digestKey(child.digest));
        yield directory;
        if (!recursive) return;
      }
    } catch (err) {
      if (isNotFound(err)) return;
      throw fromServiceError(err, this.url);
    } finally {
      call.cancel();
    }
  }

  async put(batch: Iterable<Directory>): Promise<B3Digest> {
    let settle!: { resolve: (d: B3Digest) => void; reject: (e: unknown) => void };
    const response = new Promise<B3Digest>((resolve, reject) => (settle = { resolve, reject }));
    const call = this.client.Put!((err: grpc.ServiceError | null, res: { root_digest: Buffer }) =>
      err ? settle.reject(fromServiceError(err, this.url)) : settle.resolve(res.root_digest),
    ) as grpc.ClientWritableStream<unknown>;
    for (const directory of batch) await writeMessage(call, directoryToWire(directory));
    call.end();
    return response;
  }

  async close() {
    this.client.close();
  }
}
