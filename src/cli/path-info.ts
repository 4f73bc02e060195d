// `nixcas path-info [STORE_PATH…]`: what the store knows of store paths, as
// `nix path-info` prints it.
import { Command } from 'commander';
import { MissingPathError, PathInfoLookup, invalidPathJson, pathInfoJson, referencesFirst, sortedPaths } from '../store/inspect.js';
import { type PathInfo, storePathOf } from '../store/pathinfo.js';
import { type StorePath, formatBasename, formatStorePath } from '../store/storepath.js';
import { notInStore } from './native-nar.js';
import { addStoreOptions, openServices } from './store-options.js';
import { storePathArgument } from './store-path-argument.js';
import { writeToStdout } from './stdout.js';

/** Nix's column for a size: a tab, then the number right-aligned in 11. */
const sizeColumn = (n: number) => `\t${String(n).padStart(11)}`;

export function pathInfoCommand(): Command {
  const command = new Command('path-info')
    .summary('show store paths\' NAR hash, size, references and signatures, like nix path-info')
    .description(
      'Print each STORE_PATH (/nix/store/<hash>-<name>, its basename, or a symlink into /nix/store such as ' +
        './result) that the store has, one a line, references before the paths that use them, as `nix path-info` ' +
        'does; -s adds the NAR size and -S the closure size (the NAR sizes of the path and everything it ' +
        'refers to, directly or not). --json prints what Nix 2.8\'s `nix path-info --json` prints: a list ' +
        'sorted by path of {path, narHash, narSize, references, ca, closureSize (with -S), deriver, signatures} ' +
        '(Nix\'s registrationTime and ultimate are not kept by the store). A path the store does not have is ' +
        'an error (exit status 1); with --json it is listed as {path, valid: false}, as Nix does.',
    )
    .argument('[store-paths...]', 'store paths to show')
    .option('--all', 'show every path in the store')
    .option('-r, --recursive', 'show the closures of the paths: everything they refer to, directly or not')
    .option('--json', 'print JSON, as nix path-info --json')
    .option('-s, --size', 'print the size of each path\'s NAR')
    .option('-S, --closure-size', 'print the sum of the NAR sizes of each path\'s closure');
  return addStoreOptions(command).action(async (raw: string[], options) => {
    if (options.all && raw.length) throw new Error('path-info --all takes no STORE_PATHs');
    if (!options.all && !raw.length) throw new Error('path-info needs STORE_PATHs, or --all');
    const wanted = raw.map((text) => storePathArgument(text).storePath);
    const services = await openServices(options, { writes: false });
    try {
      const lookup = new PathInfoLookup(services.pathInfos);
      let infos: PathInfo[] = [];
      const missing: StorePath[] = [];
      if (options.all) {
        for await (const info of services.pathInfos.list()) {
          lookup.remember(info);
          infos.push(info);
        }
      } else {
        for (const [i, info] of (await Promise.all(wanted.map((path) => lookup.find(path)))).entries()) {
          if (info) infos.push(info);
          else missing.push(wanted[i]!);
        }
      }
      // Without --json nothing is printed unless every path is there, as Nix does.
      if (missing.length && !options.json) throw notInStore(missing[0]!, services.addresses.pathInfo);
      try {
        if (options.recursive) infos = await lookup.closure(infos);
      } catch (err) {
        if (!(err instanceof MissingPathError)) throw err;
        throw new Error(`${notInStore(err.path, services.addresses.pathInfo).message}, but ${formatStorePath(err.referrer!)} refers to it`);
      }
      const closureSizes = new Map<PathInfo, number>();
      if (options.closureSize) {
        for (const info of infos) closureSizes.set(info, await lookup.closureSize(info));
      }
      if (options.json) {
        const entries = sortedPaths(infos).map((info) => ({ key: formatBasename(storePathOf(info)), json: pathInfoJson(info, closureSizes.get(info)) }));
        for (const path of missing) entries.push({ key: formatBasename(path), json: invalidPathJson(path) });
        entries.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
        const unique = entries.filter((entry, i) => i === 0 || entries[i - 1]!.key !== entry.key);
        await writeToStdout([Buffer.from(`${JSON.stringify(unique.map((entry) => entry.json))}\n`)]);
        for (const path of new Map(missing.map((p) => [formatBasename(p), p])).values()) console.error(`nixcas: ${notInStore(path, services.addresses.pathInfo).message}`);
        if (missing.length) process.exitCode = 1;
        return;
      }
      const ordered = referencesFirst(infos);
      const paths = ordered.map((info) => formatStorePath(storePathOf(info)));
      const width = paths.reduce((max, p) => Math.max(max, p.length), 0);
      const lines = ordered.map((info, i) => {
        let line = paths[i]!;
        if (options.size || options.closureSize) line = line.padEnd(width);
        if (options.size) line += sizeColumn(info.narSize);
        if (options.closureSize) line += sizeColumn(closureSizes.get(info)!);
        return `${line}\n`;
      });
      await writeToStdout(lines.map((line) => Buffer.from(line)));
    } finally {
      await services.close();
    }
  });
}
