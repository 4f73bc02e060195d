// Nix's base-32: its own alphabet (no e, o, u, t) and its own bit order, in
// which the last character holds the lowest five bits of the first byte.
import { InvalidInputError } from '../castore/errors.js';

const ALPHABET = '0123456789abcdfghijklmnpqrsvwxyz';
const VALUE_OF = new Int8Array(128).fill(-1);
for (let i = 0; i < ALPHABET.length; i++) VALUE_OF[ALPHABET.charCodeAt(i)] = i;

/** Characters needed for `byteLength` bytes: 32 for 20 bytes, 52 for 32. */
export function encodedLength(byteLength: number): number {
  return byteLength === 0 ? 0 : Math.floor((byteLength * 8 - 1) / 5) + 1;
}

export function encode(bytes: Uint8Array): string {
  let out = '';
  for (let n = encodedLength(bytes.length) - 1; n >= 0; n--) {
    const bit = n * 5;
    const i = bit >> 3;
    const shift = bit & 7;
    const low = bytes[i] >> shift;
    const high = i + 1 < bytes.length ? bytes[i + 1] << (8 - shift) : 0;
    out += ALPHABET[(low | high) & 0x1f];
  }
  return out;
}

/** Decodes a nixbase32 string; throws InvalidInputError on a bad character or length. */
export function decode(text: string): Buffer {
  const byteLength = Math.floor((text.length * 5) / 8);
  if (encodedLength(byteLength) !== text.length) {
    throw new InvalidInputError(`${JSON.stringify(text)}: ${text.length} characters is not a nixbase32 length`);
  }
  const out = Buffer.alloc(byteLength);
  for (let n = 0; n < text.length; n++) {
    const code = text.charCodeAt(text.length - 1 - n);
    const digit = code < 128 ? VALUE_OF[code] : -1;
    if (digit < 0) throw new InvalidInputError(`${JSON.stringify(text)}: ${JSON.stringify(text[text.length - 1 - n])} is not a nixbase32 character`);
    const bit = n * 5;
    const i = bit >> 3;
    const shift = bit & 7;
    out[i] |= (digit << shift) & 0xff;
    const carry = digit >> (8 - shift);
    if (i + 1 < byteLength) out[i + 1] |= carry;
    else if (carry !== 0) throw new InvalidInputError(`${JSON.stringify(text)}: nixbase32 with bits set beyond its length`);
  }
  return out;
}

export function isNixbase32(text: string): boolean {
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code >= 128 || VALUE_OF[code] < 0) return false;
  }
  return true;
}
