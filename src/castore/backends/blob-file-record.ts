// The local store's record of a large blob's file, kept once its bytes were
// found to hash to its digest (LMDB database `blob-files`, keyed by the
// digest). A file that still has the recorded identity is served without
// hashing it again; any change made through the file system (a write, a
// truncation, a chmod, a copy put in its place) changes its ctime, and the
// file is hashed in full before a byte of it is handed out.
//
// Layout, 40 bytes, little-endian (src/store/nar/native/local-nar.c reads it
// with the same constants):
//   0      format version (1)
//   1..7   zero
//   8..15  inode number
//   16..23 size in bytes
//   24..31 modification time, ns since the epoch
//   32..39 change time (ctime), ns since the epoch
import type { BigIntStats } from 'node:fs';

export const BLOB_FILE_RECORD_VERSION = 1;
export const BLOB_FILE_RECORD_LENGTH = 40;

/** The record a file with these attributes has. */
export function blobFileRecord(stats: BigIntStats): Buffer {
  const record = Buffer.alloc(BLOB_FILE_RECORD_LENGTH);
  record[0] = BLOB_FILE_RECORD_VERSION;
  record.writeBigUInt64LE(stats.ino, 8);
  record.writeBigUInt64LE(stats.size, 16);
  record.writeBigUInt64LE(stats.mtimeNs, 24);
  record.writeBigUInt64LE(stats.ctimeNs, 32);
  return record;
}
