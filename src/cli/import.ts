// `nixcas import PATH…`: add local trees as content-addressed store paths.
import { describeAbout } from './errors.js';
import { Command } from 'commander';
import { importPath } from '../store/import.js';
import { formatStorePath, storePathNameProblem } from '../store/storepath.js';
import { Progress, formatBytes } from './progress.js';
import { startHashThread } from '../store/sha256-off-thread.js';
import { addStoreOptions, openServices } from './store-options.js';

export function importCommand(): Command {
  const command = new Command('import')
    .summary('add directories or files as store paths, like nix-store --add')
    .description(
      'Import each PATH (a directory, file or symlink) into the store and print its store path, one per ' +
        'line: the same /nix/store path `nix-store --add PATH` would create (a NAR-hashed "source" path named ' +
        'after the basename). Executable bits, symlinks and non-UTF-8 names are kept; other metadata is not.',
    )
    .argument('<paths...>', 'files or directories to import')
    .option('--name <name>', 'store path name instead of the basename (only with one PATH)');
  return addStoreOptions(command).action(async (paths: string[], options) => {
    if (options.name && paths.length > 1) throw new Error('--name works with one PATH only');
    const nameProblem = options.name !== undefined ? storePathNameProblem(options.name) : undefined;
    if (nameProblem) throw new Error(`--name ${JSON.stringify(options.name)}: not a store path name: ${nameProblem}`);
    startHashThread(); // boots while the store opens
    const services = await openServices(options, { writes: true });
    const progress = new Progress();
    let failed = 0;
    let totalBytes = 0;
    try {
      for (const path of paths) {
        let pathBytes = 0;
        try {
          const { storePath } = await importPath(path, services, {
            name: options.name,
            onProgress: (bytes, files) => {
              pathBytes = bytes;
              progress.update(() => `importing ${path}: ${files} files, ${formatBytes(bytes)} (${progress.rate(totalBytes + bytes)})`);
            },
          });
          totalBytes += pathBytes;
          progress.clear();
          console.log(formatStorePath(storePath));
        } catch (err) {
          progress.clear();
          failed++;
          console.error(`nixcas import: ${describeAbout(path, err)}`);
        }
      }
    } finally {
      await services.close();
    }
    // On a terminal, what it all came to (piped, stdout's store paths are the whole answer).
    if (progress.enabled) console.error(`nixcas import: ${paths.length - failed} of ${paths.length} paths, ${formatBytes(totalBytes)} in ${progress.elapsed()} (${progress.rate(totalBytes)})`);
    if (failed) {
      // One path: its own line said it all.
      if (paths.length > 1) console.error(`nixcas import: ${failed} of ${paths.length} paths failed`);
      process.exitCode = 1;
    }
  });
}
