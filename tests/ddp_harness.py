"""The harness for distributed tests: run a script under ``Trainer(strategy="ddp", devices=2)`` on CPU.

Lightning's DDP launcher re-runs the launching command for each extra rank, so a DDP run cannot
start inside pytest's own process. A test writes the body of a small script instead; the harness
runs it with ``python`` in a subprocess, Lightning starts rank 1, and each rank writes what it
measured with ``save_result(...)`` into ``$LT_DDP_OUT/rank<r>.json``, which the test reads back.

Example (in a test; ``tmp_path`` is pytest's)::

    results = run_ddp(
        '''
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False)
        trainer.fit(TabularMLP(), AdultDataModule(batch_size=512))
        save_result({"steps": trainer.global_step})
        ''',
        tmp_path,
    )
    assert results[0]["steps"] == results[1]["steps"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

PRELUDE = """
import json, os, sys
from pathlib import Path
import torch
import lightning.pytorch as pl
from lightning_trust.demo import AdultDataModule, DigitsDataModule, TabularMLP, SmallCNN

OUT = Path(os.environ["LT_DDP_OUT"])

def save_result(data):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    (OUT / f"rank{rank}.json").write_text(json.dumps(data))

"""


EPILOGUE = """

# Reached only when the body succeeded. Leave without the interpreter's shutdown: a gloo/TCPStore thread
# destroyed there occasionally aborts the process ("terminate called without an active exception", exit -6)
# after every result was saved.
import torch.distributed as _dist
if _dist.is_available() and _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def run_ddp(body: str, tmp_path: Path, world_size: int = 2, timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``body`` (after :data:`PRELUDE`) as a script; return each rank's saved result, rank order.

    Raises ``AssertionError`` with the script's output when it fails or a rank saves nothing.
    """
    out = tmp_path / "ddp_out"
    out.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "ddp_script.py"
    script.write_text(PRELUDE + textwrap.dedent(body) + EPILOGUE)
    env = {**os.environ, "LT_DDP_OUT": str(out), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"DDP script failed with exit code {proc.returncode}\n{output}"
    results = []
    for rank in range(world_size):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} saved no result\n{output}"
        results.append(json.loads(path.read_text()))
    return results
