// `nixcas root add|remove|list`: the GC roots of a store (STORE/roots/); a root keeps its whole closure.
import { Command } from 'commander';
import { addStoreOptions } from './store-options.js';
import { localStoreOf } from './collection-flags.js';
import { storePathArgument } from './store-path-argument.js';
import { formatStorePath } from '../store/storepath.js';

export function rootCommand(): Command {
  const root = new Command('root').summary('manage GC roots: what `nixcas gc` keeps, with everything it refers to');
  root.addCommand(
    addStoreOptions(new Command('add').description('Make registered store paths GC roots.').argument('<store-paths...>', 'store paths, or links to them such as ./result')).action(
      async (raw: string[], options) => {
        const { addRoots } = await import('../store/gc.js');
        const added = await addRoots(localStoreOf(options, 'root add'), raw.map((r) => storePathArgument(r).storePath));
        for (const path of added) console.log(formatStorePath(path));
      },
    ),
  );
  root.addCommand(
    addStoreOptions(new Command('remove').description('Stop keeping store paths as GC roots (the next gc may remove them).').argument('<store-paths...>', 'store paths')).action(
      async (raw: string[], options) => {
        const { removeRoots } = await import('../store/gc.js');
        await removeRoots(localStoreOf(options, 'root remove'), raw.map((r) => storePathArgument(r).storePath));
      },
    ),
  );
  root.addCommand(
    addStoreOptions(new Command('list').description('Print the GC roots, one store path a line.')).action(async (options) => {
      const { listRoots } = await import('../store/gc.js');
      for (const path of await listRoots(localStoreOf(options, 'root list'))) console.log(formatStorePath(path));
    }),
  );
  return root;
}
