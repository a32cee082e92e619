"""``lightning-trust report``: render a card again from its JSON, or diff two runs.

Examples::

    lightning-trust report runs/adult/version_0/model_card.json        # rewrites model_card.md/.html beside it
    lightning-trust report runs/adult/version_0 --output-dir /tmp/card  # newest card under a run folder
    lightning-trust report runs/adult/version_0 runs/adult/version_1   # diff: verdicts and numbers that changed
    lightning-trust report model_card.json --fail-on-breach             # exit 1 when a standard is not met
    lightning-trust report model_card.json --screenshot card.png        # PNG of the HTML (headless Chromium)
    lightning-trust report runs/adult/version_0 --format hf --license apache-2.0  # Hugging Face README.md

An older card (schema 1.0, 1.1) is upgraded in memory when read (its file is left as it is).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from lightning_trust.report.card import load_card, write_renders
from lightning_trust.report.diff import diff_cards, render_diff_markdown
from lightning_trust.report.rows import standards_summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-trust report",
        description="Render a model card again from its model_card.json (byte-identical Markdown, self-contained "
        "HTML), or, given two cards, show what changed between the runs.",
    )
    parser.add_argument("path", help="model_card.json, or a run folder holding one (the newest is used)")
    parser.add_argument("other", nargs="?", help="a second card (or run folder): print the diff from PATH to it")
    parser.add_argument("--output-dir", "-o", help="where to write model_card.md/.html (default: beside the JSON)")
    parser.add_argument(
        "--format",
        choices=("card", "hf"),
        default="card",
        help="card: model_card.md and .html (default); hf: a Hugging Face model card README.md (needs huggingface_hub)",
    )
    hub = parser.add_argument_group("--format hf")
    hub.add_argument(
        "--license", help="Hub license id of the model (default: the card's, from TrustReport(license=...))"
    )
    hub.add_argument("--license-name", help="name of the license when --license other")
    hub.add_argument("--license-link", help="link to the license text when --license other (e.g. LICENSE)")
    hub.add_argument("--dataset", action="append", help="Hub id of a data set the model used (repeatable)")
    hub.add_argument("--model-name", help="name in the model-index (default: the card's title)")
    hub.add_argument("--task-type", help="Hub task id (default: inferred, e.g. tabular-classification)")
    parser.add_argument("--diff-output", help="also write the diff as Markdown (.md) or JSON (.json) to this file")
    parser.add_argument("--screenshot", help="also save a PNG of the rendered HTML here (needs headless Chromium)")
    parser.add_argument("--width", type=int, default=1280, help="screenshot width in pixels (default 1280)")
    parser.add_argument("--height", type=int, default=1800, help="screenshot height in pixels (default 1800)")
    parser.add_argument(
        "--fail-on-breach", action="store_true",
        help="exit with status 1 when a standard of the (last) card is not met",
    )  # fmt: skip
    return parser


def _card_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.rglob("model_card.json"), key=lambda f: f.stat().st_mtime)
        return found[-1] if found else p
    return p


def report_main(argv: Optional[list[str]] = None) -> int:
    """Run ``lightning-trust report``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        card = load_card(args.path)
        other = load_card(args.other) if args.other else None
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        print(f"lightning-trust report: {err}", file=sys.stderr)
        return 2
    if other is None and args.format == "hf":
        return _write_hf(card, args)
    if other is None:
        directory = Path(args.output_dir) if args.output_dir else _card_path(args.path).parent
        paths = write_renders(card, directory)
        print(standards_summary(card, str(paths["html"])))
        if args.screenshot:
            from lightning_trust.report.browser import screenshot

            try:
                print(f"Screenshot: {screenshot(paths['html'], args.screenshot, args.width, args.height)}")
            except (FileNotFoundError, RuntimeError) as err:
                print(f"lightning-trust report: {err}", file=sys.stderr)
                return 2
        final = card
    else:
        diff = diff_cards(card, other)
        text = render_diff_markdown(diff, str(_card_path(args.path)), str(_card_path(args.other)))
        print(text, end="")
        if args.diff_output:
            out = Path(args.diff_output)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(diff, indent=2) + "\n" if out.suffix == ".json" else text, encoding="utf-8")
        final = other
    return int(args.fail_on_breach and not final["summary"]["all_met"])


def _write_hf(card: dict, args: argparse.Namespace) -> int:
    """``--format hf``: write README.md, print its path and the standards summary; 2 on a refusal."""
    try:
        from lightning_trust.report.hf_card import write_hf_card
    except ImportError as err:  # pragma: no cover - huggingface_hub is installed with the hub extra
        print(f"lightning-trust report: --format hf needs huggingface_hub ({err}); pip install 'lightning-trust[hub]'",
              file=sys.stderr)  # fmt: skip
        return 2
    directory = Path(args.output_dir) if args.output_dir else _card_path(args.path).parent
    try:
        path = write_hf_card(
            card, directory, license=args.license, license_name=args.license_name, license_link=args.license_link,
            datasets=args.dataset, model_name=args.model_name, task_type=args.task_type,
        )  # fmt: skip
    except ValueError as err:
        print(f"lightning-trust report: {err}", file=sys.stderr)
        return 2
    print(f"Hugging Face model card: {path}")
    print(standards_summary(card))
    return int(args.fail_on_breach and not card["summary"]["all_met"])
