"""Aggregate finished runs into the VPT paper's Table-1 layout (Markdown and CSV).

    python -m vpt_jax.report /tmp/vtab/*/ /tmp/fgvc/*/ [--csv=table.csv]

The table is described in `vpt_jax.analysis.report`.
"""

from __future__ import annotations

import sys
from typing import List

from vpt_jax.analysis import report


def main(argv: List[str]) -> None:
  dirs = [a for a in argv[1:] if not a.startswith("--csv=")]
  csv_path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--csv=")), None)
  if not dirs:
    sys.exit("usage: python -m vpt_jax.report RUN_DIR... [--csv=out.csv]")
  out = report.tables([report.load_record(d) for d in dirs])
  print(out["markdown"])
  if csv_path:
    with open(csv_path, "w") as f:
      f.write(out["csv"])


if __name__ == "__main__":
  main(sys.argv)
