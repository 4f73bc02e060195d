// `nixcas gc`: removes every path the GC roots do not keep, and every object nothing kept reaches.
import { Command, InvalidArgumentError, Option } from 'commander';
import { Progress, formatBytes } from './progress.js';
import { addStoreOptions } from './store-options.js';
import { withSmallYoungGeneration } from './young-generation.js';
import { localStoreOf, parseDuration, parseSize } from './collection-flags.js';
import type { CollectionReport } from '../store/gc.js';

export function gcCommand(): Command {
  const command = new Command('gc')
    .summary('remove what no GC root keeps (paths, directories, blobs)')
    .description(
      'Keep every path reachable from the GC roots (`nixcas root add`) through references; unregister every other ' +
        'path; then remove every directory and blob that no kept path reaches, including what interrupted imports ' +
        'and uploads left behind. Safe while the store is in use: writers (imports, copies, uploads, a daemon) hold ' +
        'the store\'s GC lock while they write and for a minute after (NIXCAS_WRITE_LEASE_SECONDS), and gc waits for ' +
        'them; a VM or mount reading a removed path gets EIO for it, never wrong bytes. A store with no roots keeps nothing.\n\n' +
        'Example:\n  nixcas root add --store /var/lib/nixcas ./result\n  nixcas gc --store /var/lib/nixcas --dry-run',
    )
    .option('--dry-run', 'report what would be removed, remove nothing')
    .addOption(new Option('--max-freed <size>', 'stop removing blob files once SIZE bytes are freed (e.g. 10G); paths are unregistered all the same').argParser((v) => {
      try {
        return parseSize(v);
      } catch (err) {
        throw new InvalidArgumentError((err as Error).message);
      }
    }))
    .addOption(new Option('--keep-newer-than <duration>', 'also keep paths registered less than DURATION ago (e.g. 7d, 12h), with their closures').argParser((v) => {
      try {
        return parseDuration(v);
      } catch (err) {
        throw new InvalidArgumentError((err as Error).message);
      }
    }))
    .option('--json', 'print the report as JSON on stdout');
  return addStoreOptions(command).action(async (options) => {
    const root = localStoreOf(options, 'gc');
    withSmallYoungGeneration(); // a walk over every record: a bounded young generation keeps RSS down
    const { collectGarbage } = await import('../store/gc.js');
    const progress = new Progress();
    const report = await collectGarbage(root, {
      dryRun: Boolean(options.dryRun),
      maxFreed: options.maxFreed,
      keepNewerThan: options.keepNewerThan,
      onWait: () => console.error(`gc: waiting for the writers of ${root} to finish (they hold its GC lock while they write, and a while after)`),
      onProgress: (line) => progress.update(`gc: ${line}`),
    });
    progress.clear();
    printReport('gc', report, Boolean(options.dryRun), Boolean(options.json));
  });
}

export function printReport(command: string, report: CollectionReport, dryRun: boolean, json: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify({ dryRun, ...report }, null, 2)}\n`);
    return;
  }
  const verb = dryRun ? 'would remove' : 'removed';
  for (const path of report.removed) console.log(path);
  console.error(
    `${command}: ${verb} ${report.removed.length} paths (kept ${report.kept}, from ${report.roots} roots), ` +
      `${report.directories} directories, ${report.smallBlobs} small blobs and ${report.blobFiles} blob files: ` +
      `${formatBytes(report.fileBytes)} of blob files${dryRun ? '' : ' freed'}, ${formatBytes(report.recordBytes)} of database records` +
      `${dryRun ? '' : ' (reused by the store: its database file does not shrink)'}`,
  );
}
