"""One isolated virtual environment per peer library, created once and reused.

Peers (pyDVL, Kronfluence, cleanlab, TRAK) pin dependencies that clash with the
product (pyDVL 0.10 needs numpy<2), so each runs in its own venv under
``benchmarks/.venvs/<peer>`` and talks to us only through a workload directory
(see ``benchmarks/workload.py``) and a JSON result file.

CLI::

    python benchmarks/peers.py create [PEER ...]                  # missing venvs (all by default)
    python benchmarks/peers.py run PEER WORKLOAD_DIR OUT_DIR [RUNNER_ARGS ...]

A venv is considered ready when its ``.ready`` marker holds exactly the
requirement list below; change a requirement and pip re-resolves it in place.
Delete ``benchmarks/.venvs/<peer>`` for a clean rebuild.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VENV_ROOT = BENCH_DIR / ".venvs"

# torch/torchvision are pinned explicitly in every venv: pip's global constraint
# caps them at the releases that lie on local disk, so nothing large is downloaded.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
REQUIREMENTS: dict[str, list[str]] = {
    "pydvl": [*TORCH, "pyDVL[influence]==0.10.*", "numpy<2"],
    "kronfluence": [*TORCH, "kronfluence==1.0.*"],
    "cleanlab": [*TORCH, "cleanlab"],
    "trak": [*TORCH, "traker==0.3.*"],
    "dattri": [*TORCH, "dattri==0.3.*"],
}
RUNNERS = {peer: BENCH_DIR / f"peer_{peer}.py" for peer in REQUIREMENTS}
BASE_PYTHON = "python3.11"


def venv_python(peer: str) -> Path:
    """Interpreter of the peer's venv (may not exist yet)."""
    return VENV_ROOT / peer / "bin" / "python"


def _marker_text(peer: str) -> str:
    return "\n".join(REQUIREMENTS[peer]) + "\n"


def is_ready(peer: str) -> bool:
    marker = VENV_ROOT / peer / ".ready"
    return venv_python(peer).exists() and marker.exists() and marker.read_text() == _marker_text(peer)


def ensure_venv(peer: str) -> Path:
    """Create (or rebuild, if its requirements changed) the peer's venv; return its python."""
    if is_ready(peer):
        return venv_python(peer)
    root = VENV_ROOT / peer
    start = time.perf_counter()
    if not venv_python(peer).exists():
        subprocess.run([BASE_PYTHON, "-m", "venv", str(root)], check=True)
    # Quiet pip; its only noise here is the local mirror's "Location ... ignored" warnings.
    pip = [str(venv_python(peer)), "-m", "pip", "install", "--quiet", "--no-warn-script-location"]
    subprocess.run([*pip, *REQUIREMENTS[peer]], check=True)
    (root / ".ready").write_text(_marker_text(peer))
    print(f"[peers] {peer}: venv ready in {time.perf_counter() - start:.0f} s", flush=True)
    return venv_python(peer)


def run_peer(
    peer: str, workload_dir: Path, out_dir: Path, extra_args: list[str] = (), timeout_s: float | None = None
) -> Path:
    """Run ``peer_<peer>.py`` inside its venv on a workload; return the result JSON path."""
    python = ensure_venv(peer)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(RUNNERS[peer]), str(workload_dir), str(out_dir), *extra_args]
    subprocess.run(cmd, check=True, timeout=timeout_s)
    return out_dir / "result.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create missing venvs")
    create.add_argument("peers", nargs="*", metavar="PEER", help=f"among {sorted(REQUIREMENTS)} (default: all)")
    run = sub.add_parser("run", help="run a peer's runner on a workload")
    run.add_argument("peer", choices=sorted(REQUIREMENTS))
    run.add_argument("workload_dir", type=Path)
    run.add_argument("out_dir", type=Path)
    run.add_argument("runner_args", nargs=argparse.REMAINDER, help="passed on, e.g. --method cg --scope head")
    args = parser.parse_args(argv)
    if args.command == "run":
        print(run_peer(args.peer, args.workload_dir, args.out_dir, args.runner_args))
        return
    unknown = set(args.peers) - set(REQUIREMENTS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose among {sorted(REQUIREMENTS)}")
    for peer in args.peers or REQUIREMENTS:
        print(f"[peers] {peer}: {venv_python(peer) if is_ready(peer) else 'creating...'}", flush=True)
        ensure_venv(peer)


if __name__ == "__main__":
    sys.exit(main())
