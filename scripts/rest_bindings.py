"""Writes gen/rest_bindings.lua from the descriptor set (gen/payments.pb): for every REST route of
the google.api.http annotations, what Envoy's Lua filter needs to keep a request's query string
and body from setting what the path or the body already sets.

Envoy's JSON transcoder binds query parameters after the path and the body, so `?payment_id=B` on
/v1/payments/A/refunds would refund B, and `?refund.note=x` would set a body field. The table lists,
per route, the request fields a query parameter must not name (the path's variables, and the body's
field, or every field when the body is "*"), the request's fields that only a query parameter
carries (a body naming one of them, as `{"expected_refunded_amount": 3}` next to a refund's fields,
would be dropped by the transcoder without a word), and the proto type of every field path the
body can hold (so a number the gateway refuses is named with its field's type, like the
transcoder's own errors). The file is generated, never committed: `scripts/gen.sh` writes it next
to gen/payments.pb, and the Envoy image builds it the same way.

Usage: python scripts/rest_bindings.py DESCRIPTOR_SET OUT_LUA
"""

from __future__ import annotations

import re
import sys

from google.api import annotations_pb2, http_pb2  # noqa: F401  (registers the http option)
from google.protobuf import descriptor_pb2

KINDS = {descriptor_pb2.FieldDescriptorProto.Type.Name(v): v for v in descriptor_pb2.FieldDescriptorProto.Type.values()}


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pattern(template: str) -> str:
    """A Lua pattern for a path template: each {variable} one segment (no '/', no ':')."""
    out = re.sub(r"[%^$().\[\]*+?-]", lambda m: "%" + m.group(0), template)
    out = re.sub(r"\{[^}]*\}", "[^/:]+", out)
    return "^" + out + "$"


def main(descriptor_set: str, out_path: str) -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(open(descriptor_set, "rb").read())
    messages = {}
    for f in files.file:
        def walk(prefix, items):
            for m in items:
                name = f"{prefix}.{m.name}"
                messages[name] = m
                walk(name, m.nested_type)
        walk("." + f.package if f.package else "", f.message_type)

    def kind(field) -> str:
        if field.type == field.TYPE_ENUM:
            return "type.googleapis.com/" + field.type_name.lstrip(".")
        if field.type == field.TYPE_MESSAGE:
            return "type.googleapis.com/" + field.type_name.lstrip(".")
        return descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)

    def field_types(message, prefix: str, depth: int, out: dict) -> None:
        """Every field path below `message` (by proto and JSON name) -> its type, a few levels deep."""
        if depth > 4:
            return
        for field in message.field:
            for name in {field.name, field.json_name or field.name}:
                path = prefix + name
                out[path] = kind(field)
                if field.type == field.TYPE_MESSAGE and field.type_name in messages \
                        and not field.type_name.startswith(".google.protobuf."):
                    field_types(messages[field.type_name], path + ".", depth + 1, out)

    routes = []
    for f in files.file:
        for service in f.service:
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                request = messages[method.input_type]
                names = {fd.name: {fd.name, fd.json_name or fd.name} for fd in request.field}
                for binding in [rule, *rule.additional_bindings]:
                    verb = binding.WhichOneof("pattern")
                    template = getattr(binding, verb) if verb != "custom" else binding.custom.path
                    variables = re.findall(r"\{([^}=]+)", template)
                    forbidden = set()
                    for v in variables:
                        forbidden.add(v)
                        first = v.split(".")[0]
                        forbidden |= {n + v[len(first):] for n in names.get(first, {first})}
                    body = binding.body
                    if body == "*":
                        for n in names.values():
                            forbidden |= n
                    elif body:
                        forbidden |= names.get(body, {body})
                    bound = {v.split(".")[0] for v in variables} | ({body} if body and body != "*" else set())
                    query_only = set()
                    if body and body != "*":
                        for fd in request.field:
                            if fd.name not in bound:
                                query_only |= names[fd.name]
                    types: dict[str, str] = {}
                    if body == "*":
                        field_types(request, "", 0, types)
                    elif body:
                        fd = next(x for x in request.field if x.name == body)
                        field_types(messages[fd.type_name], body + ".", 0, types)
                    prefix = body + "." if body and body != "*" else ""
                    routes.append((verb.upper() if verb != "custom" else binding.custom.kind, template,
                                   sorted(forbidden), sorted(query_only), types, prefix))

    lines = ["-- GENERATED by scripts/rest_bindings.py from proto/ (make gen): do not edit.",
             "-- Per REST route: method, path pattern, template, query names refused (the path's and the",
             "-- body's fields), body keys refused (fields only a query parameter carries), field types.",
             "return {"]
    for verb, template, forbidden, query_only, types, prefix in routes:
        lines.append("  {method = %s, pattern = %s, template = %s, body_prefix = %s," % (
            lua_string(verb), lua_string(pattern(template)), lua_string(template), lua_string(prefix)))
        lines.append("   forbidden = {%s}," % ", ".join(lua_string(n) for n in forbidden))
        lines.append("   query_only = {%s}," % ", ".join(lua_string(n) for n in query_only))
        lines.append("   types = {%s}}," % ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in sorted(types.items())))
    lines.append("}")
    open(out_path, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
