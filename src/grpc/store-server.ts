// gRPC handlers for PathInfoService (tvix.store.v1 / snix.store.v1) over any backend.
import * as grpc from '@grpc/grpc-js';
import { formatDigest } from '../castore/digest.js';
import { InvalidInputError, NotFoundError } from '../castore/errors.js';
import type { Node } from '../castore/model.js';
import { calculateNar } from '../store/nar/render.js';
import { formatNarHash } from '../store/narinfo.js';
import { type PathInfo, storePathOf, validatePathInfo } from '../store/pathinfo.js';
import type { StoreServices } from '../store/import.js';
import { formatStorePath } from '../store/storepath.js';
import { type PackagePrefix, requireWellFormed } from './protos.js';
import { toServiceError } from './status.js';
import { type WireNode, type WirePathInfo, nodeFromWire, pathInfoFromWire, pathInfoToWire } from './store-convert.js';
import { writeWithBackpressure } from './castore-server.js';


function answer<T>(callback: grpc.sendUnaryData<unknown>, work: () => Promise<T>): void {
  work().then((response) => callback(null, response), (err) => callback(toServiceError(err)));
}

/** Refuses a PathInfo whose tree is not in the store: no reader may see a path it cannot read. */
async function requireContent(node: Node, services: StoreServices): Promise<void> {
  const present = node.kind === 'symlink' || (node.kind === 'directory'
    ? (await services.directories.get(node.node.digest)) !== undefined
    : node.node.size === 0 || (await services.blobs.has(node.node.digest)));
  if (!present) {
    throw new InvalidInputError(`the path's root ${node.kind} ${formatDigest(node.node.digest)} is not in the store: upload its tree before its PathInfo`);
  }
}

/**
 * The NAR the store renders for the path's tree must be the one the PathInfo
 * describes: every blob there, of its size, and NarHash and NarSize right.
 * What is registered is then what is served (and what a bridge signs).
 */
async function requireNar(info: PathInfo, services: StoreServices): Promise<void> {
  const where = formatStorePath(storePathOf(info));
  let nar: { size: number; sha256: Buffer };
  try {
    nar = await calculateNar(info.node, services);
  } catch (err) {
    throw new InvalidInputError(`${where}: its tree in the store cannot be rendered as a NAR: ${(err as Error).message}`);
  }
  if (nar.size !== info.narSize || !nar.sha256.equals(info.narSha256)) {
    throw new InvalidInputError(
      `${where}: the PathInfo says NarSize ${info.narSize} and NarHash ${formatNarHash(info.narSha256)}, ` +
        `but the tree in the store renders as a NAR of ${nar.size} bytes with NarHash ${formatNarHash(nar.sha256)}`,
    );
  }
}

export function pathInfoServiceHandlers(services: StoreServices, prefix: PackagePrefix): grpc.UntypedServiceImplementation {
  return {
    Get(call: grpc.ServerUnaryCall<{ by_output_hash?: Buffer }, unknown>, callback: grpc.sendUnaryData<unknown>) {
      answer(callback, async () => {
        const digest = requireWellFormed(call.request).by_output_hash ?? Buffer.alloc(0);
        if (digest.length !== 20) throw new InvalidInputError(`by_output_hash is ${digest.length} bytes, not 20`);
        const info = await services.pathInfos.get(digest);
        if (!info) throw new NotFoundError(`no PathInfo for ${digest.toString('hex')}`);
        return pathInfoToWire(info, prefix);
      });
    },
    Put(call: grpc.ServerUnaryCall<WirePathInfo, unknown>, callback: grpc.sendUnaryData<unknown>) {
      answer(callback, async () => {
        const info = pathInfoFromWire(requireWellFormed(call.request), prefix);
        const storePath = validatePathInfo(info);
        await services.pathInfos.holdForPut?.(); // the tree checked now must still be whole at the put
        await requireContent(info.node, services);
        await requireNar(info, services);
        const stored = await services.pathInfos.put(info);
        console.error(`nixcas: registered ${formatStorePath(storePath)}`);
        return pathInfoToWire(stored, prefix);
      });
    },
    CalculateNAR(call: grpc.ServerUnaryCall<WireNode, unknown>, callback: grpc.sendUnaryData<unknown>) {
      answer(callback, async () => {
        const node = nodeFromWire(requireWellFormed(call.request));
        const { size, sha256 } = await calculateNar(node, services);
        return { nar_size: String(size), nar_sha256: sha256 };
      });
    },
    List(call: grpc.ServerWritableStream<unknown, unknown>) {
      (async () => {
        requireWellFormed(call.request);
        for await (const info of services.pathInfos.list()) {
          if (call.cancelled) return;
          await writeWithBackpressure(call, pathInfoToWire(info, prefix));
        }
        call.end();
      })().catch((err) => call.emit('error', toServiceError(err)));
    },
  };
}
