// The store flags every subcommand shares, and opening what they name.
import { type Command, InvalidArgumentError, Option } from 'commander';
import type { BlobService } from '../castore/blobservice.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import {
  type AddressOptions, type ServiceAddresses, openBlobService, openDirectoryService, openPathInfoService, resolveAddresses,
} from '../services/addresses.js';
import type { PathInfoService } from '../store/pathinfoservice.js';
import { STORE_FLAGS } from './store-flags.js';

export function addStoreOptions(command: Command): Command {
  for (const flag of STORE_FLAGS) command.addOption(new Option(`--${flag.name} ${flag.value}`, flag.help()));
  return command;
}

export interface OpenServices {
  addresses: ServiceAddresses;
  blobs: BlobService;
  directories: DirectoryService;
  pathInfos: PathInfoService;
  close(): Promise<void>;
}

/**
 * Opens the three services. `writes`: the command stores things, so a local
 * store may be made where there is none (in an empty or missing directory);
 * commands that only read never make one.
 */
export async function openServices(options: AddressOptions, { writes }: { writes: boolean }): Promise<OpenServices> {
  const addresses = resolveAddresses(options);
  const blobs = await openBlobService(addresses.blob, { create: writes });
  const directories = await openDirectoryService(addresses.directory, { create: writes });
  const pathInfos = await openPathInfoService(addresses.pathInfo, { create: writes });
  return {
    addresses,
    blobs,
    directories,
    pathInfos,
    close: async () => {
      await pathInfos.close();
      await blobs.close();
      await directories.close();
    },
  };
}

/** A permission mode given as octal (`--socket-mode 0660`). */
export function octalMode(value: string): number {
  if (!/^0?[0-7]{3}$/.test(value)) throw new InvalidArgumentError('expected an octal mode such as 0660');
  return parseInt(value, 8);
}
