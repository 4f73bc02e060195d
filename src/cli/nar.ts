// `nixcas nar STORE_PATH`: write a store path's NAR to stdout.
import { isatty } from 'node:tty';
import { Command } from 'commander';
import { narArgument, notInStore, rootName, writeNarNatively } from './native-nar.js';
import { addStoreOptions, openServices } from './store-options.js';

export function narCommand(): Command {
  const command = new Command('nar')
    .summary('write a store path as a NAR to stdout, like nix-store --dump')
    .description(
      'Render STORE_PATH (/nix/store/<hash>-<name>, or just its basename) from the store as a NAR on ' +
        'stdout, byte for byte what `nix-store --dump` gives for the same path.\n\n' +
        'From a local store the NAR is written by a native renderer that starts in milliseconds; ' +
        'NIXCAS_NATIVE_NAR=0 makes the TypeScript renderer do it, as it always does for gRPC stores; ' +
        'NIXCAS_NATIVE_NAR=1 makes it an error when the native renderer cannot.',
    )
    .argument('<store-path>', 'a store path registered in the store');
  return addStoreOptions(command).action(async (raw: string, options) => {
    // fd 1 is written directly (process.stdout would make a pipe non-blocking and copy every byte through a stream).
    if (isatty(1)) throw new Error('refusing to write a NAR to a terminal; redirect stdout');
    if (writeNarNatively(raw, options)) return;
    const storePath = narArgument(raw);
    const { writeNarToFd } = await import('../store/nar/write-fd.js');
    const services = await openServices(options, { writes: false });
    try {
      const info = await services.pathInfos.get(storePath.digest);
      // Registered under its hash part; a path of that hash with another name is not this one.
      if (!info || !info.node.node.name.equals(rootName(storePath))) {
        throw notInStore(storePath, services.addresses.pathInfo);
      }
      await writeNarToFd(info.node, services, 1);
    } finally {
      await services.close();
    }
  });
}
