// vhost-user-ts: a vhost-user back end (QEMU's docs/interop/vhost-user.rst)
// with split virtqueues in shared guest memory. It knows nothing of FUSE or
// the store: a VirtioDevice gets descriptor chains and completes them.
export { type BackendOptions, VhostUserBackend, type VirtioDevice } from './backend.js';
export { ListenError, UnixListener } from './listener.js';
export { ChainError, DescriptorChain, NativeWait, type SplitQueue } from './virtqueue.js';
