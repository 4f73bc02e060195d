// The wire schema, loaded from protos/ at start-up. Loading (instead of
// generating code) keeps the descriptors that server reflection serves.
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { InvalidInputError } from '../castore/errors.js';

export const PROTO_ROOT = fileURLToPath(new URL('../../protos', import.meta.url));

/** Both names the same services answer to: tvix's, and its maintained fork's. */
export const PACKAGE_PREFIXES = ['tvix', 'snix'] as const;
export type PackagePrefix = (typeof PACKAGE_PREFIXES)[number];

const PROTO_FILES = PACKAGE_PREFIXES.flatMap((prefix) => [
  `${prefix}/castore/v1/castore.proto`,
  `${prefix}/castore/v1/rpc_blobstore.proto`,
  `${prefix}/castore/v1/rpc_directory.proto`,
  `${prefix}/store/v1/pathinfo.proto`,
  `${prefix}/store/v1/rpc_pathinfo.proto`,
]);

/** Which package (castore or store) each service lives in. */
const SERVICE_PACKAGES: Record<string, 'castore' | 'store'> = {
  BlobService: 'castore',
  DirectoryService: 'castore',
  PathInfoService: 'store',
};

/** The fully qualified service name, e.g. tvix.castore.v1.BlobService. */
export function qualifiedServiceName(prefix: PackagePrefix, service: string): string {
  const pkg = SERVICE_PACKAGES[service];
  if (!pkg) throw new Error(`unknown service ${service}`);
  return `${prefix}.${pkg}.v1.${service}`;
}

export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  longs: String, // uint64 arrives as a decimal string, checked before use
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

let loaded: protoLoader.PackageDefinition | undefined;

export function packageDefinition(): protoLoader.PackageDefinition {
  return (loaded ??= protoLoader.loadSync(PROTO_FILES, LOADER_OPTIONS));
}

export function serviceDefinition(prefix: PackagePrefix, service: string): grpc.ServiceDefinition {
  const name = qualifiedServiceName(prefix, service);
  const definition = packageDefinition()[name];
  if (!definition || 'format' in definition) throw new Error(`no service ${name} in protos/`);
  return definition as grpc.ServiceDefinition;
}

const MALFORMED = Symbol('malformed request');

/**
 * The service with request decoding that never throws: grpc-js answers a
 * decode failure with a bare INTERNAL, but malformed input is the client's
 * fault, so handlers turn it into INVALID_ARGUMENT (see requireWellFormed).
 */
export function tolerantServiceDefinition(prefix: PackagePrefix, service: string): grpc.ServiceDefinition {
  const definition = serviceDefinition(prefix, service);
  const tolerant: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [method, spec] of Object.entries(definition)) {
    tolerant[method] = {
      ...spec,
      requestDeserialize: (bytes: Buffer) => {
        try {
          return spec.requestDeserialize(bytes);
        } catch (err) {
          return { [MALFORMED]: `malformed ${method} message: ${(err as Error).message}` };
        }
      },
    };
  }
  return tolerant as grpc.ServiceDefinition;
}

/** Throws InvalidInputError for a request tolerantServiceDefinition could not decode. */
export function requireWellFormed<T>(message: T): T {
  const problem = (message as { [MALFORMED]?: string } | undefined)?.[MALFORMED];
  if (problem) throw new InvalidInputError(problem);
  return message;
}

/** A client constructor for one service, for nixcas's own gRPC backends. */
export function clientConstructor(prefix: PackagePrefix, service: string): grpc.ServiceClientConstructor {
  return grpc.makeClientConstructor(serviceDefinition(prefix, service), qualifiedServiceName(prefix, service));
}
