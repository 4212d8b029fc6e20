"""What a training run writes to be watched while it runs: TensorBoard event files and the sampler CSV.

``TrainMonitor`` is rank 0's (other ranks get a disabled one that writes nothing). In ``output_dir``:

    tb/events.out.tfevents.*   ``tensorboard --logdir <output_dir>/tb``; tags:
        train/<name>               every logged scalar of the history (loss, loss_*, lr, fg/bg per image,
                                   time_per_iter, time_data_per_iter, time)
        eval/<iou type>_<metric>   AP, AP50, ... in percent at every evaluation (-1, "no GT of that size",
                                   is left out)
        sampler/<name>             histograms of the sampled RoIs (neg_iou_pn: Figure 4 of the paper,
                                   neg_iou_ge, pos_iou_gp, pos_key, neg_bin, pos_bin, eps_weighted_per_image)
                                   and scalars of their summary (counts per image, means, per-bin counts)
    sampler_diagnostics.csv    one row per diagnostics step: ``iteration`` then the summary's columns
                               (:meth:`SamplerDiagnostics.summary`)

Steps are training iterations. A resumed run continues the same stream: its writer starts with a purge
step at the first iteration it trains, so whatever a killed run logged after its checkpoint is hidden
by TensorBoard (the usual ``SessionLog.START`` mechanism) and logged again once; a fresh run in a used
folder hides the old events the same way (purge step 0). The CSV keeps the rows up to the resumed
iteration. Neither writes on ranks other than 0.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from typing import Any, Optional

import numpy as np

from ..detection.diagnostics import SHARE_PREFIX, SamplerDiagnostics, summary_columns
from ..io_safety import prepare_output_dir, write_text
from .config import TrainConfig

TB_DIR = "tb"
DIAGNOSTICS_CSV = "sampler_diagnostics.csv"

# Finer than the CSV's tenths: TensorBoard draws these as the histogram's buckets.
_IOU_BUCKETS = np.linspace(0.0, 1.0, 21)


def _histogram_edges(name: str, values: np.ndarray) -> np.ndarray:
    """Fixed buckets, so that two runs' histograms line up: IoUs over [0, 1], integers one by one."""
    if "iou" in name or name == "pos_key":
        return _IOU_BUCKETS
    return np.arange(-0.5, max(float(values.max()), 0.0) + 1.0)


class TrainMonitor:
    """TensorBoard event files and the sampler diagnostics CSV of one training run (see the module doc).

    Args:
        config: the run's config (``output_dir``, ``tensorboard``, ``diagnostics_every``, ``sampler``).
        enabled: False on ranks other than 0: nothing is written.
        start_iter: the iteration the run starts from (the resumed checkpoint's, else 0).
        resumed: whether the run continues a checkpoint (its stream and CSV are continued).
    """

    def __init__(self, config: TrainConfig, *, enabled: bool, start_iter: int, resumed: bool,
                 logger: Optional[logging.Logger] = None):
        self.writer = None
        self.csv_path: Optional[str] = None
        if not enabled:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # torch's wrapper needs the tensorboard package
                raise ModuleNotFoundError(f"TensorBoard logging needs the tensorboard package ({error}): "
                                          "pip install tensorboard, or train with --no-tensorboard") from error
            folder = prepare_output_dir(os.path.join(config.output_dir, TB_DIR), "TensorBoard folder")
            self.writer = SummaryWriter(folder, purge_step=start_iter + 1 if resumed else 0, flush_secs=30)
        if config.diagnostics_every:
            self.csv_path = os.path.join(config.output_dir, DIAGNOSTICS_CSV)
            self.columns = ["iteration"] + summary_columns(config.sampler.num_bins)
            kept = _rows_up_to(self.csv_path, self.columns, start_iter, logger) if resumed else []
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(self.columns)
            writer.writerows(kept)
            write_text(self.csv_path, text.getvalue(), what="sampler diagnostics")

    def scalars(self, entry: dict[str, Any]) -> None:
        """A history entry (``{"iteration", "loss", ...}``) as ``train/<key>`` scalars at its iteration."""
        if self.writer is None:
            return
        step = int(entry["iteration"])
        for key, value in entry.items():
            if key != "iteration":
                self.writer.add_scalar(f"train/{key}", float(value), step)
        self.writer.flush()

    def evaluation(self, iteration: int, metrics: dict[str, dict[str, float]]) -> None:
        """An ``evaluate`` dict as ``eval/<iou type>_<metric>`` scalars in percent."""
        if self.writer is None:
            return
        for iou_type, table in metrics.items():
            for name, value in table.items():
                if value >= 0:
                    self.writer.add_scalar(f"eval/{iou_type}_{name}", 100.0 * value, iteration)
        self.writer.flush()

    def diagnostics(self, iteration: int, diagnostics: SamplerDiagnostics) -> None:
        """One diagnostics step: TensorBoard histograms and scalars, one CSV row."""
        summary = diagnostics.summary()
        if self.writer is not None:
            for name, values in diagnostics.histograms().items():
                if values.size:
                    self.writer.add_histogram(f"sampler/{name}", values, iteration,
                                              bins=_histogram_edges(name, values))
            for name, value in summary.items():
                # The tenths of IoU_p,n are the neg_iou_pn histogram already.
                if not name.startswith(SHARE_PREFIX) and math.isfinite(value):
                    self.writer.add_scalar(f"sampler/{name}", value, iteration)
            self.writer.flush()
        if self.csv_path is not None:
            # One short line appended: a run killed mid-line leaves a partial row, which the resumed
            # run drops (it keeps only whole rows up to its checkpoint).
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(
                    [iteration] + [_format(summary[c]) for c in self.columns[1:]])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TrainMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format(value: float) -> str:
    return f"{value:.6g}"


def _rows_up_to(path: str, columns: list[str], start_iter: int, logger: Optional[logging.Logger]) -> list[list[str]]:
    """The whole rows of an existing CSV with ``iteration <= start_iter`` (none if its header differs)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        return []
    if not rows or rows[0] != columns:
        if rows and logger is not None:
            logger.warning("%s has other columns than this run's (num_bins changed?): starting it anew", path)
        return []
    kept = []
    for row in rows[1:]:
        try:
            if len(row) == len(columns) and int(row[0]) <= start_iter:
                [float(v) for v in row[1:]]
                kept.append(row)
        except ValueError:  # a line cut by a kill
            continue
    return kept
