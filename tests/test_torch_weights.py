"""The torch-free checkpoint reader: fixture files, synthetic files of each container, bad files.

Synthetic checkpoints are written here with the stdlib pickler, with stand-in `torch` modules
registered only while writing (torch is not installed), in the byte layouts `torch.save` uses.
"""

import collections
import contextlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import data_path
from vpt_jax.weights import torch as tw

FIXTURES = {"mae_vit": "mae_vit.pth", "mocov3_vit": "mocov3_vit.pth.tar",
            "convnext": "convnext.pth", "resnet": "resnet.pth"}


def bb(name):
  return data_path(os.path.join("backbones", name))


@pytest.fixture(scope="module")
def manifest():
  with open(bb("manifest.json")) as f:
    return json.load(f)["fixtures"]


# ------------------------------------------------------------------------------------------------
# The fixture files.


@pytest.mark.parametrize("family", sorted(FIXTURES))
def test_fixture_keys_shapes_dtypes_in_file_order(family, manifest):
  sd = tw.read_state_dict(bb(FIXTURES[family]))
  want = manifest[family]["checkpoint_keys"]
  want = {k[len("module."):] if k.startswith("module.") else k: v for k, v in want.items()}
  assert list(sd) == list(want)
  assert {k: list(v.shape) for k, v in sd.items()} == want
  assert {v.dtype for v in sd.values()} == {np.dtype(np.float32)}


def test_zip_fixture_arrays_are_the_raw_records():
  # Every tensor here is contiguous with offset 0, so its bytes are one whole data/<key> record.
  for name in ("mae_vit.pth", "mocov3_vit.pth.tar", "convnext.pth", "resnet.zipformat.pth"):
    with zipfile.ZipFile(bb(name)) as zf:
      records = sorted(zf.read(n) for n in zf.namelist() if "/data/" in n)
    obj = tw.load(bb(name))
    arrays = []

    def walk(x):
      if isinstance(x, np.ndarray):
        arrays.append(x.tobytes())
      elif isinstance(x, dict):
        for v in x.values():
          walk(v)
    walk(obj)
    assert sorted(arrays) == records, name


def test_legacy_tar_equals_zip_bit_for_bit():
  old = tw.read_state_dict(bb("resnet.pth"))
  new = tw.read_state_dict(bb("resnet.zipformat.pth"))
  extra = sorted(set(new) - set(old))
  assert extra and all(k.endswith("num_batches_tracked") for k in extra)
  for k in extra:
    assert new[k].dtype == np.int64 and new[k].shape == () and new[k] == 0
  for k, v in old.items():
    assert v.tobytes() == new[k].tobytes() and v.shape == new[k].shape, k


def test_moco_container_and_other_entries():
  obj = tw.load(bb("mocov3_vit.pth.tar"))
  assert obj["epoch"] == 90 and obj["arch"] == "vit_base"
  assert obj["best_acc1"].shape == (1,)
  assert obj["optimizer"]["state"][0]["momentum_buffer"].shape == (100, 64)
  assert obj["optimizer"]["param_groups"][0]["params"] == [0, 1]
  sd = tw.read_state_dict(bb("mocov3_vit.pth.tar"))
  assert "head.weight" in sd and not any(k.startswith("module.") for k in sd)
  raw = tw.read_state_dict(bb("mocov3_vit.pth.tar"), key="state_dict")
  assert raw.keys() == sd.keys()


# ------------------------------------------------------------------------------------------------
# Writing synthetic checkpoints.

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
            np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage",
            np.dtype(np.float64): "DoubleStorage", np.dtype(np.int32): "IntStorage",
            np.dtype(np.uint8): "ByteStorage", np.dtype(bool): "BoolStorage"}


@contextlib.contextmanager
def fake_torch():
  """Registers stand-in `torch` / `torch._utils` modules so the stdlib pickler can name them."""
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  for name in set(_STORAGE.values()) | {"FloatTensor"}:
    setattr(torch, name, type(name, (), {"__module__": "torch"}))

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"

  def _rebuild_parameter(*args):
    raise AssertionError("never called while writing")
  _rebuild_parameter.__module__ = "torch._utils"
  _rebuild_parameter.__qualname__ = "_rebuild_parameter"
  utils._rebuild_tensor_v2, utils._rebuild_parameter = _rebuild_tensor_v2, _rebuild_parameter
  torch._utils = utils
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield torch
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


class Storage:
  def __init__(self, key, flat):
    self.key, self.flat = key, np.ascontiguousarray(flat)


class Tensor:
  def __init__(self, storage, offset, size, stride, parameter=False):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.parameter = parameter

  def __reduce__(self):
    utils = sys.modules["torch._utils"]
    t = (utils._rebuild_tensor_v2,
         (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
          collections.OrderedDict()))
    if self.parameter:
      return (utils._rebuild_parameter, (Tensor(self.storage, self.offset, self.size,
                                                self.stride), True, collections.OrderedDict()))
    return t


class _Pickler(pickle.Pickler):
  def __init__(self, f, pid):
    super().__init__(f, protocol=2)
    self._pid = pid

  def persistent_id(self, obj):
    return self._pid(obj) if isinstance(obj, Storage) else None


def _storages(obj, out):
  if isinstance(obj, Tensor):
    out.setdefault(obj.storage.key, obj.storage)
  elif isinstance(obj, dict):
    for v in obj.values():
      _storages(v, out)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _storages(v, out)
  return out


def write_zip(path, obj, folder="archive"):
  with fake_torch() as torch:
    buf = io.BytesIO()
    _Pickler(buf, lambda s: ("storage", getattr(torch, _STORAGE[s.flat.dtype]), s.key, "cuda:0",
                             s.flat.size)).dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{folder}/data.pkl", buf.getvalue())
    zf.writestr(f"{folder}/version", "3\n")
    for key, s in _storages(obj, {}).items():
      zf.writestr(f"{folder}/data/{key}", s.flat.tobytes())
  return str(path)


def write_stream(path, obj):
  """The legacy (0.4-1.5) stream: magic, protocol, sys_info, object, keys, sized storages."""
  with fake_torch() as torch:
    buf = io.BytesIO()
    for header in (0x1950a86a20f9469cfc6c, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(header, buf, protocol=2)
    _Pickler(buf, lambda s: ("storage", getattr(torch, _STORAGE[s.flat.dtype]), s.key, "cpu",
                             s.flat.size, None)).dump(obj)
  stores = _storages(obj, {})
  pickle.dump(sorted(stores), buf, protocol=2)
  for key in sorted(stores):
    buf.write(struct.pack("<q", stores[key].flat.size) + stores[key].flat.tobytes())
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return str(path)


def write_tar(path, state, stores, views=()):
  """The legacy tar: `state` maps names to tensor keys, each (key, storage key, offset, size,
  stride); `stores` maps storage keys to float32 arrays."""
  with fake_torch() as torch:
    members = {"sys_info": pickle.dumps({"protocol_version": 1000, "little_endian": True,
                                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, 2)}
    s = io.BytesIO()
    pickle.dump(len(stores), s, 2)
    for key, flat in stores.items():
      pickle.dump((key, "cpu", torch.FloatStorage), s, 2)
      s.write(struct.pack("<q", flat.size) + flat.astype("<f4").tobytes())
    pickle.dump(list(views), s, 2)
    members["storages"] = s.getvalue()
    t = io.BytesIO()
    pickle.dump(len(state), t, 2)
    for _, (key, skey, offset, size, stride) in state.items():
      pickle.dump((key, skey, torch.FloatTensor), t, 2)
      t.write(struct.pack("<i", len(size)) + b"\0" * 4
              + struct.pack(f"<{2 * len(size) + 1}q", *size, *stride, offset))
    members["tensors"] = t.getvalue()

  class P(pickle.Pickler):
    def persistent_id(self, obj):
      return str(obj.key) if isinstance(obj, TarRef) else None
  p = io.BytesIO()
  P(p, protocol=2).dump(collections.OrderedDict(
      (name, TarRef(rec[0])) for name, rec in state.items()))
  members["pickle"] = p.getvalue()
  with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
    for name in ("sys_info", "pickle", "tensors", "storages"):
      info = tarfile.TarInfo(name)
      info.size = len(members[name])
      tar.addfile(info, io.BytesIO(members[name]))
  return str(path)


class TarRef:
  def __init__(self, key):
    self.key = key


def _strided_case():
  """A few tensors with offsets, non-contiguous strides and several dtypes, and what they hold."""
  rng = np.random.default_rng(0)
  f32 = Storage("0", rng.normal(size=40).astype(np.float32))
  f16 = Storage("1", rng.normal(size=12).astype(np.float16))
  bf = Storage("2", rng.normal(size=8).astype(ml_dtypes.bfloat16))
  i64 = Storage("3", np.arange(-3, 9, dtype=np.int64) * (2 ** 40))
  state = collections.OrderedDict([
      ("contiguous", Tensor(f32, 0, (2, 3), (3, 1))),
      ("transposed", Tensor(f32, 4, (3, 2), (1, 3))),           # a .T view at offset 4
      ("sliced", Tensor(f32, 7, (2, 2, 2), (16, 4, 2))),        # every other element
      ("scalar", Tensor(f32, 39, (), ())),
      ("empty", Tensor(f32, 0, (0, 5), (5, 1))),
      ("broadcast", Tensor(f32, 2, (3, 4), (0, 1))),            # expand(): stride 0
      ("half", Tensor(f16, 2, (2, 5), (5, 1), parameter=True)),
      ("bf16", Tensor(bf, 1, (7,), (1,))),
      ("long", Tensor(i64, 0, (4, 3), (1, 4))),
  ])
  a, h, b, n = f32.flat, f16.flat, bf.flat, i64.flat
  want = {
      "contiguous": a[:6].reshape(2, 3), "transposed": a[4:10].reshape(2, 3).T,
      "sliced": a[7:].tolist(), "scalar": np.array(a[39]), "empty": np.zeros((0, 5), np.float32),
      "broadcast": np.broadcast_to(a[2:6], (3, 4)), "half": h[2:12].reshape(2, 5),
      "bf16": b[1:8], "long": n.reshape(3, 4).T,
  }
  want["sliced"] = np.array([[[a[7 + 16 * i + 4 * j + 2 * k] for k in range(2)]
                              for j in range(2)] for i in range(2)], np.float32)
  return state, want


def _assert_same(got, want):
  assert list(got) == list(want)
  for k, w in want.items():
    w = np.asarray(w)
    assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
    assert got[k].tobytes() == np.ascontiguousarray(w).tobytes(), k


@pytest.mark.parametrize("writer", [write_zip, write_stream])
def test_strides_offsets_dtypes_exact(tmp_path, writer):
  state, want = _strided_case()
  path = writer(tmp_path / "x.pth", {"model": state, "epoch": 3})
  _assert_same(tw.read_state_dict(path), want)


def test_legacy_tar_strides_offsets_and_views(tmp_path):
  flat = np.arange(30, dtype=np.float32) * 0.5 - 3
  state = collections.OrderedDict([
      ("a", ("10", "1", 3, (2, 4), (1, 2))),
      ("b", ("11", "2", 1, (3,), (2,))),       # on a view = elements 20.. of storage 1
  ])
  path = write_tar(tmp_path / "t.pth", state, {"1": flat}, views=[("2", "1", 20, 10)])
  got = tw.read_state_dict(path)
  np.testing.assert_array_equal(got["a"], np.array([[flat[3 + i + 2 * j] for j in range(4)]
                                                    for i in range(2)]))
  np.testing.assert_array_equal(got["b"], flat[21:27:2])


def test_containers_and_prefix(tmp_path):
  state, want = _strided_case()
  ddp = collections.OrderedDict(("module." + k, v) for k, v in state.items())
  for obj in (state, {"state_dict": ddp, "epoch": 1, "arch": "x"}, {"model": state}):
    _assert_same(tw.read_state_dict(write_zip(tmp_path / "c.pth", obj)), want)
  path = write_zip(tmp_path / "two.pth", {"ema": state, "other": 1})
  with pytest.raises(tw.TorchCheckpointError, match=r"top-level keys are \['ema', 'other'\]"):
    tw.read_state_dict(path)
  _assert_same(tw.read_state_dict(path, key="ema"), want)
  with pytest.raises(tw.TorchCheckpointError, match=r"two.pth: no top-level entry 'model'"):
    tw.read_state_dict(path, key="model")
  mixed = write_zip(tmp_path / "m.pth", {"model": collections.OrderedDict(
      [("w", state["scalar"]), ("step", 3)])})
  with pytest.raises(tw.TorchCheckpointError, match=r"m.pth: .*'step' holds a int"):
    tw.read_state_dict(mixed, key="model")
  prefixed = {"module.base_encoder.a": np.zeros(1), "module.base_encoder.b": np.ones(1),
              "module.predictor.c": np.ones(2)}
  assert list(tw.select(prefixed, "module.base_encoder.")) == ["a", "b"]


# ------------------------------------------------------------------------------------------------
# Files that must be refused, with nothing executed.


class Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class EvilWrite:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({self.marker!r}, 'w').write('x')",))


@pytest.mark.parametrize("payload, name", [(Evil, os.system.__module__ + ".system"),
                                           (EvilWrite, "__builtin__.eval")])  # protocol 2 spelling)
@pytest.mark.parametrize("container", ["zip", "stream", "tar"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload, name, container):
  marker = tmp_path / "pwned"
  evil = collections.OrderedDict([("w", [1.5, "ok"]), ("x", payload(str(marker)))])
  path = tmp_path / "evil.pth"
  data = pickle.dumps(evil, protocol=2)
  if container == "zip":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", data)
  elif container == "stream":
    with open(path, "wb") as f:
      for header in (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(data)
  else:
    with tarfile.open(path, "w") as tar:
      for member, blob in (("sys_info", pickle.dumps({"little_endian": True}, 2)),
                           ("pickle", data), ("tensors", pickle.dumps(0, 2)),
                           ("storages", pickle.dumps(0, 2) + pickle.dumps([], 2))):
        info = tarfile.TarInfo(member)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
  with pytest.raises(tw.TorchCheckpointError) as e:
    tw.load(path)
  assert str(path) in str(e.value) and f"global {name}" in str(e.value)
  assert not marker.exists()


def test_allowed_names_with_wrong_arguments_are_refused(tmp_path):
  state, _ = _strided_case()
  bad = Tensor(Storage("0", np.zeros(4, np.float32)), 0, (2, 3), (3, 1))   # needs 6 elements
  path = write_zip(tmp_path / "oob.pth", {"model": collections.OrderedDict(w=bad)})
  with pytest.raises(tw.TorchCheckpointError, match=r"oob.pth: storage '0' holds 4 elements.*"
                                                    r"reaches element 5"):
    tw.read_state_dict(path)
  # _rebuild_tensor_v2 with a non-storage first argument.
  with fake_torch() as torch:
    blob = pickle.dumps({"w": Tensor("not a storage", 0, (1,), (1,))}, protocol=2)
  with zipfile.ZipFile(tmp_path / "arg.pth", "w") as zf:
    zf.writestr("archive/data.pkl", blob)
  with pytest.raises(tw.TorchCheckpointError, match=r"arg.pth: .*storage must be a persistent"):
    tw.load(tmp_path / "arg.pth")
  del torch


@pytest.mark.parametrize("name", ["mae_vit.pth", "resnet.pth"])
def test_truncated_files(tmp_path, name):
  blob = open(bb(name), "rb").read()
  for cut in (len(blob) // 3, len(blob) * 9 // 10, 600):  # (a tar ends in padding)
    path = tmp_path / f"cut{cut}.pth"
    path.write_bytes(blob[:cut])
    with pytest.raises(tw.TorchCheckpointError, match=str(path)):
      tw.read_state_dict(path)


def test_truncated_stream_and_bad_files(tmp_path):
  state, _ = _strided_case()
  blob = open(write_stream(tmp_path / "s.pth", {"model": state}), "rb").read()
  (tmp_path / "s2.pth").write_bytes(blob[:-10])
  with pytest.raises(tw.TorchCheckpointError, match=r"s2.pth: storage '3' ends early"):
    tw.read_state_dict(tmp_path / "s2.pth")
  (tmp_path / "e.pth").write_bytes(b"")
  with pytest.raises(tw.TorchCheckpointError, match=r"e.pth: empty file"):
    tw.load(tmp_path / "e.pth")
  np.savez(tmp_path / "n.npz", a=np.zeros(2))
  with pytest.raises(tw.TorchCheckpointError, match=r"n.npz: a zip checkpoint has exactly one"):
    tw.load(tmp_path / "n.npz")
  (tmp_path / "t.txt").write_text("hello")
  with pytest.raises(tw.TorchCheckpointError, match=r"t.txt: not a PyTorch checkpoint"):
    tw.load(tmp_path / "t.txt")
  with pytest.raises(tw.TorchCheckpointError, match=r"nope.pth: cannot open"):
    tw.load(tmp_path / "nope.pth")
  # A zip whose storage record is shorter than its persistent id says.
  path = write_zip(tmp_path / "z.pth", {"model": state})
  with zipfile.ZipFile(path) as zf:
    records = {n: zf.read(n) for n in zf.namelist()}
  records["archive/data/1"] = records["archive/data/1"][:-2]
  with zipfile.ZipFile(tmp_path / "z2.pth", "w") as zf:
    for n, b in records.items():
      zf.writestr(n, b)
  with pytest.raises(tw.TorchCheckpointError, match=r"z2.pth: storage '1' holds 22 bytes"):
    tw.read_state_dict(tmp_path / "z2.pth")


def test_inert_globals_are_opt_in_and_never_called(tmp_path):
  import argparse
  state, want = _strided_case()
  path = write_zip(tmp_path / "a.pth", {"model": state, "args": argparse.Namespace(lr=0.1)})
  with pytest.raises(tw.TorchCheckpointError, match=r"a.pth: refusing to load global "
                                                    r"argparse.Namespace"):
    tw.read_state_dict(path)
  _assert_same(tw.read_state_dict(path, inert=["argparse.Namespace"]), want)
  obj = tw.load(path, inert=["argparse.Namespace"])
  assert isinstance(obj["args"], tw.Inert) and obj["args"].name == "argparse.Namespace"
  assert not hasattr(obj["args"], "lr")
  # Naming one global inert does not open the door to others.
  marker = tmp_path / "pwned"
  evil = write_zip(tmp_path / "e.pth", {"model": state, "x": Evil(str(marker))})
  with pytest.raises(tw.TorchCheckpointError, match=r"global (posix|nt)\.system"):
    tw.load(evil, inert=["argparse.Namespace"])
  assert not marker.exists()
  bad = write_zip(tmp_path / "b.pth", {"model": collections.OrderedDict(
      w=state["scalar"], args=argparse.Namespace())})
  with pytest.raises(tw.TorchCheckpointError, match=r"'args' holds a Inert"):
    tw.read_state_dict(bad, key="model", inert=["argparse.Namespace"])


def test_torch_errors_are_checkpoint_errors(tmp_path):
  """One except clause (`CheckpointError`) catches bad files of every weight format."""
  from vpt_jax.weights.download import CheckpointError
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointError, match="bad.pth"):
    tw.read_state_dict(str(bad))
