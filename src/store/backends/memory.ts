// PathInfos held in this process only (`memory://`).
import type { PathInfo } from '../pathinfo.js';
import { reRegistration, validatePathInfo } from '../pathinfo.js';
import type { PathInfoService } from '../pathinfoservice.js';

export class MemoryPathInfoService implements PathInfoService {
  private readonly infos = new Map<string, PathInfo>();

  async get(digest: Buffer) {
    return this.infos.get(digest.toString('hex'));
  }

  async put(info: PathInfo) {
    const key = validatePathInfo(info).digest.toString('hex');
    const existing = this.infos.get(key);
    const stored = existing ? reRegistration(existing, info) : info;
    this.infos.set(key, stored);
    return stored;
  }

  async *list() {
    yield* [...this.infos.values()];
  }

  async close() {}
}
