"""Safe loading of ONNX model files (regular files only, size cap, contained external data).

The file is parsed as an ONNX protobuf whatever its suffix. External data
(``model.onnx`` + ``model.onnx.data``, as PyTorch's default exporter writes) is read
only from regular, non-symlinked, single-link files inside the model's own
directory; anything else is refused before the target is opened.

The loader keeps the file's bytes and finds, by walking the protobuf wire format
(:func:`initializer_spans`), where the ``raw_data`` of each top-level initializer
lies in them. Protobuf then parses a *skeleton* of the file, the same bytes with
those ``raw_data`` fields emptied (:func:`skeleton_of`), and
:func:`robaudit.graph.onnx_graph.build_graph` views the weights in place: parsing the
whole file would copy every weight into the message (~20 ms for 10 million float32
weights) and reading ``TensorProto.raw_data`` would copy it once more. The complete
message (:attr:`LoadedModel.proto`) is assembled only when something asks for it
(fault injection, weight rescaling).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from robaudit.errors import ExternalDataError, ModelFileError, ModelStructureError
from robaudit.limits import max_external_bytes, max_model_bytes

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

    #: The parsed model, except that the ``raw_data`` of each initializer with an entry in
    #: ``initializer_bytes`` is empty (present, zero bytes): those bytes are the entry.
    #: External tensors already hold their bytes in ``raw_data``. See :attr:`proto`.
    skeleton: onnx.ModelProto
    #: The path the user gave.
    path: Path
    #: The bytes of each top-level initializer's ``raw_data`` as they lie in the file, in the
    #: order of ``skeleton.graph.initializer`` (None for one whose data is not a single
    #: ``raw_data`` field of the file: external, typed fields, ...); None when the file's
    #: structure is not the plain one :func:`initializer_spans` understands (the skeleton
    #: is then the whole model). They describe the proto as loaded: a copy whose
    #: initializers were changed must not be given them.
    initializer_bytes: tuple[memoryview | None, ...] | None = field(default=None, repr=False, compare=False)
    #: Gives the SHA-256 of the file once the background hash is done.
    digest: Callable[[], str] = field(default=lambda: "", repr=False, compare=False)

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the model file's bytes (external data not included)."""
        return self.digest()

    @cached_property
    def proto(self) -> onnx.ModelProto:
        """The complete model: the skeleton with every initializer's ``raw_data`` filled in (a copy)."""
        if not self.initializer_bytes or all(raw is None for raw in self.initializer_bytes):
            return self.skeleton
        whole = onnx.ModelProto()
        whole.CopyFrom(self.skeleton)
        for tensor, raw in zip(whole.graph.initializer, self.initializer_bytes, strict=True):
            if raw is not None:
                tensor.raw_data = bytes(raw)
        return whole

    @property
    def producer(self) -> str:
        """``producer_name producer_version`` as written by the exporter."""
        return f"{self.skeleton.producer_name} {self.skeleton.producer_version}".strip()

    @property
    def opset(self) -> int:
        """The default-domain opset version the model declares."""
        for entry in self.skeleton.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return int(entry.version)
        return 0


def load_model(path: str | os.PathLike[str], max_bytes: int | None = None) -> LoadedModel:
    """Read, parse and check an ONNX file; raise :class:`ModelFileError` on any bad input.

    The SHA-256 of the file is computed on another thread meanwhile; reading
    :attr:`LoadedModel.sha256` waits for it.
    """
    model_path = Path(path)
    data = _read_regular_file(model_path, max_model_bytes() if max_bytes is None else max_bytes)
    digest = _sha256_meanwhile(data)
    _check_magic(model_path, data)
    stripped = skeleton_of(data)
    if stripped is None:
        proto, views = _parse(model_path, data), None
    else:
        skeleton, spans = stripped
        proto = _parse(model_path, skeleton)
        whole = memoryview(data)
        views = tuple(None if span is None else whole[span[0] : span[0] + span[1]] for span in spans)
    _check_opset(model_path, proto)
    _resolve_external_data(proto, model_path)
    return LoadedModel(proto, model_path, views, digest)


#: Files at least this large are hashed in a background thread while protobuf parses them.
_THREADED_HASH_BYTES = 2**20


def _sha256_meanwhile(data: bytes) -> Callable[[], str]:
    """Start hashing ``data``; return a function giving the SHA-256 hex digest once it is done.

    hashlib releases the GIL while it hashes a large buffer, so on a large file the
    hash runs on another core during the parse instead of after it.
    """
    hasher = hashlib.sha256()
    if len(data) < _THREADED_HASH_BYTES:
        hasher.update(data)
        return hasher.hexdigest
    worker = threading.Thread(target=hasher.update, args=(data,), name="robaudit-sha256", daemon=True)
    worker.start()

    def digest() -> str:
        worker.join()
        return hasher.hexdigest()

    return digest


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, never blocking on a FIFO and never leaving its directory.

    A symbolic link is followed only when its target lies in the link's own directory
    (or below): a model path must not smuggle in a file from elsewhere. The file is
    opened non-blocking and checked again through the open descriptor, so it cannot be
    swapped for a FIFO or another file between the check and the read.
    """
    target = _contained_target(path)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        raise ModelFileError(f"model file '{path}' does not exist") from None
    except OSError as exc:
        raise ModelFileError(f"cannot access model file '{path}': {exc.strerror}") from None
    _check_model_stat(path, info, max_bytes)
    try:
        fd = os.open(target, os.O_RDONLY | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file '{path}': {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise ModelFileError(f"model file '{path}' changed while it was being opened")
        try:
            return _read_exactly(handle, opened.st_size, max_bytes)
        except OSError as exc:
            raise ModelFileError(f"cannot read model file '{path}': {exc.strerror}") from None


_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _contained_target(path: Path) -> Path:
    """``path`` itself, or the target of a symbolic link that stays in the link's directory."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return path
    except FileNotFoundError:
        raise ModelFileError(f"model file '{path}' does not exist") from None
    except OSError as exc:
        raise ModelFileError(f"cannot access model file '{path}': {exc.strerror}") from None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        raise ModelFileError(f"model file '{path}' is a symbolic link to a file that does not exist") from None
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise ModelFileError(f"cannot access model file '{path}': symbolic link loop") from None
    home = path.parent.resolve()
    if not target.is_relative_to(home):
        raise ModelFileError(
            f"'{path}' is a symbolic link to '{target}', outside its directory; refused "
            "(pass the target's own path if you trust it)"
        )
    return target


def _check_model_stat(path: Path, info: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(f"'{path}' is a directory, not an ONNX model file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"'{path}' is not a regular file (FIFO, socket or device)")
    if info.st_size == 0:
        raise ModelFileError(f"model file '{path}' is empty")
    if info.st_size > max_bytes:
        raise ModelFileError(f"model file '{path}' is {info.st_size} bytes, more than the limit of {max_bytes}")


def _read_exactly(handle, size: int, max_bytes: int) -> bytes:
    """Read the ``size`` bytes ``fstat`` announced, refusing a file that grew meanwhile.

    Reading exactly ``size`` bytes (not ``size + 1``) lets Python fill the bytes object
    in place; a one-byte over-read would make it shrink, i.e. copy, the whole model.
    """
    data = handle.read(min(size, max_bytes))
    if handle.read(1):
        raise OSError(0, "the file grew while it was being read")
    return data


#: What to do with a PyTorch checkpoint instead of auditing it.
TORCH_EXPORT_HINT = (
    "export the model to ONNX first: torch.onnx.export(model, example_input, 'model.onnx') "
    "with the model's class loaded and example_input a tensor of one input's shape"
)


def _is_torch_checkpoint(path: Path, data: bytes) -> bool:
    """torch.save writes a zip holding ``*/data.pkl`` (or, before PyTorch 1.6, a bare pickle)."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist()[:10_000])
        except Exception:  # only a guess at what the file is: a broken zip is just not a checkpoint
            return False
    return data[:1] == b"\x80" and path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin")


def _check_magic(path: Path, data: bytes) -> None:
    """Name the common non-ONNX files (HTML page, LFS pointer, zip, ...) by their first bytes."""
    if _is_torch_checkpoint(path, data):
        raise ModelFileError(
            f"'{path}' looks like a PyTorch checkpoint (torch.save), not an ONNX model; " + TORCH_EXPORT_HINT
        )
    head = data[:64].lstrip().lower()
    for magic, meaning in _MAGIC_HINTS:
        if head.startswith(magic.lower()):
            raise ModelFileError(f"'{path}' is {meaning}")


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
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
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    """Every TensorProto held by the attributes of ``nodes``, subgraphs included."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in [attr.sparse_tensor, *attr.sparse_tensors]:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def _model_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model: main graph, local functions, training graphs.

    All of them are resolved (or refused) here, so that no later consumer — onnx,
    onnxruntime — ever resolves an external path on its own.
    """
    yield from _iter_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)
    for training in proto.training_info:
        yield from _iter_tensors(training.initialization)
        yield from _iter_tensors(training.algorithm)


def _resolve_external_data(proto: onnx.ModelProto, model_path: Path) -> None:
    base_dir = model_path.parent.resolve()
    budget = max_external_bytes()
    for tensor in _model_tensors(proto):
        if tensor.external_data and tensor.data_location != onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]  # ignored by the ONNX spec; dropped so nobody else reads it
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
        if entry.key in fields:
            raise ExternalDataError(f"tensor '{tensor.name}': external data key '{entry.key}' is given twice")
        fields[entry.key] = entry.value
    if "location" not in fields:
        raise ExternalDataError(f"tensor '{tensor.name}': external data has no location")
    return fields


def _non_negative_int(tensor: onnx.TensorProto, key: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
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
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ExternalDataError(f"tensor '{tensor.name}': string tensors cannot be stored as external data")
    return count * itemsize


def _location_parts(tensor: onnx.TensorProto, location: str) -> list[str]:
    """The path components of ``location``, refusing every way out of the model directory."""
    where = f"tensor '{tensor.name}': external data location '{location}'"
    if not location or "\x00" in location:
        raise ExternalDataError(f"{where} is empty or malformed")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise ExternalDataError(f"{where} is absolute; it must lie inside the model directory")
    parts = [p for p in location.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ExternalDataError(f"{where} contains '..'; it must lie inside the model directory")
    if not parts:
        raise ExternalDataError(f"{where} names the model directory itself, not a file")
    return parts


def _open_inside(tensor: onnx.TensorProto, location: str, base_dir: Path) -> int:
    """Open the data file component by component below ``base_dir``; return its descriptor.

    Every component is examined with ``lstat`` relative to the directory opened before
    it and then opened with ``O_NOFOLLOW`` (directories with ``O_DIRECTORY``), so no
    symbolic link is ever followed, a FIFO or device is refused before it is opened,
    and nothing can be swapped in between: the opened file is compared (device, inode)
    with what was examined. Hard links (link count > 1) are refused: their other name
    may lie anywhere.
    """
    where = f"tensor '{tensor.name}': external data location '{location}'"
    parts = _location_parts(tensor, location)
    if os.open not in os.supports_dir_fd or os.stat not in os.supports_dir_fd:  # pragma: no cover - Windows
        raise ExternalDataError(f"{where}: external data can be read safely only on POSIX systems")
    dir_fd = os.open(base_dir, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            info = _lstat_at(part, dir_fd, where)
            if stat.S_ISLNK(info.st_mode):
                raise ExternalDataError(f"{where} goes through a symbolic link; refused")
            if not last and not stat.S_ISDIR(info.st_mode):
                raise ExternalDataError(f"{where}: '{part}' is not a directory")
            if last and not stat.S_ISREG(info.st_mode):
                raise ExternalDataError(f"{where} is not a regular file")
            if last and info.st_nlink > 1:
                raise ExternalDataError(f"{where} is a hard link (link count {info.st_nlink}); refused")
            flags = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | (_O_NONBLOCK if last else _O_DIRECTORY)
            try:
                fd = os.open(part, flags, dir_fd=dir_fd)
            except OSError as exc:
                raise ExternalDataError(f"{where} cannot be opened: {exc.strerror}") from None
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                os.close(fd)
                raise ExternalDataError(f"{where} changed while it was being opened; refused")
            os.close(dir_fd)
            dir_fd = fd
        return os.dup(dir_fd)
    finally:
        os.close(dir_fd)


_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _lstat_at(name: str, dir_fd: int, where: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise ExternalDataError(f"{where} does not exist next to the model") from None
    except OSError as exc:
        raise ExternalDataError(f"{where} cannot be examined: {exc.strerror}") from None


def _read_external(tensor: onnx.TensorProto, base_dir: Path, budget: int) -> bytes:
    fields = _external_fields(tensor)
    offset = _non_negative_int(tensor, "offset", fields.get("offset", "0"))
    expected = _expected_nbytes(tensor)
    if expected > budget:
        raise ExternalDataError(
            f"tensor '{tensor.name}': its dims {list(tensor.dims)} need {expected} bytes of external data, "
            f"more than the limit of {max_external_bytes()}"
        )
    length = _non_negative_int(tensor, "length", fields.get("length", str(expected)))
    if length != expected:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data length {length} does not match its "
            f"dims {list(tensor.dims)} ({expected} bytes)"
        )
    fd = _open_inside(tensor, fields["location"], base_dir)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if offset + length > size:
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data file '{fields['location']}' holds "
                f"{size} bytes, shorter than offset {offset} + length {length}"
            )
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise ExternalDataError(f"tensor '{tensor.name}': external data file '{fields['location']}' was cut short")
    return data


class _NotPlain(Exception):
    """The bytes are not the plain protobuf encoding :func:`initializer_spans` reads."""


#: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data (onnx.proto field numbers).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
#: TensorProto fields that make ``raw_data`` not the whole story: segment, float/int32/string/
#: int64/double/uint64 data, external_data (data_location, 14, is checked for a non-zero value).
_TENSOR_OTHER_DATA = frozenset({3, 4, 5, 6, 7, 10, 11, 13})
_TENSOR_DATA_LOCATION = 14
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def initializer_spans(data: bytes) -> tuple[tuple[int, int] | None, ...] | None:
    """(offset, length) in ``data`` of the ``raw_data`` of each top-level initializer, in order.

    ``data`` is a serialized ModelProto. Only the path ModelProto.graph (7) →
    GraphProto.initializer (5) → TensorProto.raw_data (9) is walked; every other field
    is skipped by its length. Where protobuf's rules would merge or override fields,
    the answer is None instead of a guess: None for the whole model when ``graph``
    occurs more than once (protobuf merges the occurrences) or the bytes use groups or
    are cut short; None for one initializer whose ``raw_data`` occurs twice (the last
    wins), is absent, or comes with typed data, segments, external data or a
    non-default data location. A field of the expected number but the wrong wire type
    is skipped, as protobuf keeps it as an unknown field.
    """
    walked = _walk_initializers(data)
    return None if walked is None else tuple(None if raw is None else raw[2:] for _, raw in walked[1])


def skeleton_of(data: bytes) -> tuple[bytes, tuple[tuple[int, int] | None, ...]] | None:
    """``data`` with the ``raw_data`` of each plain initializer emptied, and the spans it had.

    The skeleton is the same serialized ModelProto except that every ``raw_data`` that
    :func:`initializer_spans` finds holds zero bytes (the field stays, so the tensor
    still *has* raw data); the enclosing TensorProto and GraphProto lengths are
    re-encoded. Parsing it gives the model protobuf would give for ``data``, minus those
    bytes, which the spans locate in ``data``. None when :func:`initializer_spans` is
    None or the keys on the way are not their one-byte canonical encoding (then the
    whole file is parsed as it is).
    """
    walked = _walk_initializers(data)
    if walked is None:
        return None
    (graph_start, graph_body, graph_stop), initializers = walked
    if data[graph_start] != _key(_MODEL_GRAPH) or any(
        data[field[0]] != _key(_GRAPH_INITIALIZER) or data[raw[0]] != _key(_TENSOR_RAW_DATA)
        for field, raw in initializers
        if raw is not None
    ):
        return None
    graph = bytearray()
    cursor = graph_body
    for (field_start, body, field_stop), raw in initializers:
        if raw is None:
            continue
        raw_start, raw_stop = raw[0], raw[1]
        tensor = data[body:raw_start] + bytes((_key(_TENSOR_RAW_DATA), 0)) + data[raw_stop:field_stop]
        graph += data[cursor:field_start]
        graph += bytes((_key(_GRAPH_INITIALIZER),)) + _varint(len(tensor)) + tensor
        cursor = field_stop
    graph += data[cursor:graph_stop]
    head = data[:graph_start] + bytes((_key(_MODEL_GRAPH),)) + _varint(len(graph))
    spans = tuple(None if raw is None else raw[2:] for _, raw in initializers)
    return head + graph + data[graph_stop:], spans


#: (field start, body start, field stop) of a length-delimited field.
_Extent = tuple[int, int, int]
#: (field start, field stop, payload offset, payload length) of a plain ``raw_data`` field.
_RawField = tuple[int, int, int, int]


def _walk_initializers(data: bytes) -> tuple[_Extent, list[tuple[_Extent, _RawField | None]]] | None:
    """The extent of the single ``graph`` field and, per initializer, its extent and plain ``raw_data``."""
    try:
        graphs = [
            (start, value[0], stop)
            for number, wire, value, start, stop in _fields(data, 0, len(data))
            if (number, wire) == (_MODEL_GRAPH, _LENGTH_DELIMITED)
        ]
        if len(graphs) != 1:
            return None
        graph_start, body, stop = graphs[0]
        initializers = [
            ((start, value[0], field_stop), _raw_data_field(data, *value))
            for number, wire, value, start, field_stop in _fields(data, body, stop)
            if (number, wire) == (_GRAPH_INITIALIZER, _LENGTH_DELIMITED)
        ]
    except _NotPlain:
        return None
    return (graph_start, body, stop), initializers


def _raw_data_field(data: bytes, start: int, stop: int) -> _RawField | None:
    """Where the single plain ``raw_data`` of the TensorProto ``data[start:stop]`` lies, or None."""
    found = None
    for number, wire, value, field_start, field_stop in _fields(data, start, stop):
        if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED:
            if found is not None:
                return None
            found = (field_start, field_stop, value[0], value[1] - value[0])
        elif number in _TENSOR_OTHER_DATA or (number == _TENSOR_DATA_LOCATION and value != 0):
            return None
    return found


def _key(number: int) -> int:
    """The one-byte key of a length-delimited field numbered below 16."""
    return number << 3 | _LENGTH_DELIMITED


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: bytes, pos: int, end: int):
    """(field number, wire type, value, field start, field stop) of each field of the message ``data[pos:end]``.

    The value is the integer of a varint and the (start, stop) of a length-delimited
    field's bytes; fixed-size fields give None.
    """
    while pos < end:
        start = pos
        key, pos = _read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        value: int | tuple[int, int] | None
        if wire == _VARINT:
            value, pos = _read_varint(data, pos, end)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos, end)
            value = (pos, pos + length)
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            value = None
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise _NotPlain  # groups (3, 4) and invalid wire types
        if pos > end:
            raise _NotPlain
        yield number, wire, value, start, pos


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``data[pos]`` and the position after it."""
    result = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise _NotPlain
