// Errors of the filesystem core carry an errno name; transports turn it into
// their own encoding (FUSE replies carry -errno).
import { constants } from 'node:os';

export type ErrnoName = 'ENOENT' | 'EIO' | 'ENOTDIR' | 'EISDIR' | 'EPERM' | 'ENODATA' | 'EBADF' | 'EINVAL' | 'ERANGE' | 'EROFS' | 'ENOSYS' | 'EPROTO';

export class FsError extends Error {
  override name = 'FsError';
  readonly errno: number;
  constructor(
    readonly code: ErrnoName,
    /** Why, for the log; undefined for the everyday answers (ENOENT of a lookup). */
    readonly detail?: string,
    options?: { cause?: unknown },
  ) {
    super(detail ? `${code}: ${detail}` : code, options);
    this.errno = constants.errno[code];
  }
}
