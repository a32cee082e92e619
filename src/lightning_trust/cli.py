"""The ``lightning-trust`` command: LightningCLI with the pack's callbacks, models and data by short name.

Examples::

    lightning-trust fit --config configs/adult.yaml
    python -m lightning_trust test --config configs/adult.yaml --ckpt_path last
    lightning-trust report runs/adult/version_0/model_card.json   # render a model card again / diff two
    lightning-trust fit --config configs/adult.yaml --print_config
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

# Imported so that jsonargparse resolves their short `class_path` names (e.g. `class_path: TabularMLP`).
import lightning_trust.demo  # noqa: F401
from lightning_trust.registry import import_callbacks


class TrustCLI(LightningCLI):
    """LightningCLI that knows the pack's callbacks, demo models and datamodules by short name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)


def main(args: Optional[list[str]] = None) -> int:
    """Entry point of ``lightning-trust`` and ``python -m lightning_trust``; returns the exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:
        from lightning_trust.report.cli import report_main

        return report_main(argv[1:])
    import_callbacks()
    if args is None:
        return exit_code(TrustCLI())
    # Called from Python with arguments: they replace the command line. LightningCLI warns when `args=`
    # comes beside a non-empty sys.argv (a test runner's, a notebook's), so hide it for the call.
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return exit_code(TrustCLI(args=argv))
    finally:
        sys.argv = saved


def exit_code(cli: LightningCLI) -> int:
    """Non-zero when a callback asks the process to fail (e.g. a standards breach with ``fail_on_breach``)."""
    trainer = getattr(cli, "trainer", None)
    codes = [getattr(cb, "exit_code", 0) or 0 for cb in (getattr(trainer, "callbacks", None) or [])]
    return max(codes, default=0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
