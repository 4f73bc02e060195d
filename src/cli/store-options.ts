// The store flags every subcommand shares, and opening what they name.
import { type Command, InvalidArgumentError, Option } from 'commander';
import type { BlobService } from '../castore/blobservice.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import {
  type AddressOptions, type ServiceAddresses, openBlobService, openDirectoryService, openPathInfoService, resolveAddresses, withLocalCache,
} from '../services/addresses.js';
import { BinaryCache } from '../store/binary-cache.js';
import { MemoryPathInfoService } from '../store/backends/memory.js';
import type { PathInfoService } from '../store/pathinfoservice.js';
import { parsePublicKey } from '../store/signing.js';
import { Substituter, type SubstituterOptions, substitutingPathInfos } from '../store/substituter.js';
import { STORE_FLAGS } from './store-flags.js';

export function addStoreOptions(command: Command): Command {
  for (const flag of STORE_FLAGS) command.addOption(new Option(`--${flag.name} ${flag.value}`, flag.help()));
  return command;
}

export interface SubstitutionFlags {
  substituter?: string[];
  trustedPublicKey?: string[];
  requireSigs?: boolean;
  substituterTimeout?: number;
  negativeTtl?: number;
  substituterJobs?: number;
}

const collect = (value: string, previous: string[] = []) => [...previous, value];

function positiveNumber(flag: string) {
  return (value: string) => {
    const n = Number(value);
    if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError(`${flag} takes a positive number`);
    return n;
  };
}

/** Nix's substituters and trusted-public-keys, for the commands that serve or copy a store. */
export function addSubstitutionOptions(command: Command, { jobs = true }: { jobs?: boolean } = {}): Command {
  command
    .addOption(new Option('--substituter <url>', 'a binary cache (http://, https://, file://) asked for paths the store lacks; repeatable, tried in order (env NIXCAS_SUBSTITUTERS, space-separated)').argParser(collect))
    .addOption(new Option('--trusted-public-key <name:base64>', 'a key whose signature a substituted path needs; repeatable (env NIXCAS_TRUSTED_PUBLIC_KEYS, space-separated)').argParser(collect))
    .addOption(new Option('--no-require-sigs', 'take substituted paths without a valid signature by a trusted key (as Nix\'s require-sigs = false)'))
    .addOption(new Option('--substituter-timeout <seconds>', 'how long a substituter may take to answer, or pause in a NAR, before that lookup fails').default(30).argParser(positiveNumber('--substituter-timeout')))
    .addOption(new Option('--negative-ttl <seconds>', 'how long a path no substituter has is remembered as missing').default(30).argParser(positiveNumber('--negative-ttl')));
  if (jobs) command.addOption(new Option('--substituter-jobs <n>', 'NARs downloaded at once').default(8).argParser(positiveNumber('--substituter-jobs')));
  return command;
}

/** The substituter options the flags and environment name, or undefined when there is no substituter. */
export function substituterOptions(flags: SubstitutionFlags, env: NodeJS.ProcessEnv = process.env): Omit<SubstituterOptions, 'log'> | undefined {
  const split = (text: string | undefined) => (text ?? '').split(/\s+/).filter(Boolean);
  const urls = flags.substituter?.length ? flags.substituter : split(env.NIXCAS_SUBSTITUTERS);
  if (urls.length === 0) return undefined;
  const keys = flags.trustedPublicKey?.length ? flags.trustedPublicKey : split(env.NIXCAS_TRUSTED_PUBLIC_KEYS);
  for (const key of keys) {
    try {
      parsePublicKey(key);
    } catch (err) {
      throw new Error(`--trusted-public-key ${JSON.stringify(key)}: ${(err as Error).message}`);
    }
  }
  const timeoutMs = (flags.substituterTimeout ?? 30) * 1000;
  return {
    caches: urls.map((url) => new BinaryCache(url, { timeoutMs })),
    trustedKeys: keys,
    requireSigs: flags.requireSigs !== false,
    negativeTtlMs: (flags.negativeTtl ?? 30) * 1000,
    jobs: Math.floor(flags.substituterJobs ?? 8),
  };
}

export interface OpenServices {
  addresses: ServiceAddresses;
  blobs: BlobService;
  directories: DirectoryService;
  pathInfos: PathInfoService;
  /** Set when the flags name substituters: pathInfos then fetches what the store lacks through it. */
  substituter?: Substituter;
  close(): Promise<void>;
}

/**
 * Opens the three services. `writes`: the command stores things, so a local
 * store may be made where there is none (in an empty or missing directory);
 * commands that only read never make one.
 */
export async function openServices(
  options: AddressOptions & SubstitutionFlags,
  { writes, substitution, log = (line) => console.error(`nixcas: ${line}`) }: { writes: boolean; substitution?: Omit<SubstituterOptions, 'log'>; log?: (line: string) => void },
): Promise<OpenServices> {
  const addresses = resolveAddresses(options);
  const substituting = substitution ?? substituterOptions(options);
  // What is substituted is stored: a command that serves with substituters writes.
  // nix+http(s)://CACHE?trusted-public-keys=… (tvix's and snix's spelling): path infos come from a
  // binary cache, substituted into the castore services and remembered in memory.
  const fromCache = nixCacheAddress(addresses.pathInfo);
  if (fromCache && substituting) throw new Error(`--path-info-service-addr ${addresses.pathInfo} is a binary cache already: give either it or --substituter`);
  const create = writes || substituting !== undefined || fromCache !== undefined;
  const { blobs, directories } = await withLocalCache(
    addresses,
    await openBlobService(addresses.blob, { create }),
    await openDirectoryService(addresses.directory, { create }),
  );
  const local = fromCache ? new MemoryPathInfoService() : await openPathInfoService(addresses.pathInfo, { create });
  const substitutes = fromCache ?? substituting;
  const substituter = substitutes && new Substituter({ blobs, directories, pathInfos: local }, { ...substitutes, log });
  return {
    addresses,
    blobs,
    directories,
    pathInfos: substituter ? substitutingPathInfos(local, substituter) : local,
    substituter,
    close: async () => {
      await local.close();
      await blobs.close();
      await directories.close();
    },
  };
}

/**
 * The substitution a `nix+http://HOST/PATH?trusted-public-keys=K1%20K2` path info address means
 * (`nix+https://` likewise), or undefined for any other address.
 */
export function nixCacheAddress(raw: string): Omit<SubstituterOptions, 'log'> | undefined {
  if (!/^nix\+https?:\/\//.test(raw)) return undefined;
  const url = new URL(raw.slice('nix+'.length));
  const keys = (url.searchParams.get('trusted-public-keys') ?? '').split(/\s+/).filter(Boolean);
  url.searchParams.delete('trusted-public-keys');
  for (const key of keys) {
    try {
      parsePublicKey(key);
    } catch (err) {
      throw new Error(`${raw}: trusted-public-keys ${JSON.stringify(key)}: ${(err as Error).message}`);
    }
  }
  if (keys.length === 0) throw new Error(`${raw}: give the keys its paths must be signed with, as ?trusted-public-keys=NAME:BASE64 (several separated by spaces)`);
  return { caches: [new BinaryCache(url.href.replace(/\?$/, ''), { timeoutMs: 30_000 })], trustedKeys: keys, requireSigs: true, negativeTtlMs: 30_000, jobs: 8 };
}

/** A permission mode given as octal (`--socket-mode 0660`). */
export function octalMode(value: string): number {
  if (!/^0?[0-7]{3}$/.test(value)) throw new InvalidArgumentError('expected an octal mode such as 0660');
  return parseInt(value, 8);
}

/** --metrics-listen, for the commands that serve. */
export function addMetricsOption(command: Command): Command {
  return command.addOption(new Option('--metrics-listen <host:port>', 'serve Prometheus metrics at http://HOST:PORT/metrics (requests, errors, bytes, substitutions, verification failures, process)'));
}

/** --log-format and --log-level, for the commands that serve (cli/log.ts). */
export function addLogOptions(command: Command): Command {
  return command
    .addOption(new Option('--log-format <format>', 'text (default) or json: one object a line with time, level, cmd and msg (env NIXCAS_LOG_FORMAT)').choices(['text', 'json']))
    .addOption(new Option('--log-level <level>', 'info (default), warn or error: what to leave out below it (env NIXCAS_LOG_LEVEL)').choices(['info', 'warn', 'error']));
}
