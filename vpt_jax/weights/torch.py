"""Reading PyTorch checkpoints without PyTorch and without running pickled code.

The published MAE, MoCo v3, ConvNeXt, Swin and torchvision files are `torch.save` outputs. Three
containers exist on disk, all read here:

* zip (PyTorch >= 1.6): `<folder>/data.pkl` plus one raw little-endian record `<folder>/data/<key>`
  per storage; the folder name is arbitrary and other records (`version`, `byteorder`, ...) are
  ignored except `byteorder`.
* legacy tar (PyTorch < 0.1.10; torchvision's `resnet50-19c8e357.pth`): members `sys_info`,
  `pickle` (the object, tensors as persistent ids naming entries of `tensors`), `tensors` (size,
  stride and offset records) and `storages` (raw element arrays).
* legacy stream (PyTorch 0.4-1.5, `_use_new_zipfile_serialization=False`): pickled magic number,
  protocol version and sys_info, the object pickle, the list of storage keys, then each storage as
  an int64 element count followed by its bytes.

Pickles are read by `_Unpickler`, which resolves only the globals a state dict needs (OrderedDict,
the tensor/parameter rebuild functions, storage and legacy tensor types), each to a harmless
stand-in defined here; any other global is refused before anything is called, so a file whose
pickle would run code (`os.system`, `builtins.eval`, ...) raises `TorchCheckpointError` naming it.
Tensors come back as numpy arrays with their stored dtype (bfloat16 via ml_dtypes), element for
element as in the file: sizes, strides and storage offsets are applied, bounds checked first.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from vpt_jax.weights.download import CheckpointError


class TorchCheckpointError(CheckpointError):
  """A file that is not a readable PyTorch checkpoint; the message names the file (and key).

  A `CheckpointError` (and so a ValueError), so callers catch one error for every weight format.
  """


# Storage (and legacy tensor) type names -> element dtype (little-endian; byteorder applied later).
_DTYPES: Dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_TENSOR_TYPES = {name.replace("Storage", "Tensor"): dt for name, dt in _DTYPES.items()}

# The magic number that opens a legacy-stream file (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for `torch.FloatStorage` and friends: only its element dtype matters."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A flat element array; `data` is filled when the container's bytes are known."""

  key: str
  dtype: np.dtype
  numel: Optional[int]
  data: Optional[np.ndarray] = None


@dataclasses.dataclass
class _TensorRef:
  """A tensor as the pickle describes it, turned into an array once storages are loaded."""

  storage: Any            # _Storage, or a _StorageView (legacy stream)
  offset: int
  size: Tuple[int, ...]
  stride: Tuple[int, ...]


@dataclasses.dataclass
class _StorageView:
  """Legacy-stream view of a root storage: elements [offset, offset + numel)."""

  root: _Storage
  offset: int
  numel: int


def _int_tuple(x: Any, what: str) -> Tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(type(v) is int for v in x):
    raise TypeError(f"{what} must be a tuple of ints, got {x!r}")
  return tuple(x)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *unused: Any) -> _TensorRef:
  """Stand-in for torch._utils._rebuild_tensor(_v2): records where the elements are."""
  if not isinstance(storage, (_Storage, _StorageView)):
    raise TypeError(f"a tensor's storage must be a persistent storage record, got "
                    f"{type(storage).__name__}")
  if type(storage_offset) is not int:
    raise TypeError(f"storage offset must be an int, got {storage_offset!r}")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise TypeError(f"size {size} and stride {stride} differ in length")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  """Stand-in for torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  if not isinstance(data, _TensorRef):
    raise TypeError(f"a parameter must wrap a tensor, got {type(data).__name__}")
  return data


# Every global a state-dict pickle may name, and what it resolves to.
_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
_ALLOWED.update({("torch", n): _StorageType(n, dt) for n, dt in _DTYPES.items()})
_ALLOWED.update({("torch", n): _StorageType(n, dt) for n, dt in _TENSOR_TYPES.items()})


class Inert:
  """Stands for a global named in `inert=`: never imported or called, its arguments dropped."""

  name = "?"

  def __init__(self, *args: Any, **kwargs: Any):
    del args, kwargs

  def __setstate__(self, state: Any) -> None:
    del state

  def __repr__(self) -> str:
    return f"<inert {self.name}>"


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals; persistent ids go to the container's callback."""

  def __init__(self, file: Any, path: str, persistent: Callable[[Any], Any],
               inert: frozenset = frozenset()):
    super().__init__(file)
    self._path = path
    self._persistent = persistent
    self._inert = inert

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if f"{module}.{name}" in self._inert:
      return type("Inert", (Inert,), {"name": f"{module}.{name}"})
    raise TorchCheckpointError(
        f"{self._path}: refusing to load global {module}.{name}: only tensors, storages and "
        "OrderedDict records are accepted (the pickle would have called it; pass "
        f"inert=['{module}.{name}'] to read it as an inert placeholder if it is not part of the "
        "weights)")

  def persistent_load(self, pid: Any) -> Any:
    return self._persistent(pid)


def _unpickle(data: Any, path: str, what: str,
              persistent: Optional[Callable[[Any], Any]] = None,
              inert: frozenset = frozenset()) -> Any:
  """One pickle from bytes or a stream, with errors that name the file and the record."""
  def refuse(pid: Any) -> Any:
    raise TorchCheckpointError(f"{path}: {what} holds an unexpected persistent id {pid!r}")
  f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  try:
    return _Unpickler(f, path, persistent or refuse, inert).load()
  except TorchCheckpointError:
    raise
  except EOFError:
    raise TorchCheckpointError(f"{path}: {what} ends early (truncated file?)") from None
  except Exception as e:  # UnpicklingError, TypeError from a stand-in, bad opcodes...
    raise TorchCheckpointError(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from e


def _storage_type(x: Any, path: str) -> _StorageType:
  if not isinstance(x, _StorageType):
    raise TorchCheckpointError(f"{path}: expected a storage type, got {x!r}")
  return x


# ------------------------------------------------------------------------------------------------
# Turning recorded tensors into arrays.


def _materialize(ref: _TensorRef, path: str) -> np.ndarray:
  storage, base = ref.storage, 0
  if isinstance(storage, _StorageView):
    storage, base, limit = storage.root, storage.offset, storage.numel
  else:
    limit = None
  if storage.data is None:
    raise TorchCheckpointError(f"{path}: storage {storage.key!r} has no data record")
  flat = storage.data
  if limit is not None:
    flat = flat[base:base + limit]
  size, stride, offset = ref.size, ref.stride, ref.offset
  if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
    raise TorchCheckpointError(f"{path}: storage {storage.key!r}: negative size, stride or offset "
                               f"(size {size}, stride {stride}, offset {offset})")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise TorchCheckpointError(
        f"{path}: storage {storage.key!r} holds {flat.size} elements, but a tensor of size {size}, "
        f"stride {stride} at offset {offset} reaches element {last} (truncated file?)")
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  out = np.array(view, dtype=flat.dtype.newbyteorder("=") if flat.dtype.byteorder == ">"
                 else flat.dtype, copy=True)
  return out


def _convert(obj: Any, path: str) -> Any:
  """Replaces every `_TensorRef` in plain containers by its array."""
  if isinstance(obj, _TensorRef):
    return _materialize(obj, path)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _convert(v, path)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _convert(v, path) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_convert(v, path) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_convert(v, path) for v in obj)
  if isinstance(obj, (_Storage, _StorageView, _StorageType)):
    raise TorchCheckpointError(f"{path}: a bare storage outside a tensor is not supported")
  return obj


def _frombuffer(buf: bytes, dtype: np.dtype, key: str, path: str,
                numel: Optional[int]) -> np.ndarray:
  if numel is not None and len(buf) != numel * dtype.itemsize:
    raise TorchCheckpointError(
        f"{path}: storage {key!r} holds {len(buf)} bytes; {numel} elements of {dtype} need "
        f"{numel * dtype.itemsize} (truncated file?)")
  if len(buf) % dtype.itemsize:
    raise TorchCheckpointError(f"{path}: storage {key!r} is not a whole number of {dtype} elements")
  return np.frombuffer(buf, dtype)


# ------------------------------------------------------------------------------------------------
# The three containers.


def _load_zip(path: str, inert: frozenset) -> Any:
  try:
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise TorchCheckpointError(f"{path}: not a readable zip checkpoint ({e})") from None
  with zf:
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise TorchCheckpointError(
          f"{path}: a zip checkpoint has exactly one '<folder>/data.pkl' record; found "
          f"{len(pkl)} among {names[:8]}")
    prefix = pkl[0][:-len("data.pkl")]
    big = False
    if prefix + "byteorder" in names:
      order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise TorchCheckpointError(f"{path}: unknown byteorder record {order!r}")
      big = order == "big"
    storages: Dict[str, _Storage] = {}

    def persistent(pid: Any) -> Any:
      if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise TorchCheckpointError(f"{path}: data.pkl holds an unexpected persistent id {pid!r}")
      stype, key, numel = _storage_type(pid[1], path), str(pid[2]), pid[4]
      if type(numel) is not int:
        raise TorchCheckpointError(f"{path}: storage {key!r} has a non-integer size {numel!r}")
      if key not in storages:
        dtype = stype.dtype
        if big and dtype.itemsize > 1:
          if dtype.kind not in "fiub":
            raise TorchCheckpointError(f"{path}: big-endian {stype.name} is not supported")
          dtype = dtype.newbyteorder(">")
        storages[key] = _Storage(key, dtype, numel)
      return storages[key]

    try:
      raw = zf.read(pkl[0])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise TorchCheckpointError(f"{path}: cannot read {pkl[0]} ({e})") from None
    obj = _unpickle(raw, path, "data.pkl", persistent, inert)
    for key, st in storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise TorchCheckpointError(f"{path}: missing record {record!r} for storage {key!r}")
      try:
        buf = zf.read(record)
      except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise TorchCheckpointError(f"{path}: cannot read record {record!r} ({e})") from None
      st.data = _frombuffer(buf, st.dtype, key, path, st.numel)
  return _convert(obj, path)


def _read_exact(f: io.BytesIO, n: int, path: str, what: str) -> bytes:
  buf = f.read(n)
  if len(buf) != n:
    raise TorchCheckpointError(f"{path}: {what} ends early (truncated file?)")
  return buf



def _records(f: io.BytesIO, path: str, member: str, kind: str):
  """The legacy tar members' layout: a pickled count, then that many pickled 3-tuples (each
  followed by raw data the caller reads before asking for the next record)."""
  n = _unpickle(f, path, member)
  if type(n) is not int or n < 0:
    raise TorchCheckpointError(f"{path}: {member} member starts with {n!r}, not a count")
  for _ in range(n):
    rec = _unpickle(f, path, member)
    if not (isinstance(rec, tuple) and len(rec) == 3):
      raise TorchCheckpointError(f"{path}: bad {kind} record {rec!r}")
    yield rec

def _load_tar(path: str, inert: frozenset) -> Any:
  try:
    with tarfile.open(path, mode="r:", format=tarfile.PAX_FORMAT) as tar:
      members = {}
      for name in ("sys_info", "pickle", "tensors", "storages"):
        try:
          f = tar.extractfile(name)
        except KeyError:
          raise TorchCheckpointError(
              f"{path}: legacy tar checkpoint lacks the member {name!r} (members: "
              f"{tar.getnames()})") from None
        members[name] = f.read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise TorchCheckpointError(f"{path}: not a readable tar checkpoint ({e})") from None
  _check_sys_info(_unpickle(members["sys_info"], path, "sys_info"), path)

  # storages: n, then n x (pickle (key, location, type), int64 count, elements); then a view list.
  f = io.BytesIO(members["storages"])
  storages: Dict[str, Any] = {}
  for rec in _records(f, path, "storages", "storage"):
    key, stype = str(rec[0]), _storage_type(rec[2], path)
    (count,) = struct.unpack("<q", _read_exact(f, 8, path, f"storage {key!r}"))
    nbytes = count * stype.dtype.itemsize
    buf = _read_exact(f, nbytes, path, f"storage {key!r}")
    storages[key] = _Storage(key, stype.dtype, count, np.frombuffer(buf, stype.dtype))
  views = _unpickle(f, path, "storages (view list)")
  if not isinstance(views, list):
    raise TorchCheckpointError(f"{path}: storage view list is {type(views).__name__}, not a list")
  for view in views:
    target, root, offset, numel = (str(view[0]), str(view[1]), view[2], view[3])
    if root not in storages:
      raise TorchCheckpointError(f"{path}: storage view of unknown storage {root!r}")
    storages[target] = _StorageView(storages[root], offset, numel)

  # tensors: n, then n x (pickle (key, storage key, type), int32 ndim, 4 pad bytes, sizes,
  # strides, offset as int64).
  f = io.BytesIO(members["tensors"])
  tensors: Dict[str, _TensorRef] = {}
  for rec in _records(f, path, "tensors", "tensor"):
    key, skey = str(rec[0]), str(rec[1])
    ttype = _storage_type(rec[2], path)
    (ndim,) = struct.unpack("<i", _read_exact(f, 4, path, f"tensor {key!r}"))
    _read_exact(f, 4, path, f"tensor {key!r}")
    if not 0 <= ndim <= 64:
      raise TorchCheckpointError(f"{path}: tensor {key!r} claims {ndim} dimensions")
    dims = struct.unpack(f"<{2 * ndim + 1}q",
                         _read_exact(f, 8 * (2 * ndim + 1), path, f"tensor {key!r}"))
    if skey not in storages:
      raise TorchCheckpointError(f"{path}: tensor {key!r} uses unknown storage {skey!r}")
    st = storages[skey]
    root = st.root if isinstance(st, _StorageView) else st
    if root.dtype != ttype.dtype:
      raise TorchCheckpointError(f"{path}: tensor {key!r} ({ttype.name}) on a {root.dtype} storage")
    tensors[key] = _TensorRef(st, dims[-1], tuple(dims[:ndim]), tuple(dims[ndim:2 * ndim]))

  def persistent(pid: Any) -> Any:
    key = str(pid)
    if key not in tensors:
      raise TorchCheckpointError(f"{path}: pickle names tensor {pid!r}, absent from 'tensors'")
    return tensors[key]

  obj = _unpickle(members["pickle"], path, "pickle", persistent, inert)
  return _convert(obj, path)


def _check_sys_info(info: Any, path: str) -> None:
  if not isinstance(info, dict):
    raise TorchCheckpointError(f"{path}: sys_info is {type(info).__name__}, not a dict")
  if not info.get("little_endian", True):
    raise TorchCheckpointError(f"{path}: big-endian legacy checkpoints are not supported")


def _load_stream(path: str, data: bytes, inert: frozenset) -> Any:
  f = io.BytesIO(data)
  magic = _unpickle(f, path, "the header")
  if magic != _LEGACY_MAGIC:
    raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (neither zip, tar nor legacy "
                               "stream; wrong magic number)")
  version = _unpickle(f, path, "the header")
  if version != _LEGACY_PROTOCOL:
    raise TorchCheckpointError(f"{path}: legacy protocol version {version!r}; only "
                               f"{_LEGACY_PROTOCOL} is known")
  _check_sys_info(_unpickle(f, path, "sys_info"), path)
  roots: Dict[str, _Storage] = {}

  def persistent(pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise TorchCheckpointError(f"{path}: unexpected persistent id {pid!r}")
    stype, key, numel, view = _storage_type(pid[1], path), str(pid[2]), pid[4], pid[5]
    if key not in roots:
      roots[key] = _Storage(key, stype.dtype, numel)
    if view is None:
      return roots[key]
    _, offset, vsize = view
    return _StorageView(roots[key], offset, vsize)

  obj = _unpickle(f, path, "the object pickle", persistent, inert)
  keys = _unpickle(f, path, "the storage key list")
  if not isinstance(keys, list):
    raise TorchCheckpointError(f"{path}: storage key list is {type(keys).__name__}")
  for key in map(str, keys):
    if key not in roots:
      raise TorchCheckpointError(f"{path}: data for storage {key!r} that no tensor uses")
    st = roots[key]
    (count,) = struct.unpack("<q", _read_exact(f, 8, path, f"storage {key!r}"))
    buf = _read_exact(f, count * st.dtype.itemsize, path, f"storage {key!r}")
    st.data = _frombuffer(buf, st.dtype, key, path, st.numel)
  return _convert(obj, path)


# ------------------------------------------------------------------------------------------------
# Public API.


def load(path: str, *, inert: Iterable[str] = ()) -> Any:
  """The object a PyTorch checkpoint holds, tensors as numpy arrays; no pickled code runs.

  inert: 'module.name' globals that are not weights but would otherwise make the file unreadable
    (e.g. 'argparse.Namespace', the `args` entry some training scripts save): they are read as
    `Inert` placeholders, never imported or called.
  """
  path = os.fspath(path)
  inert = frozenset(inert)
  try:
    with open(path, "rb") as f:
      head = f.read(512)
  except OSError as e:
    raise TorchCheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
  if head[:4] == b"PK\x03\x04":
    return _load_zip(path, inert)
  if head[257:262] == b"ustar":
    return _load_tar(path, inert)
  if head[:2] == b"\x80\x02":
    with open(path, "rb") as f:
      return _load_stream(path, f.read(), inert)
  if not head:
    raise TorchCheckpointError(f"{path}: empty file")
  raise TorchCheckpointError(
      f"{path}: not a PyTorch checkpoint (neither a zip, a legacy tar nor a legacy stream)")


# Top-level entries under which training scripts store the weights, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model", "model_state", "module", "net")


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and len(obj) > 0
          and all(isinstance(k, str) for k in obj)
          and all(isinstance(v, np.ndarray) for v in obj.values()))


def read_state_dict(path: str, *, key: Optional[str] = None,
                    inert: Iterable[str] = ()) -> Dict[str, np.ndarray]:
  """A checkpoint's state dict as {name: array}, in file order.

  Unwraps the usual containers: a plain state dict, `{'model': ...}` (MAE, ConvNeXt, Swin),
  `{'state_dict': ...}` (MoCo); `key` picks the entry explicitly. The `module.` prefix that
  DistributedDataParallel puts on every key is removed when all keys carry it (MoCo). `inert` as
  for `load`.
  """
  obj = load(path, inert=inert)
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
      raise TorchCheckpointError(f"{path}: no top-level entry {key!r}; found {found}")
    sd, where = obj[key], f"entry {key!r}"
  elif _is_state_dict(obj):
    sd, where = obj, "the file"
  else:
    if not isinstance(obj, Mapping):
      raise TorchCheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    hits = [k for k in _CONTAINER_KEYS if _is_state_dict(obj.get(k))]
    if not hits:
      raise TorchCheckpointError(
          f"{path}: no state dict found: the top-level keys are {sorted(map(str, obj))}; none of "
          f"{list(_CONTAINER_KEYS)} holds {{name: tensor}} (pass key=...)")
    sd, where = obj[hits[0]], f"entry {hits[0]!r}"
  if not isinstance(sd, Mapping) or not sd:
    raise TorchCheckpointError(f"{path}: {where} is not a non-empty mapping")
  for k, v in sd.items():
    if not isinstance(k, str):
      raise TorchCheckpointError(f"{path}: {where} has a non-string key {k!r}")
    if not isinstance(v, np.ndarray):
      raise TorchCheckpointError(f"{path}: {where}, key {k!r} holds a {type(v).__name__}, "
                                 "not a tensor")
  out = dict(sd)
  if all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out


def select(state: Mapping[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
  """The entries under `prefix` (e.g. 'base_encoder.'), with the prefix removed."""
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


__all__ = ["Inert", "TorchCheckpointError", "load", "read_state_dict", "select"]
