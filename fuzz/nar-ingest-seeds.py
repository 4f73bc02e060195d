#!/usr/bin/env python3
# Seeds for fuzz/nar-ingest.c: NARs of a small tree (a file, an executable, a
# symlink, a nested directory, a file just past the 64 KiB limit), plain and
# as zstd bodies (zstd program), each with a few choices of chunking.
import os, struct, subprocess, sys

def s(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack('<Q', len(b)) + b + b'\0' * ((8 - len(b) % 8) % 8)

def nar(*tokens):
    return b''.join(s(t) for t in tokens)

def file(contents, executable=False):
    return ['(', 'type', 'regular'] + (['executable', ''] if executable else []) + ['contents', contents, ')']

def entry(name, node):
    return ['entry', '(', 'name', name, 'node'] + node + [')']

tree = ['(', 'type', 'directory'] + entry('a', file('hello', True)) + entry('big', file(b'x' * 70000)) + \
    entry('link', ['(', 'type', 'symlink', 'target', 'a', ')']) + \
    entry('sub', ['(', 'type', 'directory'] + entry('z', file('')) + [')']) + [')']
plain = b''.join(s(t) for t in ['nix-archive-1'] + tree)
compressed = subprocess.run(['zstd', '-c', '-q'], input=plain, stdout=subprocess.PIPE, check=True).stdout
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for i, (mode, body) in enumerate([(0, plain), (1, compressed)]):
    for choice in (0, 17, 200):
        with open(os.path.join(out, f'seed-{i}-{choice}'), 'wb') as f:
            f.write(bytes([(choice & 0xfe) | mode, choice]) + body)
