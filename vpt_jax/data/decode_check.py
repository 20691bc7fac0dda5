"""Every image decoded once when a folder source is opened, so a corrupt file (a valid JPEG header
on a random or truncated body) is named before training, not met mid-epoch inside tf.data as
`jpeg::Uncompress failed` with no file name, at the same batch on every resume.

Decoding runs in a thread pool (TensorFlow's decoders release the GIL); verdicts are cached in
memory by the bytes' digest, so the splits of a source opened again in the process are not decoded
twice.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import Dict, List, Optional, Sequence

_VERDICTS: Dict[bytes, Optional[str]] = {}


def _decode_error(data: bytes) -> Optional[str]:
  """None if the bytes decode as the pipeline decodes them, else the decoder's message."""
  # TensorFlow on first use: `import vpt_jax` (loading weights, `load_tuned`, the pretraining
  # script) then starts without it (2-5 s of CPU); the input pipelines import it themselves.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  key = hashlib.sha1(data).digest()
  if key not in _VERDICTS:
    try:
      tf.io.decode_image(data, channels=3, expand_animations=False)
      _VERDICTS[key] = None
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
      _VERDICTS[key] = str(e.message).strip().splitlines()[0][:200]
  return _VERDICTS[key]


def decode_errors(images: Sequence[bytes]) -> List[Optional[str]]:
  """Per image: None if it decodes, else why not (in the order given)."""
  workers = min(32, (os.cpu_count() or 1) + 2)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(_decode_error, images, chunksize=16))
