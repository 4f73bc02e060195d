"""An independent castore client: Debian's python3-grpcio against `nixcas daemon`.

Usage: castore_client.py SOCKET GENERATED_DIR
Digests are computed here from Python protobuf's serialization and the b3sum
tool, never taken from nixcas. Prints one line per check; exits 1 on the first
failure.
"""
import os
import subprocess
import sys

import grpc

SOCKET, GENERATED = sys.argv[1], sys.argv[2]
sys.path.insert(0, GENERATED)

from checks import expect_code, ok  # noqa: E402

from tvix.castore.v1 import castore_pb2 as tvix_pb  # noqa: E402
from tvix.castore.v1 import rpc_blobstore_pb2 as tvix_blob_pb  # noqa: E402
from tvix.castore.v1 import rpc_blobstore_pb2_grpc as tvix_blob_grpc  # noqa: E402
from tvix.castore.v1 import rpc_directory_pb2 as tvix_dir_pb  # noqa: E402
from tvix.castore.v1 import rpc_directory_pb2_grpc as tvix_dir_grpc  # noqa: E402
from snix.castore.v1 import rpc_directory_pb2 as snix_dir_pb  # noqa: E402
from snix.castore.v1 import rpc_directory_pb2_grpc as snix_dir_grpc  # noqa: E402
from snix.castore.v1 import rpc_blobstore_pb2 as snix_blob_pb  # noqa: E402
from snix.castore.v1 import rpc_blobstore_pb2_grpc as snix_blob_grpc  # noqa: E402

channel = grpc.insecure_channel("unix://" + SOCKET)
blobs = tvix_blob_grpc.BlobServiceStub(channel)
dirs = tvix_dir_grpc.DirectoryServiceStub(channel)


def b3(data: bytes) -> bytes:
    out = subprocess.run(["b3sum", "--no-names", "--raw"], input=data, capture_output=True, check=True).stdout
    assert len(out) == 32, out
    return out



# ---- blobs
def chunks(data, size):
    for i in range(0, len(data), size):
        yield tvix_blob_pb.BlobChunk(data=data[i:i + size])


samples = {
    "empty": b"",
    "small": b"hello, castore\n",
    "multi-chunk": os.urandom(3 * 1024 * 1024 + 12345),
}
blob_digests = {}
for name, data in samples.items():
    digest = blobs.Put(chunks(data, 64 * 1024)).digest
    assert digest == b3(data), f"{name}: Put returned {digest.hex()}, b3sum says {b3(data).hex()}"
    blobs.Stat(tvix_blob_pb.StatBlobRequest(digest=digest))
    got = list(blobs.Read(tvix_blob_pb.ReadBlobRequest(digest=digest)))
    assert all(len(c.data) <= 1024 * 1024 for c in got), "a Read chunk is larger than 1 MiB"
    assert b"".join(c.data for c in got) == data, f"{name}: Read returned different bytes"
    blob_digests[name] = digest
    ok(f"blob {name} ({len(data)} bytes) round trip in {len(got)} chunks")

missing = b3(b"never uploaded")
expect_code(grpc.StatusCode.NOT_FOUND, lambda: blobs.Stat(tvix_blob_pb.StatBlobRequest(digest=missing)), "Stat of a missing blob")
expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(blobs.Read(tvix_blob_pb.ReadBlobRequest(digest=missing))), "Read of a missing blob")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: blobs.Stat(tvix_blob_pb.StatBlobRequest(digest=b"short")), "Stat with a 5-byte digest")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(blobs.Read(tvix_blob_pb.ReadBlobRequest(digest=b"x" * 33))), "Read with a 33-byte digest")

# A Put cut off mid-way: the generator fails after some chunks, so the client cancels the call.
cut_data = os.urandom(2 * 1024 * 1024)


def cut_off_stream():
    yield tvix_blob_pb.BlobChunk(data=cut_data[:1024 * 1024])
    raise RuntimeError("client gives up mid-upload")


try:
    blobs.Put(cut_off_stream())
    raise AssertionError("a cut-off Put succeeded")
except grpc.RpcError:
    pass
for prefix in (cut_data[:1024 * 1024], cut_data):
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: blobs.Stat(tvix_blob_pb.StatBlobRequest(digest=b3(prefix))), "Stat after a cut-off Put")

# ---- a multi-level directory tree, built leaves to root
def digest_of(directory) -> bytes:
    return b3(directory.SerializeToString(deterministic=True))


def size_of(directory) -> int:
    return len(directory.directories) + len(directory.files) + len(directory.symlinks) + sum(d.size for d in directory.directories)


N = tvix_pb
leaf = N.Directory(
    files=[
        N.FileNode(name=b"empty", digest=blob_digests["empty"], size=0),
        N.FileNode(name=b"hello", digest=blob_digests["small"], size=len(samples["small"]), executable=True),
        N.FileNode(name=b"\xff\xfenot-utf8", digest=blob_digests["small"], size=len(samples["small"])),
    ],
    symlinks=[N.SymlinkNode(name=b"link", target=b"../dangling/\xfe")],
)
empty = N.Directory()
middle = N.Directory(
    directories=[
        N.DirectoryNode(name=b"empty-dir", digest=digest_of(empty), size=0),
        N.DirectoryNode(name=b"leaf", digest=digest_of(leaf), size=size_of(leaf)),
    ],
    files=[N.FileNode(name=b"big", digest=blob_digests["multi-chunk"], size=len(samples["multi-chunk"]))],
)
root = N.Directory(
    directories=[
        N.DirectoryNode(name=b"a", digest=digest_of(middle), size=size_of(middle)),
        N.DirectoryNode(name=b"b", digest=digest_of(middle), size=size_of(middle)),
        N.DirectoryNode(name=b"c", digest=digest_of(leaf), size=size_of(leaf)),
    ],
    symlinks=[N.SymlinkNode(name=b"z", target=b"/nix/store/abs")],
)
assert digest_of(empty).hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

root_digest = dirs.Put(iter([empty, leaf, middle, root])).root_digest
assert root_digest == digest_of(root), f"root digest {root_digest.hex()} != {digest_of(root).hex()}"
ok("directory tree Put returns the root digest b3sum computes")

got = list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=root_digest)))
assert len(got) == 1 and got[0].SerializeToString(deterministic=True) == root.SerializeToString(deterministic=True)
ok("Get of the root returns it byte for byte")

got = list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=root_digest, recursive=True)))
order = [digest_of(d) for d in got]
expected = [digest_of(root), digest_of(middle), digest_of(leaf), digest_of(empty)]
assert order == expected, f"recursive Get order {[o.hex()[:8] for o in order]} != {[e.hex()[:8] for e in expected]}"
ok("recursive Get: root first, breadth-first, each digest once")

# The same tree through the snix package names.
snix_dirs = snix_dir_grpc.DirectoryServiceStub(channel)
snix_got = list(snix_dirs.Get(snix_dir_pb.GetDirectoryRequest(digest=root_digest, recursive=True)))
assert [b3(d.SerializeToString(deterministic=True)) for d in snix_got] == expected
snix_blobs = snix_blob_grpc.BlobServiceStub(channel)
assert b"".join(c.data for c in snix_blobs.Read(snix_blob_pb.ReadBlobRequest(digest=blob_digests["small"]))) == samples["small"]
ok("the same tree and blobs through snix.castore.v1")

expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=missing))), "Get of a missing directory")
expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=missing, recursive=True))), "recursive Get of a missing directory")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=b"\x00" * 31))), "Get with a 31-byte digest")

# ---- bad batches: INVALID_ARGUMENT, and nothing from the batch stored
d = blob_digests["small"]
bad = {
    "unsorted names": [N.Directory(files=[N.FileNode(name=b"b", digest=d, size=15), N.FileNode(name=b"a", digest=d, size=15)])],
    "duplicate names": [N.Directory(files=[N.FileNode(name=b"a", digest=d, size=15), N.FileNode(name=b"a", digest=d, size=15)])],
    "name in two lists": [N.Directory(files=[N.FileNode(name=b"a", digest=d, size=15)], symlinks=[N.SymlinkNode(name=b"a", target=b"x")])],
    "name with a slash": [N.Directory(files=[N.FileNode(name=b"a/b", digest=d, size=15)])],
    "name '..'": [N.Directory(symlinks=[N.SymlinkNode(name=b"..", target=b"x")])],
    "empty name": [N.Directory(files=[N.FileNode(name=b"", digest=d, size=15)])],
    "name with NUL": [N.Directory(files=[N.FileNode(name=b"a\x00", digest=d, size=15)])],
    "256-byte name": [N.Directory(files=[N.FileNode(name=b"n" * 256, digest=d, size=15)])],
    "empty symlink target": [N.Directory(symlinks=[N.SymlinkNode(name=b"l", target=b"")])],
    "31-byte file digest": [N.Directory(files=[N.FileNode(name=b"a", digest=d[:31], size=15)])],
    "33-byte directory digest": [N.Directory(directories=[N.DirectoryNode(name=b"a", digest=d + b"!", size=0)])],
    "child neither in batch nor stored": [N.Directory(directories=[N.DirectoryNode(name=b"a", digest=missing, size=0)])],
    "wrong child size": [leaf, N.Directory(directories=[N.DirectoryNode(name=b"x", digest=digest_of(leaf), size=size_of(leaf) + 1)])],
}
for what, batch in bad.items():
    # Prefix each batch with a new, valid leaf: it must not be stored either.
    canary = N.Directory(symlinks=[N.SymlinkNode(name=b"canary", target=what.encode())])
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: dirs.Put(iter([canary] + batch)), f"Put with {what}")
    assert details, f"{what}: no message"
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=digest_of(canary)))), f"  nothing stored after {what}")

two_roots = [N.Directory(symlinks=[N.SymlinkNode(name=b"r1", target=b"x")]), N.Directory(symlinks=[N.SymlinkNode(name=b"r2", target=b"x")])]
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: dirs.Put(iter(two_roots)), "Put with two roots")
for r in two_roots:
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=digest_of(r)))), "  nothing stored after two roots")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: dirs.Put(iter([middle, leaf])), "Put root before leaves")

# A directory Put cut off mid-stream stores nothing.
cut_leaf = N.Directory(symlinks=[N.SymlinkNode(name=b"cut", target=b"off")])


def cut_off_dirs():
    yield cut_leaf
    raise RuntimeError("client gives up")


try:
    dirs.Put(cut_off_dirs())
    raise AssertionError("a cut-off directory Put succeeded")
except grpc.RpcError:
    pass
expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(dirs.Get(tvix_dir_pb.GetDirectoryRequest(digest=digest_of(cut_leaf)))), "Get after a cut-off directory Put")

# The legacy size rule (entries counted twice) is accepted on Put.
legacy_parent = N.Directory(directories=[N.DirectoryNode(name=b"l", digest=digest_of(leaf), size=2 * 4)])
assert dirs.Put(iter([legacy_parent])).root_digest == digest_of(legacy_parent)
ok("a DirectoryNode size by the legacy Rust rule is accepted")

# ---- health and reflection, as generic clients see them (no generated stubs)
identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)

# Bytes that are not protobuf at all: INVALID_ARGUMENT, not a crash or INTERNAL.
truncated = b"\x0a\xff\xff"  # a length-delimited field claiming more bytes than follow
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: channel.unary_unary("/tvix.castore.v1.BlobService/Stat", **identity)(truncated), "Stat with malformed protobuf")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(channel.unary_stream("/tvix.castore.v1.DirectoryService/Get", **identity)(truncated)), "Get with malformed protobuf")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: channel.stream_unary("/tvix.castore.v1.BlobService/Put", **identity)(iter([b"\x0a\x01a", truncated])), "blob Put with a malformed chunk")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: channel.stream_unary("/snix.castore.v1.DirectoryService/Put", **identity)(iter([truncated])), "directory Put with a malformed message")
too_big = N.Directory(files=[N.FileNode(name=b"huge", digest=d, size=2**60)])
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: dirs.Put(iter([too_big])), "Put with a file size beyond 2^53")
assert blobs.Put(chunks(b"still serving", 4)).digest == b3(b"still serving")
ok("the daemon keeps serving after malformed input")
health = channel.unary_unary("/grpc.health.v1.Health/Check", **identity)
assert health(b"") == b"\x08\x01", "overall health is not SERVING"
name = b"tvix.castore.v1.BlobService"
assert health(b"\x0a" + bytes([len(name)]) + name) == b"\x08\x01"
ok("grpc.health.v1 reports SERVING")
for version in ("v1", "v1alpha"):
    reflect = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo", **identity)
    listing = b"".join(reflect(iter([b"\x3a\x00"])))  # list_services = ""
    for service in (b"tvix.castore.v1.BlobService", b"tvix.castore.v1.DirectoryService", b"snix.castore.v1.DirectoryService"):
        assert service in listing, f"reflection {version} does not list {service}"
    # file_containing_symbol (field 4) returns the descriptor that evans/grpcurl need.
    symbol = b"tvix.castore.v1.DirectoryService"
    descriptor = b"".join(reflect(iter([b"\x22" + bytes([len(symbol)]) + symbol])))
    for needed in (b"tvix.castore.v1", b"GetDirectoryRequest", b"PutDirectoryResponse", b"DirectoryNode"):
        assert needed in descriptor, f"reflection {version}: the descriptor lacks {needed}"
    ok(f"server reflection {version} lists the services and serves their descriptors")

print("all checks passed")
