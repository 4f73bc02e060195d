// `nixcas cat STORE_PATH/FILE`: write a file inside a store path to stdout,
// streamed from the blob service, as `nix store cat` does.
import { Command } from 'commander';
import { TreeReader, fileContents } from '../store/browse.js';
import { addStoreOptions, openServices } from './store-options.js';
import { displayPath, registeredPath, storePathArgument } from './store-path-argument.js';
import { writeToStdout } from './stdout.js';

export function catCommand(): Command {
  const command = new Command('cat')
    .summary('write a file inside a store path to stdout, like nix store cat')
    .description(
      'Write the contents of a file in the store to stdout: a store path that is a single file, or a file inside ' +
        'one (/nix/store/<hash>-<name>/bin/hello, or ./result/bin/hello), read from the store as it is written ' +
        '(never held whole) and checked against its digest. Symlinks are not followed. A directory, a symlink or a ' +
        'path that is not there is an error (exit status 1).',
    )
    .argument('<path>', 'a file in the store');
  return addStoreOptions(command).action(async (raw: string, options) => {
    const argument = storePathArgument(raw);
    const services = await openServices(options, { writes: false });
    try {
      const info = await registeredPath(services, argument.storePath);
      const tree = new TreeReader(services.directories);
      const where = (depth: number) => displayPath(argument, depth);
      const node = await tree.lookup(info.node, argument.subpath.map((c) => Buffer.from(c)), where);
      if (node.kind !== 'file') throw new Error(`${where(argument.subpath.length)} is a ${node.kind}, not a regular file`);
      await writeToStdout(fileContents(services.blobs, node.node, where(argument.subpath.length)));
    } finally {
      await services.close();
    }
  });
}
