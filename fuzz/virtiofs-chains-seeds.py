# Seeds for fuzz/virtiofs-chains.c: guest memories holding a GETATTR of nodeid 2, a READ of
# nodeid 3 through an indirect table, and a READ past the end, so that mutations start from
# chains the native path answers. Usage: python3 virtiofs-chains-seeds.py CORPUS_DIR
import struct, sys, os

DESC, AVAIL, USED, DATA = 0, 256, 320, 512

def memory(descs, heads, data):
    m = bytearray(4096)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        m[DESC + 16 * i:DESC + 16 * i + 16] = struct.pack('<QIHH', addr, length, flags, nxt)
    m[AVAIL:AVAIL + 4] = struct.pack('<HH', 0, len(heads))
    for i, h in enumerate(heads):
        m[AVAIL + 4 + 2 * i:AVAIL + 6 + 2 * i] = struct.pack('<H', h)
    for at, b in data:
        m[at:at + len(b)] = b
    return bytes(m)

def fuse(opcode, nodeid, args):
    return struct.pack('<IIQQIIIHH', 40 + len(args), opcode, 7, nodeid, 0, 0, 0, 0, 0) + args

getattr_request = fuse(3, 2, struct.pack('<IIQ', 0, 0, 0))
read_request = fuse(15, 3, struct.pack('<QQIIQII', 0, 4096, 1024, 0, 0, 0, 0))
tail_request = fuse(15, 3, struct.pack('<QQIIQII', 0, 99_990, 512, 0, 0, 0, 0))
seeds = {
    'getattr': memory([(DATA, len(getattr_request), 1, 1), (DATA + 256, 120, 2, 0)], [0], [(DATA, getattr_request)]),
    'read-indirect': memory(
        [(DATA + 1024, 4 * 16, 4, 0)], [0],
        [(DATA, read_request),
         (DATA + 1024, struct.pack('<QIHH', DATA, len(read_request), 1, 1) + struct.pack('<QIHH', DATA + 128, 16, 3, 2)
          + struct.pack('<QIHH', DATA + 2048, 512, 3, 3) + struct.pack('<QIHH', DATA + 2560, 512, 2, 0))]),
    'read-tail': memory([(DATA, len(tail_request), 1, 1), (DATA + 256, 16 + 512, 2, 0)], [0], [(DATA, tail_request)]),
}
os.makedirs(sys.argv[1], exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(sys.argv[1], f'seed-{name}'), 'wb') as f:
        f.write(data)
