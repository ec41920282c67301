"""Output-curvature columns on many classes: whole-network EK-FAC with every column vs the leading ones vs
sampled labels, to choose what ``labels="auto"`` does above ``EXACT_MAX_CLASSES`` classes.

    PYTHONPATH=. .venv/bin/python benchmarks/label_columns.py [--epochs 8] [--out benchmarks/out/label_columns.json]

Data: a real 20-class set, fashion-mnist's 10 classes (Debian's ``dataset-fashion-mnist``) and scikit-learn's 10
digits (the demo), both through ``influence_core.data.load_dataset`` at 32 px; 1,000 training and 100 test
images drawn evenly from both (seed 0). Model: the product's ResNet18 from scratch, Adam (lr 1e-3), ``--epochs``.
Then the influence matrix (100 × 1,000, whole network, λ = 1e-3, default rank and fit size) with ``labels="exact"``
(19 columns: the reference), ``"leading"`` with k columns and ``"sampled"`` with m labels; per variant: relative
Frobenius error against the reference, Pearson r, mean overlap of each test point's 10 most helpful training
images, fit seconds (2 threads). Also the share of the output curvature's trace that the k leading columns keep,
over the training images at the trained model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from influence_core.data import load_dataset
from influence_core.influence import Damping, InfluenceModel, Method
from influence_core.model import build_resnet18
from influence_core.storage import atomic_write_json

LEADING = (1, 2, 4, 8, 15)
SAMPLED = (1, 4, 15)


def twenty_classes(n_train: int, n_test: int, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: 32-px inputs ``(n, 3, 32, 32)`` float32 and labels 0–19."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for offset, spec in ((0, "fashion-mnist"), (10, "demo")):
        images = load_dataset(spec, image_size=32)
        pick = rng.choice(len(images), (n_train + n_test) // 2, replace=False)
        xs.append(images.tensors(pick))
        ys.append(torch.as_tensor(images.labels[pick] + offset))
    order = torch.as_tensor(rng.permutation(n_train + n_test))
    x, y = torch.cat(xs)[order], torch.cat(ys)[order]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_resnet18(20, pretrained=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        print(f"epoch {epoch + 1}/{epochs}", file=sys.stderr)
    return model.eval()


def kept_trace(model: torch.nn.Module, x: torch.Tensor, k: int) -> float:
    """Mean share of ``tr(diag p − p pᵀ)`` in its ``k`` largest eigenvalues, over ``x``."""
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    evals = torch.linalg.eigvalsh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).clamp_min(0)
    return float((evals[:, -k:].sum(1) / evals.sum(1)).mean())


def compare(matrix: np.ndarray, reference: np.ndarray) -> dict:
    top = 10
    overlap = np.mean(
        [
            len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top
            for a, b in zip(matrix, reference, strict=True)
        ]
    )
    return {
        "rel_frobenius": float(np.linalg.norm(matrix - reference) / np.linalg.norm(reference)),
        "pearson": float(np.corrcoef(matrix.ravel(), reference.ravel())[0, 1]),
        "top10_overlap": float(overlap),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/label_columns.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = twenty_classes(1000, 100)
    model = train(x_train, y_train, a.epochs)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    variants = {"exact": {"labels": "exact"}}
    variants |= {f"leading{k}": {"labels": "leading", "label_columns": k} for k in LEADING}
    variants |= {f"sampled{m}": {"labels": "sampled", "label_samples": m} for m in SAMPLED}
    results: dict = {
        "test_accuracy": accuracy,
        "kept_trace": {k: kept_trace(model, x_train, k) for k in LEADING},
        "variants": {},
    }
    reference = None
    for name, options in variants.items():
        im = InfluenceModel(
            model, scope="all", method=Method.named("ekfac", **options), damping=Damping.of(1e-3), device="cpu"
        )
        t = time.perf_counter()
        im.fit(x_train, y_train)
        fit_s = time.perf_counter() - t
        matrix = im.influences(x_test, y_test, x_train, y_train)
        reference = matrix if reference is None else reference
        results["variants"][name] = {"options": options, "fit_s": round(fit_s, 1), **compare(matrix, reference)}
        print(name, json.dumps(results["variants"][name]), file=sys.stderr)
    atomic_write_json(a.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
