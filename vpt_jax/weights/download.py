"""Where a published checkpoint file is: model-zoo names, URLs (downloaded once), local paths.

Shared by every weight reader (`npz`, `torch`), so a name resolves the same way for all of them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.request
from typing import Optional, Tuple

from vpt_jax.weights import zoo


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not describe a ViT; the message names file and key."""


def split_subtree(spec: str) -> Tuple[str, Optional[str]]:
  """'ckpt.npz:img' -> ('ckpt.npz', 'img'); URLs keep their scheme's colon."""
  head, sep, tail = spec.rpartition(":")
  if sep and head and re.fullmatch(r"[A-Za-z_]\w*(/\w+)*", tail) and not re.fullmatch(
      r"[A-Za-z][\w+.-]*", head):  # 'gs:...' or 'https:...' alone is a scheme, not a path.
    return head, tail
  return spec, None


def default_cache_dir() -> str:
  return os.environ.get("VPT_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "vpt_jax"))


# Seconds a connection or any single read may stall before the download fails (a stalled server
# would otherwise hang the run forever).
TIMEOUT_S = float(os.environ.get("VPT_JAX_DOWNLOAD_TIMEOUT_S", 60))
# A '.partial' file older than this, or whose writer is dead, is left over from a killed download.
_STALE_PARTIAL_S = 24 * 3600
_PIN = re.compile(r"@sha256[:=]([0-9a-fA-F]{64})")


def _report(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def split_pin(spec: str) -> Tuple[str, Optional[str]]:
  """'url@sha256:<64 hex>[:subtree]' -> ('url[:subtree]', hex); no pin -> (spec, None)."""
  m = _PIN.search(spec)
  if not m:
    return spec, None
  return spec[:m.start()] + spec[m.end():], m.group(1).lower()


def _clean_stale_partials(cache_dir: str) -> None:
  """Deletes '.partial' files of downloads whose process died (or that are a day old)."""
  for name in os.listdir(cache_dir):
    if not name.endswith(".partial"):
      continue
    path = os.path.join(cache_dir, name)
    pid = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    alive = False
    if pid.isdigit():
      try:
        os.kill(int(pid), 0)
        alive = True
      except ProcessLookupError:
        alive = False
      except PermissionError:
        alive = True
    try:
      if not alive or time.time() - os.path.getmtime(path) > _STALE_PARTIAL_S:
        os.remove(path)
    except OSError:
      pass


def _fetch(url: str, tmp: str) -> None:
  """Writes the file at `url` to `tmp`; raises if fewer bytes arrive than announced."""
  if url.startswith("gs://"):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top; only GCS needs it.
    tf.io.gfile.copy(url, tmp, overwrite=True)
    return
  with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
    total = int(response.headers.get("Content-Length") or 0)
    done, shown = 0, -1
    while True:
      try:
        chunk = response.read(1 << 20)
      except http.client.IncompleteRead as e:
        out.write(e.partial)
        done += len(e.partial)
        break
      if not chunk:
        break
      out.write(chunk)
      done += len(chunk)
      pct = int(100 * done / total) if total else -1
      if pct >= 0 and pct // 10 != shown:
        shown = pct // 10
        _report(f"vpt_jax:   {done >> 20} / {total >> 20} MiB ({pct}%)")
    if total and done != total:
      raise IOError(f"the server sent {done} of the {total} bytes it announced (connection "
                    f"closed early)")


def mismatch(path: str, sha256: Optional[str] = None, md5: Optional[str] = None,
             size: Optional[int] = None) -> Optional[str]:
  """How a file differs from what is known about it (size, sha256 or its prefix, md5 prefix),
  or None when it matches everything known. The size is checked first: it costs no read."""
  if size is not None and (got := os.path.getsize(path)) != size:
    return f"size {got} bytes does not match the expected {size}"
  if sha256 is not None and not (got := file_sha256(path)).startswith(sha256):
    return f"sha256 {got} does not match the expected {sha256}"
  if md5 is not None and not (got := _file_md5(path)).startswith(md5):
    return f"md5 {got} does not match the expected {md5}"
  return None


def download(url: str, cache_dir: Optional[str] = None, sha256: Optional[str] = None,
             md5: Optional[str] = None, size: Optional[int] = None) -> str:
  """Fetches a gs:// or http(s):// file once into the cache directory and returns the local path.

  Written to '<name>.<pid>.partial' and renamed only once complete: the byte count must match the
  Content-Length, and the size, sha256 and md5 prefix (those known, e.g. from the model zoo) must
  match, so an interrupted or corrupted download never leaves a file that looks complete. A
  stalled server fails after TIMEOUT_S.
  """
  cache_dir = cache_dir or default_cache_dir()
  digest = hashlib.sha256(url.encode()).hexdigest()[:12]
  dest = os.path.join(cache_dir, f"{digest}_{os.path.basename(url.rstrip('/'))}")
  if os.path.exists(dest):
    if (why := mismatch(dest, sha256, md5, size)) is None:
      return dest
    _report(f"vpt_jax: cached {dest}: {why}; downloading it again")
  tmp = f"{dest}.{os.getpid()}.partial"
  try:
    os.makedirs(cache_dir, exist_ok=True)
    _clean_stale_partials(cache_dir)
    open(tmp, "wb").close()
  except OSError as e:
    raise CheckpointError(
        f"the download cache directory {cache_dir} cannot be written ({type(e).__name__}: {e}); "
        f"set VPT_JAX_CACHE to a writable directory") from e
  _report(f"vpt_jax: downloading {url} -> {dest}")
  try:
    _fetch(url, tmp)
    if (why := mismatch(tmp, sha256, md5, size)) is not None:
      raise IOError(why)
    os.replace(tmp, dest)
  except Exception as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise CheckpointError(f"{url}: download failed ({type(e).__name__}: {e}); nothing was "
                          f"cached, retry later") from e
  return dest


def resolve(spec: str, cache_dir: Optional[str] = None) -> Tuple[str, Optional[str]]:
  """Model-zoo name, URL or path (each with optional '@sha256:<hex>' and ':subtree')
  -> (local path, subtree)."""
  spec, pin = split_pin(spec)
  sha256 = pin or zoo.sha256_for(spec)
  zoo_name = spec
  name, _, subtree = spec.rpartition(":")
  if zoo.url_for(spec) == spec and name and subtree and zoo.url_for(name) != name:
    # 'demo-vit:img': a zoo name with a sub-tree of its own.
    if split_subtree(zoo.url_for(name))[1]:
      raise ValueError(f"checkpoint {spec!r}: zoo name {name!r} already selects the sub-tree "
                       f"{split_subtree(zoo.url_for(name))[1]!r}; drop ':{subtree}'")
    sha256 = pin or zoo.sha256_for(name)
    zoo_name = name
    spec = f"{zoo.url_for(name)}:{subtree}"
  spec = zoo.url_for(spec)
  path, subtree = split_subtree(spec)
  remote = bool(re.match(r"^(gs|https?)://", path))
  if remote:
    path = download(path, cache_dir, sha256=sha256, md5=zoo.md5_for(zoo_name),
                    size=zoo.size_for(zoo_name))
  elif path.startswith("file://"):
    path = path[len("file://"):]
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"checkpoint {path!r} not found: give a local .npz path, a gs:// or https:// URL, or a "
        f"model-zoo name ({', '.join(zoo.names())})")
  if sha256 is not None and not remote and not (got := file_sha256(path)).startswith(sha256):
    raise CheckpointError(f"{path}: sha256 {got} does not match the expected {sha256}")
  return path, subtree


def _digest(path: str, algorithm: str) -> str:
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _file_md5(path: str) -> str:
  return _digest(path, "md5")


def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes (a backbone's identity in a run's fingerprint)."""
  return _digest(path, "sha256")
