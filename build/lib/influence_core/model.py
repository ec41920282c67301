"""torchvision ResNet18 with the right number of outputs; ImageNet weights from local files, downloaded on request."""

from __future__ import annotations

import socket
import urllib.error
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import InfluenceLensError

IMAGENET = "imagenet"
"""The ``pretrained`` / ``--weights`` value that downloads torchvision's ImageNet weights if not cached."""
IMAGENET_WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
DOWNLOAD_TIMEOUT_S = 15.0  # per network operation: offline, the download fails at once instead of hanging


def hub_weights_path() -> Path:
    """Where torchvision caches :data:`IMAGENET_WEIGHTS` (``$TORCH_HOME/hub/checkpoints/resnet18-….pth``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name


def find_pretrained_weights(path: str | Path | None = None) -> Path | None:
    """The user's weights file if given, else torchvision's file in the torch hub cache, else None."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InfluenceLensError(
                f"Pretrained weights file {p} does not exist.",
                "give the path of a ResNet18 state_dict (.pth), or leave it empty to train from scratch",
            )
        return p
    cached = hub_weights_path()
    return cached if cached.is_file() else None


def fetch_imagenet_weights() -> Path:
    """torchvision's ImageNet ResNet18 weights in the torch hub cache, downloaded by torchvision once if missing.

    Offline (or on any network error) this fails within :data:`DOWNLOAD_TIMEOUT_S` with an error naming
    ``--weights PATH`` and the cache path, where a copy fetched elsewhere can be put.
    """
    cached = hub_weights_path()
    if not cached.is_file():
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                IMAGENET_WEIGHTS.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise InfluenceLensError(
                f"Cannot download the ImageNet ResNet18 weights from {IMAGENET_WEIGHTS.url}: "
                f"{getattr(e, 'reason', None) or e}.",
                f"fetch that file elsewhere and pass it with --weights PATH, or copy it to {cached}",
            ) from e
    return cached


@contextmanager
def _socket_timeout(seconds: float):
    """A default socket timeout for the duration of the block (torch.hub's download sets none of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def build_resnet18(num_classes: int, pretrained: str | Path | None | bool = None) -> tuple[nn.Module, str]:
    """ResNet18 with a ``num_classes``-way ``fc`` head, and ``"pretrained"`` or ``"scratch"``.

    ``pretrained``: a weights path, ``True``/``None`` to look in the torch hub cache, ``False`` for scratch,
    :data:`IMAGENET` to download torchvision's weights into the hub cache when missing (the only download).
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if pretrained is False:
        return model, "scratch"
    if pretrained == IMAGENET:
        source: Path | None = fetch_imagenet_weights()
    else:
        source = find_pretrained_weights(None if pretrained is True or pretrained is None else pretrained)
    if source is None:
        return model, "scratch"
    state = load_state_dict(source)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise InfluenceLensError(
            f"{source} is not a torchvision ResNet18 state_dict "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).",
            "use torchvision's resnet18 ImageNet weights file",
        )
    return model, "pretrained"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``), with a clear error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-torch files
        raise InfluenceLensError(
            f"Cannot read checkpoint {path}: {type(e).__name__}: {e}",
            "give a state_dict saved with torch.save(model.state_dict(), path)",
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InfluenceLensError(
            f"{path} does not hold a state_dict of tensors.", "save it with torch.save(model.state_dict(), path)"
        )
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model``; a shape or key mismatch names the first differences."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"shape {wrong[:3]}" if wrong else "",
                ],
            )
        )
        raise InfluenceLensError(
            f"Checkpoint {path} does not match a ResNet18 with {own['fc.weight'].shape[0]} classes: {detail}.",
            "use a checkpoint trained on the same classes, or retrain with --retrain",
        )
    model.load_state_dict(state)
    return model
