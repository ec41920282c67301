"""Workload exchange format shared by the product and the peer runners, plus runner helpers.

A peer runner (``peer_<name>.py``) runs inside that peer's own venv (numpy<2 for pyDVL), so this module
needs only ``torch``, ``torchvision`` and ``numpy`` and never imports ``influence_core``.

Workload directory (written by :func:`save_workload`, read by :func:`load_workload`)::

    model.pt       state_dict of torchvision.models.resnet18(num_classes=K); torch.load(weights_only=True)
    data.pt        dict of tensors, torch.load(weights_only=True):
                     x_train (n, 3, H, W) float32, already normalized
                     y_train (n,) int64   the labels the model was trained on (possibly corrupted)
                     x_test  (m, 3, H, W) float32
                     y_test  (m,) int64
                     pred_probs (n, K) float32, optional: out-of-sample class probabilities (cleanlab)
                     is_corrupted (n,) bool, optional: ground truth of which labels were flipped
    settings.json  see :class:`Settings`

All influence peers evaluate the model in eval mode (BatchNorm on running statistics) and report in the
product's convention: ``I(z, z_test) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z)`` with ``ℓ`` the per-sample CE loss,
``H`` the *mean* training Hessian over the chosen scope, positive = helpful.

Result directory (written by :func:`write_result`)::

    result.json          peer, version, method, scope, environment, peak memory (MiB), and per output a
                         :func:`pipeline_record` (seconds; ``"extrapolated": true`` when a stage hit the
                         time cap and its time was scaled up from the measured part) or an
                         :func:`infeasible_record`
    influence.npy        (k, j) float32, the first k test points × the first j training points
                         (k = m, j = n unless extrapolated)
    self_influence.npy   (s,) float32, the first s training points (s = n unless extrapolated)
    ranking.npy, label_quality.npy, issues.npy   cleanlab only, see peer_cleanlab.py
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

SCOPES = ("head", "all")
"""``head``: parameters of ``fc`` only; ``all``: every Conv2d/Linear weight and bias (BatchNorm excluded)."""


@dataclass
class Settings:
    """Run settings of a workload; ``time_cap_s`` bounds each measured stage separately."""

    num_classes: int
    regularization: float = 1e-3  # λ, added to the mean Hessian
    scope: str = "all"  # default scope; runners accept --scope to override
    cg_maxiter: int = 100
    cg_tol: float = 1e-4  # relative residual tolerance
    time_cap_s: float = 600.0
    batch_size: int = 64
    extra: dict = field(default_factory=dict)  # free-form provenance (seed, corruption rate, ...)


@dataclass
class Workload:
    model: nn.Module  # eval mode, on ``device``
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    settings: Settings
    pred_probs: torch.Tensor | None = None
    is_corrupted: torch.Tensor | None = None


def build_model(num_classes: int) -> nn.Module:
    return torchvision.models.resnet18(num_classes=num_classes)


def save_workload(directory: Path, model: nn.Module, tensors: dict[str, torch.Tensor], settings: Settings) -> Path:
    """Write a workload; ``tensors`` holds x_train, y_train, x_test, y_test, optionally pred_probs, is_corrupted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / "model.pt")
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / "data.pt")
    (directory / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    return directory


def load_workload(directory: Path, device: str = "cpu") -> Workload:
    directory = Path(directory)
    settings = Settings(**json.loads((directory / "settings.json").read_text()))
    model = build_model(settings.num_classes)
    model.load_state_dict(torch.load(directory / "model.pt", weights_only=True, map_location="cpu"))
    model.to(device).eval()
    data = torch.load(directory / "data.pt", weights_only=True, map_location="cpu")
    return Workload(
        model=model,
        settings=settings,
        pred_probs=data.get("pred_probs"),
        is_corrupted=data.get("is_corrupted"),
        **{k: data[k].to(device) for k in ("x_train", "y_train", "x_test", "y_test")},
    )


def pick_device(requested: str | None) -> str:
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def scope_modules(model: nn.Module, scope: str) -> list[str]:
    """Names of the Linear/Conv2d modules whose parameters form the scope."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "head":
        return ["fc"]
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n, 512) inputs of ``model.fc`` for ``x`` (n, 3, H, W), model in eval mode."""
    backbone = nn.Sequential(*(m for name, m in model.named_children() if name != "fc"), nn.Flatten())
    with torch.no_grad():
        return torch.cat([backbone(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def capped_loop(step: Callable[[int, int], np.ndarray], n: int, chunk: int, cap_s: float) -> tuple[np.ndarray, float]:
    """Run ``step(start, stop)`` over ``range(n)`` in chunks until done or ``cap_s`` is exceeded.

    Each step returns an array whose first axis has ``stop - start`` entries; the chunks are
    concatenated. A chunk that is running when the cap passes is completed. Returns
    ``(results, seconds)``; ``len(results) < n`` means the loop stopped at the cap.
    """
    parts, start, t0 = [], 0, time.perf_counter()
    while start < n and (not parts or time.perf_counter() - t0 < cap_s):
        stop = min(start + chunk, n)
        parts.append(np.asarray(step(start, stop), dtype=np.float32))
        start = stop
    return np.concatenate(parts), time.perf_counter() - t0


def stage_record(done: int, total: int, seconds: float) -> dict:
    """Timing of one capped stage; ``seconds_full`` scales the measured time linearly to ``total`` items."""
    return {
        "done": done,
        "total": total,
        "measured_s": round(seconds, 3),
        "seconds_full": round(seconds * total / done, 3),
        "extrapolated": done < total,
    }


def pipeline_record(setup_s: float, **stages: dict) -> dict:
    """Time to a full result: uncapped setup (fit) plus the stages' measured or extrapolated times."""
    return {
        "setup_s": round(setup_s, 3),
        "measured_s": round(setup_s + sum(st["measured_s"] for st in stages.values()), 3),
        "seconds_full": round(setup_s + sum(st["seconds_full"] for st in stages.values()), 3),
        "extrapolated": any(st["extrapolated"] for st in stages.values()),
        "stages": stages,
    }


def infeasible_record(reason: str) -> dict:
    return {"status": "infeasible", "reason": reason}


def peak_memory(device: str) -> dict:
    """Peak resident memory of this process (MiB) and, on GPU, peak allocated CUDA memory (MiB).

    Reads ``VmHWM`` (peak RSS of this address space, reset by exec): ``ru_maxrss`` survives fork+exec on
    Linux, so a runner started from a large parent would report the parent's RSS as its own floor.
    """
    try:
        status = Path("/proc/self/status").read_text()
        rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    except (OSError, StopIteration):
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    out = {"peak_rss_mib": round(rss_kib / 1024, 1)}
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def environment(device: str) -> dict:
    return {
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def write_result(out_dir: Path, record: dict, **arrays: np.ndarray | None) -> Path:
    """Write ``result.json`` plus one ``<name>.npy`` per non-None array; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if array is not None:
            np.save(out_dir / f"{name}.npy", array)
            record.setdefault("files", {})[name] = f"{name}.npy"
    path = out_dir / "result.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def runner_parser(description: str, methods: tuple[str, ...], influence: bool = True) -> argparse.ArgumentParser:
    """CLI shared by the peer runners: ``WORKLOAD_DIR OUT_DIR [--method M] [--device D]`` and, for influence
    peers, ``[--scope S] [--time-cap SECONDS] [--regularization λ]``; unset options fall back to the workload's
    settings."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("workload_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--method", choices=methods, default=methods[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    if influence:
        parser.add_argument("--scope", choices=SCOPES, default=None, help="default: the workload's scope")
        parser.add_argument("--time-cap", type=float, default=None, help="seconds per stage; default: workload's")
        parser.add_argument(
            "--regularization", type=float, default=None, help="absolute λ; default: the workload's regularization"
        )
    return parser
