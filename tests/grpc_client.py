"""One unary gRPC call with grpcio (the C-core implementation), for tests/grpc.rs.

tonic, the client of the other gRPC tests, is lenient about how a status arrives; C-core is
strict (a Trailers-Only response must be one HEADERS frame with END_STREAM), so this client
checks that lb-agent's refusals are read the same way by a second, independent implementation.

Usage: grpc_client.py HOST:PORT METHOD BODY [--timeout SECONDS] [--id REQ_ID]

Messages are raw bytes (identity serializers), so no protoc is needed. Prints one line,
`<STATUS CODE NAME> <details>`, e.g. `OK pod=127.0.1.5` or `UNAVAILABLE lb-agent: queue full: ...`,
and exits 0 whatever the status (a non-zero exit means the client itself failed).
"""

import argparse
import sys

import grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("method")
    parser.add_argument("body")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--id", default=None)
    args = parser.parse_args()

    # No retries inside the client: the test wants the status lb-agent sent, not a retried one.
    options = [("grpc.enable_retries", 0)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(
            args.method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        metadata = [("x-req-id", args.id)] if args.id else None
        try:
            reply = call(args.body.encode(), timeout=args.timeout, metadata=metadata)
            print("OK", reply.decode(errors="replace"))
        except grpc.RpcError as e:
            print(e.code().name, e.details())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
