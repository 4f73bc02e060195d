// Error kinds ↔ gRPC status codes, in both directions.
import * as grpc from '@grpc/grpc-js';
import { AlreadyExistsError, DataLossError, InvalidInputError, NotFoundError, StorageFullError, UnavailableError, isStorageFull } from '../castore/errors.js';

/** Error replies by gRPC status code, for metrics (cli/metrics.ts). */
export const grpcErrorCounts = new Float64Array(17);

export function toServiceError(err: unknown): Partial<grpc.ServiceError> {
  const status = toServiceErrorUncounted(err);
  grpcErrorCounts[status.code ?? grpc.status.UNKNOWN]++;
  return status;
}

function toServiceErrorUncounted(err: unknown): Partial<grpc.ServiceError> {
  const message = err instanceof Error ? err.message : String(err);
  if (err instanceof InvalidInputError) return { code: grpc.status.INVALID_ARGUMENT, details: message };
  if (err instanceof NotFoundError) return { code: grpc.status.NOT_FOUND, details: message };
  if (err instanceof AlreadyExistsError) return { code: grpc.status.ALREADY_EXISTS, details: message };
  if (err instanceof UnavailableError) return { code: grpc.status.UNAVAILABLE, details: message };
  if (isStorageFull(err)) {
    console.error(`nixcas: ${message}`);
    return { code: grpc.status.RESOURCE_EXHAUSTED, details: message };
  }
  if (err instanceof DataLossError) {
    console.error(`nixcas: ${message}`);
    return { code: grpc.status.DATA_LOSS, details: message };
  }
  console.error('nixcas: internal error:', err);
  return { code: grpc.status.INTERNAL, details: message };
}

/**
 * The Error a failed call means. `address` (the store's URL) makes an
 * unreachable store say so in one clause, without grpc-js's own wording.
 */
export function fromServiceError(err: unknown, address?: string): Error {
  const e = err as grpc.ServiceError;
  const message = e?.details || e?.message || String(err);
  if (address && e?.code === grpc.status.UNAVAILABLE) return new UnavailableError(describeUnreachable(address, message));
  switch (e?.code) {
    case grpc.status.INVALID_ARGUMENT: return new InvalidInputError(message);
    case grpc.status.NOT_FOUND: return new NotFoundError(message);
    case grpc.status.ALREADY_EXISTS: return new AlreadyExistsError(message);
    case grpc.status.DATA_LOSS: return new DataLossError(message);
    case grpc.status.RESOURCE_EXHAUSTED: return new StorageFullError(message);
    case grpc.status.UNAVAILABLE:
    case grpc.status.DEADLINE_EXCEEDED: return new UnavailableError(message);
    default: return err instanceof Error ? err : new Error(message);
  }
}

export function isNotFound(err: unknown): boolean {
  return (err as grpc.ServiceError)?.code === grpc.status.NOT_FOUND;
}

/** Errno codes a connection fails with, said plainly. */
const CONNECT_ERRORS: Record<string, string> = {
  ENOENT: 'no socket there',
  ECONNREFUSED: 'connection refused (is the daemon running?)',
  EACCES: 'permission denied',
  ETIMEDOUT: 'timed out',
  EHOSTUNREACH: 'host unreachable',
};

/** "cannot reach the store at ADDR: why", from grpc-js's details (its "Resolution note" and "Last error" dropped). */
export function describeUnreachable(address: string, details: string): string {
  const cause = details
    .replace(/\.?\s*Resolution note:.*$/s, '')
    .replace(/^No connection established\. Last error: (Error: )?/, '')
    .trim();
  const errno = /connect (E[A-Z]+)/.exec(cause)?.[1];
  return `cannot reach the store at ${address}: ${(errno && CONNECT_ERRORS[errno]) || cause || 'no connection'}`;
}
