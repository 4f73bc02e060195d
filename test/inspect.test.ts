// Inspecting a store against real Nix: `nixcas path-info`, `ls` and `cat` of
// paths `nixcas copy -` took from a plain list of store paths, compared with
// `nix path-info` / `nix store ls` of the same paths and with the trees on disk.
import assert from 'node:assert/strict';
import { chmodSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { buildClosureFixture, nix, nixcas, nixcasBytes, removeDir, seededBytes, tempDir } from './helpers.js';

const NIX = ['--extra-experimental-features', 'nix-command', '--option', 'substituters', ''];
const nixText = (...args: string[]) => nix('nix', [...NIX, ...args]).toString();

let work: string;
let store: string;
/** A tree of everything a store path can hold, its store path, and a single-file store path. */
let tree: string;
let treePath: string;
let filePath: string;
/** New store paths each run (INSPECT_SEED repeats one): printed, so a failure can be replayed. */
const SEED = Number(process.env.INSPECT_SEED ?? Date.now() % 2 ** 31);
console.log(`# inspect.test.ts seed: INSPECT_SEED=${SEED}`);

/** Three paths built by nix-build: references (one to itself), derivers. */
let mid: string;
let closure: string[];

function makeTree(root: string): void {
  mkdirSync(join(root, 'bin'), { recursive: true });
  writeFileSync(join(root, 'bin/tool'), '#!/bin/sh\necho tool\n');
  chmodSync(join(root, 'bin/tool'), 0o755);
  writeFileSync(join(root, 'nonce'), seededBytes(16, SEED)); // a new store path every run (a fresh signature)
  writeFileSync(join(root, 'empty-file'), '');
  mkdirSync(join(root, 'empty-dir'));
  mkdirSync(join(root, 'a/b/c'), { recursive: true });
  writeFileSync(join(root, 'a/b/c/deep'), 'deep down\n');
  symlinkSync('bin/tool', join(root, 'relative-link'));
  symlinkSync('/etc/hostname', join(root, 'absolute-link'));
  symlinkSync('does/not/exist', join(root, 'dangling-link'));
  // Names sort as bytes (10 before 9), non-UTF-8 names and targets, a name JSON must escape.
  writeFileSync(join(root, '10'), 'ten');
  writeFileSync(join(root, '9'), 'nine');
  writeFileSync(Buffer.from(`${root}/n\xe4me\xff`, 'latin1'), 'latin-1 named');
  symlinkSync(Buffer.from('tar\xe9get', 'latin1'), Buffer.from(`${root}/l\xfcnk`, 'latin1'));
  writeFileSync(join(root, 'quo"te\\back\x08\ttab'), 'escaped');
  // Larger than the 1 MiB chunks blobs are streamed in.
  writeFileSync(join(root, 'big.bin'), seededBytes(3 * 1024 * 1024 + 17, 26));
}

before(() => {
  work = tempDir('inspect');
  store = join(work, 'store');
  tree = join(work, 'tree');
  makeTree(tree);
  treePath = nix('nix-store', ['--add', tree]).toString().trim();
  const single = join(work, 'single.txt');
  writeFileSync(single, `a single file ${SEED}\n`);
  filePath = nix('nix-store', ['--add', single]).toString().trim();
  // Signed, so that signatures are compared too.
  nix('nix-store', ['--generate-binary-cache-key', 'inspect-test-1', join(work, 'key.sk'), join(work, 'key.pk')]);
  nix('nix', [...NIX, 'store', 'sign', '-k', join(work, 'key.sk'), treePath]);
  const attrs = buildClosureFixture(join(work, 'result'));
  closure = (JSON.parse(readFileSync(attrs, 'utf8')).closure as { path: string }[]).map((e) => e.path);
  mid = closure.find((p) => p.endsWith('-mid'))!;
  // What `nix-store -qR` prints, on stdin, as `-`.
  const list = nix('nix-store', ['-qR', mid, treePath, filePath]);
  const copy = nixcas(['copy', '--store', store, '-'], { input: list });
  assert.equal(copy.status, 0, copy.stderr);
  assert.match(copy.stderr, /5 copied .* 0 already present, 0 failed/);
});

after(() => removeDir(work));

/** nix path-info --json as Nix prints it, less what nixcas does not keep (when a path was registered, whether it was built here). */
function nixPathInfo(...args: string[]): Record<string, unknown>[] {
  const entries = JSON.parse(nixText('path-info', '--json', ...args)) as Record<string, unknown>[];
  return entries.map(({ registrationTime, ultimate, ...rest }) => {
    assert.equal(typeof registrationTime, 'number');
    return rest;
  });
}

function ourPathInfo(...args: string[]): Record<string, unknown>[] {
  const run = nixcas(['path-info', '--store', store, '--json', ...args]);
  assert.equal(run.status, 0, run.stderr);
  return JSON.parse(run.stdout) as Record<string, unknown>[];
}

test('path-info --json: every field as nix path-info --json gives it, in its order; -r, -S', () => {
  for (const args of [[mid, treePath, filePath], ['-r', mid], ['-r', '-S', mid, treePath], ['--closure-size', filePath]]) {
    const theirs = nixPathInfo(...args);
    const ours = ourPathInfo(...args);
    assert.deepEqual(ours.map((e) => e.path), theirs.map((e) => e.path), `paths and order of path-info ${args.join(' ')}`);
    for (const [i, entry] of theirs.entries()) {
      assert.deepEqual(Object.keys(ours[i]!), Object.keys(entry), `keys of ${entry.path}`);
      for (const key of Object.keys(entry)) assert.deepEqual(ours[i]![key], entry[key], `${key} of ${entry.path} (path-info ${args.join(' ')})`);
    }
  }
  // The comparison covered each kind of field.
  const [tree] = nixPathInfo(treePath);
  assert.match(String(tree!.ca), /^fixed:r:sha256:/);
  assert.match(String((tree!.signatures as string[])[0]), /^inspect-test-1:/);
  const [mine] = nixPathInfo(mid);
  assert.match(String(mine!.deriver), /-mid\.drv$/);
  assert.ok((mine!.references as string[]).includes(mid), 'mid refers to itself');
  const sized = ourPathInfo('-S', mid)[0]!;
  assert.equal(sized.closureSize, nixPathInfo('-S', mid)[0]!.closureSize);
  assert.equal(sized.closureSize, nixPathInfo('-r', mid).reduce((sum, e) => sum + (e.narSize as number), 0));
});

test('path-info without --json prints what nix path-info prints: order, -s, -S, alignment; --all', () => {
  for (const args of [['-r', mid], ['-rsS', mid], ['-s', treePath, mid], ['-S', filePath, mid, treePath], [treePath, treePath]]) {
    const run = nixcas(['path-info', '--store', store, ...args]);
    assert.equal(run.status, 0, run.stderr);
    assert.equal(run.stdout, nixText('path-info', ...args), `path-info ${args.join(' ')}`);
  }
  const all = nixcas(['path-info', '--store', store, '--all', '-s']);
  assert.equal(all.status, 0, all.stderr);
  assert.equal(all.stdout, nixText('path-info', '-s', ...closure, treePath, filePath));
  // ./result-style symlinks lead to the path they point at.
  symlinkSync(treePath, join(work, 'tree-link'));
  const linked = nixcas(['path-info', '--store', store, join(work, 'tree-link')]);
  assert.equal(linked.stdout, `${treePath}\n`, linked.stderr);
});

/** `nix store ls -R` / `-lR` of a tree on disk: entries sorted by name bytes, each directory's contents after it. */
function listFromDisk(root: string, long: boolean): Buffer {
  const lines: Buffer[] = [];
  const walk = (dir: Buffer, relative: Buffer) => {
    const names = (readdirSync(dir, { encoding: 'buffer' }) as Buffer[]).sort(Buffer.compare);
    for (const name of names) {
      const path = Buffer.concat([dir, Buffer.from('/'), name]);
      const rel = Buffer.concat([relative, Buffer.from('/'), name]);
      const stat = lstatSync(path);
      if (long) {
        const mode = stat.isDirectory() ? 'dr-xr-xr-x' : stat.isSymbolicLink() ? 'lrwxrwxrwx' : stat.mode & 0o100 ? '-r-xr-xr-x' : '-r--r--r--';
        const size = stat.isFile() ? stat.size : 0;
        lines.push(Buffer.from(`${mode} ${String(size).padStart(20)} `));
      }
      lines.push(rel);
      if (long && stat.isSymbolicLink()) lines.push(Buffer.from(' -> '), readlinkSync(path, { encoding: 'buffer' }));
      lines.push(Buffer.from('\n'));
      if (stat.isDirectory()) walk(path, rel);
    }
  };
  walk(Buffer.from(root), Buffer.from('.'));
  return Buffer.concat(lines);
}

const lsBytes = (...args: string[]) => nixcasBytes(['ls', '--store', store, ...args]);

test('ls -R and ls -lR list the tree on disk, byte for byte as nix store ls; --json as nix store ls --json', () => {
  for (const long of [false, true]) {
    const flag = long ? '-lR' : '-R';
    const ours = lsBytes(flag, treePath);
    assert.ok(ours.equals(listFromDisk(tree, long)), `ls ${flag} against the tree on disk:\n${ours.toString('latin1')}`);
    assert.ok(ours.equals(nix('nix', [...NIX, 'store', 'ls', flag, treePath])), `ls ${flag} against nix store ls`);
  }
  assert.ok(lsBytes(treePath).equals(nix('nix', [...NIX, 'store', 'ls', treePath])), 'ls without -R');
  for (const args of [['--json', '-R', treePath], ['--json', treePath], ['--json', `${treePath}/bin/tool`], ['--json', `${treePath}/relative-link`], ['--json', filePath]]) {
    const ours = lsBytes(...args);
    const theirs = nix('nix', [...NIX, 'store', 'ls', ...args]);
    assert.ok(ours.equals(Buffer.concat([theirs, Buffer.from('\n')])), `ls ${args.join(' ')}:\n${ours.toString('latin1')}\n${theirs.toString('latin1')}`);
  }
  // Raw bytes in JSON: the non-UTF-8 name and target come back as the latin-1 characters of their bytes.
  const json = JSON.parse(lsBytes('--json', '-R', treePath).toString('latin1'));
  assert.deepEqual(json.entries['l\xfcnk'], { type: 'symlink', target: 'tar\xe9get' });
  assert.deepEqual(json.entries['bin'].entries.tool, { type: 'regular', size: 20, executable: true });
  // Entries in name-byte order: "10" before "9" (a JavaScript object would put 9 first).
  const text = lsBytes('--json', treePath).toString('latin1');
  assert.ok(text.indexOf('"10":{}') > 0 && text.indexOf('"10":{}') < text.indexOf('"9":{}'), text);
});

test('ls of a path inside a store path, a file, a symlink, -d; through a ./result-style symlink', () => {
  for (const args of [['-R', `${treePath}/a`], ['-l', `${treePath}/a/b/`], ['-l', `${treePath}/bin/tool`], ['-l', `${treePath}/absolute-link`], ['-ld', treePath], ['-l', filePath]]) {
    assert.ok(lsBytes(...args).equals(nix('nix', [...NIX, 'store', 'ls', ...args])), `ls ${args.join(' ')}`);
  }
  symlinkSync(treePath, join(work, 'result-tree'));
  assert.equal(lsBytes('-R', join(work, 'result-tree/a')).toString(), './b\n./b/c\n./b/c/deep\n');
  // The bare basename, as `nixcas nar` takes it.
  assert.equal(lsBytes(filePath.slice('/nix/store/'.length)).toString(), `${filePath.slice('/nix/store/'.length)}\n`);
});

test('cat writes every file of the tree as it is on disk, a single-file store path, through symlinks to the store', () => {
  const files: string[] = [];
  const walk = (relative: string) => {
    for (const entry of readdirSync(join(tree, relative), { withFileTypes: true })) {
      const path = relative ? `${relative}/${entry.name}` : entry.name;
      if (entry.isDirectory()) walk(path);
      else if (entry.isFile() && !entry.name.includes('\ufffd')) files.push(path); // argv is UTF-8: the latin-1 name cannot be named
    }
  };
  walk('');
  assert.ok(files.includes('big.bin') && files.includes('empty-file') && files.includes('a/b/c/deep'), files.join(' '));
  for (const file of files) {
    const ours = nixcasBytes(['cat', '--store', store, `${treePath}/${file}`]);
    assert.ok(ours.equals(readFileSync(join(tree, file))), `cat ${file}`);
  }
  assert.ok(nixcasBytes(['cat', '--store', store, filePath]).equals(readFileSync(filePath)));
  symlinkSync(treePath, join(work, 'cat-link'));
  assert.equal(nixcasBytes(['cat', '--store', store, join(work, 'cat-link/bin/tool')]).toString(), '#!/bin/sh\necho tool\n');
});

test('errors: paths the store lacks, directories to cat, missing files, bad arguments; exit status 1', () => {
  const absent = `/nix/store/${'0'.repeat(32)}-absent`;
  const expectFailure = (args: string[], message: RegExp, input?: Buffer) => {
    const run = nixcas([args[0]!, '--store', store, ...args.slice(1)], { input });
    assert.equal(run.status, 1, `${args.join(' ')}: ${run.stderr}`);
    assert.match(run.stderr, message);
    return run;
  };
  const notIn = new RegExp(`${absent} is not in the store \\(local://${store}\\)`);
  assert.equal(expectFailure(['path-info', treePath, absent], notIn).stdout, '', 'nothing printed without --json');
  // With --json, Nix's shape for a path it does not have, and still exit status 1.
  const json = expectFailure(['path-info', '--json', treePath, absent], notIn);
  assert.deepEqual(JSON.parse(json.stdout).map((e: { path: string; valid?: boolean }) => [e.path, e.valid]), [[absent, false], [treePath, undefined]]);
  // Another name under a registered hash part is another path.
  const renamed = `${treePath}-renamed`;
  expectFailure(['path-info', renamed], new RegExp(`${renamed} is not in the store`));
  expectFailure(['path-info', '--all', treePath], /--all takes no STORE_PATHs/);
  expectFailure(['path-info'], /needs STORE_PATHs, or --all/);
  expectFailure(['path-info', '/tmp'], /\/tmp is not in \/nix\/store, nor a symlink into it/);

  expectFailure(['ls', `${absent}/bin`], notIn);
  expectFailure(['ls', `${treePath}/nope`], new RegExp(`${treePath}/nope does not exist`));
  expectFailure(['ls', `${treePath}/bin/tool/x`], new RegExp(`${treePath}/bin/tool/x does not exist: ${treePath}/bin/tool is a file, not a directory`));
  expectFailure(['ls', `${treePath}/relative-link/x`], new RegExp(`${treePath}/relative-link is a symlink, not a directory`));

  assert.equal(expectFailure(['cat', `${treePath}/a`], new RegExp(`${treePath}/a is a directory, not a regular file`)).stdout, '');
  expectFailure(['cat', treePath], new RegExp(`${treePath} is a directory, not a regular file`));
  expectFailure(['cat', `${treePath}/relative-link`], new RegExp(`${treePath}/relative-link is a symlink, not a regular file`));
  expectFailure(['cat', `${treePath}/a/missing`], new RegExp(`${treePath}/a/missing does not exist`));
  expectFailure(['cat', `${absent}/file`], notIn);

  // copy -: a listed path the local Nix does not have is named, the others are still copied.
  const copy = expectFailure(['copy', '-'], new RegExp(`${absent}: not valid in the local Nix store`), Buffer.from(`${absent}\n${filePath}\n`));
  assert.match(copy.stderr, /0 copied .* 1 already present, 1 failed/);
  expectFailure(['copy', '-'], new RegExp(`${absent}: not valid in the local Nix store`), Buffer.from(`${absent}\n`));
});
