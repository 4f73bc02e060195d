// Nix's ed25519 signing keys: the files `nix-store --generate-binary-cache-key`
// writes (`<name>:<base64>`; a secret key is libsodium's 64 bytes, the seed
// followed by the public key) and signatures over narinfo fingerprints.
import { type KeyObject, createPrivateKey, createPublicKey, sign, verify } from 'node:crypto';
import { InvalidInputError } from '../castore/errors.js';
import type { Signature } from './pathinfo.js';

export class InvalidKeyError extends InvalidInputError {}

export interface SigningKey {
  name: string;
  privateKey: KeyObject;
  /** The public key in Nix's form, `<name>:<base64 of 32 bytes>`, for trusted-public-keys. */
  publicKeyText: string;
}

function splitKey(text: string, what: string, length: number): { name: string; bytes: Buffer } {
  const trimmed = text.trim();
  const colon = trimmed.indexOf(':');
  const name = trimmed.slice(0, colon);
  const bytes = Buffer.from(trimmed.slice(colon + 1), 'base64');
  if (colon <= 0 || /\s/.test(name) || bytes.length !== length) {
    throw new InvalidKeyError(`not a Nix ${what} (expected <name>:<base64 of ${length} bytes>)`);
  }
  return { name, bytes };
}

export function parseSecretKey(text: string): SigningKey {
  const { name, bytes } = splitKey(text, 'ed25519 secret key', 64);
  const seed = bytes.subarray(0, 32);
  const publicBytes = bytes.subarray(32);
  const privateKey = createPrivateKey({
    key: { kty: 'OKP', crv: 'Ed25519', d: seed.toString('base64url'), x: publicBytes.toString('base64url') },
    format: 'jwk',
  });
  // The public half is stored in the file too; a key whose halves disagree would sign what nobody can verify.
  const derived = Buffer.from(createPublicKey(privateKey).export({ format: 'jwk' }).x as string, 'base64url');
  if (!derived.equals(publicBytes)) throw new InvalidKeyError(`secret key ${JSON.stringify(name)} is corrupt: its public half does not match its seed`);
  return { name, privateKey, publicKeyText: `${name}:${publicBytes.toString('base64')}` };
}

export function signFingerprint(key: SigningKey, fingerprint: string): Signature {
  return { name: key.name, data: sign(null, Buffer.from(fingerprint), key.privateKey) };
}

export interface PublicKey {
  name: string;
  key: KeyObject;
}

/** A public key in Nix's text form, `<name>:<base64 of 32 bytes>` (trusted-public-keys). */
export function parsePublicKey(publicKeyText: string): PublicKey {
  const { name, bytes } = splitKey(publicKeyText, 'ed25519 public key', 32);
  return { name, key: createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: bytes.toString('base64url') }, format: 'jwk' }) };
}

/** Checks `signature` over `fingerprint` with a public key (parsed, or in Nix's text form). */
export function verifyFingerprint(publicKey: string | PublicKey, fingerprint: string, signature: Signature): boolean {
  const { name, key } = typeof publicKey === 'string' ? parsePublicKey(publicKey) : publicKey;
  if (name !== signature.name) return false;
  return verify(null, Buffer.from(fingerprint), key, signature.data);
}
