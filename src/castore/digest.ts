// BLAKE3 digests: the identity of every blob and directory in castore.
//
// Hashing bounds ingestion speed, so the native SIMD implementation is used
// where its prebuilt binary loads; the wasm build is the portable fallback.
import { createRequire } from 'node:module';
import { InvalidInputError } from './errors.js';

export const DIGEST_LENGTH = 32;

/** A 32-byte BLAKE3 digest. */
export type B3Digest = Buffer;

export interface Blake3Hasher {
  update(data: Uint8Array): void;
  /** The 32-byte digest of everything passed to update(). */
  digest(): B3Digest;
}

interface Blake3Implementation {
  name: 'native' | 'wasm';
  create(): Blake3Hasher;
  /** The digest of `data` in one call: for small inputs, a hasher object costs more than the hashing. */
  digestOf(data: Uint8Array): B3Digest;
}

const require = createRequire(import.meta.url);

function loadNative(): Blake3Implementation {
  const { Blake3Hasher: NativeHasher, blake3: nativeDigestOf } = require('@napi-rs/blake-hash') as typeof import('@napi-rs/blake-hash');
  return {
    name: 'native',
    digestOf: (data) => nativeDigestOf(data),
    create() {
      const hasher = new NativeHasher();
      return {
        update: (data) => void hasher.update(Buffer.from(data.buffer, data.byteOffset, data.byteLength)),
        digest: () => hasher.digestBuffer(),
      };
    },
  };
}

function loadWasm(): Blake3Implementation {
  const wasm = require('blake3-wasm') as { createHash(): { update(d: Uint8Array): unknown; digest(): Buffer } };
  const create = () => {
    const hasher = wasm.createHash();
    return {
      update: (data: Uint8Array) => void hasher.update(data),
      digest: () => Buffer.from(hasher.digest()),
    };
  };
  return {
    name: 'wasm',
    create,
    digestOf(data) {
      const hasher = create();
      hasher.update(data);
      return hasher.digest();
    },
  };
}

let selected: Blake3Implementation | undefined;

/** The implementation in use; NIXCAS_BLAKE3=wasm forces the fallback (for benchmarks and tests). */
export function blake3Implementation(): Blake3Implementation {
  if (selected) return selected;
  if (process.env.NIXCAS_BLAKE3 === 'wasm') return (selected = loadWasm());
  try {
    selected = loadNative();
  } catch {
    selected = loadWasm();
  }
  return selected;
}

/** Both implementations, for benchmarks that compare them. */
export const blake3Implementations = { native: loadNative, wasm: loadWasm };

export function createBlake3(): Blake3Hasher {
  return blake3Implementation().create();
}

export function blake3(data: Uint8Array): B3Digest {
  return blake3Implementation().digestOf(data);
}

export class InvalidDigestError extends InvalidInputError {}

/** Throws unless `digest` is exactly 32 bytes; `what` names the field in the message. */
export function checkDigestLength(digest: Uint8Array, what: string): void {
  if (digest.length !== DIGEST_LENGTH) {
    throw new InvalidDigestError(`${what}: digest must be ${DIGEST_LENGTH} bytes, got ${digest.length}`);
  }
}

/** The `b3:<standard base64>` form tvix uses in logs, xattrs and CLIs. */
export function formatDigest(digest: Uint8Array): string {
  return 'b3:' + Buffer.from(digest.buffer, digest.byteOffset, digest.byteLength).toString('base64');
}

/** Parses `b3:<base64>` (standard or URL-safe alphabet, padding optional) or 64 hex characters. */
export function parseDigest(text: string): B3Digest {
  let bytes: Buffer;
  if (text.startsWith('b3:')) {
    const body = text.slice(3);
    if (!/^[A-Za-z0-9+/_-]*={0,2}$/.test(body)) throw new InvalidDigestError(`not a b3: digest: ${text}`);
    bytes = Buffer.from(body, body.includes('-') || body.includes('_') ? 'base64url' : 'base64');
  } else if (/^[0-9a-fA-F]{64}$/.test(text)) {
    bytes = Buffer.from(text, 'hex');
  } else {
    throw new InvalidDigestError(`not a digest (expected b3:<base64> or 64 hex digits): ${text}`);
  }
  checkDigestLength(bytes, text);
  return bytes;
}

/** A string key for maps keyed by digest. */
export function digestKey(digest: Uint8Array): string {
  return Buffer.from(digest.buffer, digest.byteOffset, digest.byteLength).toString('hex');
}
