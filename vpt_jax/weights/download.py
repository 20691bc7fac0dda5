"""Where a published checkpoint file is: model-zoo names, URLs (downloaded once), local paths.

Shared by every weight reader (`npz`, `torch`), so a name resolves the same way for all of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
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


def _report(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def download(url: str, cache_dir: Optional[str] = None) -> str:
  """Fetches a gs:// or http(s):// file once into the cache directory and returns the local path.

  Written to a temporary name and renamed at the end, so an interrupted download never leaves a
  truncated file that looks complete.
  """
  cache_dir = cache_dir or default_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  digest = hashlib.sha256(url.encode()).hexdigest()[:12]
  dest = os.path.join(cache_dir, f"{digest}_{os.path.basename(url.rstrip('/'))}")
  if os.path.exists(dest):
    return dest
  fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".partial")
  os.close(fd)
  _report(f"vpt_jax: downloading {url} -> {dest}")
  try:
    if url.startswith("gs://"):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top; only GCS needs it.
      tf.io.gfile.copy(url, tmp, overwrite=True)
    else:
      with urllib.request.urlopen(url) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, shown = 0, -1
        while chunk := response.read(1 << 20):
          out.write(chunk)
          done += len(chunk)
          pct = int(100 * done / total) if total else -1
          if pct >= 0 and pct // 10 != shown:
            shown = pct // 10
            _report(f"vpt_jax:   {done >> 20} / {total >> 20} MiB ({pct}%)")
    os.replace(tmp, dest)
  except Exception as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise CheckpointError(f"{url}: download failed ({type(e).__name__}: {e})") from e
  return dest


def resolve(spec: str, cache_dir: Optional[str] = None) -> Tuple[str, Optional[str]]:
  """Model-zoo name, URL or path (each with an optional ':subtree') -> (local path, subtree)."""
  spec = zoo.url_for(spec)
  path, subtree = split_subtree(spec)
  if re.match(r"^(gs|https?)://", path):
    path = download(path, cache_dir)
  elif path.startswith("file://"):
    path = path[len("file://"):]
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"checkpoint {path!r} not found: give a local .npz path, a gs:// or https:// URL, or a "
        f"model-zoo name ({', '.join(zoo.names())})")
  return path, subtree




def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes (a backbone's identity in a run's fingerprint)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()
