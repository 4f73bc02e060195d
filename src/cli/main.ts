// The nixcas command line: one file per subcommand, wired here.
import { createRequire } from 'node:module';
import { Command } from 'commander';
import { daemonCommand } from './daemon.js';
import { copyCommand } from './copy.js';
import { importCommand } from './import.js';
import { mountCommand } from './mount.js';
import { virtiofsCommand } from './virtiofs.js';
import { narCommand } from './nar.js';
import { narBridgeCommand } from './nar-bridge.js';
import { verifyCommand } from './verify.js';
import { describeError } from './errors.js';
import { storeFlagsAfterSubcommand } from './store-flags.js';
import { pathInfoCommand } from './path-info.js';
import { lsCommand } from './ls.js';
import { catCommand } from './cat.js';
import { gcCommand } from './gc.js';
import { deleteCommand } from './delete.js';
import { rootCommand } from './root.js';

const { version } = createRequire(import.meta.url)('../../package.json') as { version: string };

const program = new Command('nixcas')
  .description('A content-addressed Nix store, served over gRPC (tvix-compatible), FUSE, virtio-fs and HTTP.')
  .version(version)
  .showHelpAfterError()
  .addCommand(daemonCommand())
  .addCommand(importCommand())
  .addCommand(copyCommand())
  .addCommand(narCommand())
  .addCommand(mountCommand())
  .addCommand(virtiofsCommand())
  .addCommand(narBridgeCommand())
  .addCommand(verifyCommand())
  .addCommand(rootCommand())
  .addCommand(deleteCommand())
  .addCommand(gcCommand())
  .addCommand(pathInfoCommand())
  .addCommand(lsCommand())
  .addCommand(catCommand());

const argv = [...process.argv.slice(0, 2), ...storeFlagsAfterSubcommand(process.argv.slice(2))];
program.parseAsync(argv).catch((err: Error) => {
  console.error(`nixcas: ${describeError(err)}`);
  process.exit(1);
});
