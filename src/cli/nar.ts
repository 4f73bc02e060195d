// `nixcas nar STORE_PATH`: write a store path's NAR to stdout.
import { isatty } from 'node:tty';
import { Command } from 'commander';
import { writeNarToFd } from '../store/nar/write-fd.js';
import { parseStorePath, formatStorePath } from '../store/storepath.js';
import { addStoreOptions, openServices } from './store-options.js';

export function narCommand(): Command {
  const command = new Command('nar')
    .summary('write a store path as a NAR to stdout, like nix-store --dump')
    .description(
      'Render STORE_PATH (/nix/store/<hash>-<name>, or just its basename) from the store as a NAR on ' +
        'stdout, byte for byte what `nix-store --dump` gives for the same path.',
    )
    .argument('<store-path>', 'a store path registered in the store');
  return addStoreOptions(command).action(async (raw: string, options) => {
    const storePath = parseStorePath(raw.includes('/') ? raw : `/nix/store/${raw}`);
    // fd 1 is written directly (process.stdout would make a pipe non-blocking and copy every byte through a stream).
    if (isatty(1)) throw new Error('refusing to write a NAR to a terminal; redirect stdout');
    const services = await openServices(options);
    try {
      const info = await services.pathInfos.get(storePath.digest);
      if (!info) throw new Error(`${formatStorePath(storePath)} is not in the store (${services.addresses.pathInfo})`);
      await writeNarToFd(info.node, services, 1);
    } finally {
      await services.close();
    }
  });
}
