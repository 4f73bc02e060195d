// What nar-ingest.c hands to store/nar/native-ingest.ts, and the limits it
// shares with store/nar/ingest.ts (the TypeScript reader, the reference).
//
// A batch's events, one after another, integers little-endian:
//   DIRECTORY      u8 1, u16 name length, name
//   END_DIRECTORY  u8 2
//   SMALL_FILE     u8 3, u8 executable, u16 name length, name, u64 size, 32-byte BLAKE3 digest, the contents
//   LARGE_FILE     u8 4, u8 executable, u16 name length, name, u64 size, 32-byte BLAKE3 digest,
//                  u32 n: the file is the temp file "<prefix><n>", complete and synced
//   SYMLINK        u8 5, u16 name length, name, u16 target length, target
// A node's name is its entry's; the root's is empty.
#ifndef NIXCAS_NAR_INGEST_H
#define NIXCAS_NAR_INGEST_H

#include <errno.h>

#define NAR_EVENT_DIRECTORY 1
#define NAR_EVENT_END_DIRECTORY 2
#define NAR_EVENT_SMALL_FILE 3
#define NAR_EVENT_LARGE_FILE 4
#define NAR_EVENT_SYMLINK 5

/** Files up to this size are gathered whole (ingest.ts's WHOLE_FILE_MAX; the local store keeps them in LMDB). */
#define NAR_SMALL_FILE_MAX (64 * 1024)
#define NAR_MAX_TOKEN 16
#define NAR_MAX_NAME 255
#define NAR_MAX_TARGET 4095
#define NAR_MAX_DEPTH 2048
/** Lengths past JavaScript's exact integers are refused, as ingest.ts does. */
#define NAR_MAX_SAFE_INTEGER 9007199254740991ULL
/** zstd's output per step. */
#define NAR_DECODE_STEP (256 * 1024)
#define NAR_TEMP_PATH_MAX 4096

/** The name Node gives an errno in an error's code, for the errors a blob write meets. */
static inline const char *nar_errno_name(int error) {
  switch (error) {
    case ENOSPC: return "ENOSPC";
    case EDQUOT: return "EDQUOT";
    case EROFS: return "EROFS";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case EFBIG: return "EFBIG";
    case ENOMEM: return "ENOMEM";
    default: return "EIO";
  }
}

#endif
