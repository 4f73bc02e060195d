// --log-format json and --log-level on a serving command (nar-bridge; the daemon, virtiofs and
// mount share cli/log.ts): every line an object with stable fields; levels below the one asked
// for are left out.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CLI, freePort, nixcas, removeDir, startNixcas, tempDir } from './helpers.js';

/** A store under `work` holding one small store path, for a bridge to serve. */
function storeWithOneFile(work: string): string {
  const store = join(work, 'store');
  writeFileSync(join(work, 'file'), 'logged\n');
  assert.equal(nixcas(['import', '--store', store, join(work, 'file')]).status, 0);
  return store;
}

test('--log-format json: one object a line, with time, level, cmd and msg; requests as kind access', async () => {
  const work = tempDir('log-json');
  try {
    const store = storeWithOneFile(work);
    const bridge = await startNixcas(['nar-bridge', '--store', store, '--listen', '127.0.0.1:0', '--log-format', 'json'], 'listening on');
    const port = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(bridge.output())![1];
    assert.equal((await fetch(`http://127.0.0.1:${port}/nix-cache-info`)).status, 200);
    assert.equal(await bridge.stop(), 0);
    const lines = bridge.output().trim().split('\n').map((line) => JSON.parse(line) as Record<string, string>);
    for (const line of lines) {
      assert.match(line.time!, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.equal(line.cmd, 'nar-bridge');
      assert.ok(['info', 'warn', 'error'].includes(line.level!), JSON.stringify(line));
      assert.equal(typeof line.msg, 'string');
    }
    assert.ok(lines.some((line) => line.level === 'info' && line.msg!.startsWith('listening on http://127.0.0.1:')));
    assert.ok(lines.some((line) => line.kind === 'access' && /"GET \/nix-cache-info HTTP\/1\.1" 200/.test(line.msg!)), bridge.output());
  } finally {
    removeDir(work);
  }
});

test('--log-level warn leaves out start-up, stop and request lines; a bad level or format is refused', async () => {
  const work = tempDir('log-level');
  try {
    const store = storeWithOneFile(work);
    const port = await freePort();
    // Nothing is said at warn when all goes well, so the test waits for the port to answer.
    const bridge = spawn(process.execPath, [CLI, 'nar-bridge', '--store', store, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    bridge.stderr!.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => bridge.once('exit', resolve));
    try {
      let status = 0;
      for (const deadline = Date.now() + 15_000; Date.now() < deadline && status !== 200; ) {
        status = await fetch(`http://127.0.0.1:${port}/nix-cache-info`).then((r) => r.status, () => 0);
        if (status !== 200) await new Promise((r) => setTimeout(r, 100)); // polling a server we do not hear from
      }
      assert.equal(status, 200);
    } finally {
      bridge.kill('SIGTERM');
    }
    assert.equal(await exited, 0);
    assert.equal(stderr, '', 'nothing below warn was said');
    const bad = nixcas(['nar-bridge', '--store', store, '--log-level', 'loud']);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /--log-level.*Allowed choices are info, warn, error/);
    const badFormat = nixcas(['daemon', '--store', store, '--log-format', 'xml']);
    assert.equal(badFormat.status, 1);
    assert.match(badFormat.stderr, /--log-format.*Allowed choices are text, json/);
  } finally {
    removeDir(work);
  }
});
