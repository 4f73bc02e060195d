// Loads dist/cli/main.cjs (the whole command line) with V8's code cache, the
// way Node 22's module.enableCompileCache() would: `npm run build` runs one
// small import with NIXCAS_WRITE_CODE_CACHE set, which writes what V8 compiled
// for it to main.cjs.v8cache; later runs skip parsing and compiling those
// functions. A tiny `nixcas import` takes ~25 ms less (docs/design-notes.md).
//
// The cache starts with the SHA-256 of the source it was made from: V8 itself
// checks only the source's length, so a stale cache is refused here. V8
// refuses one from another Node version or other V8 flags on its own, and
// then compiles as usual. Any failure to read the cache costs only the time.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import Module, { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Script } from 'node:vm';

const HASH_LENGTH = 32;

/** The V8 data in `cacheFile` when it was made from `source`; undefined otherwise (hashing only when there is a cache). */
function cachedDataFor(cacheFile: string, source: string): { data: Buffer; sourceHash: Buffer } | { data: undefined; sourceHash: undefined } {
  let cache: Buffer;
  try {
    cache = readFileSync(cacheFile);
  } catch {
    return { data: undefined, sourceHash: undefined };
  }
  const sourceHash = hashOf(source);
  if (cache.length <= HASH_LENGTH || !cache.subarray(0, HASH_LENGTH).equals(sourceHash)) return { data: undefined, sourceHash: undefined };
  return { data: cache.subarray(HASH_LENGTH), sourceHash };
}

function hashOf(source: string): Buffer {
  return createHash('sha256').update(source).digest();
}

/** Runs main.cjs, which sits beside the file at `entryUrl` (scripts/bundle.mjs). */
export function loadMain(entryUrl: string): void {
  const file = join(dirname(fileURLToPath(entryUrl)), 'main.cjs');
  const source = readFileSync(file, 'utf8');
  const cacheFile = `${file}.v8cache`;
  const cached = cachedDataFor(cacheFile, source);
  const script = new Script(Module.wrap(source), { filename: file, cachedData: cached.data });
  if (process.env.NIXCAS_WRITE_CODE_CACHE === '1') {
    // At exit, so that the functions this run compiled are in it.
    process.once('exit', () => writeFileSync(cacheFile, Buffer.concat([cached.sourceHash ?? hashOf(source), script.createCachedData()])));
  }
  // What require() would give a CommonJS module: its own module object, require, __filename and __dirname.
  const module = new Module(file);
  module.filename = file;
  const wrapped = script.runInThisContext() as (exports: unknown, require: NodeRequire, module: Module, filename: string, dirname: string) => void;
  wrapped.call(module.exports, module.exports, createRequire(file), module, file, dirname(file));
}
