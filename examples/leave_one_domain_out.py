"""Leave-one-region-out on Adult, DomainBed-style: one ordinary Lightning run per held-out region.

    python examples/leave_one_domain_out.py                       # all five regions, 2 epochs each
    python examples/leave_one_domain_out.py --domains Asia Europe -- --trainer.max_epochs=1

Each run trains on the other regions (train/val loaders filtered by `HoldOutDomain`), tests on the
full test split with `CrossDomainEvaluation`, and the held-out region's accuracy fills the table
(`runs/lodo/lodo.md`, `.csv`, `.json`). The same command form, with one `--domains` each, farms
the runs out to a cluster scheduler.
"""

import sys

from lightning_trust.evaluation.lodo import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    defaults = ["--config", "configs/adult_domains.yaml", "--domain_key", "native_region", "--out", "runs/lodo"]
    sys.exit(main([*defaults, *own, "--", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", *extra]))
