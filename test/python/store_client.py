"""An independent PathInfoService client: Debian's python3-grpcio against `nixcas daemon`.

Usage: store_client.py SOCKET GENERATED_DIR STORE_PATH NAR_FILE
STORE_PATH was imported into the daemon's store beforehand; NAR_FILE holds
`nix-store --dump` of the same tree, from which the expected NAR size and
SHA-256 are computed here. nixbase32 is decoded here, independently.
Prints one line per check; exits 1 on the first failure.
"""
import hashlib
import sys

import grpc

SOCKET, GENERATED, STORE_PATH, NAR_FILE = sys.argv[1:5]
sys.path.insert(0, GENERATED)

from checks import expect_code, ok  # noqa: E402

from tvix.castore.v1 import castore_pb2 as tvix_castore  # noqa: E402
from tvix.store.v1 import pathinfo_pb2 as tvix_pathinfo  # noqa: E402
from tvix.store.v1 import rpc_pathinfo_pb2 as tvix_rpc  # noqa: E402
from tvix.store.v1 import rpc_pathinfo_pb2_grpc as tvix_grpc  # noqa: E402
from snix.store.v1 import rpc_pathinfo_pb2 as snix_rpc  # noqa: E402
from snix.store.v1 import rpc_pathinfo_pb2_grpc as snix_grpc  # noqa: E402

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


def nixbase32_decode(text: str) -> bytes:
    out = bytearray(len(text) * 5 // 8)
    for n, char in enumerate(reversed(text)):
        digit = ALPHABET.index(char)
        bit = n * 5
        i, shift = bit // 8, bit % 8
        out[i] |= (digit << shift) & 0xFF
        if i + 1 < len(out):
            out[i + 1] |= digit >> (8 - shift)
    return bytes(out)



channel = grpc.insecure_channel("unix://" + SOCKET)
tvix = tvix_grpc.PathInfoServiceStub(channel)
snix = snix_grpc.PathInfoServiceStub(channel)

basename = STORE_PATH.split("/")[-1]
output_hash = nixbase32_decode(basename[:32])
nar = open(NAR_FILE, "rb").read()

info = tvix.Get(tvix_rpc.GetPathInfoRequest(by_output_hash=output_hash))
assert info.node.WhichOneof("node") == "directory", info
assert info.node.directory.name == basename.encode(), info.node.directory.name
assert info.narinfo.nar_size == len(nar), (info.narinfo.nar_size, len(nar))
assert info.narinfo.nar_sha256 == hashlib.sha256(nar).digest()
assert info.narinfo.ca.type == tvix_pathinfo.NARInfo.CA.NAR_SHA256
assert info.narinfo.ca.digest == hashlib.sha256(nar).digest()
ok(f"Get {basename}: node, NAR size {len(nar)} and SHA-256 match nix-store --dump")

snix_info = snix.Get(snix_rpc.GetPathInfoRequest(by_output_hash=output_hash))
assert snix_info.entry.directory.name == basename.encode()
ok("Get under snix.store.v1 answers with the snix field names")

unnamed = tvix_castore.Node()
unnamed.CopyFrom(info.node)
unnamed.directory.name = b""
calculated = tvix.CalculateNAR(unnamed)
assert calculated.nar_size == len(nar) and calculated.nar_sha256 == hashlib.sha256(nar).digest()
ok("CalculateNAR matches nix-store --dump")

listed = [p.node.directory.name for p in tvix.List(tvix_rpc.ListPathInfoRequest())]
assert basename.encode() in listed, listed
ok(f"List streams {len(listed)} path(s), including {basename}")

expect_code(grpc.StatusCode.NOT_FOUND, lambda: tvix.Get(tvix_rpc.GetPathInfoRequest(by_output_hash=b"\x01" * 20)), "Get of an unknown path")
expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: tvix.Get(tvix_rpc.GetPathInfoRequest(by_output_hash=b"\x01" * 19)), "Get with a 19-byte hash")

# Registered again with a signature, as a substituter would: the signature is added.
signed = tvix_pathinfo.PathInfo()
signed.CopyFrom(info)
signed.narinfo.signatures.add(name="python-test-1", data=b"\x07" * 64)
stored = tvix.Put(signed)
assert [s.name for s in stored.narinfo.signatures][-1:] == ["python-test-1"], stored.narinfo.signatures
again = tvix.Get(tvix_rpc.GetPathInfoRequest(by_output_hash=output_hash))
assert again.narinfo.signatures[-1].name == "python-test-1"
ok("Put of the same path with a new signature adds it; Get returns it")

# Anything else about a registered path does not change: ALREADY_EXISTS, and Get shows what was there.
rewritten = tvix_pathinfo.PathInfo()
rewritten.CopyFrom(signed)
rewritten.references.append(output_hash)
rewritten.narinfo.reference_names.append(basename)
rewritten.narinfo.deriver.name = "made-by"
rewritten.narinfo.deriver.digest = b"\x02" * 20
expect_code(grpc.StatusCode.ALREADY_EXISTS, lambda: tvix.Put(rewritten), "Put of a registered path with other references and deriver")
after = tvix.Get(tvix_rpc.GetPathInfoRequest(by_output_hash=output_hash))
assert list(after.references) == list(again.references) and after.narinfo.deriver.name == again.narinfo.deriver.name
ok("and the registered path is unchanged")


def broken(mutate):
    bad = tvix_pathinfo.PathInfo()
    bad.CopyFrom(info)
    mutate(bad)
    return lambda: tvix.Put(bad)


def unnamed_reference(p):
    p.references.append(output_hash)


def short_sha(p):
    p.narinfo.nar_sha256 = b"\x00" * 31


def not_a_store_path(p):
    p.node.directory.name = b"not-a-store-path"


def no_narinfo(p):
    p.ClearField("narinfo")


def missing_tree(p):
    p.node.directory.digest = b"\x05" * 32


def short_signature(p):
    p.narinfo.signatures.add(name="k", data=b"\x01" * 10)


for mutate in [unnamed_reference, short_sha, not_a_store_path, no_narinfo, missing_tree, short_signature]:
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, broken(mutate), f"Put with {mutate.__name__.replace('_', ' ')}")

# A new path whose tree is in the store, but whose NarHash or NarSize is not that tree's NAR:
# refused, so that what is registered (and signed by a bridge) is what is served.
def lying(field):
    def mutate(p):
        p.node.directory.name = b"1" * 32 + b"-lying-" + field.encode()
        if field == "hash":
            p.narinfo.nar_sha256 = b"\x00" * 32
        else:
            p.narinfo.nar_size += 1
    mutate.__name__ = f"a lying NAR {field}"
    return mutate


for mutate in [lying("hash"), lying("size")]:
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, broken(mutate), f"Put with {mutate.__name__}")
    assert "renders as a NAR" in details, details

final = tvix.Get(tvix_rpc.GetPathInfoRequest(by_output_hash=output_hash))
assert final.node.directory.digest == info.node.directory.digest
ok("refused Puts changed nothing")
print("all checks passed")
