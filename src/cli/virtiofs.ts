// `nixcas virtiofs SOCKET`: the store as /nix/store for VMs, over virtio-fs
// (a vhost-user-fs back end for QEMU and cloud-hypervisor).
import { makeLogger } from './log.js';
import { withSmallYoungGeneration } from './young-generation.js';
import { activationSocket, notifySystemd } from './systemd.js';
import { Command, InvalidArgumentError } from 'commander';
import { addLogOptions, addMetricsOption, addStoreOptions, addSubstitutionOptions, octalMode, openServices } from './store-options.js';

export function virtiofsCommand(): Command {
  const command = new Command('virtiofs')
    .summary('serve the store to VMs over virtio-fs (a vhost-user-fs back end)')
    .description(
      'Listen on the unix socket SOCKET for vhost-user front ends and serve the store, read-only, as a ' +
        'virtio-fs device: every registered store path appears by its basename. Start a VM with\n' +
        '  cloud-hypervisor --memory size=1G,shared=on --fs tag=nixstore,socket=SOCKET,num_queues=1 …\n' +
        'or\n' +
        '  qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n' +
        '    -chardev socket,id=fs,path=SOCKET -device vhost-user-fs-pci,chardev=fs,tag=nixstore,queue-size=1024 …\n' +
        'and in the guest: mount -t virtiofs -o ro nixstore /nix/store\n' +
        'Any number of VMs may connect, each its own device; when one shuts down or reboots the socket ' +
        'stays and it can connect again. Ctrl-C or SIGTERM stops the back end.',
    )
    .argument('<socket>', 'path of the unix socket to create, e.g. /run/nixcas-fs.sock')
    .option('--list-root', 'allow listing the top level (otherwise readdir of the root is refused with EPERM)', false)
    .option('--num-request-queues <n>', "request queues besides the high-priority one: QEMU's num-request-queues, cloud-hypervisor's num_queues", positiveInteger, 1)
    .option(
      '--poll-max-ns <ns>',
      "how long to wait on the CPU for a busy guest's next request (one that had several in flight) before sleeping: " +
        'a wake-up costs each side more than a short wait; 0 never waits (for hosts short of CPUs)',
      nonNegativeNanoseconds,
      50_000,
    )
    .option('--socket-mode <octal>', 'permissions of the socket file, whatever the umask (default 0600); e.g. 0660 to let a group of VM users connect', octalMode);
  return addLogOptions(addMetricsOption(addSubstitutionOptions(addStoreOptions(command)))).action(async (socketPath: string, options) => {
    withSmallYoungGeneration();
    const [{ ReadOnlyFilesystem }, { DirectoryCache }, { VirtioFsServer }, { storePathRoot }] = await Promise.all([
      import('../fs/filesystem.js'),
      import('../fs/directory-cache.js'),
      import('../virtiofs/server.js'),
      import('../store/fs-root.js'),
    ]);
    const logger = makeLogger('virtiofs', options);
    const log = logger.info;
    const services = await openServices(options, { writes: false, log: logger.warn });
    const root = storePathRoot(services.pathInfos);
    // One cache of decoded directories for every VM.
    const directoryCache = new DirectoryCache(services.directories);
    let server;
    try {
      server = VirtioFsServer.listen({
        socketPath,
        requestQueues: options.numRequestQueues,
        socketMode: options.socketMode,
        makeFilesystem: () => new ReadOnlyFilesystem(services.blobs, services.directories, root, { listRoot: options.listRoot, directoryCache }),
        log: logger.warn,
        info: logger.info,
        listeningFd: activationSocket(),
        // For comparing with and without the wait in poll(2) (docs/benchmarks.md).
        waitForKicks: process.env.NIXCAS_VIRTIOFS_WAIT_FOR_KICKS !== '0',
        pollMaxNs: options.pollMaxNs,
      });
    } catch (err) {
      server?.close();
      await services.close();
      throw err;
    }
    const stop = async (signal: string) => {
      log(`${signal}, stopping`);
      notifySystemd({ STOPPING: '1' }, log);
      server.close();
      await services.close();
      process.exit(0);
    };
    // Before saying it listens: whoever waits for that may send a signal at once.
    process.once('SIGINT', () => void stop('SIGINT'));
    process.once('SIGTERM', () => void stop('SIGTERM'));
    if (options.metricsListen) {
      const [{ startMetrics }, { fuseCounters }, { opcodeName }, { substitutionCounts }] = await Promise.all([
        import('./metrics.js'), import('../fuse/counters.js'), import('../fuse/protocol.js'), import('../store/substituter.js'),
      ]);
      const serving = server;
      await startMetrics(options.metricsListen, { fuse: { counters: fuseCounters, opcodeName }, substitution: substitutionCounts, connections: () => serving.connections }, log);
    }
    log(
      `listening on ${socketPath} (${options.numRequestQueues} request queue${options.numRequestQueues === 1 ? '' : 's'}; ` +
        `blobs: ${services.addresses.blob}, directories: ${services.addresses.directory}, path infos: ${services.addresses.pathInfo})`,
    );
    notifySystemd({ READY: '1', STATUS: `serving virtio-fs on ${socketPath}`, MAINPID: String(process.pid) }, log);
  });
}

function nonNegativeNanoseconds(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 10_000_000) throw new InvalidArgumentError('expected nanoseconds, a whole number from 0 to 10000000 (10 ms)');
  return n;
}

function positiveInteger(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new InvalidArgumentError('expected a whole number from 1 to 64');
  return n;
}
