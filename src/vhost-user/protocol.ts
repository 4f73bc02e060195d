// The vhost-user wire protocol (QEMU's docs/interop/vhost-user.rst): numbers,
// flags and feature bits. See ../shared/reference/vhost-user-virtio-fs.md.

/** Front-end requests this back end knows. */
export enum Request {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  RESET_DEVICE = 34,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
}

const REQUEST_NAMES: Record<number, string> = {
  1: 'GET_FEATURES', 2: 'SET_FEATURES', 3: 'SET_OWNER', 4: 'RESET_OWNER', 5: 'SET_MEM_TABLE', 6: 'SET_LOG_BASE',
  7: 'SET_LOG_FD', 8: 'SET_VRING_NUM', 9: 'SET_VRING_ADDR', 10: 'SET_VRING_BASE', 11: 'GET_VRING_BASE',
  12: 'SET_VRING_KICK', 13: 'SET_VRING_CALL', 14: 'SET_VRING_ERR', 15: 'GET_PROTOCOL_FEATURES',
  16: 'SET_PROTOCOL_FEATURES', 17: 'GET_QUEUE_NUM', 18: 'SET_VRING_ENABLE', 19: 'SEND_RARP', 20: 'NET_SET_MTU',
  21: 'SET_BACKEND_REQ_FD', 22: 'IOTLB_MSG', 23: 'SET_VRING_ENDIAN', 24: 'GET_CONFIG', 25: 'SET_CONFIG',
  26: 'CREATE_CRYPTO_SESSION', 27: 'CLOSE_CRYPTO_SESSION', 28: 'POSTCOPY_ADVISE', 29: 'POSTCOPY_LISTEN',
  30: 'POSTCOPY_END', 31: 'GET_INFLIGHT_FD', 32: 'SET_INFLIGHT_FD', 33: 'GPU_SET_SOCKET', 34: 'RESET_DEVICE',
  35: 'VRING_KICK', 36: 'GET_MAX_MEM_SLOTS', 37: 'ADD_MEM_REG', 38: 'REM_MEM_REG', 39: 'SET_STATUS',
  40: 'GET_STATUS', 41: 'GET_SHARED_OBJECT', 42: 'SET_DEVICE_STATE_FD', 43: 'CHECK_DEVICE_STATE',
};

export function requestName(request: number): string {
  return REQUEST_NAMES[request] ?? `request ${request}`;
}

export const HEADER_SIZE = 12;
/** Header flags: the version in bits 0-1, then REPLY and NEED_REPLY. */
export const VERSION = 0x1;
export const VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
/** The largest payload we accept; real ones are a few hundred bytes (8 regions in SET_MEM_TABLE: 264). */
export const MAX_PAYLOAD = 4096;
/** The most fds one message may carry (QEMU sends at most 8 regions; some front ends more). */
export const MAX_FDS = 32;

/** Virtio feature bits (u64, as bigint). */
export const VirtioFeature = {
  /** Descriptors may point at tables of descriptors. */
  INDIRECT_DESC: 1n << 28n,
  /** used_event / avail_event suppress interrupts and kicks. */
  EVENT_IDX: 1n << 29n,
  /** vhost-user: the protocol-features messages are available. */
  PROTOCOL_FEATURES: 1n << 30n,
  VERSION_1: 1n << 32n,
} as const;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const ProtocolFeature = {
  MQ: 1n << 0n,
  LOG_SHMFD: 1n << 1n,
  REPLY_ACK: 1n << 3n,
  BACKEND_REQ: 1n << 5n,
  CONFIG: 1n << 9n,
  INFLIGHT_SHMFD: 1n << 12n,
  RESET_DEVICE: 1n << 13n,
  CONFIGURE_MEM_SLOTS: 1n << 15n,
  STATUS: 1n << 16n,
} as const;

/**
 * What we offer. Never CONFIG: QEMU 7.1–8.0 crash on it for vhost-user-fs.
 * No LOG_SHMFD (no live migration), no INFLIGHT_SHMFD, no BACKEND_REQ (no DAX).
 */
export const OFFERED_PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS;

/** SET_VRING_KICK/CALL/ERR: the low byte is the queue index; this bit says no fd came (polling). */
export const VRING_INDEX_MASK = 0xffn;
export const VRING_NOFD = 1n << 8n;

/** Memory slots we let a front end use with CONFIGURE_MEM_SLOTS (QEMU without it sends at most 8). */
export const MAX_MEM_SLOTS = 32;
/** The largest virtqueue the split format allows. */
export const MAX_QUEUE_SIZE = 32768;

/** Size of one memory region description: guest address, size, user address, mmap offset. */
export const REGION_SIZE = 32;
