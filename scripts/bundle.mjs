// Builds the nixcas command: src/ bundled by esbuild into two CommonJS files.
// dist/cli/nixcas.cjs (the package's bin, from src/cli/entry.ts) is small: it
// answers `nixcas nar` of a local store with the native renderer and hands
// everything else to dist/cli/main.cjs (src/cli/main.ts, the whole command
// line). `npm run build` type-checks with tsc first; tsc emits nothing.
//
// Why a bundle, and why CommonJS: every command pays for loading its code
// before it does anything. As dozens of ES modules, Node 20 resolved, read
// and linked each one asynchronously, and lmdb's ES module graph loaded more
// slowly than its one-file CommonJS build (measured in one process: 58 ms
// against 37 ms). `nixcas nar` of a one-file path went from 178 to 125 ms;
// docs/benchmarks.md has the numbers.
//
// Packages with native code (and the gRPC stack, which loads its own files at
// run time) stay outside the bundle and load from node_modules. The modules
// find package.json, protos/ and build/ relative to their own file, two levels
// below the package root (src/x/y.ts); the bundle sits at the same depth, and
// import.meta.url is rewritten to its own URL.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

rmSync(join(root, 'dist'), { recursive: true, force: true });
await build({
  entryPoints: [
    { in: join(root, 'src/cli/entry.ts'), out: 'nixcas' },
    { in: join(root, 'src/cli/main.ts'), out: 'main' },
  ],
  outdir: join(root, 'dist/cli'),
  outExtension: { '.js': '.cjs' },
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  external: ['lmdb', '@napi-rs/blake-hash', 'blake3-wasm', '@grpc/*', 'grpc-health-check'],
  define: { 'import.meta.url': '__nixcasModuleUrl' },
  // Strict first: the sources are ES modules, always strict, and a directive only counts before any statement.
  banner: { js: "'use strict';\nconst __nixcasModuleUrl = require('node:url').pathToFileURL(__filename).href;" },
  sourcemap: 'linked',
  logLevel: 'warning',
});

// The microVM test runner nix/default.nix's lib.mkVMTest calls (vmtest/run-vm-test.ts): one file, so
// that the nixcas package carries it without tsx.
await build({
  entryPoints: [{ in: join(root, 'vmtest/run-vm-test.ts'), out: 'run-vm-test' }],
  outdir: join(root, 'dist/vmtest'),
  outExtension: { '.js': '.cjs' },
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  define: { 'import.meta.url': '__nixcasModuleUrl' },
  banner: { js: "'use strict';\nconst __nixcasModuleUrl = require('node:url').pathToFileURL(__filename).href;" },
  logLevel: 'warning',
});

// V8's code cache for main.cjs (src/cli/load-main.ts): what one small import
// compiles, the path most commands share. Without it (no native addon yet,
// say) nixcas works the same, only starts ~25 ms slower.
const scratch = mkdtempSync(join(tmpdir(), 'nixcas-code-cache-'));
try {
  mkdirSync(join(scratch, 'tree'));
  writeFileSync(join(scratch, 'tree', 'file'), 'warm-up\n');
  const run = spawnSync(process.execPath, [join(root, 'dist/cli/nixcas.cjs'), 'import', '--store', join(scratch, 'store'), join(scratch, 'tree')], {
    env: { ...process.env, NIXCAS_WRITE_CODE_CACHE: '1' },
    encoding: 'utf8',
  });
  if (run.status !== 0) console.warn(`bundle: no code cache for main.cjs (the warm-up import failed: ${(run.stderr || run.error?.message || '').trim()})`);
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
