// Debian's nginx serving a directory on loopback, for the tests and benches
// whose peer is a static binary cache (`nix copy --to file://…` output): the
// nar-bridge bench and the substitution tests. nginx runs in the foreground
// from a generated configuration in its own directory.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { freePort } from './helpers.js';

export { freePort };

export interface Nginx {
  child: ChildProcess;
  /** http://127.0.0.1:PORT, no trailing slash */
  base: string;
  /** What nginx printed, and its error log. */
  stderr: () => string;
  /** The access log's lines so far (empty unless started with accessLog). */
  requests: () => string[];
}


export function collectStderr(child: ChildProcess): () => string {
  let text = '';
  child.stderr!.on('data', (d) => {
    text += d;
    if (text.length > 64 * 1024) text = text.slice(-64 * 1024);
  });
  return () => text;
}

function nginxConfig(dir: string, root: string, port: number, accessLog: string | undefined, tls?: { cert: string; key: string }): string {
  const user = process.getuid?.() === 0 ? 'user root root;\n' : '';
  const temp = (name: string) => join(dir, 'temp', name);
  for (const name of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) mkdirSync(temp(name), { recursive: true });
  return `${user}daemon off;
master_process on;
worker_processes 1;
pid ${join(dir, 'nginx.pid')};
error_log ${join(dir, 'error.log')} warn;
events { worker_connections 1024; }
http {
  ${accessLog ? `log_format requests '$request $status'; access_log ${accessLog} requests;` : 'access_log off;'}
  sendfile on;
  keepalive_requests 1000000;
  client_body_temp_path ${temp('body')};
  proxy_temp_path ${temp('proxy')};
  fastcgi_temp_path ${temp('fastcgi')};
  uwsgi_temp_path ${temp('uwsgi')};
  scgi_temp_path ${temp('scgi')};
  types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; }
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:${port}${tls ? ' ssl' : ''};
    ${tls ? `ssl_certificate ${tls.cert}; ssl_certificate_key ${tls.key};` : ''}
    root ${root};
  }
}
`;
}

/** Starts `nginx` (the binary's path) serving `root`, with its files in `dir`; resolves once it accepts connections. */
/** `tls`: serve HTTPS with this certificate and key (PEM files). */
export async function startNginx(nginx: string, dir: string, root: string, options: { accessLog?: boolean; tls?: { cert: string; key: string } } = {}): Promise<Nginx> {
  mkdirSync(dir, { recursive: true });
  const port = await freePort();
  const conf = join(dir, 'nginx.conf');
  const accessLog = options.accessLog ? join(dir, 'access.log') : undefined;
  writeFileSync(conf, nginxConfig(dir, root, port, accessLog, options.tls));
  // -e: nginx opens its error log before reading the configuration.
  const child = spawn(nginx, ['-p', dir, '-e', join(dir, 'error.log'), '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  const stderr = collectStderr(child);
  const log = () => `${stderr()}${existsSync(join(dir, 'error.log')) ? readFileSync(join(dir, 'error.log'), 'utf8') : ''}`;
  let exited: number | null | undefined;
  child.once('exit', (code) => (exited = code));
  const base = `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  for (const deadline = Date.now() + 10_000; ; ) {
    if (exited !== undefined) throw new Error(`nginx exited with ${exited}: ${log()}`);
    if (await accepts(port)) break;
    if (Date.now() > deadline) {
      child.kill('SIGTERM');
      throw new Error(`nginx is not listening on ${base} after 10 s: ${log()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const requests = () => (accessLog && existsSync(accessLog) ? readFileSync(accessLog, 'utf8').split('\n').filter(Boolean) : []);
  return { child, base, stderr: log, requests };
}

/** Whether something accepts TCP connections on the port (HTTP or HTTPS alike). */
function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** SIGTERM, then SIGKILL after 5 s; resolves once the process is gone. */
export async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/** SIGKILL to a leftover nginx worker, unless the pid is gone or now someone else's. */
export function killIfNginx(pid: number): void {
  try {
    if (readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'nginx') process.kill(pid, 'SIGKILL');
  } catch {
    // already gone, as it should be
  }
}

export async function stopNginx(server: Nginx | undefined, workers: number[] = []): Promise<void> {
  if (!server) return;
  await stopProcess(server.child);
  for (const pid of workers) killIfNginx(pid);
}
