"""Small report-protocol callbacks for the report's tests (stand-ins for the pack's real callbacks)
and the short run limits they train with."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_trust.core import artifact_dir, new_figure, save_figure


class FakeSection(Callback):
    """Reports fixed numbers and one figure drawn at the end of fit (with visible ink)."""

    def __init__(self, section: str, numbers: dict[str, Any], figure: Optional[str] = "curve") -> None:
        self.report_section = section
        self.numbers = numbers
        self.figure_name = figure
        self.figure_path: Optional[str] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.figure_name is None:
            return
        fig = new_figure(figsize=(4, 3))
        ax = fig.add_subplot()
        ax.bar(["a", "b", "c"], [3, 1, 2], color=["#d62728", "#1f77b4", "#2ca02c"])
        ax.set_title(f"{self.report_section} {self.figure_name}")
        path = artifact_dir(trainer, self.report_section) / f"{self.figure_name}.png"
        save_figure(trainer, fig, path)
        self.figure_path = str(path)

    def report(self) -> dict[str, Any]:
        out = dict(self.numbers)
        if self.figure_path:
            out["figures"] = {self.figure_name: self.figure_path}
        return out


#: The short runs of the report's tests (passed explicitly to ``tests.support.trainer``).
LIMITS: dict[str, Any] = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2)
