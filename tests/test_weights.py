"""``--weights imagenet``: torchvision's download into the torch hub cache; offline a quick, clear error.

Nothing here downloads: the download function is replaced by one that fails (or must not be called).
"""

import socket
import urllib.error

import pytest
import torch
import torchvision

from influence_core import InfluenceLensError
from influence_core.model import DOWNLOAD_TIMEOUT_S, IMAGENET, build_resnet18, hub_weights_path


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert str(hub_weights_path()).startswith(str(tmp_path))
    return hub_weights_path()


def test_offline_download_fails_at_once_naming_the_alternatives(empty_hub, monkeypatch, capsys):
    from influence_core.cli import main

    timeouts = []

    def offline(url, dst, *args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code = main(
        [
            "train",
            "--dataset",
            "demo",
            "--classes",
            "0",
            "1",
            "--run-dir",
            str(empty_hub.parents[3] / "run"),
            "--weights",
            "imagenet",
            "--image-size",
            "16",
            "--downsample",
            "0.2",
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "Cannot download the ImageNet ResNet18 weights" in err and "name resolution" in err
    assert "--weights PATH" in err and str(empty_hub) in err
    assert timeouts == [DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() is None  # restored afterwards


def test_cached_imagenet_weights_are_used_without_a_download(empty_hub, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    imagenet_like = torchvision.models.resnet18(weights=None)
    empty_hub.parent.mkdir(parents=True)
    torch.save(imagenet_like.state_dict(), empty_hub)
    model, source = build_resnet18(3, IMAGENET)
    assert source == "pretrained" and model.fc.out_features == 3
    assert torch.equal(model.layer1[0].conv1.weight, imagenet_like.layer1[0].conv1.weight)


def test_a_corrupt_download_is_a_clear_error(empty_hub, monkeypatch):
    def truncated(url, dst, *args, **kwargs):
        raise RuntimeError('invalid hash value (expected "f37072fd", got "0000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", truncated)
    with pytest.raises(InfluenceLensError, match="invalid hash value"):
        build_resnet18(2, IMAGENET)
