"""Small shared pieces of the compression tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def trainer(tmp_path: Any, max_epochs: int, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
        deterministic=True, num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
