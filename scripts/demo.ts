// npm run demo [-- --help]
//
// The whole point of nixcas in one run: build a small closure with Nix, put it into a fresh
// embedded store, serve that store with `nixcas virtiofs`, boot a microVM under QEMU that mounts it
// at /nix/store over virtio-fs, and run a program from it. Prints what the guest saw, with timings.

import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  atExit, type Backend, bootGuest, type BootResult, buildInitramfs, BUSYBOX, ensureVmPackages, MissingPackagesError, NIXCAS_CLI,
  startNixcasVirtiofs, stopAll, VmError,
} from '../vmtest/harness.js';
import { onPath } from '../vmtest/packages.js';
import { track } from '../vmtest/processes.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const TAG = 'nixstore';
const APPLETS = ['sh', 'cat', 'cut', 'grep', 'head', 'ls', 'uname', 'wc'];

const HELP = `Usage: npm run demo [-- OPTIONS]

Builds a small closure (a static busybox and a script that runs with it) with nix-build, copies it
into a fresh embedded nixcas store, serves the store with \`nixcas virtiofs\`, boots a microVM under
QEMU (TCG, no KVM needed) that mounts it over virtio-fs at /nix/store, and runs the script from it.
Everything it creates is removed when it ends, also on Ctrl-C; the closure stays in the host's
/nix/store, as any nix-build output does. Without a usable nix-build (or with --no-nix) the same two
store paths are made with \`nixcas import\` instead.

Needs the Debian packages qemu-system-x86, linux-image-amd64, busybox-static and xz-utils. As root,
missing ones are installed with apt-get; otherwise the demo names them and the apt-get line.

Options:
  --no-nix       make the store paths with nixcas import, even if nix-build is there
  --no-install   never run apt-get; just say what is missing
  --verbose      stream the guest's console (kernel messages included) to stderr
  -h, --help     this text
`;

interface Options {
  nix: boolean;
  install: boolean;
  verbose: boolean;
}

function parseArgs(argv: string[]): Options | undefined {
  const options: Options = { nix: true, install: process.getuid?.() === 0, verbose: false };
  for (const arg of argv) {
    if (arg === '-h' || arg === '--help') return undefined;
    else if (arg === '--no-nix') options.nix = false;
    else if (arg === '--no-install') options.install = false;
    else if (arg === '--verbose') options.verbose = true;
    else throw new UsageError(`unknown option ${arg}`);
  }
  return options;
}

class UsageError extends Error {}
/** A failure whose message says everything; printed without a stack. */
class DemoError extends Error {}

// ---- output ----------------------------------------------------------------------------------

const tty = process.stdout.isTTY && !process.env.NO_COLOR;
const bold = (s: string) => (tty ? `\x1b[1m${s}\x1b[22m` : s);
const dim = (s: string) => (tty ? `\x1b[2m${s}\x1b[22m` : s);
const seconds = (ms: number) => (ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`);

const COLUMN = 20;

/** "N. title   detail (time)", then more lines under the detail. */
function step(n: number, title: string, detail: string, ms: number, more: string[] = []): void {
  console.log(`${bold(`${n}. ${title}`.padEnd(COLUMN - 1))} ${detail} ${dim(`(${seconds(ms)})`)}`);
  indent(more, ' '.repeat(COLUMN));
}

function indent(lines: string[], prefix: string): void {
  for (const line of lines) console.log(`${prefix}${line}`);
}

async function timed<T>(fn: () => Promise<T> | T): Promise<[T, number]> {
  const t = performance.now();
  const value = await fn();
  return [value, performance.now() - t];
}

// ---- child processes -------------------------------------------------------------------------

interface Ran {
  stdout: string;
  stderr: string;
}

/** Runs a command to its end without blocking the event loop (so Ctrl-C is handled at once). */
function run(command: string, args: string[], input?: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child: ChildProcess = track(spawn(command, args, { stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.once('error', (e) => reject(new DemoError(`${command}: ${e.message}`)));
    child.once('exit', (code, signal) => {
      if (code === 0) resolve({ stdout, stderr });
      else reject(new DemoError(`${command} ${args.join(" ")} failed (${code ?? signal}):\n${(stderr.trim() || stdout.trim())}`));
    });
    if (input !== undefined) child.stdin!.end(input);
  });
}

function nixcas(args: string[], input?: string): Promise<Ran> {
  return run(process.execPath, [NIXCAS_CLI, ...args], input);
}

// ---- the steps -------------------------------------------------------------------------------

/** Rebuilds dist/ when it is missing or older than a source file, so the demo never shows stale code. */
async function buildIfNeeded(): Promise<string | undefined> {
  const built = existsSync(NIXCAS_CLI) ? statSync(NIXCAS_CLI).mtimeMs : 0;
  const newer = (dir: string): boolean =>
    readdirSync(dir, { withFileTypes: true }).some((e) =>
      e.isDirectory() ? newer(join(dir, e.name)) : e.name.endsWith('.ts') && statSync(join(dir, e.name)).mtimeMs > built,
    );
  if (built && !newer(join(ROOT, 'src'))) return undefined;
  await run(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', join(ROOT, 'tsconfig.json')]);
  await run(process.execPath, [join(ROOT, 'scripts/bundle.mjs')]);
  return built ? 'src/ changed since the last build' : 'dist/ was missing';
}

/** The demo program. `dollar` is how a shell `$` is written: escaped inside demoNix's here-document. */
function helloScript(busybox: string, self: string, dollar: string): string[] {
  const $ = dollar;
  return [
    `#!${busybox}/bin/sh`,
    `PATH=${busybox}/bin`,
    `echo "Hello from ${$}0"`,
    `echo "  interpreter  ${busybox}/bin/sh"`,
    `echo "  message      ${$}(cat ${self}/share/message)"`,
    `echo "  kernel       ${$}(uname -sr)"`,
    `echo "  /nix/store   ${$}(ls /nix/store | wc -l) store paths, mounted ${$}(grep ' /nix/store ' /proc/mounts | cut -d ' ' -f 3,4)"`,
  ];
}

/**
 * Two derivations: a static busybox with a few applet links, and a script whose interpreter is
 * that busybox, so the script's closure is two store paths. The busybox's hash is an input, so a
 * new /bin/busybox gives new store paths.
 */
function demoNix(): string {
  const nixVar = (name: string) => '${' + name + '}';
  return [
    '{ busyboxPath, busyboxHash }:',
    'let',
    '  mk = name: script: derivation {',
    '    inherit name;',
    '    system = builtins.currentSystem;',
    '    builder = "/bin/sh";',
    '    args = [ "-c" script ];',
    '    PATH = "/usr/bin:/bin";',
    '  };',
    "  busybox = mk \"nixcas-demo-busybox\" ''",
    `    # busybox sha256 ${nixVar('busyboxHash')}`,
    '    mkdir -p $out/bin',
    `    cp ${nixVar('busyboxPath')} $out/bin/busybox`,
    `    for applet in ${APPLETS.join(' ')}; do ln -s busybox $out/bin/$applet; done`,
    "  '';",
    "in mk \"nixcas-demo-hello\" ''",
    '  mkdir -p $out/bin $out/share',
    '  echo "built by Nix, read over virtio-fs" > $out/share/message',
    '  cat > $out/bin/hello <<EOS',
    ...helloScript(nixVar('busybox'), '$out', '\\$').map((line) => `  ${line}`),
    '  EOS',
    '  chmod +x $out/bin/hello',
    "''",
    '',
  ].join('\n');
}

interface Closure {
  hello: string;
  busybox: string;
  how: string;
}

/** Builds the closure with nix-build and copies it in with `nixcas copy`; or says why Nix cannot be used. */
async function closureWithNix(work: string, store: string): Promise<Closure | string> {
  if (!onPath('nix-build')) return 'nix-build is not installed (apt-get install nix-bin)';
  const file = join(work, 'demo.nix');
  writeFileSync(file, demoNix());
  const busyboxHash = createHash('sha256').update(readFileSync(BUSYBOX)).digest('hex');
  let hello: string;
  try {
    const built = await run('nix-build', [
      '--option', 'sandbox', 'false', '--option', 'substituters', '', '--no-out-link',
      '--argstr', 'busyboxPath', BUSYBOX, '--argstr', 'busyboxHash', busyboxHash, file,
    ]);
    hello = built.stdout.trim();
  } catch (e) {
    return `nix-build failed: ${(e as Error).message.trim().split('\n').slice(-1)[0]}`;
  }
  const info = await run('nix', ['--extra-experimental-features', 'nix-command', 'path-info', '--json', '--recursive', hello]);
  const paths = (JSON.parse(info.stdout) as Array<{ path: string }>).map((p) => p.path);
  const busybox = paths.find((p) => p.endsWith('-nixcas-demo-busybox'));
  if (!busybox) throw new DemoError(`the closure of ${hello} lacks the busybox path: ${paths.join(' ')}`);
  await nixcas(['copy', '--store', store, '-'], info.stdout);
  return { hello, busybox, how: 'built with nix-build, copied with nixcas copy' };
}

/** The same two store paths without Nix: directories imported as `nix-store --add` would. */
async function closureWithImport(work: string, store: string): Promise<Closure> {
  const bb = join(work, 'nixcas-demo-busybox');
  mkdirSync(join(bb, 'bin'), { recursive: true });
  copyFileSync(BUSYBOX, join(bb, 'bin/busybox'));
  chmodSync(join(bb, 'bin/busybox'), 0o755);
  for (const applet of APPLETS) symlinkSync('busybox', join(bb, 'bin', applet));
  const busybox = (await nixcas(['import', '--store', store, bb])).stdout.trim();
  // A store path cannot name itself before it exists; the script finds its message through $0.
  const hello = join(work, 'nixcas-demo-hello');
  mkdirSync(join(hello, 'bin'), { recursive: true });
  mkdirSync(join(hello, 'share'));
  writeFileSync(join(hello, 'share/message'), 'imported with nixcas import, read over virtio-fs\n');
  writeFileSync(join(hello, 'bin/hello'), `${helloScript(busybox, '${0%/bin/*}', '$').join('\n')}\n`, { mode: 0o755 });
  return { hello: (await nixcas(['import', '--store', store, hello])).stdout.trim(), busybox, how: 'made with nixcas import instead of Nix' };
}

interface GuestStep {
  key: string;
  command: string;
}

function guestSteps(c: Closure): GuestStep[] {
  return [
    { key: 'mount', command: `mount -t virtiofs -o ro ${TAG} /nix/store` },
    { key: 'ls', command: 'ls -l /nix/store' },
    { key: 'tree', command: `ls -lR ${c.hello}` },
    { key: 'shebang', command: `head -n 1 ${c.hello}/bin/hello` },
    { key: 'hello', command: `${c.hello}/bin/hello` },
    { key: 'sha256', command: `sha256sum ${c.busybox}/bin/busybox` },
    { key: 'umount', command: 'umount /nix/store' },
  ];
}

function guestScript(steps: GuestStep[]): string {
  return ['set -e', 'mkdir -p /nix/store', ...steps.map((s) => `capture ${s.key} ${s.command}`)].join('\n') + '\n';
}

function showGuest(r: BootResult, steps: GuestStep[]): GuestStep | undefined {
  for (const s of steps) {
    const rc = r.results[`${s.key}.rc`];
    if (rc === undefined) return s; // not reached: the step before failed
    console.log(`${' '.repeat(COLUMN - 7)}${dim('guest#')} ${s.command} ${dim(`(${r.results[`${s.key}.ms`]} ms${rc === '0' ? '' : `, exit status ${rc}`})`)}`);
    const out = r.results[`${s.key}.out`];
    if (out !== undefined) indent(out.split('\n'), `${' '.repeat(COLUMN)}${dim('│')} `);
    if (rc !== '0') return s;
  }
  return undefined;
}

// ---- main ------------------------------------------------------------------------------------

/** Set by a signal: the children are being stopped, then the process exits 130. */
let interrupted: Promise<void> | undefined;

async function main(): Promise<number> {
  let options: Options | undefined;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`demo: ${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (!options) {
    process.stdout.write(HELP);
    return 0;
  }
  if (options.verbose) process.env.VMTEST_VERBOSE = '1';
  // Children (QEMU, nixcas virtiofs, nix-build) get SIGTERM and are waited for; then process.exit()
  // runs the exit hooks, which remove the work directory. A second signal exits at once (the hooks
  // still SIGKILL whatever is left).
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(signal, () => {
      if (interrupted) process.exit(130);
      console.error(`\ndemo: ${signal}, cleaning up`);
      interrupted = stopAll(1000).finally(() => process.exit(130));
    });
  }

  const start = performance.now();
  console.log(bold('nixcas demo: a Nix closure served to a microVM over virtio-fs'));
  const [, packagesMs] = await timed(() => {
    try {
      ensureVmPackages({ install: options.install });
    } catch (e) {
      if (!(e instanceof MissingPackagesError)) throw e;
      // The harness's hint is about its own switches; say what this command does instead.
      const hint = process.getuid?.() === 0 ? 'or run npm run demo without --no-install: as root it installs them itself' : 'run that as root, or run npm run demo as root, which installs them itself';
      throw new DemoError(`${e.message.replace(/^VM tests need/, 'The demo needs').split('\n').slice(0, -1).join('\n')}\n(${hint})`);
    }
  });
  if (packagesMs > 1000) console.log(dim(`   (installed the missing VM packages in ${seconds(packagesMs)})`));
  const [rebuilt, buildMs] = await timed(buildIfNeeded);
  if (rebuilt) console.log(dim(`   (built nixcas: ${rebuilt}, ${seconds(buildMs)})`));

  const work = mkdtempSync(join(tmpdir(), 'nixcas-demo-'));
  const removeWork = () => rmSync(work, { recursive: true, force: true });
  const forgetWork = atExit(removeWork);
  let backend: Backend | undefined;
  try {
    const store = join(work, 'store');
    const [closure, closureMs] = await timed(async () => {
      let reason = 'asked for with --no-nix';
      if (options.nix) {
        const c = await closureWithNix(work, store);
        if (typeof c !== 'string') return c;
        reason = c;
      }
      const c = await closureWithImport(work, store);
      return { ...c, how: `${c.how}; ${reason}` };
    });
    step(1, 'closure', `${closure.how}`, closureMs, [closure.hello, closure.busybox, dim(`in a fresh store: ${store}`)]);

    const socketPath = join(work, 'virtiofs.sock');
    const [started, backendMs] = await timed(() => startNixcasVirtiofs({ socketPath, store, listRoot: true }));
    backend = started;
    step(2, 'nixcas virtiofs', `listening on ${socketPath}`, backendMs, [dim(`nixcas virtiofs ${socketPath} --store ${store} --list-root`)]);

    const steps = guestSteps(closure);
    const [initramfs, initramfsMs] = await timed(() => buildInitramfs({ guestScript: guestScript(steps) }));
    const [r, bootMs] = await timed(() => bootGuest({ initramfs, backend, virtiofsTag: TAG, memoryMiB: 512, timeoutMs: 120_000 }));
    const t = r.timings;
    step(3, 'microVM', `QEMU (TCG, 1 vCPU, 512 MiB) with vhost-user-fs-pci tag=${TAG}, Linux ${initramfs.kernel.version}`, bootMs, [
      dim(
        `kernel boot ${seconds(t.kernelMs)}, modules ${seconds(t.modulesMs)}, guest commands ${seconds(t.scriptMs)}, ` +
          `power-off ${seconds(t.shutdownMs)}; busybox initramfs ${initramfs.cached ? 'from cache' : `built in ${seconds(initramfsMs)}`}`,
      ),
    ]);
    const failed = showGuest(r, steps);
    if (failed || r.exitStatus !== 0) {
      throw new DemoError(
        `the guest ${failed ? `failed at: ${failed.command}` : `script exited with ${r.exitStatus}`}\n` +
          `--- console (last lines) ---\n${r.output.split('\n').slice(-40).join('\n')}\n--- nixcas virtiofs ---\n${backend.output().trim()}`,
      );
    }

    // What the guest saw, against the host.
    const listed = (r.results['ls.out'] ?? '').split('\n').filter((l) => l.startsWith('d') || l.startsWith('-') || l.startsWith('l')).length;
    const hostSha = createHash('sha256').update(readFileSync(`${BUSYBOX}`)).digest('hex');
    const guestSha = (r.results['sha256.out'] ?? '').split(' ')[0];
    if (guestSha !== hostSha) throw new DemoError(`the guest read busybox with sha256 ${guestSha}, the host has ${hostSha}`);
    if (listed !== 2) throw new DemoError(`the guest listed ${listed} store paths in /nix/store, the store has 2`);
    if (!(r.results['hello.out'] ?? '').startsWith(`Hello from ${closure.hello}/bin/hello`)) throw new DemoError('the script printed something else');

    const [, stopMs] = await timed(() => backend!.stop());
    step(4, 'done', 'the guest listed both store paths, ran the script and read busybox byte for byte', stopMs, [dim('nixcas virtiofs stopped')]);
    console.log(bold(`\ndemo: ok in ${seconds(performance.now() - start)}`));
    return 0;
  } finally {
    await backend?.stop();
    forgetWork();
    removeWork();
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    // A step that fails because its child was just stopped is no failure of the demo.
    if (interrupted) return;
    const known = error instanceof MissingPackagesError || error instanceof VmError || error instanceof DemoError;
    const message = error instanceof Error ? (known ? error.message : (error.stack ?? error.message)) : String(error);
    console.error(`\ndemo: FAILED: ${message}`);
    process.exit(1);
  },
);
