// The store flags every subcommand shares, and opening what they name.
import { type Command, Option } from 'commander';
import type { BlobService } from '../castore/blobservice.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import {
  type AddressOptions, type ServiceAddresses, defaultStoreDir, openBlobService, openDirectoryService, openPathInfoService,
  resolveAddresses,
} from '../services/addresses.js';
import type { PathInfoService } from '../store/pathinfoservice.js';

export function addStoreOptions(command: Command): Command {
  return command
    .addOption(new Option('--store <dir>', `local store directory for all services (env NIXCAS_STORE; default ${defaultStoreDir()})`))
    .addOption(new Option('--blob-service-addr <url>', 'blob service URL (env BLOB_SERVICE_ADDR)'))
    .addOption(new Option('--directory-service-addr <url>', 'directory service URL (env DIRECTORY_SERVICE_ADDR)'))
    .addOption(new Option('--path-info-service-addr <url>', 'path info service URL (env PATH_INFO_SERVICE_ADDR)'));
}

export interface OpenServices {
  addresses: ServiceAddresses;
  blobs: BlobService;
  directories: DirectoryService;
  pathInfos: PathInfoService;
  close(): Promise<void>;
}

export async function openServices(options: AddressOptions): Promise<OpenServices> {
  const addresses = resolveAddresses(options);
  const blobs = await openBlobService(addresses.blob);
  const directories = await openDirectoryService(addresses.directory);
  const pathInfos = await openPathInfoService(addresses.pathInfo);
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
