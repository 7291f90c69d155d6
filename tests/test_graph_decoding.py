"""Decoding of initializers and attributes (the speed work of README "Speed", checked for equality and refusals).

Weights are viewed in place in the model file's bytes (``loader.initializer_spans`` +
``onnx_graph.tensor_to_array``) instead of copied out of the protobuf message; these
tests compare every such array with ``numpy_helper.to_array`` of the parsed message (an
independent decoder), check that the view really lies in the file's bytes (so a silent
fallback would fail them), and that malformed data is refused or left to onnx. The
static attribute-type table is compared with ``onnx.defs`` over all opset versions.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from robaudit.errors import ModelStructureError
from robaudit.graph.loader import initializer_spans, load_model, skeleton_of
from robaudit.graph.onnx_graph import build_graph
from robaudit.graph.ops import supported_op_types
from robaudit.graph.ops.base import attribute_table

_ATTRIBUTE_TYPES = attribute_table()

#: name → array of every plain dtype, scalars and odd shapes included.
ARRAYS = {
    "f32": np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 7,
    "f16": np.linspace(-2, 2, 10).astype(np.float16).reshape(2, 5),
    "i8": np.array([[-128, -1, 0, 1, 127]], dtype=np.int8),
    "f64": np.array([np.pi, -np.e, 1e-300, 5e-324], dtype=np.float64),
    "u8": np.arange(7, dtype=np.uint8),
    "i64": np.array([-(2**62), 3, 2**40], dtype=np.int64),
    "i32": np.array([[-7], [9]], dtype=np.int32),
    "scalar": np.array(2.5, dtype=np.float32),
    "boolean": np.array([True, False, True]),
    "cube": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
}


def save(tmp_path, initializers: list[TensorProto], nodes=None, name: str = "m.onnx") -> str:
    """A model holding ``initializers``; its one node (an Identity of ``f32`` unless given) is never run."""
    graph = helper.make_graph(
        nodes or [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return str(path)


def test_views_equal_to_array_and_lie_in_the_file_bytes(tmp_path) -> None:
    path = save(tmp_path, [numpy_helper.from_array(a, n) for n, a in ARRAYS.items()])
    loaded = load_model(path)
    graph = build_graph(loaded.proto, loaded.initializer_bytes)
    assert loaded.initializer_bytes is not None and all(v is not None for v in loaded.initializer_bytes)
    for tensor, raw in zip(loaded.proto.graph.initializer, loaded.initializer_bytes, strict=True):
        array, reference = graph.initializers[tensor.name], numpy_helper.to_array(tensor)
        assert array.dtype == reference.dtype and array.shape == reference.shape, tensor.name
        np.testing.assert_array_equal(array, reference, err_msg=tensor.name)
        np.testing.assert_array_equal(array, ARRAYS[tensor.name], err_msg=tensor.name)
        assert np.shares_memory(array, np.frombuffer(raw, np.uint8)), f"{tensor.name} was copied"
        assert not array.flags.writeable


def test_spans_are_the_raw_data_protobuf_reads(tmp_path) -> None:
    """Independent check of the wire walk: each span's bytes equal ``TensorProto.raw_data``."""
    path = save(tmp_path, [numpy_helper.from_array(a, n) for n, a in ARRAYS.items()])
    data = open(path, "rb").read()
    proto = onnx.load_from_string(data)
    spans = initializer_spans(data)
    assert spans is not None and len(spans) == len(proto.graph.initializer)
    for (offset, length), tensor in zip(spans, proto.graph.initializer, strict=True):
        assert data[offset : offset + length] == tensor.raw_data


def test_typed_fields_and_external_data_fall_back_to_onnx(tmp_path) -> None:
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [2, 2], [1.0, -2.0, 3.5, 4.0])  # float_data, no raw_data
    external = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "ext")
    plain = numpy_helper.from_array(ARRAYS["f32"], "plain")
    model_path = tmp_path / "m.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [typed, external, plain],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.external_data_helper.convert_model_to_external_data(model, location="m.data", size_threshold=16)
    onnx.save(model, str(model_path))
    loaded = load_model(model_path)
    views = dict(zip([t.name for t in loaded.proto.graph.initializer], loaded.initializer_bytes, strict=True))
    assert views["typed"] is None and views["ext"] is None
    built = build_graph(loaded.proto, loaded.initializer_bytes)
    np.testing.assert_array_equal(built.initializers["typed"], [[1.0, -2.0], [3.5, 4.0]])
    np.testing.assert_array_equal(built.initializers["ext"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(built.initializers["plain"], ARRAYS["f32"])


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.arange(5, dtype=np.float32).tobytes(), "holds 5 values|reshape|unreadable"),  # short
        (np.arange(7, dtype=np.float32).tobytes(), "holds 7 values|reshape|unreadable"),  # long
        (np.arange(6, dtype=np.float32).tobytes()[:-1], "unreadable"),  # not a multiple of 4
    ],
)
def test_raw_data_not_matching_the_dims_is_refused(tmp_path, values: bytes, match: str) -> None:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3], raw_data=values)
    loaded = load_model(save(tmp_path, [tensor]))
    assert loaded.initializer_bytes is not None and loaded.initializer_bytes[0] is not None
    with pytest.raises(ModelStructureError, match=match):
        build_graph(loaded.proto, loaded.initializer_bytes)


def test_repeated_fields_follow_protobuf(tmp_path) -> None:
    """A repeated ``raw_data`` (the last wins) or ``graph`` (merged) is left to protobuf's reading."""
    first = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    second = np.array([1.0, 2.0, 3.0], np.float32).tobytes()
    tensor_bytes = first.SerializeToString() + b"\x4a" + bytes([len(second)]) + second  # field 9, length-delimited
    assert TensorProto.FromString(tensor_bytes).raw_data == second
    model = onnx.load(save(tmp_path, []))
    graph_bytes = model.graph.SerializeToString() + b"\x2a" + _varint(len(tensor_bytes)) + tensor_bytes  # field 5
    model.ClearField("graph")
    path = tmp_path / "twice.onnx"
    path.write_bytes(model.SerializeToString() + b"\x3a" + _varint(len(graph_bytes)) + graph_bytes)  # field 7
    loaded = load_model(path)
    assert loaded.proto.graph.initializer[0].raw_data == second
    assert loaded.initializer_bytes == (None,)
    np.testing.assert_array_equal(build_graph(loaded.proto, loaded.initializer_bytes).initializers["w"], [1, 2, 3])

    data = open(path, "rb").read()
    extra = onnx.GraphProto(initializer=[numpy_helper.from_array(np.ones(2, np.float32), "v")]).SerializeToString()
    merged = data + b"\x3a" + _varint(len(extra)) + extra  # ModelProto field 7 once more: merged by protobuf
    (tmp_path / "merged.onnx").write_bytes(merged)
    loaded = load_model(tmp_path / "merged.onnx")
    assert loaded.initializer_bytes is None and len(loaded.proto.graph.initializer) == 2
    built = build_graph(loaded.proto, loaded.initializer_bytes)
    np.testing.assert_array_equal(built.initializers["v"], [1, 1])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def test_wire_walk_never_raises_on_damaged_bytes(tmp_path) -> None:
    """Every prefix and many single-byte changes: None or spans inside the bytes, never an exception."""
    data = open(save(tmp_path, [numpy_helper.from_array(a, n) for n, a in ARRAYS.items()]), "rb").read()
    rng = np.random.default_rng(0)
    damaged = [data[:cut] for cut in range(len(data))]
    for _ in range(400):
        copy = bytearray(data)
        copy[rng.integers(len(copy))] = rng.integers(256)
        damaged.append(bytes(copy))
    for blob in damaged:
        spans = initializer_spans(blob)
        for span in spans or ():
            assert span is None or (span[0] >= 0 and span[0] + span[1] <= len(blob))


def test_attribute_table_matches_onnx_defs() -> None:
    declared: dict[str, dict[str, set[int]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "" and schema.name in _ATTRIBUTE_TYPES:
            for name, attribute in schema.attributes.items():
                declared[schema.name][name].add(int(attribute.type))
    for op, table in _ATTRIBUTE_TYPES.items():
        ours = {name: set(t if isinstance(t, tuple) else (t,)) for name, t in table.items()}
        assert ours == dict(declared[op]), op
    # robaudit's own fused nodes, and scikit-learn's Scaler (domain ai.onnx.ml, not in onnx.defs' default domain)
    fused = {
        "GatedActivation",
        "ScaledSoftplus",
        "LayerNormPattern",
        "RMSNormPattern",
        "Scaler",
        "QuantizeDequantize",
        "FloatRound",
        "NanGuard",
        "GruUpdate",
        "ChannelClip",
        "DynamicRound",
    }
    rules = set(supported_op_types()) - fused
    assert rules <= set(_ATTRIBUTE_TYPES), f"ops with rules but no attribute types: {rules - set(_ATTRIBUTE_TYPES)}"


@pytest.mark.parametrize(
    ("attribute", "match"),
    [
        (helper.make_attribute("alpha", "two"), r"attribute 'alpha' must be FLOAT, got STRING"),
        (helper.make_attribute("transB", [1, 1]), r"attribute 'transB' must be INT, got INTS"),
        (onnx.AttributeProto(name="alpha", f=2.0), r"attribute 'alpha' has no type"),
    ],
)
def test_attribute_of_the_wrong_type_is_refused(tmp_path, attribute, match: str) -> None:
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")
    node.attribute.append(attribute)
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    loaded = load_model(save(tmp_path, [w], nodes=[node]))
    with pytest.raises(ModelStructureError, match=match):
        build_graph(loaded.proto, loaded.initializer_bytes)


def test_attribute_types_of_other_versions_and_domains_are_accepted(tmp_path) -> None:
    cast = helper.make_node("Cast", ["x"], ["c"], to="FLOAT")  # Cast-1 declared 'to' a STRING
    custom = helper.make_node("Gemm", ["c"], ["y"], domain="my.domain", alpha="anything")
    loaded = load_model(save(tmp_path, [], nodes=[cast, custom]))
    graph = build_graph(loaded.proto, loaded.initializer_bytes)
    assert [n.attrs for n in graph.nodes] == [{"to": "FLOAT"}, {"alpha": "anything"}]


def _parsed(blob: bytes) -> onnx.ModelProto | None:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(blob)
    except Exception:  # protobuf's decode errors differ between its backends
        return None
    return model


def _filled(skeleton: onnx.ModelProto, blob: bytes, spans) -> onnx.ModelProto:
    """The skeleton with each span's bytes put back as its initializer's raw_data (the loader's rule, redone here)."""
    whole = onnx.ModelProto()
    whole.CopyFrom(skeleton)
    for tensor, span in zip(whole.graph.initializer, spans, strict=True):
        if span is not None:
            assert tensor.HasField("raw_data") and tensor.raw_data == b"", tensor.name
            tensor.raw_data = blob[span[0] : span[0] + span[1]]
    return whole


def test_skeleton_parses_to_the_model_without_its_weight_bytes(tmp_path) -> None:
    """Parsing the skeleton and putting the spans back gives exactly what protobuf parses from the file."""
    big = np.arange(50_000, dtype=np.float32).reshape(250, 200)
    tensors = [numpy_helper.from_array(a, n) for n, a in {**ARRAYS, "big": big}.items()]
    tensors.append(helper.make_tensor("typed", TensorProto.FLOAT, [2], [1.0, 2.0]))  # float_data: kept whole
    path = save(tmp_path, tensors)
    data = open(path, "rb").read()
    skeleton, spans = skeleton_of(data)
    assert spans == initializer_spans(data) and spans[-1] is None
    assert len(skeleton) < 4096 < len(data), "the weights were not taken out"
    assert _filled(onnx.load_from_string(skeleton), data, spans) == onnx.load_from_string(data)
    loaded = load_model(path)
    assert loaded.skeleton.ByteSize() < 4096
    assert loaded.proto == onnx.load(path)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    np.testing.assert_array_equal(build_graph(loaded.skeleton, loaded.initializer_bytes).initializers["big"], big)


def test_skeleton_of_damaged_bytes_parses_exactly_when_the_bytes_do(tmp_path) -> None:
    """Every prefix and many single-byte changes: the skeleton is valid iff the file is, and then the same model."""
    data = open(save(tmp_path, [numpy_helper.from_array(a, n) for n, a in ARRAYS.items()]), "rb").read()
    rng = np.random.default_rng(1)
    damaged = [data[:cut] for cut in range(0, len(data), 3)]
    for _ in range(400):
        copy = bytearray(data)
        copy[rng.integers(len(copy))] = rng.integers(256)
        damaged.append(bytes(copy))
    stripped_some = 0
    for blob in damaged:
        result = skeleton_of(blob)
        if result is None:
            continue
        skeleton, spans = result
        stripped_some += any(span is not None for span in spans)
        reference, parsed = _parsed(blob), _parsed(skeleton)
        assert (reference is None) == (parsed is None), blob
        if parsed is not None:
            assert _filled(parsed, blob, spans) == reference
    assert stripped_some > 200


def test_non_canonical_keys_are_parsed_whole(tmp_path) -> None:
    """A key in a longer varint encoding is valid protobuf; the skeleton is not attempted, the file still loads."""
    tensor = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    body = tensor.SerializeToString()
    raw = tensor.raw_data
    body = body.replace(b"\x4a" + bytes([len(raw)]) + raw, b"\xca\x00" + bytes([len(raw)]) + raw)  # key 9/LD in 2 bytes
    assert TensorProto.FromString(body).raw_data == raw
    model = onnx.load(save(tmp_path, []))
    graph = model.graph.SerializeToString() + b"\x2a" + _varint(len(body)) + body
    model.ClearField("graph")
    path = tmp_path / "long_key.onnx"
    path.write_bytes(model.SerializeToString() + b"\x3a" + _varint(len(graph)) + graph)
    data = path.read_bytes()
    assert initializer_spans(data) is not None and skeleton_of(data) is None
    loaded = load_model(path)
    built = build_graph(loaded.skeleton, loaded.initializer_bytes)
    np.testing.assert_array_equal(built.initializers["w"], np.arange(4))
