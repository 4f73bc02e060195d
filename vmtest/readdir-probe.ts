// A 193-byte static x86-64 Linux program for the guest: `/vmtest/readdir DIR` opens DIR and reads
// it to the end with getdents64(2). Its exit status is the errno of the first failing call, or 0.
//
// The guest needs it because busybox's applets (ls, find, du, tar) ignore readdir errors: `ls` on
// a directory whose listing is refused prints nothing and exits 0. No compiler is needed: the
// machine code is below, one instruction a line. `as` + `objdump -d -M intel` reproduce the bytes.

import type { ExtraFile } from './initramfs.js';

const CODE: Array<[bytes: string, asm: string]> = [
  ['48 8b 7c 24 10', 'mov rdi, [rsp+16]      ; argv[1]'],
  ['be 00 00 01 00', 'mov esi, 0x10000       ; O_RDONLY | O_DIRECTORY'],
  ['31 d2', 'xor edx, edx'],
  ['b8 02 00 00 00', 'mov eax, 2             ; open'],
  ['0f 05', 'syscall'],
  ['48 85 c0', 'test rax, rax'],
  ['78 24', 'js fail'],
  ['48 89 c7', 'mov rdi, rax           ; the fd'],
  ['48 81 ec 00 10 00 00', 'sub rsp, 4096          ; a buffer on the stack'],
  ['48 89 e6', 'again: mov rsi, rsp'],
  ['ba 00 10 00 00', 'mov edx, 4096'],
  ['b8 d9 00 00 00', 'mov eax, 217           ; getdents64'],
  ['0f 05', 'syscall'],
  ['48 85 c0', 'test rax, rax'],
  ['7f ec', 'jg again               ; more entries'],
  ['78 04', 'js fail'],
  ['31 ff', 'xor edi, edi           ; read to the end: status 0'],
  ['eb 06', 'jmp done'],
  ['48 89 c7', 'fail: mov rdi, rax'],
  ['48 f7 df', 'neg rdi                ; status = errno'],
  ['b8 3c 00 00 00', 'done: mov eax, 60      ; exit'],
  ['0f 05', 'syscall'],
];

const BASE = 0x400000;
const EHDR = 64;
const PHDR = 56;

/** The ELF file: header, one PT_LOAD segment mapping the whole file read+execute, the code. */
export function readdirProbe(): Buffer {
  const code = Buffer.from(CODE.map(([bytes]) => bytes).join(' ').replace(/ /g, ''), 'hex');
  const file = Buffer.alloc(EHDR + PHDR + code.length);
  // e_ident: magic, ELFCLASS64, little endian, version 1, System V ABI.
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]).copy(file, 0);
  file.writeUInt16LE(2, 16); // e_type: ET_EXEC
  file.writeUInt16LE(0x3e, 18); // e_machine: x86-64
  file.writeUInt32LE(1, 20); // e_version
  file.writeBigUInt64LE(BigInt(BASE + EHDR + PHDR), 24); // e_entry: the first instruction
  file.writeBigUInt64LE(BigInt(EHDR), 32); // e_phoff
  file.writeBigUInt64LE(0n, 40); // e_shoff: no sections
  file.writeUInt32LE(0, 48); // e_flags
  file.writeUInt16LE(EHDR, 52); // e_ehsize
  file.writeUInt16LE(PHDR, 54); // e_phentsize
  file.writeUInt16LE(1, 56); // e_phnum
  file.writeUInt16LE(64, 58); // e_shentsize
  file.writeUInt16LE(0, 60); // e_shnum
  file.writeUInt16LE(0, 62); // e_shstrndx
  const ph = EHDR;
  file.writeUInt32LE(1, ph); // p_type: PT_LOAD
  file.writeUInt32LE(5, ph + 4); // p_flags: R + X
  file.writeBigUInt64LE(0n, ph + 8); // p_offset
  file.writeBigUInt64LE(BigInt(BASE), ph + 16); // p_vaddr
  file.writeBigUInt64LE(BigInt(BASE), ph + 24); // p_paddr
  file.writeBigUInt64LE(BigInt(file.length), ph + 32); // p_filesz
  file.writeBigUInt64LE(BigInt(file.length), ph + 40); // p_memsz
  file.writeBigUInt64LE(0x1000n, ph + 48); // p_align
  code.copy(file, EHDR + PHDR);
  return file;
}

/** For buildInitramfs's extraFiles: the probe at /vmtest/readdir. */
export function readdirProbeFile(path = '/vmtest/readdir'): ExtraFile {
  return { path, content: readdirProbe(), mode: 0o755 };
}
