// The top level of a mounted store: each registered store path by its
// basename, looked up through the PathInfoService (which is keyed by the
// 20-byte hash part, so a lookup never scans).
import type { Node } from '../castore/model.js';
import type { PathInfoService } from './pathinfoservice.js';
import { parseBasename, type StorePath } from './storepath.js';

/** Structurally the fs/ RootProvider: the store layer does not import fs/. */
export interface StorePathRoot {
  lookup(name: Buffer): Promise<Node | undefined>;
  list(): AsyncIterable<Node>;
}

export function storePathRoot(pathInfos: PathInfoService): StorePathRoot {
  return {
    async lookup(name) {
      let storePath: StorePath;
      try {
        storePath = parseBasename(name.toString('latin1'));
      } catch {
        return undefined; // not a store path name: nothing by that name
      }
      const info = await pathInfos.get(storePath.digest);
      // The hash part alone finds the PathInfo; the name must match too.
      return info && info.node.node.name.equals(name) ? info.node : undefined;
    },
    async *list() {
      for await (const info of pathInfos.list()) yield info.node;
    },
  };
}
