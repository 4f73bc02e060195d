// Structural validation of Directory messages, exactly as tvix defines it.
import { DIGEST_LENGTH } from './digest.js';
import { InvalidInputError } from './errors.js';
import { type Directory, displayName } from './model.js';

export const MAX_NAME_LENGTH = 255;
export const MAX_SYMLINK_TARGET_LENGTH = 4095;

export class DirectoryValidationError extends InvalidInputError {}

const SLASH = 0x2f;
const NUL = 0x00;
const DOT = 0x2e;

/** Why `name` is not a valid entry name, or undefined when it is. */
export function nameProblem(name: Uint8Array): string | undefined {
  if (name.length === 0) return 'name is empty';
  if (name.length > MAX_NAME_LENGTH) return `name is ${name.length} bytes, longer than ${MAX_NAME_LENGTH}`;
  if (name.length === 1 && name[0] === DOT) return "name is '.'";
  if (name.length === 2 && name[0] === DOT && name[1] === DOT) return "name is '..'";
  if (name.includes(SLASH)) return "name contains '/'";
  if (name.includes(NUL)) return 'name contains a NUL byte';
  return undefined;
}

/** Why `target` is not a valid symlink target, or undefined when it is. */
export function symlinkTargetProblem(target: Uint8Array): string | undefined {
  if (target.length === 0) return 'symlink target is empty';
  if (target.length > MAX_SYMLINK_TARGET_LENGTH) {
    return `symlink target is ${target.length} bytes, longer than ${MAX_SYMLINK_TARGET_LENGTH}`;
  }
  if (target.includes(NUL)) return 'symlink target contains a NUL byte';
  return undefined;
}

function fail(name: Uint8Array, why: string): never {
  throw new DirectoryValidationError(`entry ${displayName(name)}: ${why}`);
}

function checkSorted(list: { name: Buffer }[], kind: string): void {
  for (let i = 1; i < list.length; i++) {
    const order = Buffer.compare(list[i - 1]!.name, list[i]!.name);
    if (order === 0) fail(list[i]!.name, `duplicate name in ${kind}`);
    if (order > 0) fail(list[i]!.name, `${kind} not sorted: comes after ${displayName(list[i - 1]!.name)}`);
  }
}

/** Throws DirectoryValidationError naming the first problem found. */
export function validateDirectory(directory: Directory): void {
  let total = 0;
  for (const node of directory.directories) {
    const problem = nameProblem(node.name);
    if (problem) fail(node.name, problem);
    if (node.digest.length !== DIGEST_LENGTH) fail(node.name, `directory digest is ${node.digest.length} bytes, expected ${DIGEST_LENGTH}`);
    total += node.size;
  }
  for (const node of directory.files) {
    const problem = nameProblem(node.name);
    if (problem) fail(node.name, problem);
    if (node.digest.length !== DIGEST_LENGTH) fail(node.name, `file digest is ${node.digest.length} bytes, expected ${DIGEST_LENGTH}`);
  }
  for (const node of directory.symlinks) {
    const problem = nameProblem(node.name) ?? symlinkTargetProblem(node.target);
    if (problem) fail(node.name, problem);
  }
  checkSorted(directory.directories, 'directories');
  checkSorted(directory.files, 'files');
  checkSorted(directory.symlinks, 'symlinks');

  const seen = new Set<string>();
  for (const list of [directory.directories, directory.files, directory.symlinks]) {
    for (const { name } of list) {
      const key = name.toString('latin1');
      if (seen.has(key)) fail(name, 'name appears in more than one list');
      seen.add(key);
    }
  }
  if (!Number.isSafeInteger(total + seen.size)) throw new DirectoryValidationError('directory size overflows');
}
