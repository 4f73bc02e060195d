#!/usr/bin/env node
// The nixcas command's entry point (dist/cli/nixcas.cjs). `nixcas nar` of a
// path in a local store is answered here, by the native renderer, before the
// command line proper (main.ts: commander and every subcommand, ~40 ms to
// load) is loaded; that is most of what separates a fresh `nixcas nar` from
// `nix-store --dump` on a tree of small files. Every other command, and any
// `nar` invocation this does not handle (help, an unknown flag, a gRPC store,
// a terminal on stdout), goes to main.ts, which gives the usual answers.
import { isatty } from 'node:tty';
import { parseArgs } from 'node:util';
import type { AddressOptions } from '../services/addresses.js';
import { writeNarNatively } from './native-nar.js';
import { STORE_FLAGS, storeFlagsAfterSubcommand } from './store-flags.js';

/** True when the NAR was written; false to leave the invocation to main.ts. */
function narFastPath(args: string[]): boolean {
  if (args[0] !== 'nar' || isatty(1)) return false;
  let parsed;
  try {
    const options = Object.fromEntries(STORE_FLAGS.map((flag) => [flag.name, { type: 'string' as const }]));
    parsed = parseArgs({ args: args.slice(1), options, allowPositionals: true, strict: true });
  } catch {
    return false;
  }
  if (parsed.positionals.length !== 1) return false;
  const addressOptions: AddressOptions = {};
  for (const flag of STORE_FLAGS) addressOptions[flag.key] = parsed.values[flag.name] as string | undefined;
  return writeNarNatively(parsed.positionals[0]!, addressOptions);
}

let handled = false;
try {
  handled = narFastPath(storeFlagsAfterSubcommand(process.argv.slice(2)));
} catch (err) {
  // Possibly after part of the NAR was written: main.ts must not start over.
  console.error(`nixcas: ${(err as Error).message}`);
  process.exitCode = 1;
  handled = true;
}
// The bundle of main.ts sits beside this one's (scripts/bundle.mjs). Its loader
// comes in only now: what it needs (node:crypto, node:vm) would slow the fast path.
if (!handled) {
  import('./load-main.js')
    .then(({ loadMain }) => loadMain(import.meta.url))
    .catch((err: unknown) => {
      console.error(`nixcas: ${(err as Error)?.stack ?? err}`);
      process.exitCode = 1;
    });
}
