// PathInfoService backed by a remote store over gRPC.
import * as grpc from '@grpc/grpc-js';
import { InvalidInputError } from '../castore/errors.js';
import type { Node } from '../castore/model.js';
import { type PathInfo, validatePathInfo } from '../store/pathinfo.js';
import type { PathInfoService } from '../store/pathinfoservice.js';
import { parseGrpcUrl } from './castore-client.js';
import { toSafeInteger } from './convert.js';
import { type PackagePrefix, clientConstructor } from './protos.js';
import { fromServiceError, isNotFound } from './status.js';
import { type WirePathInfo, nodeToWire, pathInfoFromWire, pathInfoToWire } from './store-convert.js';

type Client = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export class GrpcPathInfoService implements PathInfoService {
  private readonly client: Client;
  private readonly prefix: PackagePrefix;

  constructor(private readonly url: string) {
    const { target, prefix, credentials } = parseGrpcUrl(url);
    this.prefix = prefix;
    const Constructor = clientConstructor(prefix, 'PathInfoService');
    this.client = new Constructor(target, credentials) as unknown as Client;
  }

  private unary<T>(method: string, request: unknown): Promise<T> {
    return new Promise((resolve, reject) => {
      this.client[method]!(request, (err: grpc.ServiceError | null, response: T) => (err ? reject(err) : resolve(response)));
    });
  }

  async get(digest: Buffer): Promise<PathInfo | undefined> {
    try {
      const info = pathInfoFromWire(await this.unary<WirePathInfo>('Get', { by_output_hash: digest }), this.prefix);
      const path = validatePathInfo(info);
      if (!path.digest.equals(digest)) throw new InvalidInputError(`server answered a Get for ${digest.toString('hex')} with another path`);
      return info;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw fromServiceError(err, this.url);
    }
  }

  async put(info: PathInfo): Promise<PathInfo> {
    validatePathInfo(info);
    try {
      return pathInfoFromWire(await this.unary<WirePathInfo>('Put', pathInfoToWire(info, this.prefix)), this.prefix);
    } catch (err) {
      throw fromServiceError(err, this.url);
    }
  }

  /** Asks the server to compute a tree's NAR size and SHA-256 (no local rendering). */
  async calculateNar(node: Node): Promise<{ size: number; sha256: Buffer }> {
    try {
      const response = await this.unary<{ nar_size?: string; nar_sha256?: Buffer }>('CalculateNAR', nodeToWire(node));
      return { size: toSafeInteger(response.nar_size, 'NAR size'), sha256: response.nar_sha256 ?? Buffer.alloc(0) };
    } catch (err) {
      throw fromServiceError(err, this.url);
    }
  }

  async *list(): AsyncIterable<PathInfo> {
    const call = this.client.List!({}) as grpc.ClientReadableStream<WirePathInfo>;
    try {
      for await (const wire of call) {
        const info = pathInfoFromWire(wire, this.prefix);
        validatePathInfo(info);
        yield info;
      }
    } catch (err) {
      throw fromServiceError(err, this.url);
    } finally {
      call.cancel();
    }
  }

  async close() {
    this.client.close();
  }
}
