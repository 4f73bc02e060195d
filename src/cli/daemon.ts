// `nixcas daemon`: serve the store over gRPC until SIGINT/SIGTERM.
import { unlinkSync } from 'node:fs';
import { Command } from 'commander';
import { addLogOptions, addMetricsOption, addStoreOptions, addSubstitutionOptions, octalMode, openServices } from './store-options.js';
import { makeLogger } from './log.js';
import { notifySystemd } from './systemd.js';

export const DEFAULT_LISTEN = '[::1]:8000';

export function daemonCommand(): Command {
  const command = new Command('daemon')
    .summary('serve the store over gRPC (tvix and snix castore.v1 and store.v1)')
    .description(
      'Serve BlobService and DirectoryService (tvix.castore.v1, snix.castore.v1) and PathInfoService (tvix.store.v1, snix.store.v1), with the ' +
        'standard gRPC health and reflection services. These services carry no authentication: ' +
        `the default address is loopback only (${DEFAULT_LISTEN}); listening elsewhere exposes the ` +
        'store to whoever can reach that address.',
    )
    .option('-l, --listen <address>', 'host:port, [ipv6]:port, or a unix socket path', DEFAULT_LISTEN)
    .option('--socket-mode <octal>', 'permissions of a unix socket, whatever the umask (default 0600); e.g. 0660 to let a group connect', octalMode)
    .option('--tls-cert <file>', 'serve gRPC over TLS with this certificate (PEM; with --tls-key)')
    .option('--tls-key <file>', 'the private key of --tls-cert (PEM)')
    .option('--tls-client-ca <file>', 'require client certificates signed by this CA (PEM)')
    .option('--insecure-listen', 'allow plain TCP on an address other than loopback (anyone who reaches it may read and write the store)')
    .option('--read-only', 'refuse every write (the Put methods answer PERMISSION_DENIED); the store is opened read-only, so it may be on a read-only file system');
  return addLogOptions(addMetricsOption(addSubstitutionOptions(addStoreOptions(command)))).action(async (options) => {
    const { createServer, grpcListenTarget, isLocalListen, listen, serverCredentials } = await import('../grpc/server.js'); // loaded only when serving
    if (Boolean(options.tlsCert) !== Boolean(options.tlsKey)) throw new Error('--tls-cert and --tls-key go together');
    if (options.tlsClientCa && !options.tlsCert) throw new Error('--tls-client-ca needs --tls-cert and --tls-key');
    if (!options.tlsCert && !options.insecureListen && !isLocalListen(options.listen)) {
      throw new Error(`--listen ${options.listen}: plain TCP beyond loopback lets anyone who reaches it read and write the store; give --tls-cert and --tls-key (and --tls-client-ca), or --insecure-listen if that is what you want`);
    }
    const credentials = serverCredentials(options.tlsCert ? { cert: options.tlsCert, key: options.tlsKey, clientCa: options.tlsClientCa } : undefined);
    const logger = makeLogger('daemon', options);
    const services = await openServices(options, { writes: !options.readOnly, log: logger.warn });
    const server = createServer(services, { readOnly: Boolean(options.readOnly) });
    const port = await listen(server, options.listen, options.socketMode, credentials);
    const { socketPath } = grpcListenTarget(options.listen);
    const where = socketPath ?? options.listen.replace(/:0$/, `:${port}`);

    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      logger.info(`${signal}, shutting down`);
      notifySystemd({ STOPPING: '1' }, logger.info);
      const forced = setTimeout(() => server.forceShutdown(), 5000);
      server.tryShutdown(async () => {
        clearTimeout(forced);
        await services.close();
        if (socketPath) {
          try {
            unlinkSync(socketPath);
          } catch {
            // already gone
          }
        }
        process.exit(0);
      });
    };
    // Before saying it listens: whoever waits for that may send a signal at once.
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
    if (options.metricsListen) {
      const [{ startMetrics }, { grpcCallCounts }, { grpcErrorCounts }, { substitutionCounts }] = await Promise.all([
        import('./metrics.js'), import('../grpc/server.js'), import('../grpc/status.js'), import('../store/substituter.js'),
      ]);
      await startMetrics(options.metricsListen, { grpc: { calls: grpcCallCounts, errors: grpcErrorCounts }, substitution: substitutionCounts }, logger.info);
    }
    const security = options.tlsCert ? (options.tlsClientCa ? ', TLS with client certificates' : ', TLS') : '';
    logger.info(`listening on ${where}${security}${options.readOnly ? ', read-only' : ''} (blobs: ${services.addresses.blob}, directories: ${services.addresses.directory}, path infos: ${services.addresses.pathInfo})`);
    notifySystemd({ READY: '1', STATUS: `serving gRPC on ${where}`, MAINPID: String(process.pid) }, logger.info);
  });
}
