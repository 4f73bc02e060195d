// `nixcas daemon`: serve the store over gRPC until SIGINT/SIGTERM.
import { unlinkSync } from 'node:fs';
import { Command } from 'commander';
import { addLogOptions, addMetricsOption, addStoreOptions, addSubstitutionOptions, octalMode, openServices } from './store-options.js';
import { makeLogger } from './log.js';
import { activationSockets, notifySystemd } from './systemd.js';
import type { Server as NetServer } from 'node:net';
import type { Server } from '@grpc/grpc-js';

const collect = (value: string, previous: string[] | undefined) => [...(previous ?? []), value];

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
    .option('-l, --listen <address>', `host:port, [ipv6]:port, or a unix socket path; repeat to listen on several (default ${DEFAULT_LISTEN}, unless systemd hands over sockets)`, collect)
    .option('--listen-read-only <address>', 'also listen here, answering every write with PERMISSION_DENIED: e.g. a TLS port for a fleet next to a read-write unix socket for the host; repeatable', collect)
    .option('--socket-mode <octal>', 'permissions of a unix socket, whatever the umask (default 0600); e.g. 0660 to let a group connect', octalMode)
    .option('--tls-cert <file>', 'serve gRPC over TLS with this certificate (PEM; with --tls-key) on every TCP listener; unix sockets stay plain, guarded by their mode')
    .option('--tls-key <file>', 'the private key of --tls-cert (PEM)')
    .option('--tls-client-ca <file>', 'require client certificates signed by this CA (PEM)')
    .option('--insecure-listen', 'allow plain TCP on an address other than loopback (anyone who reaches it may read the store, and write it unless the listener is read-only)')
    .option('--read-only', 'refuse every write on every listener (the Put methods answer PERMISSION_DENIED); the store is opened read-only, so it may be on a read-only file system')
    .addHelpText(
      'after',
      '\nSocket activation: when systemd hands over sockets (LISTEN_FDS), the daemon serves on them too, and only on them when ' +
        'no --listen is given. A socket the unit names read-only (FileDescriptorName=read-only) is served read-only.',
    );
  return addLogOptions(addMetricsOption(addSubstitutionOptions(addStoreOptions(command)))).action(async (options) => {
    const { createServer, grpcListenTarget, isLocalListen, listen, serveHandedSocket, serverCredentials } = await import('../grpc/server.js'); // loaded only when serving
    if (Boolean(options.tlsCert) !== Boolean(options.tlsKey)) throw new Error('--tls-cert and --tls-key go together');
    if (options.tlsClientCa && !options.tlsCert) throw new Error('--tls-client-ca needs --tls-cert and --tls-key');
    const allReadOnly = Boolean(options.readOnly);
    const handed = activationSockets();
    const wanted = [
      ...((options.listen as string[] | undefined) ?? []).map((address) => ({ address, flag: '--listen', readOnly: allReadOnly })),
      ...((options.listenReadOnly as string[] | undefined) ?? []).map((address) => ({ address, flag: '--listen-read-only', readOnly: true })),
    ];
    if (wanted.length === 0 && handed.length === 0) wanted.push({ address: DEFAULT_LISTEN, flag: '--listen', readOnly: allReadOnly });
    const plainBeyondLoopback = (flag: string, address: string) =>
      new Error(`${flag} ${address}: plain TCP beyond loopback lets anyone who reaches it read${flag === '--listen' && !allReadOnly ? ' and write' : ''} the store; give --tls-cert and --tls-key (and --tls-client-ca), or --insecure-listen if that is what you want`);
    for (const { address, flag } of wanted) {
      if (!options.tlsCert && !options.insecureListen && !isLocalListen(address)) throw plainBeyondLoopback(flag, address);
    }
    const tls = options.tlsCert ? serverCredentials({ cert: options.tlsCert, key: options.tlsKey, clientCa: options.tlsClientCa }) : undefined;
    const plain = serverCredentials(undefined);
    const tlsText = options.tlsClientCa ? ', TLS with client certificates' : ', TLS';
    const logger = makeLogger('daemon', options);
    const services = await openServices(options, { writes: !allReadOnly, log: logger.warn });
    // One gRPC server per kind of listener: the read-only one has its writes refused.
    const servers = new Map<boolean, Server>();
    const serverFor = (readOnly: boolean) => servers.get(readOnly) ?? servers.set(readOnly, createServer(services, { readOnly })).get(readOnly)!;
    const listening: string[] = [];
    const socketPaths: string[] = [];
    const handedListeners: NetServer[] = [];
    for (const { address, readOnly } of wanted) {
      const { socketPath } = grpcListenTarget(address);
      const port = await listen(serverFor(readOnly), address, options.socketMode, socketPath || !tls ? plain : tls);
      if (socketPath) socketPaths.push(socketPath);
      listening.push(`${socketPath ?? address.replace(/:0$/, `:${port}`)}${!socketPath && tls ? tlsText : ''}${readOnly ? ', read-only' : ''}`);
    }
    for (const { fd, name } of handed) {
      const readOnly = allReadOnly || name === 'read-only';
      const served = await serveHandedSocket(serverFor(readOnly), fd, (tcp, where) => {
        if (tcp && !tls && !options.insecureListen && !isLocalListen(where)) throw plainBeyondLoopback(readOnly ? '--listen-read-only' : '--listen', `${where} (handed over by systemd)`);
        return tcp && tls ? tls : plain;
      });
      handedListeners.push(served.listener);
      listening.push(`${served.where}${served.tcp && tls ? tlsText : ''}${readOnly ? ', read-only' : ''} (from systemd)`);
    }

    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      logger.info(`${signal}, shutting down`);
      notifySystemd({ STOPPING: '1' }, logger.info);
      for (const listener of handedListeners) listener.close();
      const forced = setTimeout(() => servers.forEach((server) => server.forceShutdown()), 5000);
      void Promise.all([...servers.values()].map((server) => new Promise<void>((resolve) => server.tryShutdown(() => resolve())))).then(async () => {
        clearTimeout(forced);
        await services.close();
        for (const socketPath of socketPaths) {
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
    if (tls && socketPaths.length) logger.warn(`TLS is for TCP listeners: ${socketPaths.join(', ')} ${socketPaths.length > 1 ? 'are' : 'is'} served without it, guarded by the socket's mode`);
    logger.info(`listening on ${listening.join('; ')} (blobs: ${services.addresses.blob}, directories: ${services.addresses.directory}, path infos: ${services.addresses.pathInfo})`);
    notifySystemd({ READY: '1', STATUS: `serving gRPC on ${listening.join('; ')}`, MAINPID: String(process.pid) }, logger.info);
  });
}
