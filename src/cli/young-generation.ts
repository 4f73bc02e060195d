// V8 lets its young generation grow to 3 × 16 MiB. A daemon answering small requests for hours
// does as well with 2 MiB semi-spaces and keeps 25 MB less private memory (measured while serving
// a VM: RssAnon 60 → 35 MB); so does a collection walking every record of a store, no slower
// (docs/benchmarks.md). Node reads the flag only at start-up, so the process re-executes itself
// with it (same pid, so a service manager sees nothing).
import { optionalNative } from '../native/index.js';

const FLAG = '--max-semi-space-size';

/** Re-executes this process with 2 MiB semi-spaces, unless it has them (or the flag) already; returns only if it did not. */
export function withSmallYoungGeneration(): void {
  if ([...process.execArgv, process.env.NODE_OPTIONS ?? ''].some((arg) => arg.includes(FLAG))) return;
  optionalNative()?.exec(process.execPath, [process.execPath, `${FLAG}=2`, ...process.execArgv, ...process.argv.slice(1)]);
  // exec returns only when it failed (or there is no addon): carry on with the default heap.
}
