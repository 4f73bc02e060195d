// gRPC over TLS with client certificates: `nixcas daemon --tls-cert --tls-key --tls-client-ca`
// against Debian's Python grpcio and against nixcas's own grpc+https:// client; plain TCP beyond
// loopback is refused without --insecure-listen. Certificates are made by openssl for the test.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { ROOT, compilePythonStubs, nixcas, nixcasBytes, removeDir, startDaemon, tempDir } from './helpers.js';

/**
 * A CA, and a server (localhost, 127.0.0.1) and a client certificate it signed; and another CA
 * with a client certificate of its own, which the server must not take.
 */
function makeCertificates(dir: string): Record<'ca' | 'serverCert' | 'serverKey' | 'clientCert' | 'clientKey' | 'strangerCert' | 'strangerKey', string> {
  const ssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ssl('req', '-x509', ...key, '-keyout', 'ca.key', '-out', 'ca.pem', '-subj', '/CN=nixcas test CA', '-days', '2');
  ssl('req', '-x509', ...key, '-keyout', 'other-ca.key', '-out', 'other-ca.pem', '-subj', '/CN=another CA', '-days', '2');
  for (const [name, san, ca] of [['server', 'DNS:localhost,IP:127.0.0.1', 'ca'], ['client', 'DNS:client', 'ca'], ['stranger', 'DNS:client', 'other-ca']]) {
    ssl('req', ...key, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    writeFileSync(join(dir, `${name}.ext`), `subjectAltName=${san}\n`);
    ssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', `${name}.ext`);
  }
  return {
    ca: join(dir, 'ca.pem'), serverCert: join(dir, 'server.pem'), serverKey: join(dir, 'server.key'),
    clientCert: join(dir, 'client.pem'), clientKey: join(dir, 'client.key'),
    strangerCert: join(dir, 'stranger.pem'), strangerKey: join(dir, 'stranger.key'),
  };
}

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
