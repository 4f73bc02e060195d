// `nixcas mount MOUNTPOINT`: the store as a read-only /nix/store over FUSE,
// until SIGINT/SIGTERM or umount.
import { Command } from 'commander';
import { makeLogger } from './log.js';
import { addLogOptions, addMetricsOption, addStoreOptions, addSubstitutionOptions, openServices } from './store-options.js';

export function mountCommand(): Command {
  const command = new Command('mount')
    .summary('mount the store read-only over FUSE, as a /nix/store directory')
    .description(
      'Mount the store at MOUNTPOINT: every registered store path appears by its basename with its ' +
        'files (0444, executables 0555), directories and symlinks. Lookups of store path names always ' +
        'work; listing the top level needs --list-root. As root the mount is made with mount(2), ' +
        'otherwise with fusermount3 (package fuse3). Ctrl-C, SIGTERM or `umount MOUNTPOINT` unmounts.',
    )
    .argument('<mountpoint>', 'an existing directory, e.g. /nix/store or /mnt/store')
    .option('--list-root', 'allow listing the top level (otherwise readdir of the root is refused with EPERM)', false)
    .option('--allow-other', 'let other users access the mount (needs user_allow_other in /etc/fuse.conf when not root)', false);
  return addLogOptions(addMetricsOption(addSubstitutionOptions(addStoreOptions(command)))).action(async (mountpoint: string, options) => {
    // Loaded only when mounting: the native addon and the protocol layer.
    const [{ ReadOnlyFilesystem }, { FuseServer }, { limitLog }, { DevFuseSession }, { storePathRoot }] = await Promise.all([
      import('../fs/filesystem.js'),
      import('../fuse/protocol.js'),
      import('../fuse/log-limit.js'),
      import('../fuse/session.js'),
      import('../store/fs-root.js'),
    ]);
    const logger = makeLogger('mount', options);
    const log = logger.info;
    const services = await openServices(options, { writes: false, log: logger.warn });
    const fs = new ReadOnlyFilesystem(services.blobs, services.directories, storePathRoot(services.pathInfos), {
      listRoot: options.listRoot,
    });
    let session;
    try {
      session = await DevFuseSession.mount(new FuseServer(fs, { log: limitLog(logger.warn) }), { mountpoint, allowOther: options.allowOther, log });
    } catch (err) {
      await services.close();
      throw err;
    }
    const stop = (signal: string) => {
      log(`${signal}, unmounting`);
      session.unmount();
    };
    // Before saying it is mounted: whoever waits for that may send a signal at once.
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
    if (options.metricsListen) {
      const [{ startMetrics }, { fuseCounters }, { opcodeName }, { substitutionCounts }] = await Promise.all([
        import('./metrics.js'), import('../fuse/counters.js'), import('../fuse/protocol.js'), import('../store/substituter.js'),
      ]);
      await startMetrics(options.metricsListen, { fuse: { counters: fuseCounters, opcodeName }, substitution: substitutionCounts }, log);
    }
    log(`mounted at ${mountpoint} (blobs: ${services.addresses.blob}, directories: ${services.addresses.directory}, path infos: ${services.addresses.pathInfo})`);
    await session.closed;
    await fs.close();
    await services.close();
    log(`unmounted ${mountpoint}`);
    process.exit(0);
  });
}
