// `nixcas nar-bridge`: the store as an HTTP Nix binary cache until SIGINT/SIGTERM.
import { readFileSync } from 'node:fs';
import { makeLogger } from './log.js';
import { activationSocket, notifySystemd } from './systemd.js';
import { Command, InvalidArgumentError } from 'commander';
import { addLogOptions, addMetricsOption, addStoreOptions, addSubstitutionOptions, openServices } from './store-options.js';

export const DEFAULT_BRIDGE_LISTEN = '[::]:9000';

export function narBridgeCommand(): Command {
  const command = new Command('nar-bridge')
    .summary('serve the store to Nix as an HTTP binary cache (substitute from it, nix copy to it)')
    .description(
      'Serve every registered store path as a Nix binary cache: /nix-cache-info, /<hash>.narinfo, and the NAR each ' +
        'narinfo names, rendered from the store as it is sent (uncompressed, with Range support). Use it with\n' +
        '  nix copy --from http://HOST:9000 /nix/store/…   or   substituters = http://HOST:9000\n' +
        'With --allow-upload it also takes `nix copy --to http://HOST:9000 …` (NARs uncompressed, xz or zstd; ' +
        'xz and zstd bodies are decoded by the xz and zstd programs). A path becomes visible once its narinfo is ' +
        'uploaded, and only after all of its references are in the store. Reads are open to anyone who can reach ' +
        'the address; guard uploads with --upload-credentials. One access log line per request goes to stderr.',
    )
    .option('-l, --listen <address>', 'host:port or [ipv6]:port to listen on', DEFAULT_BRIDGE_LISTEN)
    .option('--priority <n>', 'Priority in /nix-cache-info (Nix prefers lower; cache.nixos.org is 40)', priority, 39)
    .option('--sign-key <file>', 'sign every narinfo served with this Nix secret key (nix-store --generate-binary-cache-key)')
    .option('--allow-upload', 'accept uploads (PUT of NARs and narinfos)', false)
    .option('--upload-credentials <file>', 'uploads need HTTP Basic credentials from this file of user:password lines (Nix sends them from its netrc-file)')
    .option('--max-nar-size <bytes>', 'refuse an upload whose NAR, decompressed, is larger (e.g. 64G; default 32G)', byteSize)
    .option('--no-access-log', 'do not log each request');
  return addLogOptions(addMetricsOption(addSubstitutionOptions(addStoreOptions(command)))).action(async (options) => {
    const [{ NarBridge }, { Credentials }, { parseSecretKey }] = await Promise.all([
      import('../narbridge/server.js'),
      import('../narbridge/credentials.js'),
      import('../store/signing.js'),
    ]);
    const logger = makeLogger('nar-bridge', options);
    const log = logger.info;
    const { host, port } = listenAddress(options.listen);
    const signingKey = options.signKey ? parseSecretKeyFile(options.signKey, parseSecretKey) : undefined;
    let credentials;
    if (options.uploadCredentials) {
      if (!options.allowUpload) throw new Error('--upload-credentials guards uploads: give --allow-upload too');
      const loaded = Credentials.load(options.uploadCredentials);
      if (loaded.warning) log(`warning: ${loaded.warning}`);
      credentials = loaded.credentials;
    }
    const services = await openServices(options, { writes: options.allowUpload === true, log: logger.warn });
    const bridge = new NarBridge({
      services,
      priority: options.priority,
      signingKey,
      allowUpload: options.allowUpload,
      credentials,
      accessLog: options.accessLog ? logger.access : undefined,
      errorLog: (line) => console.error(line),
      maxNarSize: options.maxNarSize,
      // For the slow-client test: a shorter header deadline.
      headersTimeoutMs: process.env.NIXCAS_BRIDGE_HEADERS_TIMEOUT_MS ? Number(process.env.NIXCAS_BRIDGE_HEADERS_TIMEOUT_MS) : undefined,
    });
    await new Promise<void>((resolve, reject) => {
      bridge.server.once('error', reject);
      // Socket activation: systemd made and bound the socket; it is fd 3.
      const handedOver = activationSocket();
      bridge.server.listen(handedOver !== undefined ? { fd: handedOver } : { host, port }, resolve);
    }).catch(async (err: NodeJS.ErrnoException) => {
      await services.close();
      throw new Error(`cannot listen on ${options.listen}: ${err.code === 'EADDRINUSE' ? 'the address is in use' : err.message}`);
    });
    const bound = bridge.server.address();
    const actualPort = typeof bound === 'object' && bound ? bound.port : port;
    const boundHost = typeof bound === 'object' && bound ? bound.address : host; // as bound: a handed-over socket's own
    const shownHost = boundHost.includes(':') ? `[${boundHost}]` : boundHost;
    const uploads = options.allowUpload ? (credentials ? 'uploads with credentials' : 'uploads open to anyone') : 'uploads off';

    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      log(`${signal}, stopping`);
      notifySystemd({ STOPPING: '1' }, log);
      bridge.server.close();
      bridge.server.closeIdleConnections();
      // Downloads in flight get a few seconds to finish.
      setTimeout(() => bridge.server.closeAllConnections(), 5000).unref();
      bridge.server.once('close', async () => {
        await services.close();
        process.exit(0);
      });
    };
    // Before saying it listens: whoever waits for that may send a signal at once.
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
    if (options.metricsListen) {
      const [{ startMetrics }, http, { substitutionCounts }] = await Promise.all([
        import('./metrics.js'), import('../narbridge/counters.js'), import('../store/substituter.js'),
      ]);
      await startMetrics(options.metricsListen, { http, substitution: substitutionCounts }, log);
    }
    log(
      `listening on http://${shownHost}:${actualPort} (${uploads}${signingKey ? `, signing as ${signingKey.name}` : ''}; ` +
        `blobs: ${services.addresses.blob}, directories: ${services.addresses.directory}, path infos: ${services.addresses.pathInfo})`,
    );
    if (signingKey) log(`public key for trusted-public-keys: ${signingKey.publicKeyText}`);
    notifySystemd({ READY: '1', STATUS: `serving a binary cache on http://${shownHost}:${actualPort}`, MAINPID: String(process.pid) }, log);
  });
}

function priority(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 1_000_000) throw new InvalidArgumentError('expected a whole number');
  return n;
}

/** host:port or [ipv6]:port; an empty or * host means every address. */
export function listenAddress(text: string): { host: string; port: number } {
  const match = /^\[([0-9a-fA-F:.]+)\]:(\d+)$/.exec(text) ?? /^([^:[\]]*):(\d+)$/.exec(text);
  const port = Number(match?.[2]);
  if (!match || port > 65535) throw new InvalidArgumentError(`${JSON.stringify(text)} is not host:port or [ipv6]:port`);
  const host = match[1] === '' || match[1] === '*' ? '::' : match[1]!;
  return { host, port };
}

function parseSecretKeyFile<K>(file: string, parse: (text: string) => K): K {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new Error(`--sign-key: ${(err as Error).message}`);
  }
  try {
    return parse(text);
  } catch (err) {
    throw new Error(`--sign-key ${file}: ${(err as Error).message}`);
  }
}

/** A size in bytes, with an optional K, M, G or T suffix (powers of 1024). */
function byteSize(value: string): number {
  const match = /^([0-9]+)([KMGT]?)$/i.exec(value.trim());
  if (!match) throw new InvalidArgumentError('expected a size in bytes, such as 1048576, 512M or 64G');
  return Number(match[1]) * 1024 ** ' KMGT'.indexOf((match[2] || ' ').toUpperCase());
}
