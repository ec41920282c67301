"""Build a small real-image workload for smoke-testing the peer runners (not the benchmark itself).

Two Tiny-ImageNet classes (goldfish n01443537, lemon n07749582), 64×64 RGB normalized with ImageNet
statistics; a fraction of the training labels is flipped; a ResNet18 (random init) is trained for a few
epochs on the corrupted labels, and out-of-sample probabilities come from 4-fold cross-validation with
the same recipe (for cleanlab).

    python benchmarks/make_tiny_workload.py OUT_DIR [--n-train 200] [--n-test 20] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from workload import Settings, build_model, save_workload

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200"
)  # ../shared beside the checkout
DATA = Path(os.environ.get("TINY_IMAGENET", DEFAULT_DATA)) / "train"
CLASSES = ("n01443537", "n07749582")  # goldfish, lemon
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_images(wnid: str, count: int) -> torch.Tensor:
    """(count, 3, 64, 64) float32 normalized images of one class, in file-name order."""
    files = sorted((DATA / wnid / "images").glob("*.JPEG"))[:count]
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - MEAN) / STD


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    """The recipe: ResNet18 from random init, Adam lr 1e-3, batch 32, ``epochs`` passes; eval mode."""
    torch.manual_seed(seed)
    model = build_model(num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def out_of_fold_probs(x: torch.Tensor, y: torch.Tensor, epochs: int, folds: int = 4) -> torch.Tensor:
    """(n, 2) class probabilities of each sample from a model trained without its fold."""
    probs = torch.empty(len(x), 2)
    fold_of = torch.arange(len(x)) % folds
    for k in range(folds):
        held = fold_of == k
        model = train(x[~held], y[~held], epochs, seed=k + 1)
        with torch.no_grad():
            probs[held] = model(x[held]).softmax(-1)
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    args = parser.parse_args()
    torch.set_num_threads(2)

    per_class_train, per_class_test = args.n_train // 2, args.n_test // 2
    x_parts, y_parts = [], []
    for label, wnid in enumerate(CLASSES):
        x_parts.append(load_images(wnid, per_class_train + per_class_test))
        y_parts.append(torch.full((per_class_train + per_class_test,), label))
    is_test = torch.cat([torch.arange(len(p)) >= per_class_train for p in x_parts])
    x, y = torch.cat(x_parts), torch.cat(y_parts)
    x_train, y_clean, x_test, y_test = x[~is_test], y[~is_test], x[is_test], y[is_test]

    gen = torch.Generator().manual_seed(0)
    flipped = torch.randperm(len(y_clean), generator=gen)[: int(args.flip * len(y_clean))]
    y_train = y_clean.clone()
    y_train[flipped] = 1 - y_train[flipped]
    is_corrupted = y_train != y_clean

    model = train(x_train, y_train, args.epochs, seed=0)
    pred_probs = out_of_fold_probs(x_train, y_train, args.epochs)
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    settings = Settings(
        num_classes=2,
        regularization=1e-2,
        scope="all",
        cg_maxiter=20,
        cg_tol=1e-4,
        time_cap_s=60.0,
        batch_size=50,
        extra={"classes": CLASSES, "flip": args.flip, "epochs": args.epochs, "test_acc": acc},
    )
    save_workload(
        args.out_dir,
        model,
        {
            "x_train": x_train,
            "y_train": y_train,
            "x_test": x_test,
            "y_test": y_test,
            "pred_probs": pred_probs,
            "is_corrupted": is_corrupted,
        },
        settings,
    )
    print(
        f"workload in {args.out_dir}: n_train={len(x_train)} n_test={len(x_test)} "
        f"flipped={int(is_corrupted.sum())} test_acc={acc:.2f}"
    )


if __name__ == "__main__":
    main()
