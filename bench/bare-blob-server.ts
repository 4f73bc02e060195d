// The baseline for blob throughput: a grpc-js server speaking the same
// BlobService that streams bytes from memory and stores nothing. Whatever
// nixcas loses against it is the cost of hashing, storage and our handlers.
import { unlinkSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { serviceDefinition } from '../src/grpc/protos.js';

const socket = process.argv[2]!;
const size = Number(process.argv[3]);
const CHUNK = 1024 * 1024;
const payload = Buffer.alloc(size, 0x5a);

const server = new grpc.Server({ 'grpc.max_receive_message_length': 64 << 20 });
server.addService(serviceDefinition('tvix', 'BlobService'), {
  Stat: (_call: unknown, cb: grpc.sendUnaryData<unknown>) => cb(null, { chunks: [] }),
  Read: async (call: grpc.ServerWritableStream<unknown, unknown>) => {
    for (let offset = 0; offset < payload.length; offset += CHUNK) {
      if (!call.write({ data: payload.subarray(offset, offset + CHUNK) })) await new Promise((r) => call.once('drain', r));
    }
    call.end();
  },
  Put: (call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
    call.on('data', () => {});
    call.on('end', () => cb(null, { digest: Buffer.alloc(32) }));
  },
});
try {
  unlinkSync(socket);
} catch {}
server.bindAsync(`unix:${socket}`, grpc.ServerCredentials.createInsecure(), () => console.error('listening on', socket));
