"""The gate's front of TorchServe's gRPC APIs (serving/gate.py runs it beside its HTTP fronts):
it listens on the gRPC ports (PIXTOK_GRPC_INFERENCE_PORT, PIXTOK_GRPC_MANAGEMENT_PORT, on
127.0.0.1 unless PIXTOK_GRPC_HOST opens them) and passes each call on to TorchServe's own gRPC
port on loopback, message bytes as they are (no protobuf decoding here), metadata (the key
too: TorchServe still checks it) and deadline included, answers and streams back as they come.

It changes two answers:

- a missing, wrong or expired key: TorchServe 0.12's PERMISSION_DENIED ("Token Authorization
  failed") becomes UNAUTHENTICATED, the status gRPC clients expect for missing credentials;
- TorchServe not reachable (starting again, stopping): UNAVAILABLE with a plain message.

The methods passed on are those of TorchServe 0.12's protos (inference.proto, management.proto,
open_inference_grpc.proto); any other is UNIMPLEMENTED, as TorchServe answers it.
"""
from __future__ import annotations

import grpc

INFERENCE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
MANAGEMENT = "org.pytorch.serve.grpc.management.ManagementAPIsService"
OPEN_INFERENCE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
# method -> (request streamed, answer streamed)
METHODS = {
    f"/{INFERENCE}/Ping": (False, False),
    f"/{INFERENCE}/Predictions": (False, False),
    f"/{INFERENCE}/StreamPredictions": (False, True),
    f"/{INFERENCE}/StreamPredictions2": (True, True),
    **{f"/{MANAGEMENT}/{name}": (False, False) for name in (
        "DescribeModel", "ListModels", "RegisterModel", "ScaleWorker", "SetDefault",
        "UnregisterModel")},
    **{f"/{OPEN_INFERENCE}/{name}": (False, False) for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer")},
}
KEY_REFUSED = "Token Authorization failed"     # in TorchServe 0.12's PERMISSION_DENIED
MAX_ANSWER_BYTES = 64 * 2**20                   # TorchServe's max_response_size here


def passed_metadata(context) -> tuple:
    """The caller's metadata without what belongs to its own connection."""
    return tuple((k, v) for k, v in context.invocation_metadata()
                 if not k.startswith((":", "grpc-")) and k != "user-agent")


async def refuse(context, failed: grpc.aio.AioRpcError) -> None:
    """Answer with TorchServe's status, the two the gate changes changed."""
    code, details = failed.code(), failed.details() or ""
    if code == grpc.StatusCode.PERMISSION_DENIED and KEY_REFUSED in details:
        code, details = (grpc.StatusCode.UNAUTHENTICATED,
                         "send the key as metadata `authorization: Bearer <key>` (the inference "
                         "or management key of key_file.json in the run folder; docs/serving.md)")
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = ("the model server is not reachable: it is starting again or stopping; "
                   "retry after 1 s")
    await context.abort(code, details)


class GrpcFront:
    """A generic handler that passes every method of METHODS on to `upstream` (HOST:PORT)."""

    def __init__(self, upstream: str, max_body: int):
        self.upstream, self.max_body = upstream, max_body
        self.channel: grpc.aio.Channel | None = None

    def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.upstream, options=[
            ("grpc.max_send_message_length", self.max_body),
            ("grpc.max_receive_message_length", MAX_ANSWER_BYTES)])

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def handler(self, method: str, streamed_in: bool, streamed_out: bool):
        def upstream_call(context):
            make = {(False, False): self.channel.unary_unary,
                    (False, True): self.channel.unary_stream,
                    (True, True): self.channel.stream_stream}[(streamed_in, streamed_out)]
            return make(method), {"metadata": passed_metadata(context),
                                  "timeout": context.time_remaining()}

        async def one(request, context):
            call, options = upstream_call(context)
            try:
                return await call(request, **options)
            except grpc.aio.AioRpcError as e:
                await refuse(context, e)

        async def stream(request, context):
            call, options = upstream_call(context)
            answers = call(request, **options)
            try:
                async for answer in answers:
                    yield answer
            except grpc.aio.AioRpcError as e:
                await refuse(context, e)
            finally:
                answers.cancel()      # the caller has gone: so does the call behind it

        if not streamed_out:
            return grpc.unary_unary_rpc_method_handler(one)
        if not streamed_in:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.stream_stream_rpc_method_handler(stream)


SERVICES = {"inference": (INFERENCE, OPEN_INFERENCE), "management": (MANAGEMENT,)}


class Route(grpc.GenericRpcHandler):
    """The methods of one port's services to its front; any other method: None (UNIMPLEMENTED)."""

    def __init__(self, front: GrpcFront, services: tuple[str, ...]):
        self.front, self.services = front, services

    def service(self, details):
        kinds = METHODS.get(details.method)
        if kinds is None or details.method.split("/")[1] not in self.services:
            return None
        return self.front.handler(details.method, *kinds)


def make_grpc_server(api: str, listen: str, upstream: str, max_body: int):
    """A grpc.aio server for one API (inference or management) listening on `listen`
    (HOST:PORT) and passing its calls on to `upstream`; returns (server, front), the front
    still to open()."""
    front = GrpcFront(upstream, max_body)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_body),
                                      ("grpc.max_send_message_length", MAX_ANSWER_BYTES),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((Route(front, SERVICES[api]),))
    server.add_insecure_port(listen)
    return server, front
