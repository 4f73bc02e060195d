// The flags naming the store's services, which every subcommand takes. Two
// parsers read them: commander (store-options.ts) and the entry point's fast
// path (entry.ts), which must not load commander.
import { type AddressOptions, defaultStoreDir } from '../services/addresses.js';

export interface StoreFlag {
  /** The long flag without its dashes, e.g. `blob-service-addr`. */
  name: string;
  key: keyof AddressOptions;
  value: '<dir>' | '<url>';
  help: () => string;
}

export const STORE_FLAGS: readonly StoreFlag[] = [
  { name: 'store', key: 'store', value: '<dir>', help: () => `local store directory for all services (env NIXCAS_STORE; default ${defaultStoreDir()})` },
  { name: 'blob-service-addr', key: 'blobServiceAddr', value: '<url>', help: () => 'blob service URL (env BLOB_SERVICE_ADDR)' },
  { name: 'directory-service-addr', key: 'directoryServiceAddr', value: '<url>', help: () => 'directory service URL (env DIRECTORY_SERVICE_ADDR)' },
  { name: 'path-info-service-addr', key: 'pathInfoServiceAddr', value: '<url>', help: () => 'path info service URL (env PATH_INFO_SERVICE_ADDR)' },
  { name: 'local-cache', key: 'localCache', value: '<dir>', help: () => 'a local store in front of remote (grpc+…) blob and directory services: what they send is kept there and read from there (env NIXCAS_LOCAL_CACHE)' },
];

/**
 * The store flags may come before the subcommand (`nixcas --store DIR nar …`):
 * they are moved after it, where each subcommand takes them.
 */
export function storeFlagsAfterSubcommand(args: string[], flags: readonly string[] = STORE_FLAGS.map((f) => f.name)): string[] {
  const moved: string[] = [];
  let i = 0;
  while (i < args.length && args[i]!.startsWith('--')) {
    const [name, inline] = args[i]!.slice(2).split(/=(.*)/s, 2);
    if (!flags.includes(name!)) return args; // --help, --version, or a mistake: commander answers
    if (inline !== undefined) {
      moved.push(args[i]!);
      i += 1;
    } else {
      if (i + 1 >= args.length) return args;
      moved.push(args[i]!, args[i + 1]!);
      i += 2;
    }
  }
  if (moved.length === 0 || i >= args.length) return args;
  return [args[i]!, ...moved, ...args.slice(i + 1)];
}
