// `nixcas ls STORE_PATH[/SUBPATH]`: list what is inside a store path, read from
// castore without mounting it, as `nix store ls` lists it.
import { Command } from 'commander';
import type { Node } from '../castore/model.js';
import { TreeReader, listNodes, listingJson } from '../store/browse.js';
import { rootName } from './native-nar.js';
import { addStoreOptions, openServices } from './store-options.js';
import { displayPath, registeredPath, storePathArgument } from './store-path-argument.js';
import { writeToStdout } from './stdout.js';

/** Lines are gathered into writes of about this many bytes. */
const BATCH = 64 * 1024;

/** `nix store ls -l`'s mode column. */
function mode(node: Node): string {
  if (node.kind === 'directory') return 'dr-xr-xr-x';
  if (node.kind === 'symlink') return 'lrwxrwxrwx';
  return node.node.executable ? '-r-xr-xr-x' : '-r--r--r--';
}

/** Names and targets are bytes: lines are made of them as they are. */
async function* lines(listed: AsyncIterable<{ node: Node; path: Buffer }>, long: boolean): AsyncGenerator<Buffer> {
  let batch: Buffer[] = [];
  let bytes = 0;
  for await (const { node, path } of listed) {
    const parts = long ? [Buffer.from(`${mode(node)} ${String(node.kind === 'file' ? node.node.size : 0).padStart(20)} `), path] : [path];
    if (long && node.kind === 'symlink') parts.push(Buffer.from(' -> '), node.node.target);
    parts.push(Buffer.from('\n'));
    for (const part of parts) {
      batch.push(part);
      bytes += part.length;
    }
    if (bytes >= BATCH) {
      yield Buffer.concat(batch);
      batch = [];
      bytes = 0;
    }
  }
  if (batch.length) yield Buffer.concat(batch);
}

export function lsCommand(): Command {
  const command = new Command('ls')
    .summary('list the files inside a store path, like nix store ls')
    .description(
      'List STORE_PATH (/nix/store/<hash>-<name>, its basename, or a symlink into /nix/store such as ./result), ' +
        'or a directory, file or symlink inside it (/nix/store/<hash>-<name>/bin), from the store without mounting ' +
        'it, as `nix store ls` does: a directory\'s entries as ./NAME, anything else by its name. Symlinks inside ' +
        'the store path are listed, not followed. Names are written as the bytes they are. A path that is not there ' +
        'is an error (exit status 1).',
    )
    .argument('<path>', 'a store path, or a path inside one')
    .option('-l, --long', 'show the type and permissions, the size of files, and where symlinks point')
    .option('-R, --recursive', 'list directories\' contents, all the way down')
    .option('-d, --directory', 'show a directory itself rather than its entries')
    .option('--json', 'print JSON, as nix store ls --json');
  return addStoreOptions(command).action(async (raw: string, options) => {
    if (options.json && options.directory) throw new Error('ls: --directory is useless with --json');
    const argument = storePathArgument(raw);
    const services = await openServices(options, { writes: false });
    try {
      const info = await registeredPath(services, argument.storePath);
      const tree = new TreeReader(services.directories);
      const { subpath } = argument;
      const node = await tree.lookup(info.node, subpath.map((c) => Buffer.from(c)), (depth) => displayPath(argument, depth));
      if (options.json) {
        await writeToStdout([Buffer.from(`${await listingJson(tree, node, Boolean(options.recursive))}\n`, 'latin1')]);
        return;
      }
      const name = subpath.length ? Buffer.from(subpath[subpath.length - 1]!) : rootName(argument.storePath);
      const listed = listNodes(tree, node, name, { recursive: Boolean(options.recursive), directoryItself: Boolean(options.directory) });
      await writeToStdout(lines(listed, Boolean(options.long)));
    } finally {
      await services.close();
    }
  });
}
