// PathInfos held in this process only (`memory://`).
import type { PathInfo } from '../pathinfo.js';
import { validatePathInfo } from '../pathinfo.js';
import type { PathInfoService } from '../pathinfoservice.js';

export class MemoryPathInfoService implements PathInfoService {
  private readonly infos = new Map<string, PathInfo>();

  async get(digest: Buffer) {
    return this.infos.get(digest.toString('hex'));
  }

  async put(info: PathInfo) {
    const path = validatePathInfo(info);
    this.infos.set(path.digest.toString('hex'), info);
    return info;
  }

  async *list() {
    yield* [...this.infos.values()];
  }

  async close() {}
}
