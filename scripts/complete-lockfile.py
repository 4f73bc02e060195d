#!/usr/bin/env python3
"""Completes package-lock.json for `npm ci` when the registry is a filtered mirror.

The registry reachable here serves only some platforms' prebuilt packages
(e.g. @napi-rs/blake-hash-darwin-x64 answers 404). npm then writes a lock
without them, and `npm ci` refuses that lock as out of sync. This adds an
entry for each missing optional platform package, tagged with its os/cpu, so
npm ci skips it on every other platform without ever fetching it.
Run after any `npm install` that rewrites the lock: python3 scripts/complete-lockfile.py
"""
import json, re, subprocess, sys
lock = json.load(open('package-lock.json'))
out = subprocess.run(['npm', 'ci', '--dry-run'], capture_output=True, text=True).stderr
missing = re.findall(r'Missing: (\S+)@(\S*) from lock file', out)
pk = lock['packages']
def platform(name):
    n = name.split('/')[-1]
    os_ = next(o for o in ['android','darwin','freebsd','linux','win32'] if o in n)
    cpu = next(c for c in ['arm64','x64','ia32','arm','ppc64','s390x','riscv64'] if re.search(r'-' + c + r'(\b|-|$)', n))
    return os_, cpu
for name, _ in missing:
    # find version from the parent's optionalDependencies
    version = None
    for k, v in pk.items():
        od = v.get('optionalDependencies', {})
        if name in od: version = od[name]
    os_, cpu = platform(name)
    libc = ['musl'] if 'musl' in name else (['glibc'] if 'gnu' in name and os_ == 'linux' else None)
    entry = {'version': version, 'cpu': [cpu], 'os': [os_], 'optional': True}
    if libc: entry['libc'] = libc
    pk['node_modules/' + name] = entry
    print('stub', name, version, os_, cpu)
json.dump(lock, open('package-lock.json', 'w'), indent=2)
open('package-lock.json', 'a').write('\n')
