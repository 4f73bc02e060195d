// NARs the readers' tests share: the encoding of strings, a small tree, and
// malformed NARs with the error each must be refused with.
import { NarEncoder } from '../src/store/nar/encoder.js';

export function narString(bytes: Buffer | string): Buffer {
  const data = Buffer.from(bytes);
  const out = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  out.writeBigUInt64LE(BigInt(data.length));
  data.copy(out, 8);
  return out;
}

/** The NAR of these tokens: strings encoded, Buffers taken as they are. */
export function nar(...tokens: (string | Buffer)[]): Buffer {
  return Buffer.concat(tokens.map((t) => (typeof t === 'string' ? narString(t) : t)));
}

/** A NAR of a small tree, written with the encoder. */
export function sampleNar(): Buffer {
  const chunks: Buffer[] = [];
  const e = new NarEncoder((c) => chunks.push(Buffer.from(c)));
  e.directoryStart();
  e.entryStart(Buffer.from('a'));
  e.fileStart(true, 5);
  e.fileData(Buffer.from('hello'));
  e.fileEnd();
  e.entryEnd();
  e.entryStart(Buffer.from('b'));
  e.symlink(Buffer.from('a'));
  e.entryEnd();
  e.directoryEnd();
  e.flush();
  return Buffer.concat(chunks);
}

/** Malformed NARs: what is wrong, the bytes, and what the refusal must say. */
export function malformedNars(): [string, Buffer, RegExp][] {
  const good = sampleNar();
  const file = (contents: string, ...before: string[]) => ['(', 'type', 'regular', ...before, 'contents', narString(contents), ')'];
  const dir = (...entries: (string | Buffer)[][]) => ['(', 'type', 'directory', ...entries.flat(), ')'];
  const entry = (name: string | Buffer, node: (string | Buffer)[]) => ['entry', '(', 'name', typeof name === 'string' ? narString(name) : name, 'node', ...node, ')'];
  const badPadding = Buffer.concat([Buffer.from([3, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('abc'), Buffer.from([0, 0, 0, 0, 1])]);
  return [
    ['truncated', good.subarray(0, good.length - 9), /NAR is truncated/],
    ['cut inside contents', good.subarray(0, 150), /NAR is truncated/],
    ['not a NAR', nar('nix-archive-2', ...file('x')), /does not start with "nix-archive-1"/],
    ['trailing data', Buffer.concat([good, narString('x')]), /trailing data/],
    ['unsorted', nar('nix-archive-1', ...dir(entry('b', file('1')), entry('a', file('2')))), /entry "a" comes after "b"/],
    ['duplicate', nar('nix-archive-1', ...dir(entry('a', file('1')), entry('a', file('2')))), /entry "a" appears twice/],
    ['slash in name', nar('nix-archive-1', ...dir(entry('a/b', file('1')))), /entry name "a\/b"/],
    ['dot-dot name', nar('nix-archive-1', ...dir(entry('..', file('1')))), /entry name "\.\."/],
    ['empty name', nar('nix-archive-1', ...dir(entry('', file('1')))), /entry name/],
    ['executable after contents', nar('nix-archive-1', '(', 'type', 'regular', 'contents', narString('x'), 'executable', '', ')'), /expected "\)", found "executable"/],
    ['bad padding', nar('nix-archive-1', '(', 'type', 'symlink', 'target', badPadding, ')'), /non-zero padding/],
    ['unknown type', nar('nix-archive-1', '(', 'type', 'fifo', ')'), /unknown node type "fifo"/],
    ['huge length', nar('nix-archive-1', '(', 'type', 'regular', 'contents', Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x80])), /too large/],
    ['empty symlink target', nar('nix-archive-1', '(', 'type', 'symlink', 'target', '', ')'), /symlink target/],
  ];
}
