"""The committed server/schema and server/rpc/pb code is exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = {str(p.relative_to(tmp_path)): p.read_text() for p in module.generate(tmp_path)}
    committed = {
        str(p.relative_to(ROOT / "server")): p.read_text()
        for folder in ("schema", "rpc/pb")
        for p in (ROOT / "server" / folder).iterdir()
        if p.is_file()
    }
    assert sorted(fresh) == sorted(committed), "run: python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}; run: python scripts/gen_protos.py"


def test_wire_compatible_with_tritonclient() -> None:
    """Same field numbers as Triton's messages: our bytes parse as theirs and back, field for field."""
    from tritonclient.grpc import model_config_pb2 as triton_config
    from tritonclient.grpc import service_pb2 as triton

    from server.rpc.pb import grpc_service_pb2 as ours
    from server.schema import model_config_pb2 as our_config

    pairs = [(ours, triton), (our_config, triton_config)]
    for our_module, their_module in pairs:
        for name, descriptor in our_module.DESCRIPTOR.message_types_by_name.items():
            theirs = their_module.DESCRIPTOR.message_types_by_name.get(name)
            if theirs is None:
                continue
            _compare(descriptor, theirs)
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_methods = {m.name: m for m in their_service.methods}
    for method in service.methods:
        if method.name in their_methods:
            other = their_methods[method.name]
            assert method.input_type.name == other.input_type.name
            assert method.output_type.name == other.output_type.name
            streaming = (method.client_streaming, method.server_streaming)
            assert streaming == (other.client_streaming, other.server_streaming)


def _compare(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    their_fields = {f.name: f for f in theirs.fields}
    for field in ours.fields:
        other = their_fields.get(field.name)
        assert other is not None, f"{ours.full_name}.{field.name} is not in Triton's message"
        assert field.number == other.number, f"{ours.full_name}.{field.name}: {field.number} vs {other.number}"
        assert field.type == other.type, f"{ours.full_name}.{field.name} has another type"
        # Repeated-ness: both, or neither.
        assert (field.label == field.LABEL_REPEATED) == (other.label == other.LABEL_REPEATED), field.full_name
    for nested in ours.nested_types:
        other_nested = {n.name: n for n in theirs.nested_types}.get(nested.name)
        if other_nested is not None:
            _compare(nested, other_nested)


def test_schema_and_protocol_share_one_private_pool() -> None:
    """grpc_service.proto imports model_config.proto: both live in server.schema's pool, not the default one."""
    from server.rpc.pb import grpc_service_pb2 as pb
    from server.schema import _pool
    from server.schema import model_config_pb2 as mc

    assert pb.DESCRIPTOR.pool is _pool.POOL and mc.DESCRIPTOR.pool is _pool.POOL
    assert pb.ModelConfigResponse.DESCRIPTOR.fields_by_name["config"].message_type is mc.ModelConfig.DESCRIPTOR
    response = pb.ModelConfigResponse()
    response.config.CopyFrom(mc.ModelConfig(name="m", max_batch_size=4))
    assert pb.ModelConfigResponse.FromString(response.SerializeToString()).config.max_batch_size == 4
