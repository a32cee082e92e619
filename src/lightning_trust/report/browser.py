"""Headless Chromium for model cards: a PNG screenshot of a card, or its DOM after rendering.

Used by the tests (the card renders, its figures show) and to make the README screenshot. Needs a
``chromium`` (Debian's package) or ``google-chrome`` binary; nothing is fetched from the network.

Example:
    >>> screenshot("runs/adult/version_0/model_card.html", "docs/model_card.png", width=1280, height=1800)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Union

_BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Flags for a quiet, offline, reproducible headless run.
FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
    "--enable-logging=stderr", "--v=0",
)  # fmt: skip


def find_chromium() -> Optional[str]:
    """Path of a Chromium/Chrome binary (``$CHROMIUM`` first), or ``None``."""
    for name in (os.environ.get("CHROMIUM"), *_BINARIES):
        if name:
            found = shutil.which(name)
            if found:
                return found
    return None


def run_chromium(
    html: Union[str, Path], *extra: str, width: int = 1280, height: int = 2000, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run headless Chromium on the local file ``html`` with ``extra`` flags; returns the finished process."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("No chromium binary found; install Debian's `chromium` package or set $CHROMIUM.")
    url = Path(html).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="lt-chromium-") as profile:
        args = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", *extra, url]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(html: Union[str, Path], png: Union[str, Path], width: int = 1280, height: int = 2000) -> Path:
    """Save a ``width`` x ``height`` PNG of the rendered page ``html`` at ``png``."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = run_chromium(html, f"--screenshot={png}", width=width, height=height)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return png


def dump_dom(html: Union[str, Path], width: int = 1280, height: int = 2000) -> tuple[str, str]:
    """The DOM after rendering (scripts run) and Chromium's log (console messages appear as ``CONSOLE``)."""
    proc = run_chromium(html, "--dump-dom", width=width, height=height)
    return proc.stdout, proc.stderr
