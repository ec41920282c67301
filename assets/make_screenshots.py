"""Regenerate the README's screenshots (``assets/screenshots/*.jpg``) from a real run, in headless chromium.

    python assets/make_screenshots.py RUN_DIR [--test 8] [--name goldfish-vs-lemon]

Copies ``RUN_DIR`` into a temporary runs folder as ``--name`` with its dataset location made relative to the
checkout (so that no path of this machine shows), computes its default influence result and the explorer's
whole-network ranking (:func:`~influence_core.upgrade.ranking_upgrade`) where missing, serves ``app.py`` over it and
saves the top of the Overview, the Test image explorer (test image ``--test``) and the Mislabel review as JPEG. Needs Debian's ``chromium`` and the
``playwright`` package (the test extras).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from browsing import CHROMIUM_ARGS, serve, settle  # noqa: E402

from influence_core import Run  # noqa: E402
from influence_core.pipeline import DEFAULT_SETTINGS, compute_influence  # noqa: E402
from influence_core.upgrade import ranking_upgrade  # noqa: E402

OUT = ROOT / "assets" / "screenshots"
WIDTH = 1400


def pages(test: int) -> dict[str, tuple[str, str, int]]:
    """Screenshot name → (address, text that shows once the page is drawn, height of the shot in pixels)."""
    return {
        "overview": ("", "Flips found in the top 10 %", 1000),
        "explorer": (f"explorer?test={test}", "Most helpful training images", 1450),
        "review": ("review_queue", "Rank suspects by", 1000),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--test", type=int, default=8, help="test image shown by the explorer")
    p.add_argument("--name", default="goldfish-vs-lemon", help="the run's name in the app")
    args = p.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit(
            "make_screenshots: chromium not found; install Debian's chromium (apt-get install -y chromium)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("make_screenshots: the playwright package is missing; pip install -e '.[test]'") from None
    if not (args.run_dir / "train_key").is_file():
        raise SystemExit(f"make_screenshots: {args.run_dir} is not a finished run (no train_key); pass a run folder")

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs_root = Path(tmp)
        run_dir = runs_root / args.name
        shutil.copytree(args.run_dir, run_dir)
        config = json.loads((run_dir / "config.json").read_text())
        kind, sep, location = config["dataset"].partition(":")
        if sep and Path(location).is_absolute():
            config["dataset"] = f"{kind}:{os.path.relpath(location, ROOT)}"
            (run_dir / "config.json").write_text(json.dumps(config, indent=2))
        run = Run(run_dir)
        compute_influence(run, DEFAULT_SETTINGS)
        upgrade = ranking_upgrade(run, DEFAULT_SETTINGS)
        if upgrade is not None:
            compute_influence(run, upgrade.settings)
        with serve(runs_root, "screenshots-streamlit.log") as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            for name, (page, text, height) in pages(args.test).items():
                tab = browser.new_page(viewport={"width": WIDTH, "height": height})
                tab.set_default_timeout(180_000)
                tab.goto(f"{base}/{page}{'&' if '?' in page else '?'}run={args.name}")
                tab.get_by_text(text).first.wait_for()
                settle(tab)
                png = runs_root / f"{name}.png"
                tab.screenshot(path=png)
                Image.open(png).convert("RGB").save(OUT / f"{name}.jpg", quality=82, optimize=True)
                print(OUT / f"{name}.jpg")
                tab.close()
            browser.close()


if __name__ == "__main__":
    main()
