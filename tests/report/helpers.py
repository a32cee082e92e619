"""Small report-protocol callbacks for the report's tests (stand-ins for the pack's real callbacks)."""

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


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2, accelerator="cpu",
        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
