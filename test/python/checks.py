"""What both Python clients share: reporting a check, expecting a gRPC status."""
import grpc


def ok(what):
    print("ok", what, flush=True)


def expect_code(code, fn, what):
    """Calls fn, which must fail with `code`; returns the error's details."""
    try:
        fn()
    except grpc.RpcError as err:
        if err.code() != code:
            raise AssertionError(f"{what}: expected {code}, got {err.code()}: {err.details()}")
        ok(f"{what} -> {code.name}: {err.details()}")
        return err.details()
    raise AssertionError(f"{what}: expected {code}, but the call succeeded")
