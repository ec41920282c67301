"""Cached ResNet18 training and the run directory it writes."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from influence_core import InfluenceLensError, Run, TrainConfig, train
from influence_core.model import build_resnet18, load_checkpoint
from influence_core.training import SETTINGS_ADDED_LATER, _translate, checkpoint_epochs, keyed_settings


def test_run_directory_is_self_contained(demo_run):
    run = demo_run
    assert run.config["weights"] == "scratch" and run.classes == [str(d) for d in range(10)]
    n_train = len(run.ids("train"))
    flipped = run.flipped()
    assert flipped.sum() == round(0.1 * n_train)
    assert np.all(run.labels("train")[flipped] != run.true_labels("train")[flipped])
    assert set(run.corruption["flipped"]) == set(np.array(run.ids("train"))[flipped])
    assert [p.name for p in run.checkpoint_paths()] == ["epoch_2.pt", "final.pt"]  # 3 epochs, 2 kept
    assert run.dynamics["loss"].shape == run.dynamics["margin"].shape == (3, n_train)
    assert len(run.history) == 3 and all(h["val_loss"] > 0 for h in run.history)
    assert run.predictions["probs_test"].shape == (len(run.ids("test")), 10)
    assert 0 <= run.metrics["f1_test"] <= 1 and np.array(run.metrics["confusion_matrix"]).sum() == len(run.ids("test"))
    x, y = run.tensors("test")
    assert x.shape[0] == y.shape[0] == len(run.ids("test")) and torch.equal(y, torch.tensor(run.labels("test")))
    assert run.load_model().fc.out_features == 10


@pytest.mark.slow  # several trainings
def test_second_identical_call_hits_cache_and_changes_retrain(runs_root):
    config = TrainConfig(dataset="demo", classes=["0", "1"], downsample=0.3, image_size=16, epochs=1)
    first = train(config, runs_root / "cache")
    final = first.path / "checkpoints" / "final.pt"
    stamp = final.stat().st_mtime_ns
    t = time.perf_counter()
    train(config, runs_root / "cache")
    assert time.perf_counter() - t < 5 and final.stat().st_mtime_ns == stamp
    changed = TrainConfig(**{**config.__dict__, "corrupt_fraction": 0.1})  # a changed label retrains
    train(changed, runs_root / "cache")
    assert final.stat().st_mtime_ns != stamp and Run(runs_root / "cache").flipped().sum() > 0
    stamp = final.stat().st_mtime_ns
    train(changed, runs_root / "cache", retrain=True)
    assert final.stat().st_mtime_ns != stamp


def test_config_rebuilt_from_a_run_hits_its_cache(demo_run):
    config = TrainConfig.from_run(demo_run)
    assert config.corrupt_fraction == 0.1 and config.image_size == 16
    stamp = (demo_run.path / "checkpoints" / "final.pt").stat().st_mtime_ns
    train(config, demo_run.path)
    assert (demo_run.path / "checkpoints" / "final.pt").stat().st_mtime_ns == stamp


def test_runs_cached_before_a_setting_existed_keep_their_key(demo_run):
    """A ``config.json`` without ``augment_shift`` was trained without shifts, and at that value the setting stays
    out of the key: such runs are still cache hits. Any other value enters the key."""
    config = TrainConfig.from_run(demo_run)
    recorded = (demo_run.path / "config.json").read_text()
    older = {k: v for k, v in json.loads(recorded).items() if k not in SETTINGS_ADDED_LATER}
    (demo_run.path / "config.json").write_text(json.dumps(older))
    try:
        assert TrainConfig.from_run(Run(demo_run.path)).augment_shift == 0.0
    finally:
        (demo_run.path / "config.json").write_text(recorded)
    assert config.augment_shift == 0.0  # the digits' default
    unshifted = keyed_settings(config)
    assert "augment_shift" not in unshifted
    assert keyed_settings(dataclasses.replace(config, augment_shift=0.25)) == unshifted | {"augment_shift": 0.25}


def test_photos_are_shifted_by_default_and_centred_items_are_not():
    """``augment_shift=None`` resolves by dataset kind; an explicit value, 0 included, wins."""
    assert TrainConfig(dataset="tiny-imagenet:/data/ti").shift_share() == 0.25
    assert TrainConfig(dataset="folder:/data/pets").shift_share() == 0.25
    assert TrainConfig(dataset="demo").shift_share() == 0.0 == TrainConfig(dataset="fashion-mnist:").shift_share()
    assert TrainConfig(dataset="tiny-imagenet:/data/ti", augment_shift=0.0).shift_share() == 0.0
    assert TrainConfig(dataset="demo", augment_shift=0.125).shift_share() == 0.125


def test_shifts_move_every_image_by_its_own_offset_with_reflected_borders():
    """``_translate`` against numpy's reflect padding and slicing, image by image (offsets up to the pad and
    beyond the image, which are clamped to the side − 1)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 9, 9, generator=gen)
    offsets = torch.tensor([[0, 0], [2, -1], [-3, 3], [1, 1], [-2, 0], [0, 3]])
    got = _translate(x, offsets).numpy()
    for i, (dy, dx) in enumerate(offsets.tolist()):
        padded = np.pad(x[i].numpy(), ((0, 0), (3, 3), (3, 3)), mode="reflect")
        np.testing.assert_array_equal(got[i], padded[:, 3 + dy : 3 + dy + 9, 3 + dx : 3 + dx + 9])
    np.testing.assert_array_equal(_translate(x[:1], torch.tensor([[20, 0]])), _translate(x[:1], torch.tensor([[8, 0]])))


def test_checkpoint_epochs_are_evenly_spaced():
    assert checkpoint_epochs(10, 4) == [2, 5, 8]  # the 10th epoch is final.pt
    assert checkpoint_epochs(3, 2) == [2] and checkpoint_epochs(1, 4) == [] and checkpoint_epochs(10, 0) == []


def test_wrong_or_broken_checkpoint_is_a_clear_error(tmp_path):
    model, _ = build_resnet18(10, pretrained=False)
    torch.save(model.state_dict(), tmp_path / "ten.pt")
    two, _ = build_resnet18(2, pretrained=False)
    with pytest.raises(InfluenceLensError, match="does not match a ResNet18 with 2 classes"):
        load_checkpoint(two, tmp_path / "ten.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(InfluenceLensError, match="Cannot read checkpoint"):
        load_checkpoint(two, tmp_path / "junk.pt")


def test_nan_loss_stops_with_advice(tmp_path):
    config = TrainConfig(dataset="demo", classes=["0", "1"], downsample=0.3, image_size=16, epochs=2, lr=1e30)
    with pytest.raises(InfluenceLensError, match="lower the learning rate"):
        train(config, tmp_path / "nan")
    assert not (tmp_path / "nan" / "train_key").exists()  # an unfinished run is never taken as cached


def test_head_recipe_freezes_the_backbone(runs_root):
    config = TrainConfig(
        dataset="demo", classes=["3", "8"], downsample=0.3, image_size=16, epochs=1, train_layers="head"
    )
    run = train(config, runs_root / "head")
    torch.manual_seed(0)
    reference, _ = build_resnet18(2, pretrained=False)
    trained = run.load_model()
    assert torch.equal(trained.conv1.weight, reference.conv1.weight)  # same seed, frozen backbone
    assert not torch.equal(trained.fc.weight, reference.fc.weight)


def test_local_pretrained_weights_are_used_and_bad_ones_refused(tmp_path):
    import torchvision

    imagenet_like = torchvision.models.resnet18(weights=None)  # 1000 outputs, as torchvision's file
    torch.save(imagenet_like.state_dict(), tmp_path / "resnet18.pth")
    model, source = build_resnet18(2, pretrained=tmp_path / "resnet18.pth")
    assert source == "pretrained" and model.fc.out_features == 2
    assert torch.equal(model.layer4[1].conv2.weight, imagenet_like.layer4[1].conv2.weight)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InfluenceLensError, match="not a torchvision ResNet18"):
        build_resnet18(2, pretrained=tmp_path / "other.pth")
    with pytest.raises(InfluenceLensError, match="does not exist"):
        build_resnet18(2, pretrained=tmp_path / "missing.pth")


@pytest.mark.slow  # several trainings
def test_leave_group_out_fit_keeps_the_full_sets_batches(demo_run):
    """``fit_model(exclude=...)``: an empty mask reproduces the plain fit bit for bit; a mask keeps the removed points
    out of every batch (their recorded losses stay 0) while the others see the same order, flips and shifts."""
    from influence_core.training import fit_model

    x, y = demo_run.tensors("train")
    x_te, y_te = demo_run.tensors("test")
    config = TrainConfig(
        dataset="demo", epochs=2, image_size=16, n_checkpoints=0, augment_flip=True, augment_shift=0.25
    )

    def fit(exclude):
        torch.manual_seed(0)
        model, _ = build_resnet18(demo_run.n_classes, False)
        _, dynamics = fit_model(model, config, x, y, x_te, y_te, exclude=exclude)
        return model.state_dict(), dynamics["loss"]

    plain, plain_loss = fit(None)
    same, same_loss = fit(np.zeros(len(y), bool))
    assert all(torch.equal(plain[k], same[k]) for k in plain) and np.array_equal(plain_loss, same_loss)
    removed = np.zeros(len(y), bool)
    removed[::50] = True
    without, loss = fit(removed)
    assert (loss[:, removed] == 0).all() and (loss[:, ~removed] > 0).all()
    assert not torch.equal(without["fc.weight"], plain["fc.weight"])
