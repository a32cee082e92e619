"""Leave-one-domain-out, DomainBed-style: one ordinary Lightning run per held-out domain.

Each run trains on the other domains (train and validation loaders filtered by
:class:`~lightning_trust.evaluation.data.HoldOutDomain`, so model selection uses training-domain
validation) and tests on the full test split, where :class:`CrossDomainEvaluation` reports every
domain. The held-out domain's test metric fills the table. Runs are sequential here; each is an
ordinary ``lightning-trust fit`` run with one extra callback, so a cluster can run them apart::

    python -m lightning_trust.evaluation.lodo --config configs/adult_domains.yaml \\
        --domain_key native_region --out runs/lodo -- --trainer.max_epochs=2

Example:
    >>> table = leave_one_domain_out(["--config", "configs/adult_domains.yaml"], "native_region")  # doctest: +SKIP
    >>> table["average"]["held_out"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional, Union

from lightning_trust.core import find_callback
from lightning_trust.evaluation.callback import CrossDomainEvaluation
from lightning_trust.evaluation.data import HoldOutDomain

__all__ = ["leave_one_domain_out", "main"]


def _domain_names(datamodule: Any, key: str, domains: Optional[list[Union[str, int]]]) -> list[Union[str, int]]:
    if domains:
        return list(domains)
    categories = getattr(datamodule, "categories", None)
    if isinstance(categories, dict) and key in categories:
        return list(categories[key])
    raise ValueError(
        f"The DataModule has no `categories[{key!r}]`; name the domains to hold out with `domains=[...]` (--domains)."
    )


def leave_one_domain_out(
    cli_args: list[str],
    domain_key: str,
    domains: Optional[list[Union[str, int]]] = None,
    metric: str = "accuracy",
    out_dir: Union[str, Path] = "runs/lodo",
) -> dict[str, Any]:
    """Run the LightningCLI config once per held-out domain and tabulate the results.

    Args:
        cli_args: LightningCLI arguments without the subcommand (``["--config", "configs/adult_domains.yaml"]``).
        domain_key: the domain side column (``"native_region"``).
        domains: domains to hold out, names or codes (default: all of ``datamodule.categories[domain_key]``).
        metric: the metric in the table (computed by the config's ``CrossDomainEvaluation``, or one added).
        out_dir: where ``lodo.json``, ``lodo.csv`` and ``lodo.md`` go; each run's files go under ``<out_dir>/<domain>``.

    Returns:
        ``{"domain_key", "metric", "runs": [{held_out, held_out_<metric>, train_domains_<metric>, log_dir}],
        "average": {"held_out": ..., "train_domains": ...}, "table": {...paths}}``.
    """
    from lightning_trust.cli import TrustCLI
    from lightning_trust.registry import import_callbacks

    import_callbacks()
    out = Path(out_dir)
    runs: list[dict[str, Any]] = []
    if domains:
        names = list(domains)
    else:  # the domain list comes from the config's datamodule
        datamodule = TrustCLI(args=[*cli_args, f"--trainer.default_root_dir={out}"], run=False).datamodule
        datamodule.setup("fit")
        names = _domain_names(datamodule, domain_key, None)
    for held in names:
        cli = TrustCLI(args=[*cli_args, f"--trainer.default_root_dir={out / str(held)}"], run=False)
        datamodule = cli.datamodule
        trainer: Any = cli.trainer  # its `callbacks` list is set at runtime, not declared on the class
        model = cli.model
        evaluation = find_callback(trainer, CrossDomainEvaluation)
        if evaluation is None:
            evaluation = CrossDomainEvaluation(domain_key=domain_key, metrics=[metric])
            trainer.callbacks.append(evaluation)
        if evaluation.domain_key != domain_key:
            raise ValueError(
                f"The config's CrossDomainEvaluation reads domain_key={evaluation.domain_key!r}, not {domain_key!r}."
            )
        if metric not in evaluation.metric_names:
            raise ValueError(
                f"The config's CrossDomainEvaluation has no metric {metric!r}; it has {evaluation.metric_names}."
            )
        others = [n for n in names if n != held]
        evaluation.in_domain = others  # the training domains count as in-domain in this run
        trainer.callbacks.append(HoldOutDomain(domain_key, held_out=[held]))
        trainer.fit(model, datamodule=datamodule)
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        ckpt = "best" if checkpoint is not None and bool(getattr(checkpoint, "best_model_path", "")) else None
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        report = evaluation.report()
        per_domain = report["per_domain"]
        held_name = _name_in(report, held)
        runs.append({
            "held_out": held_name,
            f"held_out_{metric}": per_domain[held_name][metric],
            f"train_domains_{metric}": report.get("in_domain", {}).get(metric),
            "held_out_samples": report["sizes"][held_name],
            "log_dir": str(trainer.log_dir or out / str(held)),
        })  # fmt: skip
    return _tabulate(runs, domain_key, metric, out)


def _name_in(report: dict[str, Any], held: Union[str, int]) -> str:
    if str(held) in report["per_domain"]:
        return str(held)
    if isinstance(held, int) and 0 <= held < len(report["domains"]):
        return report["domains"][held]
    raise ValueError(f"Held-out domain {held!r} is not among the evaluated domains {report['domains']}.")


def _mean(values: list[Any]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _tabulate(runs: list[dict[str, Any]], key: str, metric: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    average = {
        "held_out": _mean([r[f"held_out_{metric}"] for r in runs]),
        "train_domains": _mean([r[f"train_domains_{metric}"] for r in runs]),
    }
    result: dict[str, Any] = {"domain_key": key, "metric": metric, "runs": runs, "average": average}
    fmt = lambda v: "" if v is None else f"{100 * v:.1f}" if metric == "accuracy" else f"{v:.4f}"  # noqa: E731
    header = [r["held_out"] for r in runs] + ["Avg"]
    lines = [
        f"Leave-one-domain-out by `{key}` ({metric}{' %' if metric == 'accuracy' else ''} on the held-out domain, "
        "training-domain validation):",
        "",
        "| Algorithm | " + " | ".join(header) + " |",
        "|---|" + "|".join(["---"] * len(header)) + "|",
        "| ERM | " + " | ".join(fmt(r[f"held_out_{metric}"]) for r in runs) + f" | {fmt(average['held_out'])} |",
        "| ERM (training domains) | " + " | ".join(fmt(r[f"train_domains_{metric}"]) for r in runs)
        + f" | {fmt(average['train_domains'])} |",
    ]  # fmt: skip
    (out / "lodo.md").write_text("\n".join(lines) + "\n")
    with (out / "lodo.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(runs[0]) if runs else ["held_out"])
        writer.writeheader()
        writer.writerows(runs)
    result["table"] = {"markdown": str(out / "lodo.md"), "csv": str(out / "lodo.csv"), "json": str(out / "lodo.json")}
    (out / "lodo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m lightning_trust.evaluation.lodo --config CFG --domain_key KEY [--domains A B] [-- CLI args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="lodo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="LightningCLI config file(s)")
    parser.add_argument("--domain_key", required=True, help="domain side column, e.g. native_region")
    parser.add_argument("--domains", nargs="*", default=None, help="domains to hold out (default: all)")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--out", default="runs/lodo")
    args = parser.parse_args(argv)
    cli_args = [a for c in args.config for a in ("--config", c)] + extra
    domains = [int(d) if d.lstrip("-").isdigit() else d for d in args.domains] if args.domains else None
    result = leave_one_domain_out(cli_args, args.domain_key, domains, args.metric, args.out)
    print(Path(result["table"]["markdown"]).read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
