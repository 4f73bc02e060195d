// gRPC over TLS with client certificates: `nixcas daemon --tls-cert --tls-key --tls-client-ca`
// against Debian's Python grpcio and against nixcas's own grpc+https:// client; plain TCP beyond
// loopback is refused without --insecure-listen. Certificates are made by openssl for the test.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { makeCertificates } from './certificates.js';
import { ROOT, compilePythonStubs, nixcas, nixcasBytes, removeDir, startDaemon, tempDir } from './helpers.js';

test('daemon over TLS requires client certificates: Python grpcio and grpc+https:// with one work, without one they are refused', async () => {
  const work = tempDir('tls');
  try {
    const certs = makeCertificates(work);
    const store = join(work, 'store');
    // A read-write TLS port, and a read-only one for the fleet (both on loopback here).
    const daemon = await startDaemon(['--store', store, '--listen', '127.0.0.1:0', '--listen-read-only', '127.0.0.1:0', '--tls-cert', certs.serverCert, '--tls-key', certs.serverKey, '--tls-client-ca', certs.ca]);
    try {
      assert.match(daemon.output(), /listening on 127\.0\.0\.1:\d+, TLS with client certificates; 127\.0\.0\.1:\d+, TLS with client certificates, read-only/);
      const [, port, readOnlyPort] = /listening on 127\.0\.0\.1:(\d+), [^;]*; 127\.0\.0\.1:(\d+)/.exec(daemon.output())!;
      const python = spawnSync('/usr/bin/python3', [join(ROOT, 'test/python/tls_client.py'), `127.0.0.1:${port}`, compilePythonStubs(join(work, 'generated')), certs.ca, certs.clientCert, certs.clientKey, certs.strangerCert, certs.strangerKey, `127.0.0.1:${readOnlyPort}`], { encoding: 'utf8', timeout: 60_000 });
      assert.equal(python.status, 0, python.stderr);
      assert.match(python.stdout, /with a client certificate: put and read 9 bytes/);
      assert.match(python.stdout, /without a client certificate: UNAVAILABLE/);
      assert.match(python.stdout, /with a certificate from another CA: UNAVAILABLE/);
      assert.match(python.stdout, /read-only listener: read 9 bytes; Put: PERMISSION_DENIED/);

      const params = `tls-ca-cert-path=${certs.ca}&tls-client-cert-path=${certs.clientCert}&tls-client-key-path=${certs.clientKey}`;
      const url = `grpc+https://127.0.0.1:${port}?${params}`;
      const remote = ['--blob-service-addr', url, '--directory-service-addr', url, '--path-info-service-addr', url];
      writeFileSync(join(work, 'file'), 'imported over tls\n');
      const imported = nixcas(['import', ...remote, join(work, 'file')]);
      assert.equal(imported.status, 0, imported.stderr);
      assert.equal(nixcasBytes(['cat', ...remote, imported.stdout.trim()]).toString(), 'imported over tls\n');
      const noCert = `grpc+https://127.0.0.1:${port}?tls-ca-cert-path=${certs.ca}`;
      const refused = nixcas(['path-info', '--blob-service-addr', noCert, '--directory-service-addr', noCert, '--path-info-service-addr', noCert, imported.stdout.trim()]);
      assert.equal(refused.status, 1);
      assert.match(refused.stderr, /cannot reach the store at grpc\+https:\/\/127\.0\.0\.1/);
    } finally {
      await daemon.stop();
    }
  } finally {
    removeDir(work);
  }
});

test('plain TCP beyond loopback is refused without --insecure-listen; TLS flags are checked', async () => {
  const work = tempDir('tls-refused');
  try {
    const store = join(work, 'store');
    const open = nixcas(['daemon', '--store', store, '--listen', '0.0.0.0:0']);
    assert.equal(open.status, 1);
    assert.match(open.stderr, /--listen 0\.0\.0\.0:0: plain TCP beyond loopback .* give --tls-cert and --tls-key .* or --insecure-listen/);
    const half = nixcas(['daemon', '--store', store, '--listen', '127.0.0.1:0', '--tls-cert', join(work, 'x.pem')]);
    assert.equal(half.status, 1);
    assert.match(half.stderr, /--tls-cert and --tls-key go together/);
    const missing = nixcas(['daemon', '--store', store, '--listen', '127.0.0.1:0', '--tls-cert', join(work, 'x.pem'), '--tls-key', join(work, 'x.key')]);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, new RegExp(`--tls-cert ${join(work, 'x.pem')}: no such file`));
    const insecure = await startDaemon(['--store', store, '--listen', '0.0.0.0:0', '--insecure-listen']);
    assert.equal(await insecure.stop(), 0);
  } finally {
    removeDir(work);
  }
});
