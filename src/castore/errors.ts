// Error kinds every service and transport agrees on. Transports map them to
// their own codes (gRPC: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, DATA_LOSS,
// RESOURCE_EXHAUSTED).

/** The caller sent something invalid; nothing of it was stored. */
export class InvalidInputError extends Error {
  override name = 'InvalidInputError';
}

/** The store has this already, with other contents or metadata, and it does not change. */
export class AlreadyExistsError extends Error {
  override name = 'AlreadyExistsError';
}

/** The requested blob, directory or path is not in the store. */
export class NotFoundError extends Error {
  override name = 'NotFoundError';
}

/** A backing service could not be reached; the same call may succeed later. */
export class UnavailableError extends Error {
  override name = 'UnavailableError';
}

/**
 * What the store holds under a digest does not hash to it (or has another
 * size): that object is damaged. None of its bytes were handed out.
 */
export class DataLossError extends Error {
  override name = 'DataLossError';
  /** How many were raised in this process: content that did not match its digest (metrics). */
  static raised = 0;

  constructor(message?: string, options?: ErrorOptions) {
    super(message, options);
    DataLossError.raised++;
  }
}

/**
 * The store could not keep what it was given: its file system is full (or
 * over quota), its database reached its size limit, or the disk failed the
 * write. Nothing of that write was kept; reads go on, and writes work again
 * once there is room.
 */
export class StorageFullError extends Error {
  override name = 'StorageFullError';
}

/** Whether `err` says the store is out of room: a StorageFullError, or a file write that failed with ENOSPC or EDQUOT. */
export function isStorageFull(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return err instanceof StorageFullError || code === 'ENOSPC' || code === 'EDQUOT';
}
