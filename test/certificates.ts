// Certificates made by openssl for TLS tests and benchmarks.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * A CA, and a server (localhost, 127.0.0.1) and a client certificate it signed; and another CA
 * with a client certificate of its own, which the server must not take.
 */
export function makeCertificates(dir: string): Record<'ca' | 'serverCert' | 'serverKey' | 'clientCert' | 'clientKey' | 'strangerCert' | 'strangerKey', string> {
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
