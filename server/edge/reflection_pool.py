"""What server reflection describes: the API's descriptors without the OpenAPI annotations.

`grpcurl describe payments.v1.PaymentService` printed every method's openapiv2 options (pages of
response examples meant for the OpenAPI document) around each rpc line. Those options matter only
to `make gen`; reflection serves the same files with them cleared. The REST mapping
(`google.api.http`) stays: it tells a gRPC user which REST route a method also has.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool

_OPENAPI = "grpc.gateway.protoc_gen_openapiv2."


def _clear_openapi(options) -> None:
    for field, _ in options.ListFields():
        if field.is_extension and field.full_name.startswith(_OPENAPI):
            options.ClearExtension(field)


def _stripped(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    _clear_openapi(file.options)
    for service in file.service:
        _clear_openapi(service.options)
        for method in service.method:
            _clear_openapi(method.options)

    def messages(types):
        for message in types:
            yield message
            yield from messages(message.nested_type)

    for message in messages(file.message_type):
        _clear_openapi(message.options)
        for field in message.field:
            _clear_openapi(field.options)
    return file


def pool_for(*files) -> descriptor_pool.DescriptorPool:
    """A pool holding `files` (FileDescriptors) and everything they import, OpenAPI options cleared."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb)
        pool.Add(_stripped(proto))
        added.add(file.name)

    for file in files:
        add(file)
    return pool
