// Waiting on the event loop for a full non-blocking descriptor to take more,
// shared by the writers that hand descriptors to the kernel directly.
import type { EventEmitter } from 'node:events';
import type { NativeAddon } from './index.js';

/**
 * Resolves once `fd` is writable (or in error, which the next write reports),
 * or as soon as `closing` emits 'close': a socket whose peer went away may
 * never become writable again.
 */
export function whenWritable(addon: NativeAddon, fd: number, closing?: EventEmitter): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      addon.unwatch(watch);
      closing?.off('close', done);
      resolve();
    };
    const watch = addon.watch(fd, done, true);
    closing?.once('close', done);
  });
}
