// `nixcas copy FILE|-`: copy a closure from the local /nix/store into the store
// (FILE: closure JSON, or a plain list of store paths that Nix describes).
// `nixcas copy --from URL STORE_PATH…`: fetch closures from binary caches.
import { readFileSync } from 'node:fs';
import { describeAbout } from './errors.js';
import { Command, Option } from 'commander';
import { parseClosure } from '../store/closure.js';
import { copyClosure } from '../store/copy.js';
import { isPathList, localClosure, parsePathList } from '../store/nix-path-info.js';
import { type StorePath, formatStorePath, parseStorePath } from '../store/storepath.js';
import { Progress, formatBytes } from './progress.js';
import { startHashThread } from '../store/sha256-off-thread.js';
import { type SubstitutionFlags, addStoreOptions, addSubstitutionOptions, openServices, substituterOptions } from './store-options.js';

function readInput(file: string | undefined): { text: string; source: string } {
  const name = file ?? process.env.NIX_ATTRS_JSON_FILE;
  if (!name) throw new Error('no closure given: pass a FILE, - for stdin, or set NIX_ATTRS_JSON_FILE');
  return { text: readFileSync(name === '-' ? 0 : name, 'utf8'), source: name === '-' ? 'stdin' : name };
}

export function copyCommand(): Command {
  const command = new Command('copy')
    .summary('copy a closure from the local /nix/store into the store, verified')
    .description(
      'Read a closure description — the .attrs.json Nix writes for exportReferencesGraph with ' +
        '__structuredAttrs, or the output of `nix path-info --json --recursive` — and copy every path it ' +
        'lists from the local /nix/store. Each path is hashed as a NAR while it is read and checked against ' +
        'the NAR hash and size in the description before it is registered, with its references, signatures ' +
        'and deriver. Paths already in the store are skipped. A path is registered only after all paths it ' +
        'refers to are. Exits non-zero when any path failed; the others are still copied.\n\n' +
        'A plain list of store paths instead (one a line, e.g. `nix-store -qR result | nixcas copy -`) ' +
        'copies their closures as the local `nix path-info --json --recursive` describes them.',
    )
    .argument('[file...]', 'the closure JSON or a list of store paths, or - for stdin (default: $NIX_ATTRS_JSON_FILE); with --from, store paths')
    .addOption(new Option('--from <url>', 'fetch the closures of the STORE_PATHs given from this binary cache (http://, https://, file://) instead; repeatable, tried in order. Signatures by a --trusted-public-key are required unless --no-require-sigs').argParser((value: string, previous: string[] = []) => [...previous, value]))
    .addOption(new Option('-j, --jobs <n>', 'paths read (or, with --from, NARs downloaded) at once').default(4).argParser((v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new Error('--jobs must be a positive integer');
      return n;
    }));
  addSubstitutionOptions(command, { jobs: false });
  return addStoreOptions(command).action(async (files: string[], options) => {
    if (options.from) return copyFrom(files, options);
    if (files.length > 1) throw new Error(`copy takes one closure FILE, not ${files.length} (to fetch store paths from a binary cache, pass --from URL)`);
    const file = files[0];
    const { text, source } = readInput(file);
    let json: unknown;
    let unknown: string[] = [];
    if (isPathList(text)) {
      // A plain list of store paths (`nix-store -qR result`): the local Nix describes their closure.
      ({ json, unknown } = await localClosure(parsePathList(text)));
    } else {
      try {
        json = JSON.parse(text);
      } catch (err) {
        throw new Error(`${source}: not JSON: ${(err as Error).message}`);
      }
    }
    const { entries, problems } = parseClosure(json);
    problems.push(...unknown.map((path) => ({ path, error: new Error('not valid in the local Nix store') })));
    for (const { path, error } of problems) console.error(`nixcas copy: ${describeAbout(path, error)}`);
    startHashThread(); // boots while the store opens
    const services = await openServices(options, { writes: true });
    const progress = new Progress();
    let done = 0;
    let bytes = 0;
    const show = (force = false) =>
      progress.update(() => `copying: ${done}/${entries.length} paths, ${formatBytes(bytes)} read at ${progress.rate(bytes)}`, force);
    try {
      const started = Date.now();
      const summary = await copyClosure(entries, services, {
        concurrency: options.jobs,
        onBytes: (n) => {
          bytes = n;
          show();
        },
        onPathDone: () => {
          done++;
          show(true);
        },
        onPathFailed: (path, error) => {
          done++;
          progress.clear();
          console.error(`nixcas copy: ${describeAbout(path, error)}`);
        },
      });
      progress.clear();
      const seconds = ((Date.now() - started) / 1000).toFixed(1);
      console.error(
        `nixcas copy: ${summary.copied.length} copied (${formatBytes(bytes)}), ${summary.present.length} already present, ` +
          `${summary.failed.length + problems.length} failed, in ${seconds} s`,
      );
      if (summary.failed.length || problems.length) process.exitCode = 1;
    } finally {
      await services.close();
    }
  });
}

/** `copy --from URL STORE_PATH…`: the closures of the paths, fetched through a substituter. */
async function copyFrom(args: string[], options: SubstitutionFlags & { from: string[]; jobs: number; substituter?: string[] }): Promise<void> {
  if (args.length === 0) throw new Error('copy --from needs the store paths to fetch');
  if (options.substituter?.length) throw new Error('copy --from takes its binary caches from --from; --substituter is for the serving commands');
  const wanted: StorePath[] = args.map((arg) => {
    try {
      return parseStorePath(arg.replace(/\/+$/, ''));
    } catch (err) {
      throw new Error(`${arg}: ${(err as Error).message}`);
    }
  });
  const substitution = substituterOptions({ ...options, substituter: options.from, substituterJobs: options.jobs });
  const services = await openServices(options, { writes: true, substitution });
  const progress = new Progress();
  let fetched = 0;
  let bytes = 0;
  const show = (force = false) => progress.update(() => `fetching: ${fetched} paths, ${formatBytes(bytes)} downloaded at ${progress.rate(bytes)}`, force);
  const substituter = services.substituter!;
  substituter.options.onSubstituted = () => {
    fetched++;
    show(true);
  };
  substituter.options.onBytes = (n) => {
    bytes += n;
    show();
  };
  substituter.options.log = (line) => {
    progress.clear();
    console.error(`nixcas copy: ${line}`);
  };
  try {
    const started = Date.now();
    const results = await Promise.all(wanted.map((path) => services.pathInfos.get(path.digest).then((info) => ({ path, info }), (error: Error) => ({ path, info: undefined, error }))));
    progress.clear();
    let failed = 0;
    for (const { path, info } of results) {
      if (info) continue;
      failed++;
      console.error(`nixcas copy: ${formatStorePath(path)}: not copied: no --from cache has it with its closure (see above)`);
    }
    const seconds = ((Date.now() - started) / 1000).toFixed(1);
    console.error(`nixcas copy: ${fetched} paths fetched (${formatBytes(bytes)}), ${wanted.length - failed} of ${wanted.length} requested now in the store, in ${seconds} s`);
    if (failed) process.exitCode = 1;
  } finally {
    await services.close();
  }
}
