"""Time the app's pages on a (large) run headless with Streamlit's AppTest, and report the process's memory.

    python benchmarks/app_timing.py --run runs/synthetic/run [--tests 3] [--out benchmarks/out/app_timing.json]

Opens ``app.py`` with ``?run=RUN`` once (the first load: the run's files, the image cache, the result's summaries),
then opens every page and, on the test-image explorer, picks ``--tests`` test images through the URL state, timing
each script run. Memory is this process's peak resident set (``VmHWM``), which includes AppTest and the app.
Numbers are for the script runs only (no browser rendering).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["overview", "setup_run", "explorer", "test_set", "review_queue", "corruption_lab"]


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def main() -> None:
    from streamlit.testing.v1 import AppTest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--tests", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    os.environ.setdefault("INFLUENCE_LENS_RUNS", str(args.run.resolve().parent))  # the app opens runs under it
    sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=1800)
    at.query_params["run"] = args.run.resolve().name  # a reference relative to INFLUENCE_LENS_RUNS
    report: dict = {"run": str(args.run), "first_load_s": timed(at.run), "pages_s": {}, "pick_test_s": []}
    errors = []
    for page in PAGES:
        at.switch_page(f"pages/{page}.py")
        report["pages_s"][page] = timed(at.run)
        errors += [f"{page}: {e.value}" for e in at.error] + [f"{page}: {e.value}" for e in at.exception]
    at.switch_page("pages/explorer.py")
    at.run()
    for test in range(1, args.tests + 1):
        at.session_state["test"] = test * 7
        report["pick_test_s"].append(timed(at.run))
    report |= {"errors": errors, "peak_rss_mib": peak_rss_mib()}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
