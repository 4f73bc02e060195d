// `nixcas nar-bridge` against real Nix (Debian's nix-bin): the store as an
// HTTP binary cache that `nix copy --to` uploads into and `nix copy --from`
// substitutes from, with signatures, upload credentials, ranged NAR reads and
// hostile requests.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash, createPublicKey, randomBytes, verify } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { basename, join } from 'node:path';
import { test } from 'node:test';
import * as nixbase32 from '../src/store/nixbase32.js';
import { buildClosureFixture, type Daemon, makeEmptyStore, nix, nixcas, removeDir, startNixcas, tempDir } from './helpers.js';

// ---------------------------------------------------------------- plumbing

interface Bridge {
  daemon: Daemon;
  port: number;
  base: string;
}

async function startBridge(store: string, args: string[] = []): Promise<Bridge> {
  const daemon = await startNixcas(['nar-bridge', '--store', store, '--listen', '127.0.0.1:0', ...args], 'listening on');
  const match = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.output());
  if (!match) {
    await daemon.stop();
    throw new Error(`no port in nar-bridge's output: ${daemon.output()}`);
  }
  const port = Number(match[1]);
  return { daemon, port, base: `http://127.0.0.1:${port}` };
}

interface Response {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** One HTTP request on a fresh connection; the whole response body is read. */
function request(port: number, method: string, path: string, options: { headers?: Record<string, string | number>; body?: Buffer | string } = {}): Promise<Response> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.setTimeout(20_000, () => req.destroy(new Error('no answer in 20 s')));
    req.on('error', (error) => reject(new Error(`${method} ${path.slice(0, 100)}: ${error.message}`, { cause: error })));
    req.end(options.body);
  });
}

/** A PUT with `Expect: 100-continue`, as curl (and so Nix) sends it; the body goes only after 100 Continue. */
function putExpectingContinue(port: number, path: string, body: Buffer, headers: Record<string, string> = {}): Promise<Response & { sentBody: boolean }> {
  return new Promise((resolve, reject) => {
    let sentBody = false;
    const req = http.request(
      { host: '127.0.0.1', port, method: 'PUT', path, agent: false, headers: { ...headers, 'Content-Length': body.length, Expect: '100-continue' } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => {
          resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks), sentBody });
          req.destroy();
        });
      },
    );
    req.on('continue', () => {
      sentBody = true;
      req.end(body);
    });
    req.setTimeout(20_000, () => req.destroy(new Error(`PUT ${path}: no answer in 20 s`)));
    req.on('error', reject);
  });
}

function basicAuth(user: string, password: string): string {
  return `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
}

function parseNarinfo(text: string): Map<string, string> {
  const fields = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (!line) continue;
    const at = line.indexOf(': ');
    assert.ok(at > 0 || line.endsWith(':'), `narinfo line ${JSON.stringify(line)} is not "Key: value"`);
    const key = at > 0 ? line.slice(0, at) : line.slice(0, -1);
    const value = at > 0 ? line.slice(at + 2) : '';
    // Sig may repeat; keep them all, newline-separated.
    fields.set(key, fields.has(key) ? `${fields.get(key)}\n${value}` : value);
  }
  return fields;
}

/** Environment for a Nix command that keeps Nix's caches (narinfo lookups, negative ones too) out of the real HOME. */
function nixEnv(home: string): NodeJS.ProcessEnv {
  mkdirSync(join(home, '.cache'), { recursive: true });
  return { ...process.env, HOME: home, XDG_CACHE_HOME: join(home, '.cache') };
}

interface NixRun {
  status: number | null;
  stdout: Buffer;
  stderr: string;
}

function runNix(home: string, command: string, args: string[]): NixRun {
  const result = spawnSync(command, args, { env: nixEnv(home), maxBuffer: 1 << 30, timeout: 120_000 });
  if (result.error) throw new Error(`${command}: ${result.error.message} (is nix-bin installed?)`);
  return { status: result.status, stdout: result.stdout, stderr: result.stderr.toString() };
}

/** Options every `nix` invocation here gets: no cached narinfo answers, no outside substituters. */
const NIX_OPTIONS = [
  '--extra-experimental-features', 'nix-command',
  '--option', 'narinfo-cache-negative-ttl', '0',
  '--option', 'narinfo-cache-positive-ttl', '0',
  '--option', 'substituters', '',
];

function nixCopyTo(home: string, url: string, paths: string[], extra: string[] = []): NixRun {
  return runNix(home, 'nix', [...NIX_OPTIONS, ...extra, 'copy', '--to', url, ...paths]);
}

function closurePaths(attrsJson: string): string[] {
  return (JSON.parse(readFileSync(attrsJson, 'utf8')).closure as { path: string }[]).map((e) => e.path);
}

function hashPartOf(storePath: string): string {
  return basename(storePath).slice(0, 32);
}

function nixNarHash(path: string): string {
  return `sha256:${nix('nix-hash', ['--type', 'sha256', '--base32', path]).toString().trim()}`;
}

function nixReferences(path: string): string[] {
  return nix('nix-store', ['-q', '--references', path]).toString().trim().split('\n').filter(Boolean).map((p) => basename(p)).sort();
}

function sha256Nix32(bytes: Buffer): string {
  return nixbase32.encode(createHash('sha256').update(bytes).digest());
}

function randomStorePath(name: string): string {
  return `/nix/store/${nixbase32.encode(randomBytes(20))}-${name}`;
}

/** Bytes that are the same in every run (a SHA-256 chain from `label`), for tests that need no randomness. */
function fixedBytes(length: number, label: string): Buffer {
  const out: Buffer[] = [];
  let block = createHash('sha256').update(label).digest();
  for (let made = 0; made < length; made += block.length) {
    out.push(block);
    block = createHash('sha256').update(block).digest();
  }
  return Buffer.concat(out).subarray(0, length);
}

/** A store path whose hash part is derived from its name: the same in every run. */
function fixedStorePath(name: string): string {
  return `/nix/store/${nixbase32.encode(fixedBytes(20, name))}-${name}`;
}

/** Generates a Nix signing key pair; returns the file names and the public key line. */
function makeKey(dir: string, name: string): { secretFile: string; publicFile: string; publicKey: string } {
  const secretFile = join(dir, `${name}.sk`);
  const publicFile = join(dir, `${name}.pk`);
  nix('nix-store', ['--generate-binary-cache-key', name, secretFile, publicFile]);
  return { secretFile, publicFile, publicKey: readFileSync(publicFile, 'utf8').trim() };
}

/** Checks a `Sig: name:base64` of a narinfo with the public key, over Nix's fingerprint. */
function signatureValid(info: Map<string, string>, publicKey: string): boolean {
  const [keyName, keyData] = publicKey.split(':');
  const key = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from(keyData, 'base64').toString('base64url') }, format: 'jwk' });
  const references = (info.get('References') ?? '').split(' ').filter(Boolean).map((r) => `/nix/store/${r}`).join(',');
  const fingerprint = `1;${info.get('StorePath')};${info.get('NarHash')};${info.get('NarSize')};${references}`;
  for (const sig of (info.get('Sig') ?? '').split('\n').filter(Boolean)) {
    const at = sig.indexOf(':');
    if (sig.slice(0, at) !== keyName) continue;
    if (verify(null, Buffer.from(fingerprint), key, Buffer.from(sig.slice(at + 1), 'base64'))) return true;
  }
  return false;
}

async function getNarinfo(bridge: Bridge, storePath: string): Promise<Map<string, string>> {
  const res = await request(bridge.port, 'GET', `/${hashPartOf(storePath)}.narinfo`);
  assert.equal(res.status, 200, `GET narinfo of ${storePath}: ${res.status} ${res.body}`);
  return parseNarinfo(res.body.toString());
}

/** The request path of a narinfo's URL, resolved against the cache's base. */
function narPath(bridge: Bridge, info: Map<string, string>): string {
  const url = new URL(info.get('URL')!, `${bridge.base}/`);
  return url.pathname + url.search;
}

/** Checks a served narinfo against what Nix itself says about the path, and the served NAR against `nix-store --dump`. */
async function checkServedPath(bridge: Bridge, storePath: string, dump: Buffer = nix('nix-store', ['--dump', storePath]), narHash = nixNarHash(storePath), references = nixReferences(storePath)): Promise<Map<string, string>> {
  const info = await getNarinfo(bridge, storePath);
  assert.equal(info.get('StorePath'), storePath);
  assert.equal(info.get('NarHash'), narHash, `NarHash of ${storePath}`);
  assert.equal(info.get('NarSize'), String(dump.length), `NarSize of ${storePath}`);
  assert.deepEqual((info.get('References') ?? '').split(' ').filter(Boolean).sort(), references, `References of ${storePath}`);
  assert.equal(info.get('Compression'), 'none', `Compression of ${storePath}`);
  assert.ok(info.get('URL'), `${storePath}: narinfo without URL`);
  if (info.has('FileHash')) assert.equal(info.get('FileHash'), narHash, 'uncompressed: FileHash is NarHash');
  if (info.has('FileSize')) assert.equal(info.get('FileSize'), String(dump.length), 'uncompressed: FileSize is NarSize');
  const nar = await request(bridge.port, 'GET', narPath(bridge, info));
  assert.equal(nar.status, 200, `GET ${info.get('URL')}`);
  assert.ok(nar.body.equals(dump), `NAR of ${storePath} served by nar-bridge differs from nix-store --dump (${nar.body.length} vs ${dump.length} bytes)`);
  const head = await request(bridge.port, 'HEAD', narPath(bridge, info));
  assert.equal(head.status, 200);
  assert.equal(head.headers['content-length'], String(dump.length), 'HEAD of the NAR: Content-Length is NarSize');
  const headInfo = await request(bridge.port, 'HEAD', `/${hashPartOf(storePath)}.narinfo`);
  assert.equal(headInfo.status, 200, 'HEAD narinfo');
  return info;
}

/**
 * Waits until nar-bridge's access log holds every request answered so far: the
 * log is read through a pipe, and a synchronous Nix run keeps this process from
 * reading it meanwhile. A marker request's line comes after all earlier ones.
 */
async function logSettled(bridge: Bridge): Promise<string> {
  const marker = `/${nixbase32.encode(randomBytes(20))}.narinfo`;
  await request(bridge.port, 'HEAD', marker);
  await waitFor(`the access log line of HEAD ${marker}`, () => bridge.daemon.output().includes(`"HEAD ${marker} HTTP/1.1"`));
  return bridge.daemon.output();
}

/** Adds nar-bridge's log (access log and errors) to a failure. */
function withLog(error: unknown, bridge: Bridge): unknown {
  if (error instanceof Error) error.message += `\n--- nar-bridge output (last 6000 characters):\n${bridge.daemon.output().slice(-6000)}`;
  return error;
}

async function waitFor(what: string, condition: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A regular file's NAR, made by Nix; with its nix32 SHA-256. */
function fileNar(dir: string, name: string, contents: Buffer): { nar: Buffer; hash: string } {
  const file = join(dir, name);
  writeFileSync(file, contents);
  const nar = nix('nix-store', ['--dump', file]);
  return { nar, hash: sha256Nix32(nar) };
}

function narinfoText(fields: { storePath: string; narHash: string; narSize: number; references?: string[]; url?: string }): string {
  return [
    `StorePath: ${fields.storePath}`,
    `URL: ${fields.url ?? `nar/${fields.narHash}.nar`}`,
    'Compression: none',
    `FileHash: sha256:${fields.narHash}`,
    `FileSize: ${fields.narSize}`,
    `NarHash: sha256:${fields.narHash}`,
    `NarSize: ${fields.narSize}`,
    `References: ${(fields.references ?? []).join(' ')}`,
    '',
  ].join('\n');
}

// ------------------------------------------------------------------ tests

test('nar-bridge: nix copy --to uploads a closure (none, xz, zstd); narinfos, NARs and signed nix copy --from match Nix', async (t) => {
  const work = tempDir('narbridge-copy');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const paths = closurePaths(attrs);
    assert.equal(paths.length, 3);
    const key = makeKey(work, 'nixcas-test-1');
    const otherKey = makeKey(work, 'someone-else-1');
    const dumps = new Map(paths.map((p) => [p, nix('nix-store', ['--dump', p])]));

    for (const [label, query, suffix] of [['none', '?compression=none', '.nar'], ['xz (default)', '', '.nar.xz'], ['zstd', '?compression=zstd', '.nar.zst']] as const) {
      await t.test(`compression ${label}`, async (t) => {
        const dir = join(work, `case-${suffix.slice(1)}`);
        mkdirSync(dir);
        const home = join(dir, 'home');
        const bridge = await startBridge(join(dir, 'store'), ['--allow-upload', '--sign-key', key.secretFile]);
        try {
          const up = nixCopyTo(home, `${bridge.base}${query}`, paths);
          if (up.status !== 0 && label === 'zstd' && /compression|zstd/i.test(up.stderr) && !/HTTP error/.test(up.stderr)) {
            t.skip(`this Nix does not upload zstd: ${up.stderr.trim()}`);
            return;
          }
          assert.equal(up.status, 0, `nix copy --to ${bridge.base}${query} failed:\n${up.stderr}\nnar-bridge:\n${bridge.daemon.output()}`);
          // Nix picked the URL for this compression, and nar-bridge saw it.
          assert.match(await logSettled(bridge), new RegExp(`"PUT /nar/[0-9a-z]{52}${suffix.replaceAll('.', '\\.')} HTTP/1\\.1" 2\\d\\d`), 'access log shows the NAR upload');

          for (const path of paths) {
            const info = await checkServedPath(bridge, path, dumps.get(path)!);
            assert.match(info.get('Sig') ?? '', /^nixcas-test-1:/m, `${path}: narinfo not signed with the --sign-key: ${JSON.stringify(info.get('Sig'))}`);
            assert.ok(signatureValid(info, key.publicKey), `${path}: Sig does not verify with the public key`);
            assert.ok(!signatureValid(info, otherKey.publicKey));
          }
          // Nix's own upload again: every path is already there, so nothing is PUT.
          const putsBefore = ((await logSettled(bridge)).match(/"PUT /g) ?? []).length;
          const again = nixCopyTo(home, `${bridge.base}${query}`, paths);
          assert.equal(again.status, 0, again.stderr);
          assert.equal(((await logSettled(bridge)).match(/"PUT /g) ?? []).length, putsBefore, 'a second nix copy --to uploads nothing');

          // Substituting from it: a key Nix does not trust is refused...
          const wrongRoot = join(dir, 'root-wrong-key');
          const refused = runNix(home, 'nix', [...NIX_OPTIONS, 'copy', '--from', bridge.base, '--store', wrongRoot, '--option', 'require-sigs', 'true', '--option', 'trusted-public-keys', otherKey.publicKey, ...paths]);
          assert.notEqual(refused.status, 0, 'nix copy --from with another trusted key must fail');
          assert.match(refused.stderr, /lacks a valid signature/);
          const wrongStore = join(wrongRoot, 'nix/store');
          assert.deepEqual(existsSync(wrongStore) ? readdirSync(wrongStore).filter((n) => !n.startsWith('.')) : [], [], 'no path copied without a trusted signature');

          // ...and with the right key everything arrives, hashes and signatures intact.
          const root = join(dir, 'root');
          const pulled = runNix(home, 'nix', [...NIX_OPTIONS, 'copy', '--from', bridge.base, '--store', root, '--option', 'require-sigs', 'true', '--option', 'trusted-public-keys', key.publicKey, ...paths]);
          assert.equal(pulled.status, 0, `nix copy --from failed:\n${pulled.stderr}\nnar-bridge:\n${bridge.daemon.output()}`);
          const verified = runNix(home, 'nix', [...NIX_OPTIONS, 'store', 'verify', '--store', root, '--option', 'trusted-public-keys', key.publicKey, '--sigs-needed', '1', ...paths]);
          assert.equal(verified.status, 0, `nix store verify (contents and 1 signature):\n${verified.stderr}`);
          const untrusted = runNix(home, 'nix', [...NIX_OPTIONS, 'store', 'verify', '--store', root, '--option', 'trusted-public-keys', otherKey.publicKey, '--sigs-needed', '1', ...paths]);
          assert.notEqual(untrusted.status, 0, 'the copied paths carry only our signature');
          for (const path of paths) {
            const copied = runNix(home, 'nix-store', ['--store', root, '--dump', path]);
            assert.equal(copied.status, 0, copied.stderr);
            assert.ok(copied.stdout.equals(dumps.get(path)!), `${path} as copied into ${root} differs from the original`);
            const refs = runNix(home, 'nix-store', ['--store', root, '-q', '--references', path]);
            assert.deepEqual(refs.stdout.toString().trim().split('\n').filter(Boolean).map((p) => basename(p)).sort(), nixReferences(path));
          }
        } finally {
          await bridge.daemon.stop();
        }
      });
    }
  } finally {
    removeDir(work);
  }
});

test('nar-bridge: uploads need --allow-upload, and with --upload-credentials valid Basic auth', async () => {
  const work = tempDir('narbridge-auth');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const paths = closurePaths(attrs);
    const home = join(work, 'home');
    const credentials = join(work, 'credentials');
    writeFileSync(credentials, 'alice:s3cret-pw\nbob:other:pw-with-colon\n');
    const netrc = join(work, 'netrc');
    writeFileSync(netrc, 'machine 127.0.0.1 login alice password s3cret-pw\n');
    const wrongNetrc = join(work, 'netrc-wrong');
    writeFileSync(wrongNetrc, 'machine 127.0.0.1 login alice password not-her-password\n');
    const { nar, hash } = fileNar(work, 'payload', randomBytes(5000));

    const bridge = await startBridge(join(work, 'store'), ['--allow-upload', '--upload-credentials', credentials]);
    try {
      const url = `${bridge.base}?compression=none`;
      for (const [what, extra] of [['without netrc', []], ['with a wrong password', ['--option', 'netrc-file', wrongNetrc]]] as const) {
        const refused = nixCopyTo(home, url, paths, [...extra]);
        assert.notEqual(refused.status, 0, `nix copy --to ${what} must fail`);
        assert.match(refused.stderr, /401/, `nix copy --to ${what}: ${refused.stderr}`);
        for (const path of paths) {
          assert.equal((await request(bridge.port, 'HEAD', `/${hashPartOf(path)}.narinfo`)).status, 404, `${path} must not be in the cache after an upload ${what}`);
        }
        for (const path of paths) {
          // Nothing of the NARs either (Nix names uncompressed NARs by their NAR hash).
          const narHash = nixNarHash(path).slice('sha256:'.length);
          assert.equal((await request(bridge.port, 'HEAD', `/nar/${narHash}.nar`)).status, 404, `NAR of ${path} after an upload ${what}`);
        }
      }

      // Raw PUTs: no auth, wrong password, unknown user, malformed header → 401 with a challenge, nothing stored.
      for (const [what, headers] of [
        ['no Authorization', {}],
        ['a wrong password', { Authorization: basicAuth('alice', 'wrong') }],
        ['an unknown user', { Authorization: basicAuth('mallory', 's3cret-pw') }],
        ['a password that is a prefix', { Authorization: basicAuth('alice', 's3cret') }],
        ['Bearer', { Authorization: 'Bearer s3cret-pw' }],
        ['garbage Basic', { Authorization: 'Basic !!!notbase64' }],
      ] as const) {
        const res = await request(bridge.port, 'PUT', `/nar/${hash}.nar`, { headers: { ...headers, 'Content-Type': 'application/x-nix-nar' }, body: nar });
        assert.equal(res.status, 401, `PUT with ${what}: ${res.status} ${res.body}`);
        assert.match(String(res.headers['www-authenticate']), /^Basic\b/i, `PUT with ${what}: WWW-Authenticate`);
      }
      // curl's way: Expect: 100-continue, and the server may refuse before the body is sent.
      const early = await putExpectingContinue(bridge.port, `/nar/${hash}.nar`, nar, { Authorization: basicAuth('alice', 'wrong') });
      assert.equal(early.status, 401, 'PUT with Expect: 100-continue and a wrong password');
      const badInfo = narinfoText({ storePath: randomStorePath('payload'), narHash: hash, narSize: nar.length });
      const infoRefused = await request(bridge.port, 'PUT', `/${hashPartOf(randomStorePath('x'))}.narinfo`, { headers: { Authorization: basicAuth('alice', 'wrong') }, body: badInfo });
      assert.equal(infoRefused.status, 401, 'narinfo PUT with a wrong password');

      // A password containing a colon (the user is up to the first colon).
      const storePath = randomStorePath('payload');
      const bobNar = await request(bridge.port, 'PUT', `/nar/${hash}.nar`, { headers: { Authorization: basicAuth('bob', 'other:pw-with-colon') }, body: nar });
      assert.ok(bobNar.status >= 200 && bobNar.status < 300, `PUT NAR as bob: ${bobNar.status} ${bobNar.body}`);
      const bobInfo = await request(bridge.port, 'PUT', `/${hashPartOf(storePath)}.narinfo`, { headers: { Authorization: basicAuth('bob', 'other:pw-with-colon') }, body: narinfoText({ storePath, narHash: hash, narSize: nar.length }) });
      assert.ok(bobInfo.status >= 200 && bobInfo.status < 300, `PUT narinfo as bob: ${bobInfo.status} ${bobInfo.body}`);
      assert.equal((await request(bridge.port, 'HEAD', `/${hashPartOf(storePath)}.narinfo`)).status, 200);

      // With the right netrc, Nix's upload goes through (curl sends the credentials up front).
      const accepted = nixCopyTo(home, url, paths, ['--option', 'netrc-file', netrc]);
      assert.equal(accepted.status, 0, `nix copy --to with netrc:\n${accepted.stderr}\nnar-bridge:\n${bridge.daemon.output()}`);
      for (const path of paths) await checkServedPath(bridge, path);
      // Reading needs no credentials.
      assert.equal((await request(bridge.port, 'GET', '/nix-cache-info')).status, 200);
    } finally {
      await bridge.daemon.stop();
    }

    // Without --allow-upload every PUT is 403, whatever the credentials, and nix copy --to fails.
    await makeEmptyStore(join(work, 'store-ro'));
    const readOnly = await startBridge(join(work, 'store-ro'));
    try {
      const narPut = await request(readOnly.port, 'PUT', `/nar/${hash}.nar`, { body: nar });
      assert.equal(narPut.status, 403, `PUT NAR without --allow-upload: ${narPut.status}`);
      const storePath = randomStorePath('payload');
      const infoPut = await request(readOnly.port, 'PUT', `/${hashPartOf(storePath)}.narinfo`, { body: narinfoText({ storePath, narHash: hash, narSize: nar.length }) });
      assert.equal(infoPut.status, 403, `PUT narinfo without --allow-upload: ${infoPut.status}`);
      assert.equal((await request(readOnly.port, 'HEAD', `/${hashPartOf(storePath)}.narinfo`)).status, 404);
      const refused = nixCopyTo(join(work, 'home-ro'), `${readOnly.base}?compression=none`, paths);
      assert.notEqual(refused.status, 0, 'nix copy --to a read-only nar-bridge must fail');
      assert.match(refused.stderr, /403/);
      for (const path of paths) assert.equal((await request(readOnly.port, 'HEAD', `/${hashPartOf(path)}.narinfo`)).status, 404);
    } finally {
      await readOnly.daemon.stop();
    }
  } finally {
    removeDir(work);
  }
});

/** Checks ranged GETs of one NAR against `nix-store --dump`. */
async function checkRanges(bridge: Bridge, path: string, dump: Buffer, ranges: [string, number, number][]): Promise<void> {
  const size = dump.length;
  for (const [range, first, last] of ranges) {
    assert.ok(first >= 0 && last < size && first <= last, `test bug: ${range} over ${size} bytes`);
    const res = await request(bridge.port, 'GET', path, { headers: { Range: range } });
    assert.equal(res.status, 206, `Range: ${range} of ${size} bytes: status`);
    assert.equal(res.headers['content-range'], `bytes ${first}-${last}/${size}`, `Range: ${range}: Content-Range`);
    assert.equal(res.headers['content-length'], String(last - first + 1), `Range: ${range}: Content-Length`);
    assert.ok(res.body.equals(dump.subarray(first, last + 1)), `Range: ${range}: bytes ${first}-${last} differ from nix-store --dump (got ${res.body.length} bytes)`);
  }
  for (const range of [`bytes=${size}-`, `bytes=${size + 10}-${size + 20}`]) {
    const res = await request(bridge.port, 'GET', path, { headers: { Range: range } });
    assert.equal(res.status, 416, `Range: ${range} of ${size} bytes`);
    assert.equal(res.headers['content-range'], `bytes */${size}`, `Range: ${range}: Content-Range`);
  }
  const head = await request(bridge.port, 'HEAD', path);
  assert.equal(head.status, 200);
  assert.equal(head.headers['content-length'], String(size));
  const whole = await request(bridge.port, 'GET', path);
  assert.equal(whole.status, 200);
  assert.ok(whole.body.equals(dump));
}

test('nar-bridge: ranged GETs of NARs match nix-store --dump, inside file contents and across NAR structure', async () => {
  const work = tempDir('narbridge-range');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const paths = closurePaths(attrs);
    const store = join(work, 'store');

    // A tree with a 3 MiB random file, small files and a symlink, put in by nixcas import.
    const tree = join(work, 'tree');
    mkdirSync(join(tree, 'sub'), { recursive: true });
    const big = randomBytes(3 * 1024 * 1024 + 12345);
    writeFileSync(join(tree, 'big.bin'), big);
    writeFileSync(join(tree, 'a-small'), 'small file\n');
    writeFileSync(join(tree, 'sub/tool'), '#!/bin/sh\necho tool\n');
    chmodSync(join(tree, 'sub/tool'), 0o755);
    writeFileSync(join(tree, 'z-after'), randomBytes(777));
    symlinkSync('sub/tool', join(tree, 'link'));
    const imported = nixcas(['import', '--store', store, tree]);
    assert.equal(imported.status, 0, imported.stderr);
    const treePath = imported.stdout.trim();
    assert.match(treePath, /^\/nix\/store\/[0-9a-z]{32}-tree$/);
    const treeDump = nix('nix-store', ['--dump', tree]);

    const bridge = await startBridge(store, ['--allow-upload']);
    try {
      const up = nixCopyTo(join(work, 'home'), `${bridge.base}?compression=none`, paths);
      assert.equal(up.status, 0, up.stderr);

      // The biggest NAR of the closure.
      const sized = paths.map((p) => ({ path: p, dump: nix('nix-store', ['--dump', p]) })).sort((a, b) => b.dump.length - a.dump.length);
      const { path: biggest, dump } = sized[0];
      const info = await checkServedPath(bridge, biggest, dump);
      const n = dump.length;
      const mid = Math.floor(n / 3);
      await checkRanges(bridge, narPath(bridge, info), dump, [
        ['bytes=0-0', 0, 0],
        [`bytes=${mid}-${mid + 99}`, mid, mid + 99],
        ['bytes=-100', n - 100, n - 1],
        [`bytes=${n - 37}-`, n - 37, n - 1],
        [`bytes=${n - 1}-`, n - 1, n - 1],
        [`bytes=0-${n + 1000}`, 0, n - 1], // an end past the NAR is clamped
        [`bytes=-${n + 1000}`, 0, n - 1], // so is a suffix longer than the NAR
      ]);

      // The imported tree: ranges inside the big file's contents, straddling its start and end
      // (NAR tokens around it), and in the entries after it.
      const treeInfo = await checkServedPath(bridge, treePath, treeDump, nixNarHash(tree), []);
      const start = treeDump.indexOf(big.subarray(0, 64));
      assert.ok(start > 0, 'the big file is in the NAR');
      assert.ok(treeDump.subarray(start, start + big.length).equals(big));
      const end = start + big.length; // first byte after the contents (padding, then NAR tokens)
      const size = treeDump.length;
      await checkRanges(bridge, narPath(bridge, treeInfo), treeDump, [
        ['bytes=0-0', 0, 0],
        ['bytes=0-511', 0, 511],
        [`bytes=${start - 40}-${start + 40}`, start - 40, start + 40],
        [`bytes=${start + 1_000_000}-${start + 1_000_000 + 65_535}`, start + 1_000_000, start + 1_000_000 + 65_535],
        [`bytes=${start + 65_536 * 7 - 3}-${start + 65_536 * 9 + 3}`, start + 65_536 * 7 - 3, start + 65_536 * 9 + 3],
        [`bytes=${end - 100}-${end + 300}`, end - 100, end + 300],
        [`bytes=${end}-`, end, size - 1],
        [`bytes=${Math.floor(size / 2)}-`, Math.floor(size / 2), size - 1],
        ['bytes=-100', size - 100, size - 1],
        ['bytes=-1', size - 1, size - 1],
      ]);
    } finally {
      await bridge.daemon.stop();
    }
  } finally {
    removeDir(work);
  }
});

test('nar-bridge: bad uploads and hostile URLs are refused, nothing half-stored, and the server keeps serving', async () => {
  const work = tempDir('narbridge-bad');
  const bridge = await startBridge(join(work, 'store'), ['--allow-upload']);
  const port = bridge.port;
  const serving = async (after: string) => {
    const res = await request(port, 'GET', '/nix-cache-info');
    assert.equal(res.status, 200, `GET /nix-cache-info after ${after}`);
    assert.match(res.body.toString(), /StoreDir: \/nix\/store/);
  };
  const headStatus = async (path: string) => (await request(port, 'HEAD', path)).status;
  const putInfo = (storePath: string, body: string) => request(port, 'PUT', `/${hashPartOf(storePath)}.narinfo`, { headers: { 'Content-Type': 'text/x-nix-narinfo' }, body });
  const is4xx = (status: number) => status >= 400 && status < 500;
  try {
    const good = fileNar(work, 'good', randomBytes(3000));
    const other = fileNar(work, 'other', randomBytes(3000));

    // A body whose hash is not the one in the URL.
    const mismatch = await request(port, 'PUT', `/nar/${other.hash}.nar`, { body: good.nar });
    assert.equal(mismatch.status, 400, `PUT of a NAR under another hash: ${mismatch.status} ${mismatch.body}`);
    assert.equal(await headStatus(`/nar/${other.hash}.nar`), 404, 'HEAD of the NAR URL after a refused upload');
    for (const narHash of [other.hash, good.hash]) {
      const storePath = randomStorePath('mismatch');
      const res = await putInfo(storePath, narinfoText({ storePath, narHash, narSize: good.nar.length }));
      assert.ok(is4xx(res.status), `narinfo naming the refused upload's ${narHash === good.hash ? 'real' : 'claimed'} hash: ${res.status}`);
      assert.equal(await headStatus(`/${hashPartOf(storePath)}.narinfo`), 404);
    }
    await serving('a hash mismatch');

    // A truncated NAR (its URL names the hash of the truncated bytes, so only the NAR is wrong).
    for (const cut of [20, Math.floor(good.nar.length / 2), good.nar.length - 1]) {
      const truncated = good.nar.subarray(0, cut);
      const res = await request(port, 'PUT', `/nar/${sha256Nix32(truncated)}.nar`, { body: truncated });
      assert.equal(res.status, 400, `PUT of a NAR cut at ${cut} of ${good.nar.length} bytes: ${res.status}`);
      assert.equal(await headStatus(`/nar/${sha256Nix32(truncated)}.nar`), 404);
    }
    // Not a NAR at all, and a NAR with trailing garbage.
    for (const [what, body] of [['text', Buffer.from('hello, this is not a NAR\n')], ['trailing bytes', Buffer.concat([good.nar, Buffer.alloc(8)])]] as const) {
      const res = await request(port, 'PUT', `/nar/${sha256Nix32(body)}.nar`, { body });
      assert.equal(res.status, 400, `PUT of ${what}: ${res.status}`);
    }
    // An oversized narinfo: refused by its declared length, and as it arrives when no length is declared.
    {
      const good2 = fileNar(work, 'good2', randomBytes(100));
      assert.equal((await request(port, 'PUT', `/nar/${good2.hash}.nar`, { body: good2.nar })).status, 200);
      const storePath = randomStorePath('oversized');
      const huge = narinfoText({ storePath, narHash: good2.hash, narSize: good2.nar.length }) + `Padding: ${'a'.repeat(3 << 20)}\n`;
      for (const headers of [{ 'Content-Type': 'text/x-nix-narinfo' }, { 'Content-Type': 'text/x-nix-narinfo', 'Transfer-Encoding': 'chunked' }]) {
        const res = await request(port, 'PUT', `/${hashPartOf(storePath)}.narinfo`, { headers, body: huge }).catch((err: Error) => err);
        // The bridge may close the connection before the whole body is sent; a 413 or a reset both refuse it.
        if (!(res instanceof Error)) assert.equal(res.status, 413, `oversized narinfo (${JSON.stringify(headers)}): ${res.status}`);
        assert.equal(await headStatus(`/${hashPartOf(storePath)}.narinfo`), 404);
      }
      await serving('an oversized narinfo');
    }
    // Compressed uploads that do not decompress.
    for (const ext of ['.nar.xz', '.nar.zst']) {
      const body = randomBytes(500);
      const res = await request(port, 'PUT', `/nar/${sha256Nix32(body)}${ext}`, { body });
      assert.ok(is4xx(res.status), `PUT of random bytes as ${ext}: ${res.status}`);
    }
    await serving('truncated NARs');

    // A narinfo for a NAR that was never uploaded.
    const never = fileNar(work, 'never', randomBytes(100));
    const neverPath = randomStorePath('never');
    const neverRes = await putInfo(neverPath, narinfoText({ storePath: neverPath, narHash: never.hash, narSize: never.nar.length }));
    assert.ok(is4xx(neverRes.status), `narinfo for a NAR never uploaded: ${neverRes.status}`);
    assert.equal(await headStatus(`/${hashPartOf(neverPath)}.narinfo`), 404);

    // Now the good NAR; narinfos that do not fit it are refused, one that does is taken.
    const up = await request(port, 'PUT', `/nar/${good.hash}.nar`, { headers: { 'Content-Type': 'application/x-nix-nar' }, body: good.nar });
    assert.ok(up.status >= 200 && up.status < 300, `PUT of a good NAR: ${up.status} ${up.body}`);
    const storePath = randomStorePath('good');
    const absentRef = `${nixbase32.encode(randomBytes(20))}-not-in-the-nar`;
    for (const [what, body, at] of [
      ['a NarSize one too big', narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length + 1 }), storePath],
      ['a NarSize one too small', narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length - 1 }), storePath],
      ['a reference the NAR does not contain', narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length, references: [absentRef] }), storePath],
      ['a StorePath that is not the URL\'s', narinfoText({ storePath: randomStorePath('good'), narHash: good.hash, narSize: good.nar.length }), storePath],
      ['an invalid StorePath', narinfoText({ storePath: `/nix/store/${hashPartOf(storePath)}-bad/name`, narHash: good.hash, narSize: good.nar.length }), storePath],
      ['no NarHash', narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length }).replace(/^NarHash: .*\n/m, ''), storePath],
      ['a malformed NarHash', narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length }).replace(/^NarHash: sha256:/m, 'NarHash: sha256:!!'), storePath],
      ['garbage', 'this is not a narinfo\n\0\0\0', storePath],
    ] as const) {
      const res = await putInfo(at, body);
      assert.ok(is4xx(res.status), `narinfo with ${what}: ${res.status} ${res.body}`);
      assert.equal(await headStatus(`/${hashPartOf(at)}.narinfo`), 404, `narinfo with ${what} must not be stored`);
    }
    const ok = await putInfo(storePath, narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length }));
    assert.ok(ok.status >= 200 && ok.status < 300, `the fitting narinfo: ${ok.status} ${ok.body}`);
    const served = await checkServedPath(bridge, storePath, good.nar, `sha256:${good.hash}`, []);
    assert.equal(served.get('StorePath'), storePath);
    await serving('bad narinfos');

    // Garbage URLs, for reading and for writing.
    const garbage = [
      '/../etc/passwd',
      '/../../../../etc/passwd',
      '/nar/../../etc/passwd',
      '/nar/xyz.nar',
      `/nar/${good.hash}.nar.gz`,
      `/nar/${good.hash.slice(1)}.nar`,
      `/nar/${good.hash}e.nar`,
      '/%00.narinfo',
      `/${hashPartOf(storePath).slice(0, 31)}%00.narinfo`,
      `/${'e'.repeat(32)}.narinfo`, // e is not a nix32 character
      `/${hashPartOf(storePath).slice(0, 31)}.narinfo`,
      `/${hashPartOf(storePath)}0.narinfo`,
      `/${hashPartOf(storePath).toUpperCase()}.narinfo`,
      `/${hashPartOf(storePath)}.narinfo/../../etc/passwd`,
      `/${'%2e%2e%2f'.repeat(8)}etc%2fpasswd`,
    ];
    for (const url of garbage) {
      for (const method of ['GET', 'HEAD', 'PUT'] as const) {
        const res = await request(port, method, url, method === 'PUT' ? { body: good.nar } : {});
        // An unknown compression may also be 415 Unsupported Media Type when PUT.
        const allowed = method === 'PUT' && url.endsWith('.nar.gz') ? [400, 404, 415] : [400, 404];
        assert.ok(allowed.includes(res.status), `${method} ${url.slice(0, 80)}: ${res.status}`);
        assert.ok(!res.body.includes('root:'), `${method} ${url.slice(0, 80)} leaks a file`);
      }
    }
    for (const method of ['GET', 'HEAD'] as const) {
      const res = await request(port, method, `/${'a'.repeat(20000)}.narinfo`);
      assert.ok([400, 404, 414, 431].includes(res.status), `${method} of a 20000-character URL: ${res.status}`);
    }
    await serving('garbage URLs');

    // A client that sends half a NAR and goes away.
    const half = fileNar(work, 'half', randomBytes(200_000));
    await new Promise<void>((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.write(`PUT /nar/${half.hash}.nar HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nContent-Type: application/x-nix-nar\r\nContent-Length: ${half.nar.length}\r\n\r\n`);
        socket.write(half.nar.subarray(0, half.nar.length >> 1), () => setTimeout(() => {
          socket.destroy();
          resolve();
        }, 200));
      });
      socket.on('error', reject);
    });
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(await headStatus(`/nar/${half.hash}.nar`), 404, 'HEAD of a NAR whose upload was cut off');
    const halfPath = randomStorePath('half');
    const halfInfo = await putInfo(halfPath, narinfoText({ storePath: halfPath, narHash: half.hash, narSize: half.nar.length }));
    assert.ok(is4xx(halfInfo.status), `narinfo for a NAR whose upload was cut off: ${halfInfo.status}`);
    await serving('an upload cut off');
    // The same NAR, sent whole afterwards, is fine.
    const whole = await request(port, 'PUT', `/nar/${half.hash}.nar`, { body: half.nar });
    assert.ok(whole.status >= 200 && whole.status < 300, `PUT of the whole NAR after a cut-off one: ${whole.status}`);
    const wholeInfo = await putInfo(halfPath, narinfoText({ storePath: halfPath, narHash: half.hash, narSize: half.nar.length }));
    assert.ok(wholeInfo.status >= 200 && wholeInfo.status < 300, `its narinfo: ${wholeInfo.status} ${wholeInfo.body}`);
    await checkServedPath(bridge, halfPath, half.nar, `sha256:${half.hash}`, []);

    // A request that is not HTTP at all.
    await new Promise<void>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => socket.end('\x16\x03\x01 not http at all\r\n\r\n'));
      socket.on('close', () => resolve());
      socket.on('error', () => resolve());
      socket.resume();
    });
    await serving('a non-HTTP client');
    assert.equal(bridge.daemon.process.exitCode, null, 'nar-bridge is still running');
  } catch (error) {
    throw withLog(error, bridge);
  } finally {
    await bridge.daemon.stop();
    removeDir(work);
  }
});

test('nar-bridge: /nix-cache-info, unknown paths, the access log', async () => {
  const work = tempDir('narbridge-info');
  const accessLine = /^127\.0\.0\.1 \S+ \S+ \[[^\]]+\] "(GET|HEAD|PUT) \S+ HTTP\/1\.1" \d{3} \d+ .*\d$/gm;
  try {
    for (const [args, priority] of [[['--priority', '23'], '23'], [['--priority', '70'], '70'], [[], undefined]] as const) {
      await makeEmptyStore(join(work, `store-${priority}`));
      const bridge = await startBridge(join(work, `store-${priority}`), [...args]);
      try {
        const res = await request(bridge.port, 'GET', '/nix-cache-info');
        assert.equal(res.status, 200);
        const info = parseNarinfo(res.body.toString());
        assert.equal(info.get('StoreDir'), '/nix/store');
        assert.equal(info.get('WantMassQuery'), '1');
        if (priority) assert.equal(info.get('Priority'), priority);
        else assert.match(info.get('Priority') ?? '', /^\d+$/, 'a default Priority');
        const missing = `/${nixbase32.encode(randomBytes(20))}.narinfo`;
        assert.equal((await request(bridge.port, 'GET', missing)).status, 404);
        assert.equal((await request(bridge.port, 'HEAD', missing)).status, 404);
        // One access-log line per request (three, and logSettled's own), combined log format plus a duration.
        const log = await logSettled(bridge);
        assert.equal(log.match(accessLine)?.length, 4, `access log:\n${log}`);
        assert.match(log, /^127\.0\.0\.1 \S+ \S+ \[[^\]]+\] "GET \/nix-cache-info HTTP\/1\.1" 200 \d+ .*\d$/m);
        assert.match(log, new RegExp(`"GET ${missing.replaceAll('.', '\\.')} HTTP/1\\.1" 404 `));
        // Nix takes it as a binary cache: a path it lacks is "not valid", not an error about the cache.
        const query = runNix(join(work, `home-${priority}`), 'nix', [...NIX_OPTIONS, 'path-info', '--store', bridge.base, `/nix/store/${missing.slice(1, 33)}-x`]);
        assert.notEqual(query.status, 0, 'nix path-info of a path the cache lacks fails');
        assert.match(query.stderr, /path '\/nix\/store\/\w{32}-x' is not valid/);
      } finally {
        await bridge.daemon.stop();
      }
    }
    // --no-access-log: no request lines.
    await makeEmptyStore(join(work, 'store-quiet'));
    const quiet = await startBridge(join(work, 'store-quiet'), ['--no-access-log']);
    try {
      assert.equal((await request(quiet.port, 'GET', '/nix-cache-info')).status, 200);
      assert.equal((await request(quiet.port, 'GET', `/${nixbase32.encode(randomBytes(20))}.narinfo`)).status, 404);
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(quiet.daemon.output().match(accessLine), null, `--no-access-log, yet:\n${quiet.daemon.output()}`);
    } finally {
      await quiet.daemon.stop();
    }
  } finally {
    removeDir(work);
  }
});

test('nar-bridge: a registered path does not change: the same narinfo again is 200, a new signature is added, another Deriver, CA or NAR is 409', async () => {
  const work = tempDir('narbridge-immutable');
  const bridge = await startBridge(join(work, 'store'), ['--allow-upload']);
  const putInfo = (storePath: string, body: string) => request(bridge.port, 'PUT', `/${hashPartOf(storePath)}.narinfo`, { headers: { 'Content-Type': 'text/x-nix-narinfo' }, body });
  try {
    const good = fileNar(work, 'good', fixedBytes(3000, 'good'));
    const other = fileNar(work, 'other', fixedBytes(3000, 'other'));
    for (const { nar, hash } of [good, other]) assert.equal((await request(bridge.port, 'PUT', `/nar/${hash}.nar`, { body: nar })).status, 200);
    const storePath = fixedStorePath('payload');
    const base = narinfoText({ storePath, narHash: good.hash, narSize: good.nar.length });
    assert.equal((await putInfo(storePath, base)).status, 200, 'registered');
    const served = async () => (await request(bridge.port, 'GET', `/${hashPartOf(storePath)}.narinfo`)).body.toString();
    const first = await served();

    assert.equal((await putInfo(storePath, base)).status, 200, 'the same narinfo again');
    assert.equal(await served(), first, 'changes nothing');
    const signature = `test-1:${Buffer.alloc(64, 5).toString('base64')}`;
    assert.equal((await putInfo(storePath, `${base}Sig: ${signature}\n`)).status, 200, 'with a new signature');
    const signed = await served();
    assert.ok(signed.includes(`Sig: ${signature}`), `the signature is served: ${signed}`);

    const deriver = `${fixedStorePath('maker').slice('/nix/store/'.length)}.drv`;
    for (const [what, body] of [
      ['another Deriver', `${base}Deriver: ${deriver}\n`],
      ['a CA', `${base}CA: fixed:r:sha256:${good.hash}\n`],
      ['another NAR', narinfoText({ storePath, narHash: other.hash, narSize: other.nar.length })],
    ]) {
      const res = await putInfo(storePath, body);
      assert.equal(res.status, 409, `${what}: ${res.status} ${res.body}`);
      assert.match(res.body.toString(), /registered already|already has this path/);
      assert.equal(await served(), signed, `${what} changes nothing`);
    }
  } finally {
    await bridge.daemon.stop();
    removeDir(work);
  }
});

test('nar-bridge: limits: a NAR past --max-nar-size is refused as it arrives; slow headers and too many connections from one address are cut, and others are still served', async () => {
  const work = tempDir('narbridge-limits');
  const bridge = await startNixcas(['nar-bridge', '--store', join(work, 'store'), '--listen', '127.0.0.1:0', '--allow-upload', '--max-nar-size', '1M'], 'listening on', { NIXCAS_BRIDGE_HEADERS_TIMEOUT_MS: '1500' });
  const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(bridge.output())![1]);
  const served = async (what: string) => assert.equal((await request(port, 'GET', '/nix-cache-info')).status, 200, `served ${what}`);
  const sockets: net.Socket[] = [];
  try {
    // A small upload that expands past the limit: zstd of 3 MiB of zeros.
    const { nar, hash } = fileNar(work, 'zeros', Buffer.alloc(3 << 20));
    const compressed = spawnSync('zstd', ['-c', '-q'], { input: nar, maxBuffer: 64 << 20 }).stdout;
    assert.ok(compressed.length < 64 * 1024, 'the bomb is small');
    const fileHash = createHash('sha256').update(compressed).digest();
    const put = await request(port, 'PUT', `/nar/${nixbase32.encode(fileHash)}.nar.zst`, { body: compressed });
    assert.equal(put.status, 413, `a NAR past --max-nar-size: ${put.status} ${put.body}`);
    const storePath = fixedStorePath('bomb');
    const info = await request(port, 'PUT', `/${hashPartOf(storePath)}.narinfo`, { body: narinfoText({ storePath, narHash: hash, narSize: nar.length }) });
    assert.ok(info.status >= 400 && info.status < 500, 'and its narinfo has nothing to register');
    await served('after the refused upload');

    // Slow clients on 127.0.0.2: a header line started and never finished. The bridge still serves 127.0.0.1,
    // and cuts them once the header deadline (1.5 s here) has passed.
    const closed = (s: net.Socket) => new Promise<void>((resolve) => (s.destroyed ? resolve() : s.once('close', () => resolve())));
    const slow = Array.from({ length: 20 }, () => {
      const s = net.connect({ host: '127.0.0.1', port, localAddress: '127.0.0.2' });
      s.on('error', () => {});
      s.write('GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Slow: ');
      sockets.push(s);
      return s;
    });
    const trickle = setInterval(() => slow.forEach((s) => s.writable && s.write('a')), 200);
    try {
      await served('while slow clients trickle their headers');
      const cut = await Promise.race([Promise.all(slow.map(closed)).then(() => true), new Promise<false>((resolve) => setTimeout(() => resolve(false), 8000).unref())]);
      assert.equal(cut, true, `every slow client is cut within 8 s (${slow.filter((s) => s.destroyed).length} of ${slow.length} were)`);
    } finally {
      clearInterval(trickle);
    }

    // 80 connections from 127.0.0.3: past 64 they are closed at once; 127.0.0.1 is still served.
    const many = Array.from({ length: 80 }, () => {
      const s = net.connect({ host: '127.0.0.1', port, localAddress: '127.0.0.3' });
      s.on('error', () => {});
      sockets.push(s);
      return s;
    });
    await Promise.all(many.map((s) => new Promise<void>((resolve) => (s.connecting ? s.once('connect', () => resolve()).once('close', () => resolve()) : resolve()))));
    const refused = await Promise.race([
      Promise.all(many.slice(64).map(closed)).then(() => true),
      new Promise<false>((resolve) => setTimeout(() => resolve(false), 5000).unref()),
    ]);
    assert.equal(refused, true, 'the connections past 64 from one address are closed');
    await served('while one address holds its 64 connections');
  } finally {
    for (const s of sockets) s.destroy();
    await bridge.stop();
    removeDir(work);
  }
});

test('nar-bridge: after 10 wrong credentials in a minute an address gets 429; other addresses log in as before', async () => {
  const work = tempDir('narbridge-logins');
  const credentials = join(work, 'credentials');
  writeFileSync(credentials, 'alice:s3cret-pw\n', { mode: 0o600 });
  const bridge = await startBridge(join(work, 'store'), ['--allow-upload', '--upload-credentials', credentials]);
  const put = (localAddress: string, authorization: string) =>
    new Promise<number>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: bridge.port, localAddress, method: 'PUT', path: `/${'1'.repeat(32)}.narinfo`, headers: { Authorization: authorization }, agent: false }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode!));
      });
      req.on('error', reject);
      req.end('not a narinfo');
    });
  try {
    const statuses: number[] = [];
    for (let i = 0; i < 13; i++) statuses.push(await put('127.0.0.6', basicAuth('alice', `guess-${i}`)));
    assert.deepEqual(statuses, [...Array(10).fill(401), 429, 429, 429], 'ten tries, then refused without a check');
    assert.equal(await put('127.0.0.6', basicAuth('alice', 's3cret-pw')), 429, 'even the right password, from that address, for the rest of the minute');
    // Another address with the right credentials gets past authentication (and is refused for its body).
    assert.equal(await put('127.0.0.1', basicAuth('alice', 's3cret-pw')), 400);
  } finally {
    await bridge.daemon.stop();
    removeDir(work);
  }
});
