"""What the cached-features path saves, end to end: linear probe and partial-1, cached vs uncached.

    python benchmarks/cached_features.py                   # 100 epochs each, ~5 minutes on 2 cores
    python benchmarks/cached_features.py --epochs=5        # a quick look

The task is the offline demo's (shipped `demo-vit` backbone, scikit-learn digits): the final
split train800val200 (1000 images, batch 64, 15 steps per epoch), tested on the other 797. Each
protocol runs `loop.train_and_evaluate` twice, with `cache_features` False and True, and the wall
time covers everything the run does (backbone load, data, token caching, compilation, training,
test evaluation, the final checkpoint; one untimed run first warms up the imports). Prints one JSON line: per protocol and mode the wall time, trained
images per second of wall time, test top-1 and loss (the two modes must agree), and the speedup.
Goal (issue 7): >= 20x end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402  pylint: disable=g-import-not-at-top
from vpt_jax.tuning import loop


LR = {"linear": 1.0, "partial-1": 0.1}   # the demo's linear-probe lr; partial-1 needs less


def run(protocol: str, cached: bool, epochs: int, workdir: str) -> dict:
  c = demo.get_config(f"linear,final,protocol={protocol},optim.epochs={epochs},"
                      f"optim.warmup_epochs={max(epochs // 10, 0)},eval_every_epochs=0,"
                      f"optim.lr={LR.get(protocol, 0.1)}")
  c.cache_features = "true" if cached else "false"
  c.checkpoint_every_steps = 10 ** 9  # checkpoint at the end only: measure training, not saving
  log = io.StringIO()
  t = time.perf_counter()
  with contextlib.redirect_stdout(log):
    r = loop.train_and_evaluate(c, workdir)
  wall = time.perf_counter() - t
  images = r["steps"] * c.batch_size
  return {"wall_s": round(wall, 2), "images_per_s": round(images / wall, 1),
          "trained_images": images, "test_top1": round(r["test_top1"], 4),
          "test_loss": round(r["test_loss"], 5), "cached_features_layer": r["cached_features_layer"]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--epochs", type=int, default=100)
  ap.add_argument("--protocols", default="linear,partial-1")
  args = ap.parse_args()
  out = {"benchmark": "cached_features", "device": str(jax.devices()[0].device_kind),
         "backend": jax.default_backend(), "host": platform.node(), "cpus": os.cpu_count(),
         "task": "demo digits train800val200 (1000 images), demo-vit, batch 64",
         "epochs": args.epochs, "protocols": {}}
  with tempfile.TemporaryDirectory() as tmp:
    run("linear", False, 1, os.path.join(tmp, "warmup"))  # imports, TensorFlow and data: untimed
    for protocol in args.protocols.split(","):
      res = {mode: run(protocol, mode == "cached", args.epochs, os.path.join(tmp, protocol + mode))
             for mode in ("uncached", "cached")}
      res["speedup_end_to_end"] = round(res["uncached"]["wall_s"] / res["cached"]["wall_s"], 1)
      out["protocols"][protocol] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
