// `nixcas delete STORE_PATH…`: unregisters paths nothing else refers to, and removes what only they used.
import { Command } from 'commander';
import { Progress } from './progress.js';
import { addStoreOptions } from './store-options.js';
import { withSmallYoungGeneration } from './young-generation.js';
import { localStoreOf } from './collection-flags.js';
import { storePathArgument } from './store-path-argument.js';
import { printReport } from './gc.js';

export function deleteCommand(): Command {
  const command = new Command('delete')
    .summary('remove store paths that nothing registered refers to')
    .description(
      'Unregister the STORE_PATHs and remove the directories and blobs that no remaining path reaches. ' +
        'Refuses, removing nothing, when a path is a GC root or another registered path refers to it (it names ' +
        'the referrer: delete both at once, or neither). Waits for writers as `nixcas gc` does.',
    )
    .argument('<store-paths...>', 'store paths (/nix/store/HASH-NAME, HASH-NAME, or a link such as ./result)')
    .option('--dry-run', 'report what would be removed, remove nothing')
    .option('--json', 'print the report as JSON on stdout');
  return addStoreOptions(command).action(async (raw: string[], options) => {
    const root = localStoreOf(options, 'delete');
    withSmallYoungGeneration(); // a walk over every record: a bounded young generation keeps RSS down
    const paths = raw.map((r) => storePathArgument(r).storePath);
    const { deletePaths } = await import('../store/gc.js');
    const progress = new Progress();
    const report = await deletePaths(root, paths, {
      dryRun: Boolean(options.dryRun),
      onWait: () => console.error(`delete: waiting for the writers of ${root} to finish`),
      onProgress: (line) => progress.update(`delete: ${line}`),
    });
    progress.clear();
    printReport('delete', report, Boolean(options.dryRun), Boolean(options.json));
  });
}
