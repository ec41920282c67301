"""Tabulate the peer results (``*/result.json``) found under a directory.

    python benchmarks/summarize.py RESULTS_DIR

One row per result: peer, method, scope, seconds to the full test × train matrix and to self-influence
(``*`` = extrapolated from a capped partial run, ``-`` = not produced), setup (fit) seconds,
cleanlab's ranking seconds and peak RSS in MiB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def seconds(stage: dict | None) -> str:
    if not stage:
        return "-"
    if stage.get("status") == "infeasible":
        return "infeasible"
    return f"{stage['seconds_full']:.1f}{'*' if stage['extrapolated'] else ''}"


def main(results_dir: str) -> None:
    header = ("peer", "method", "scope", "matrix_s", "self_s", "setup_s", "rank_s", "rss_mib")
    rows = []
    for path in sorted(Path(results_dir).glob("*/result.json")):
        r = json.loads(path.read_text())
        matrix, self_inf = r.get("matrix"), r.get("self_influence")
        setup = matrix.get("setup_s", "-") if matrix else "-"
        rank = round(r["find_label_issues_s"] + r["label_quality_s"], 3) if "find_label_issues_s" in r else "-"
        rows.append(
            (
                r["peer"],
                r["method"],
                r.get("scope", "-"),
                seconds(matrix),
                seconds(self_inf),
                str(setup),
                str(rank),
                str(r.get("peak_rss_mib", "-")),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main(sys.argv[1])
