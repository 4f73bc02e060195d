// `nixcas nar STORE_PATH`: write a store path's NAR to stdout.
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { Command } from 'commander';
import { renderNar } from '../store/nar/render.js';
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
    if (process.stdout.isTTY) throw new Error('refusing to write a NAR to a terminal; redirect stdout');
    const services = await openServices(options);
    try {
      const info = await services.pathInfos.get(storePath.digest);
      if (!info) throw new Error(`${formatStorePath(storePath)} is not in the store (${services.addresses.pathInfo})`);
      await pipeline(Readable.from(renderNar(info.node, services), { objectMode: false }), process.stdout);
    } finally {
      await services.close();
    }
  });
}
