# Against a `nixcas daemon --read-only`: every Put is PERMISSION_DENIED and stores nothing,
# reads work. argv: socket, generated stubs directory, hex digest of a blob that is stored.
import sys

sys.path.insert(0, sys.argv[2])
import grpc  # noqa: E402
from tvix.castore.v1 import castore_pb2, rpc_blobstore_pb2, rpc_blobstore_pb2_grpc, rpc_directory_pb2_grpc  # noqa: E402
from tvix.store.v1 import pathinfo_pb2, rpc_pathinfo_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel('unix:' + sys.argv[1])
blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
directories = rpc_directory_pb2_grpc.DirectoryServiceStub(channel)
pathinfos = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(channel)


def refused(what, call):
    try:
        call()
    except grpc.RpcError as e:
        print(f'{what}: {e.code().name}: {e.details()}')
        return
    print(f'{what}: ACCEPTED')


refused('BlobService.Put', lambda: blobs.Put(iter([rpc_blobstore_pb2.BlobChunk(data=b'not to be stored')])))
refused('DirectoryService.Put', lambda: directories.Put(iter([castore_pb2.Directory()])))
refused('PathInfoService.Put', lambda: pathinfos.Put(pathinfo_pb2.PathInfo()))
stored = bytes.fromhex(sys.argv[3])
data = b''.join(chunk.data for chunk in blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=stored)))
print(f'BlobService.Read: {len(data)} bytes')
