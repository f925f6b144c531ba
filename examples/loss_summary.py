"""Print how the training loss moved across the CSVLogger runs of a log folder (used by ``make demo``)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def losses(log_dir: Path) -> list[tuple[int, float]]:
    """(step, train_loss) rows of every ``version_*/metrics.csv`` under ``log_dir``, by step."""
    rows = []
    for metrics in sorted(log_dir.glob("version_*/metrics.csv")):
        with metrics.open() as f:
            rows += [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r.get("train_loss")]
    return sorted(rows)


if __name__ == "__main__":
    rows = losses(Path(sys.argv[1]))
    if not rows:
        sys.exit(f"no train_loss logged under {sys.argv[1]}")
    (first_step, first), (last_step, last) = rows[0], rows[-1]
    print(f"train_loss: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
