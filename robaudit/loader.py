"""Safe loading of ONNX model files (regular files only, size cap, contained external data).

The file is parsed as an ONNX protobuf whatever its suffix. External data
(``model.onnx`` + ``model.onnx.data``, as PyTorch's default exporter writes) is read
only from regular, non-symlinked, single-link files inside the model's own
directory; anything else is refused before the target is opened.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from robaudit.errors import ExternalDataError, ModelFileError, ModelStructureError

#: Largest model file accepted (protobuf itself cannot exceed 2 GiB).
MAX_MODEL_BYTES = int(os.environ.get("ROBAUDIT_MAX_MODEL_BYTES", 2**31 - 1))
#: Largest total of external data accepted.
MAX_EXTERNAL_BYTES = int(os.environ.get("ROBAUDIT_MAX_EXTERNAL_BYTES", 8 * 2**30))
_EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}

_MAGIC_HINTS: tuple[tuple[bytes, str], ...] = (
    (b"version https://git-lfs", "a Git LFS pointer, not the model (run 'git lfs pull')"),
    (b"<!doctype", "an HTML page, not an ONNX model (was it downloaded from a web page?)"),
    (b"<html", "an HTML page, not an ONNX model (was it downloaded from a web page?)"),
    (b"<?xml", "an XML file, not an ONNX model"),
    (b"PK\x03\x04", "a zip archive, not an ONNX model (unpack it first)"),
    (b"\x80\x02", "a Python pickle, not an ONNX model"),
    (b"{", "a JSON/text file, not an ONNX model"),
)


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model read from disk with its external data resolved in memory."""

    #: The parsed model; external tensors already hold their bytes in ``raw_data``.
    proto: onnx.ModelProto
    #: The path the user gave.
    path: Path
    #: SHA-256 of the model file's bytes (external data not included).
    sha256: str
    #: Size of the model file in bytes.
    size_bytes: int

    @property
    def producer(self) -> str:
        """``producer_name producer_version`` as written by the exporter."""
        return f"{self.proto.producer_name} {self.proto.producer_version}".strip()

    @property
    def opset(self) -> int:
        """The default-domain opset version the model declares."""
        for entry in self.proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return int(entry.version)
        return 0


def load_model(path: str | os.PathLike[str], max_bytes: int = MAX_MODEL_BYTES) -> LoadedModel:
    """Read, parse and check an ONNX file; raise :class:`ModelFileError` on any bad input."""
    model_path = Path(path)
    data = _read_regular_file(model_path, max_bytes)
    proto = _parse(model_path, data)
    _check_opset(model_path, proto)
    _resolve_external_data(proto, model_path)
    return LoadedModel(proto, model_path, hashlib.sha256(data).hexdigest(), len(data))


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"model file '{path}' does not exist") from None
    except OSError as exc:
        raise ModelFileError(f"cannot access model file '{path}': {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(f"'{path}' is a directory, not an ONNX model file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"'{path}' is not a regular file (FIFO, socket or device)")
    if info.st_size == 0:
        raise ModelFileError(f"model file '{path}' is empty")
    if info.st_size > max_bytes:
        raise ModelFileError(f"model file '{path}' is {info.st_size} bytes, more than the limit of {max_bytes}")
    try:
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file '{path}': {exc.strerror}") from None


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    head = data[:64].lstrip().lower()
    for magic, meaning in _MAGIC_HINTS:
        if head.startswith(magic.lower()):
            raise ModelFileError(f"'{path}' is {meaning}")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "protobuf decode error"
        raise ModelFileError(f"'{path}' is not a valid ONNX model (truncated or not a protobuf: {reason})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelFileError(
            f"'{path}' is not a valid ONNX model (no graph, IR version or opset; truncated or not an ONNX file)"
        )
    return proto


def _check_opset(path: Path, proto: onnx.ModelProto) -> None:
    supported = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > supported:
            raise ModelFileError(
                f"'{path}' declares opset {entry.version}, newer than the newest this "
                f"robaudit supports ({supported}); upgrade onnx or export with a lower opset"
            )
        if entry.domain in ("", "ai.onnx") and entry.version < 1:
            raise ModelFileError(f"'{path}' declares an invalid opset version {entry.version}")


def _iter_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph and its subgraphs (initializers and attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def _resolve_external_data(proto: onnx.ModelProto, model_path: Path) -> None:
    base_dir = model_path.parent.resolve()
    budget = MAX_EXTERNAL_BYTES
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        raw = _read_external(tensor, base_dir, budget)
        budget -= len(raw)
        tensor.raw_data = raw
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    fields: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _EXTERNAL_KEYS:
            raise ExternalDataError(
                f"tensor '{tensor.name}': unknown external data key '{entry.key}' "
                f"(expected one of {sorted(_EXTERNAL_KEYS)})"
            )
        fields[entry.key] = entry.value
    if "location" not in fields:
        raise ExternalDataError(f"tensor '{tensor.name}': external data has no location")
    return fields


def _non_negative_int(tensor: onnx.TensorProto, key: str, text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data {key} must be a non-negative integer, got '{text}'"
        )
    return int(text)


def _expected_nbytes(tensor: onnx.TensorProto) -> int:
    if any(dim < 0 for dim in tensor.dims):
        raise ModelStructureError(f"tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise ModelStructureError(f"tensor '{tensor.name}' has an unsupported data type {tensor.data_type}") from None
    return count * itemsize


def _safe_data_path(tensor: onnx.TensorProto, location: str, base_dir: Path) -> Path:
    """Join ``location`` to the model directory, refusing every way out of it."""
    where = f"tensor '{tensor.name}': external data location '{location}'"
    if not location or "\x00" in location:
        raise ExternalDataError(f"{where} is empty or malformed")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise ExternalDataError(f"{where} is absolute; it must lie inside the model directory")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise ExternalDataError(f"{where} contains '..'; it must lie inside the model directory")
    current = base_dir
    for part in parts:
        if part in ("", "."):
            continue
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise ExternalDataError(f"{where} does not exist next to the model") from None
        if stat.S_ISLNK(info.st_mode):
            raise ExternalDataError(f"{where} goes through a symbolic link; refused")
    info = os.lstat(current)
    if not stat.S_ISREG(info.st_mode):
        raise ExternalDataError(f"{where} is not a regular file")
    if info.st_nlink > 1:
        raise ExternalDataError(f"{where} is a hard link (link count {info.st_nlink}); refused")
    return current


def _read_external(tensor: onnx.TensorProto, base_dir: Path, budget: int) -> bytes:
    fields = _external_fields(tensor)
    offset = _non_negative_int(tensor, "offset", fields.get("offset", "0"))
    expected = _expected_nbytes(tensor)
    length = _non_negative_int(tensor, "length", fields.get("length", str(expected)))
    if length != expected:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data length {length} does not match its "
            f"dims {list(tensor.dims)} ({expected} bytes)"
        )
    if length > budget:
        raise ExternalDataError(f"tensor '{tensor.name}': external data exceeds the size limit")
    path = _safe_data_path(tensor, fields["location"], base_dir)
    size = os.lstat(path).st_size
    if offset + length > size:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data file '{fields['location']}' holds "
            f"{size} bytes, shorter than offset {offset} + length {length}"
        )
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)
