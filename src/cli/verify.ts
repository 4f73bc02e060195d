// `nixcas verify [STORE_PATH…]`: checks that every registered path's
// directories and blobs are there and intact, and names what is not.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Command } from 'commander';
import { narArgument, notInStore, rootName } from './native-nar.js';
import { Progress, formatBytes } from './progress.js';
import { type AddressOptions, resolveAddresses, singleLocalStore } from '../services/addresses.js';
import { addStoreOptions, openServices } from './store-options.js';
import type { PathInfo } from '../store/pathinfo.js';

/** Users of one damaged object listed in the human-readable report; --json lists them all. */
const USERS_SHOWN = 5;

/** --repair writes to the store, but must never make one where there is none. */
function requireExistingStore(options: AddressOptions): void {
  const root = singleLocalStore(resolveAddresses(options));
  if (!root) throw new Error('--repair works on a local store only (--store DIR)');
  if (!existsSync(join(root, 'nixcas-store'))) throw new Error(`${root} holds no nixcas store: there is nothing to repair`);
}

export function verifyCommand(): Command {
  const command = new Command('verify')
    .summary('check that store paths have every directory and blob they need, intact')
    .description(
      'Walk the registered paths (all of them, or the STORE_PATHs given) down to every directory and ' +
        'blob they use. Directories are hashed and compared with their digests; blobs are checked for ' +
        'presence and size, or with --check-contents hashed in full (whatever the store remembers of ' +
        'them: this finds media corruption too). Each missing or damaged object is reported with the ' +
        'store paths and files that use it; whatever uses it must be imported or copied again.\n\n' +
        'Read-only unless --repair: that moves each damaged object (hashed in full, as with --check-contents) ' +
        'to STORE/damaged/, so that it reads as missing instead of wrong; importing or copying the paths that ' +
        'use it again stores it afresh. Exit status 1 when anything is wrong, repaired or not.',
    )
    .argument('[store-paths...]', 'store paths to check (default: every registered path)')
    .option('--check-contents', 'hash every blob in full, not just check it is there with the right size')
    .option('--repair', 'move damaged objects aside (local store only; implies --check-contents)')
    .option('--json', 'print the report as JSON on stdout');
  return addStoreOptions(command).action(async (raw: string[], options) => {
    const { verifyPaths } = await import('../store/verify.js');
    if (options.repair) requireExistingStore(options);
    const services = await openServices(options, { writes: Boolean(options.repair) });
    const progress = new Progress();
    try {
      let infos: AsyncIterable<PathInfo> | PathInfo[];
      if (raw.length) {
        infos = [];
        for (const text of raw) {
          const storePath = narArgument(text);
          const info = await services.pathInfos.get(storePath.digest);
          if (!info || !info.node.node.name.equals(rootName(storePath))) throw notInStore(storePath, services.addresses.pathInfo);
          infos.push(info);
        }
      } else {
        infos = services.pathInfos.list();
      }
      const report = await verifyPaths(infos, services, {
        checkContents: Boolean(options.checkContents),
        repair: Boolean(options.repair),
        onProgress: (r) => progress.update(() => `verify: ${r.paths} paths, ${r.directories} directories, ${r.blobs} blobs (${formatBytes(r.bytes)}), ${r.problems.length} problems`),
      });
      progress.clear();
      if (options.json) {
        process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
      } else {
        const checked = options.checkContents || options.repair ? 'hashed' : 'present with their sizes (--check-contents hashes them)';
        const summary = `${report.paths} paths, ${report.directories} directories, ${report.blobs} blobs of ${formatBytes(report.bytes)} ${checked}`;
        const lines = [`nixcas verify: ${summary}: ${report.problems.length ? `${report.problems.length} problems` : 'all intact'}`];
        for (const problem of report.problems) {
          const users = problem.usedBy.slice(0, USERS_SHOWN).join(', ') + (problem.usedBy.length > USERS_SHOWN ? ` and ${problem.usedBy.length - USERS_SHOWN} more` : '');
          const moved = problem.movedTo ? `; moved to ${problem.movedTo}: import or copy what uses it again` : '';
          lines.push(`${problem.kind} ${problem.digest} ${problem.problem}; used by ${users}${moved}`);
        }
        console.error(lines.join('\n'));
      }
      if (report.problems.length) process.exitCode = 1;
    } finally {
      progress.clear();
      await services.close();
    }
  });
}
