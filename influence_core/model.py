"""torchvision ResNet18 with the right number of outputs; ImageNet weights only from local files."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import InfluenceLensError

HUB_WEIGHTS_NAME = "resnet18-f37072fd.pth"  # the file torchvision's ResNet18_Weights.IMAGENET1K_V1 caches


def find_pretrained_weights(path: str | Path | None = None) -> Path | None:
    """The user's weights file if given, else torchvision's file in the torch hub cache, else None."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InfluenceLensError(f"Pretrained weights file {p} does not exist.",
                                     "give the path of a ResNet18 state_dict (.pth), or leave it empty to train from scratch")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / HUB_WEIGHTS_NAME
    return cached if cached.is_file() else None


def build_resnet18(num_classes: int, pretrained: str | Path | None | bool = None) -> tuple[nn.Module, str]:
    """ResNet18 with a ``num_classes``-way ``fc`` head, and ``"pretrained"`` or ``"scratch"``.

    ``pretrained``: a weights path, ``True``/``None`` to look in the torch hub cache, ``False`` for scratch.
    Nothing is ever downloaded.
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    source = None if pretrained is False else find_pretrained_weights(None if pretrained in (True, None) else pretrained)
    if source is None:
        return model, "scratch"
    state = load_state_dict(source)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise InfluenceLensError(f"{source} is not a torchvision ResNet18 state_dict "
                                 f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).",
                                 "use torchvision's resnet18 ImageNet weights file")
    return model, "pretrained"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``), with a clear error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-torch files
        raise InfluenceLensError(f"Cannot read checkpoint {path}: {type(e).__name__}: {e}",
                                 "give a state_dict saved with torch.save(model.state_dict(), path)") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InfluenceLensError(f"{path} does not hold a state_dict of tensors.",
                                 "save it with torch.save(model.state_dict(), path)")
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model``; a shape or key mismatch names the first differences."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape {wrong[:3]}" if wrong else ""]))
        raise InfluenceLensError(f"Checkpoint {path} does not match a ResNet18 with {own['fc.weight'].shape[0]} "
                                 f"classes: {detail}.",
                                 "use a checkpoint trained on the same classes, or retrain with --retrain")
    model.load_state_dict(state)
    return model
