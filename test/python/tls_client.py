# Against `nixcas daemon --tls-cert … --tls-client-ca …`: a Put and a Read over TLS with a client
# certificate; then a channel without one and one with a certificate from another CA, which the
# server must refuse; then, on a read-only TLS listener, a Read that works and a Put that is refused.
# argv: host:port, generated stubs directory, CA, client certificate, client key, the other CA's
# client certificate and key, the read-only listener's host:port.
import sys

sys.path.insert(0, sys.argv[2])
import grpc  # noqa: E402
from tvix.castore.v1 import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc  # noqa: E402

target, _, ca, cert, key, stranger_cert, stranger_key, read_only_target = sys.argv[1:9]
read = lambda path: open(path, 'rb').read()  # noqa: E731
with_cert = grpc.secure_channel(target, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))
blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(with_cert)
digest = blobs.Put(iter([rpc_blobstore_pb2.BlobChunk(data=b'over tls\n')]), timeout=20).digest
data = b''.join(c.data for c in blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest), timeout=20))
print(f'with a client certificate: put and read {len(data)} bytes, digest {digest.hex()}')


def outcome(call):
    """ACCEPTED, or the status code the server answered with."""
    try:
        call()
        return 'ACCEPTED'
    except grpc.RpcError as e:
        return e.code().name


def stat_with(credentials):
    stub = rpc_blobstore_pb2_grpc.BlobServiceStub(grpc.secure_channel(target, credentials))
    return outcome(lambda: stub.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=digest), timeout=10))


print(f'without a client certificate: {stat_with(grpc.ssl_channel_credentials(read(ca)))}')
print(f'with a certificate from another CA: {stat_with(grpc.ssl_channel_credentials(read(ca), read(stranger_key), read(stranger_cert)))}')
fleet = rpc_blobstore_pb2_grpc.BlobServiceStub(grpc.secure_channel(read_only_target, grpc.ssl_channel_credentials(read(ca), read(key), read(cert))))
data = b''.join(c.data for c in fleet.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest), timeout=20))
put = outcome(lambda: fleet.Put(iter([rpc_blobstore_pb2.BlobChunk(data=b'not to be stored')]), timeout=20))
print(f'read-only listener: read {len(data)} bytes; Put: {put}')
