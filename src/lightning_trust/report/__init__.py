"""lightning_trust.report: the model card a run writes about itself, judged against declared standards.

Example:
    >>> from lightning_trust.report import TrustReport
    >>> report = TrustReport(standards={"privacy.epsilon": {"max": 8}}, fail_on_breach=True)
"""

from lightning_trust.report.callback import TrustReport
from lightning_trust.report.card import SCHEMA_VERSION, card_schema, load_card, validate_card, write_card, write_renders
from lightning_trust.report.diff import diff_cards, render_diff_markdown
from lightning_trust.report.render_html import render_html
from lightning_trust.report.render_markdown import render_markdown
from lightning_trust.report.standards import Standard, UnknownStandardError, parse_standards

__all__ = [
    "SCHEMA_VERSION",
    "Standard",
    "TrustReport",
    "UnknownStandardError",
    "card_schema",
    "diff_cards",
    "load_card",
    "parse_standards",
    "render_diff_markdown",
    "render_html",
    "render_markdown",
    "validate_card",
    "write_card",
    "write_renders",
]
