// http-body.ts against real HTTP servers: node:http (Content-Length, chunked,
// keep-alive, redirects, errors, gzip) and a raw socket server for what
// node:http would not send (bytes one at a time, chunk extensions and
// trailers, a close inside the body, a stall, bytes past the response).
import assert from 'node:assert/strict';
import { type IncomingMessage, type ServerResponse, createServer } from 'node:http';
import { type Socket, createServer as createNetServer } from 'node:net';
import { once } from 'node:events';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { PlainHttpFallback, PlainHttpTimeout, plainHttpBody } from '../src/store/http-body.js';
import { seededBytes } from './helpers.js';

async function body(url: string, timeoutMs = 5000): Promise<Buffer> {
  const views: Buffer[] = [];
  for await (const view of plainHttpBody(new URL(url), timeoutMs)) views.push(Buffer.from(view));
  return Buffer.concat(views);
}

async function listen(server: ReturnType<typeof createServer> | ReturnType<typeof createNetServer>): Promise<string> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  if (!address || typeof address === 'string') throw new Error('no port');
  return `http://127.0.0.1:${address.port}`;
}

test('plain HTTP bodies: Content-Length and chunked, across slabs, on kept-alive connections; anything else falls back', async () => {
  const large = seededBytes(3 * 1024 * 1024 + 12345, 1);
  let connections = 0;
  const server = createServer((request: IncomingMessage, response: ServerResponse) => {
    switch (request.url) {
      case '/length':
        response.setHeader('content-length', large.length);
        response.end(large);
        return;
      case '/chunked': {
        // node:http chunks what it is given in writes: pieces of odd sizes.
        for (let at = 0, i = 0; at < large.length; i++) {
          const size = [1, 7, 65536, 300_001, 2][i % 5]!;
          response.write(large.subarray(at, at + size));
          at += size;
        }
        response.end();
        return;
      }
      case '/empty':
        response.setHeader('content-length', 0);
        response.end();
        return;
      case '/redirect':
        response.writeHead(302, { location: '/length' }).end();
        return;
      case '/missing':
        response.writeHead(404).end('no');
        return;
      case '/gzip':
        response.writeHead(200, { 'content-encoding': 'gzip' }).end(gzipSync(large.subarray(0, 1000)));
        return;
    }
  });
  server.on('connection', () => connections++);
  const base = await listen(server);
  try {
    assert.ok((await body(`${base}/length`)).equals(large), 'Content-Length');
    assert.ok((await body(`${base}/chunked`)).equals(large), 'chunked');
    assert.equal((await body(`${base}/empty`)).length, 0, 'empty');
    assert.ok((await body(`${base}/length`)).equals(large), 'again');
    assert.equal(connections, 1, 'one connection carried every request');
    for (const path of ['/redirect', '/missing', '/gzip']) {
      await assert.rejects(body(`${base}${path}`), PlainHttpFallback, path);
    }
  } finally {
    server.closeAllConnections();
    server.close();
  }
});

test('plain HTTP bodies from a raw server: a byte at a time with extensions and trailers; a close inside the body and a stall fail, bytes past it end the connection; a kept connection the server closed is replaced', async () => {
  const payload = seededBytes(70_000, 2);
  const chunked = Buffer.concat([
    Buffer.from('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'),
    Buffer.from(`${(40_000).toString(16)};name=value\r\n`), payload.subarray(0, 40_000), Buffer.from('\r\n'),
    Buffer.from(`${(30_000).toString(16).toUpperCase()}\r\n`), payload.subarray(40_000), Buffer.from('\r\n'),
    Buffer.from('0\r\nX-Trailer: yes\r\n\r\n'),
  ]);
  const lengthHead = `HTTP/1.1 200 OK\r\nContent-Length: ${payload.length}\r\n\r\n`;
  let connections = 0;
  const server = createNetServer((socket: Socket) => {
    connections++;
    let asked = '';
    socket.on('data', async (data) => {
      asked += data.toString('latin1');
      if (!asked.endsWith('\r\n\r\n')) return;
      const path = asked.split(' ')[1];
      asked = '';
      switch (path) {
        case '/bytewise':
          // A byte per write (and so, mostly, per read): every CR and LF split from its partner.
          for (const byte of chunked.subarray(0, 300)) {
            socket.write(Buffer.from([byte]));
            await new Promise((resolve) => setImmediate(resolve));
          }
          socket.write(chunked.subarray(300));
          return;
        case '/close-after-answer':
          socket.end(Buffer.concat([Buffer.from(lengthHead), payload]));
          return;
        case '/cut':
          socket.end(Buffer.concat([Buffer.from(lengthHead), payload.subarray(0, 1000)]));
          return;
        case '/too-much':
          socket.write(Buffer.concat([Buffer.from(lengthHead), payload, Buffer.from('HTTP/1.1 200 OK\r\n')]));
          return;
        case '/short-too-much':
          // On a kept connection the first read lands in the connection's scratch buffer and is copied.
          socket.write(Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n'));
          return;
        case '/stall':
          socket.write(Buffer.concat([Buffer.from(lengthHead), payload.subarray(0, 1000)]));
          return;
      }
    });
    socket.on('error', () => {});
  });
  const base = await listen(server);
  try {
    assert.ok((await body(`${base}/bytewise`)).equals(payload), 'a byte at a time, with a chunk extension and a trailer');
    assert.ok((await body(`${base}/bytewise`)).equals(payload), 'again, on the same connection');
    assert.equal(connections, 1);
    // The server answers and closes: the next request finds the kept connection closed and takes a new one.
    assert.ok((await body(`${base}/close-after-answer`)).equals(payload));
    assert.ok((await body(`${base}/bytewise`)).equals(payload), 'after the server closed the kept connection');
    await assert.rejects(body(`${base}/cut`), /closed the connection inside the response/);
    // Bytes past a complete response: the body stands, the connection is not used again.
    const before = connections;
    assert.ok((await body(`${base}/too-much`)).equals(payload));
    assert.ok((await body(`${base}/bytewise`)).equals(payload));
    assert.equal(connections, before + 2, 'a new connection after the one that sent too much (which itself needed a new one: /cut ended the last)');
    assert.ok((await body(`${base}/bytewise`)).equals(payload));
    const kept = connections;
    assert.equal((await body(`${base}/short-too-much`)).toString(), 'hello', 'a short answer with bytes after it, on a kept connection');
    assert.ok((await body(`${base}/bytewise`)).equals(payload));
    assert.equal(connections, kept + 1, 'that connection was not used again');
    await assert.rejects(body(`${base}/stall`, 300), PlainHttpTimeout);
  } finally {
    server.close();
  }
});
