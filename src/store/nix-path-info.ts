// The closure of a plain list of store paths (`nix-store -qR result | nixcas
// copy -`), described by the local Nix itself: `nix path-info --json`, whose
// output parseClosure reads.
import { spawn } from 'node:child_process';
import { InvalidInputError } from '../castore/errors.js';

/** True when `text` is a list of paths, one a line (/nix/store/…, ./result), rather than JSON. */
export function isPathList(text: string): boolean {
  return /^\s*[/.]/.test(text);
}

/** The paths of a list: one a line, blank lines and surrounding spaces ignored. */
export function parsePathList(text: string): string[] {
  return text.split('\n').map((line) => line.trim()).filter(Boolean);
}

/**
 * Runs `nix path-info --json PATHS…` (any Nix since 2.4) and returns its
 * entries by path: null for a path Nix does not have (`"valid": false` in
 * Nix ≤ 2.18, null later). Substituters are turned off: this describes what
 * the local store has, and must neither wait for a cache nor fetch anything.
 */
async function describe(paths: string[], nix: string): Promise<Map<string, Record<string, unknown> | null>> {
  const args = ['--extra-experimental-features', 'nix-command', '--option', 'substituters', '', 'path-info', '--json', '--', ...paths];
  const child = spawn(nix, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const stdout: Buffer[] = [];
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
  const status = await new Promise<number | null>((resolve, reject) => {
    child.once('error', (err) => reject(new Error(`cannot run ${nix} path-info to describe the paths: ${err.message}`)));
    child.once('close', resolve);
  });
  if (status !== 0) throw new InvalidInputError(`${nix} path-info --json failed: ${stderr.trim() || `exit status ${status}`}`);
  let json: unknown;
  try {
    json = JSON.parse(Buffer.concat(stdout).toString('utf8'));
  } catch (err) {
    throw new Error(`${nix} path-info printed something other than JSON: ${(err as Error).message}`);
  }
  const described = new Map<string, Record<string, unknown> | null>();
  const entries = Array.isArray(json)
    ? json.map((e: Record<string, unknown>) => [String(e.path), e] as const)
    : Object.entries((json ?? {}) as Record<string, Record<string, unknown> | null>);
  for (const [path, entry] of entries) described.set(path, entry && entry.valid !== false ? { ...entry, path } : null);
  return described;
}

/**
 * The closure of `paths` as the local Nix describes it (a `nix path-info
 * --json` list, for parseClosure), and the paths it does not have. The
 * references of the paths listed are described too, when the list is not
 * a closure already. Throws when Nix has none of the paths.
 */
export async function localClosure(paths: string[], nix = 'nix'): Promise<{ json: unknown; unknown: string[] }> {
  const entries = new Map<string, Record<string, unknown>>();
  const unknown: string[] = [];
  let pending = paths;
  while (pending.length) {
    for (const [path, entry] of await describe(pending, nix)) {
      if (entry) entries.set(path, entry);
      else unknown.push(path);
    }
    const wanted = new Set<string>();
    for (const entry of entries.values()) {
      for (const ref of Array.isArray(entry.references) ? entry.references : []) {
        if (!entries.has(String(ref)) && !unknown.includes(String(ref))) wanted.add(String(ref));
      }
    }
    pending = [...wanted];
  }
  if (entries.size === 0) throw new InvalidInputError(`${unknown.join(', ')}: not valid in the local Nix store`);
  return { json: [...entries.values()], unknown };
}
