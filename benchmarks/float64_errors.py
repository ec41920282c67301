"""Error of every inverse-curvature method at the product's default damping, against float64 truth, per scope.

    PYTHONPATH=. .venv/bin/python benchmarks/float64_errors.py [--dataset tiny-imagenet:PATH] [--out FILE.json]

Two trained models, each method at its defaults (``Method.named(m)``) and the scope's default damping
(``default_damping``: ``top:1e-3`` on the head, ``top:1e-5`` per block beyond it), float32 as the product runs:

* scope ``all``: a small CNN (conv 1→8 3×3, ReLU, 2×2 max-pool, linear 128→10: 1,370 parameters) trained to
  100 % training accuracy on 400 of scikit-learn's digits (10 classes), 40 test digits;
* scope ``head``: the product's ResNet18 trained from scratch for 3 epochs on goldfish vs lemon (440 / 55 images,
  ``influence_core.train``; cached under ``benchmarks/out/float64_errors/run``).

Truth, computed here without the engine: the Gauss-Newton matrix of the mean cross-entropy in float64 (per-example
Jacobians of a float64 copy of the model for the CNN; the closed form of a linear layer on float64 penultimate
features for the head), ``H + Λ`` solved exactly, ``truth[t, i] = g_testᵀ (H + Λ)⁻¹ g_i``. ``Λ`` is the λ the
engine resolved per block (``InfluenceModel.block_damping()``) on that block's parameters: one block for
``direct``/``cg``/``lissa``/``arnoldi``, one per layer for ``kfac``/``ekfac``, so those rows measure the Kronecker
approximation plus rounding at the same damping. Prints and writes the relative Frobenius error and Pearson r of
every method's (n_test, n_train) matrix, with the resolved λ and condition number of each block.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from influence_core import TrainConfig, train
from influence_core.influence import METHODS, InfluenceModel, Method, Scope, default_damping

BENCH = Path(__file__).resolve().parent


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def solve_truth(h: np.ndarray, lam: np.ndarray, g_test: np.ndarray, g_train: np.ndarray) -> np.ndarray:
    """``g_test (H + diag(lam))⁻¹ g_trainᵀ``: (n_test, n_train) float64."""
    return g_test @ np.linalg.solve(h + np.diag(lam), g_train.T)


def block_lambdas(im: InfluenceModel, names: list[str], sizes: list[int]) -> np.ndarray:
    """(p,) the λ of each parameter, in the order of ``names``: its block's (a block is named by its parameters
    joined with ``|``, or ``""`` for the whole scope)."""
    blocks = im.block_damping()
    out = []
    for name, size in zip(names, sizes, strict=True):
        (block,) = (b for b in blocks if b == "" or name in b.split("|"))
        out.append(np.full(size, blocks[block]))
    return np.concatenate(out)


def engine_rows(model: nn.Module, scope: Scope, data, truth_of) -> list[dict]:
    """One row per method: the engine's matrix at the defaults against ``truth_of(im)``."""
    x_train, y_train, x_test, y_test = data
    rows = []
    for method in METHODS:
        t0 = time.perf_counter()
        im = InfluenceModel(model, method=Method.named(method), scope=scope, device="cpu").fit(x_train, y_train)
        got = im.influences(x_test, y_test).astype(np.float64)
        truth, h_top = truth_of(im)
        lambdas = im.block_damping()
        rows.append(
            {
                "scope": str(scope),
                "method": method,
                "damping": str(im.damping),
                "lambda_per_block": lambdas,
                "largest_eigenvalue": h_top,
                "rel_error": relative_error(got, truth),
                "pearson": float(np.corrcoef(got.ravel(), truth.ravel())[0, 1]),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        print(
            f"{scope:>4} {method:8s} {rows[-1]['damping']:>10s}  rel. error {rows[-1]['rel_error']:.2e}  "
            f"Pearson {rows[-1]['pearson']:.5f}  λ {', '.join(f'{v:.3g}' for v in lambdas.values())}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- scope all
def small_cnn_rows() -> list[dict]:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    x_train, y_train, x_test, y_test = x[order[:400]], y[order[:400]], x[order[400:440]], y[order[400:440]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(500):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    accuracy = float((model(x_train).argmax(1) == y_train).float().mean())
    print(f"small CNN: {sum(p.numel() for p in model.parameters())} parameters, train accuracy {accuracy:.3f}")

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]
    model64 = copy.deepcopy(model).double().requires_grad_(False)
    theta = torch.cat([p.flatten() for p in model64.parameters()])

    def logits(t: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, torch.split(t, sizes), strict=True))
        params = {n: v.view(s) for (n, v), s in zip(params.items(), shapes, strict=True)}
        return torch.func.functional_call(model64, params, (xb.double(),))

    def jacobians(xb: torch.Tensor) -> torch.Tensor:  # (n, C, p)
        return torch.func.vmap(lambda xi: torch.func.jacrev(logits)(theta, xi[None])[0])(xb)

    def grads(xb: torch.Tensor, yb: torch.Tensor) -> np.ndarray:  # (n, p): J_iᵀ (softmax − onehot)
        jac, probs = jacobians(xb), logits(theta, xb).softmax(-1)
        return torch.einsum("icp,ic->ip", jac, probs - F.one_hot(yb, 10).double()).numpy()

    jac, probs = jacobians(x_train), logits(theta, x_train).softmax(-1)
    out_curv = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    h = (torch.einsum("icp,icd,idq->pq", jac, out_curv, jac) / len(y_train)).numpy()
    g_train, g_test = grads(x_train, y_train), grads(x_test, y_test)
    h_top = float(np.linalg.eigvalsh(h)[-1])
    return engine_rows(
        model,
        Scope.ALL,
        (x_train, y_train, x_test, y_test),
        lambda im: (solve_truth(h, block_lambdas(im, names, sizes), g_test, g_train), h_top),
    )


# --------------------------------------------------------------------------------------------- scope head
def resnet_head_rows(dataset: str, run_dir: Path) -> list[dict]:
    config = TrainConfig(dataset=dataset, classes=["goldfish", "lemon"], epochs=3, downsample=0.5, seed=0)
    run = train(config, run_dir, device="cpu")
    x_train, y_train = run.tensors("train")
    x_test, y_test = run.tensors("test")
    x_train, x_test = x_train[:], x_test[:]
    model = run.load_model().eval()
    print(f"ResNet18: {len(y_train)} / {len(y_test)} images, test accuracy {run.metrics['accuracy_test']:.3f}")

    model64 = copy.deepcopy(model).double()
    seen: list[torch.Tensor] = []
    model64.fc.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))

    def features(x: torch.Tensor) -> torch.Tensor:  # (n, d) float64 inputs of fc
        seen.clear()
        with torch.no_grad():
            for xb in x.split(64):
                model64(xb.double())
        return torch.cat(seen)

    phi_train, phi_test = features(x_train), features(x_test)
    w, b = model64.fc.weight.detach(), model64.fc.bias.detach()
    classes, dim = w.shape

    def jac_and_probs(phi: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(n, C, C·d + C) Jacobian of the logits by (weight row-major, bias), and (n, C) softmax."""
        n = len(phi)
        jac = torch.zeros(n, classes, classes * dim + classes, dtype=torch.float64)
        for c in range(classes):
            jac[:, c, c * dim : (c + 1) * dim] = phi
            jac[:, c, classes * dim + c] = 1.0
        return jac.numpy(), (phi @ w.T + b).softmax(-1).numpy()

    def grads(phi: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        jac, probs = jac_and_probs(phi)
        return np.einsum("icp,ic->ip", jac, probs - np.eye(classes)[y.numpy()])

    jac, probs = jac_and_probs(phi_train)
    out_curv = np.einsum("ic,cd->icd", probs, np.eye(classes)) - probs[:, :, None] * probs[:, None, :]
    h = np.einsum("icp,icd,idq->pq", jac, out_curv, jac) / len(y_train)
    g_train, g_test = grads(phi_train, y_train), grads(phi_test, y_test)
    h_top = float(np.linalg.eigvalsh(h)[-1])
    sizes = [classes * dim, classes]
    return engine_rows(
        model,
        Scope.HEAD,
        (x_train, y_train, x_test, y_test),
        lambda im: (solve_truth(h, block_lambdas(im, ["weight", "bias"], sizes), g_test, g_train), h_top),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset",
        default=f"tiny-imagenet:{BENCH.parent.parent / 'shared' / 'data' / 'tiny-imagenet-200'}",
        help="dataset spec (default: the tiny-imagenet copy in ../shared next to the repository)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out" / "float64_errors" / "results.json")
    args = p.parse_args(argv)
    print(f"defaults: head {default_damping(Scope.HEAD)}, beyond it {default_damping(Scope.ALL)}")
    rows = small_cnn_rows() + resnet_head_rows(args.dataset, args.out.parent / "run")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
