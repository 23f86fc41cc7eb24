"""Tests of toy_accuracy.py: the shape classifier learns the classes, and a checkpoint's samples are scored (CPU)."""
import pytest

import toy_accuracy
from data import Shapes
from train import main as train_main, parse_args as train_args


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    """A 16px classifier trained briefly (3,000 shapes, 3 epochs, 86% held out): seconds, not minutes."""
    path = str(tmp_path_factory.mktemp("clf") / "clf16.pt")
    toy_accuracy.train_classifier(16, path, num_train=3_000, num_eval=500, epochs=3)
    return path


def test_the_classifier_tells_the_shapes_apart_and_needs_the_right_labels(classifier_path):
    net = toy_accuracy.load_classifier(16, classifier_path)
    data = Shapes(size=16, seed=7, num_train=0, num_eval=500)  # shapes neither it nor training saw
    x, y, _ = data.batch(data.eval)
    overall, per_class = toy_accuracy.class_accuracy(net, x, y)
    assert overall > 0.6 and len(per_class) == 10, (overall, per_class)  # chance is 0.1
    assert toy_accuracy.class_accuracy(net, x, (y + 1) % 10)[0] < 0.2


def test_a_classifier_of_another_size_is_refused(classifier_path):
    with pytest.raises(SystemExit, match="classifies 16px shapes, the samples are 32px"):
        toy_accuracy.load_classifier(32, classifier_path)


def test_scores_a_checkpoints_samples_per_class(tmp_path, classifier_path, capsys, monkeypatch):
    train_main(train_args(["--data=shapes", "--image-size=16", "--model=SiT-S/4", "--depth=2", "--hidden-size=32",
                           "--num-heads=2", "--precision=fp32", "--global-batch-size=4", "--max-steps=2",
                           "--eval-every=0", "--sample-every=0", "--ckpt-every=2", f"--results-dir={tmp_path}"]))
    ckpt = str(tmp_path / "checkpoints" / "0000002.pt")
    overall, per_class = toy_accuracy.main([f"--ckpt={ckpt}", f"--classifier={classifier_path}",
                                            "--per-class=3", "--num-steps=2"])
    out = capsys.readouterr().out
    assert f"class accuracy of 30 samples (guidance 4.0, 2 Heun steps): {overall:.3f}" in out
    assert "| circle | square |" in out and len(per_class) == 10
    assert overall == pytest.approx(sum(per_class) / 10)  # equal classes: the mean of the per-class rates
    assert all(0 <= a <= 1 for a in per_class)
    assert "toy FID (the classifier's 128 features, against 30 real shapes): " in out
    # bf16 sampling (sample.py --precision=bf16) is scored the same way, and its samples are not fp32's
    import torch

    from model import SiT

    compiled, autocast = [], []
    forward = SiT.forward
    monkeypatch.setattr(SiT, "compile", lambda self, *a, **k: compiled.append(self))
    monkeypatch.setattr(SiT, "forward", lambda self, *a, **k: autocast.append(torch.is_autocast_enabled("cpu"))
                        or forward(self, *a, **k))
    toy_accuracy.main([f"--ckpt={ckpt}", f"--classifier={classifier_path}", "--per-class=3", "--num-steps=2",
                       "--precision=bf16", "--compile"])
    bf16 = capsys.readouterr().out
    assert bf16.splitlines()[0].startswith("class accuracy of 30 samples") and len(compiled) == 1
    assert autocast and all(autocast)  # every model call under bf16 autocast


def test_toy_fid_is_small_between_real_shapes_and_large_for_noise(classifier_path):
    import torch

    net = toy_accuracy.load_classifier(16, classifier_path)
    data = Shapes(size=16, seed=11, num_train=0, num_eval=300)
    real = data.batch(data.eval)[0]
    noise = torch.rand(300, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same, far = toy_accuracy.toy_fid(net, real, 16), toy_accuracy.toy_fid(net, noise, 16)
    assert 0 <= same < 0.2 * far, (same, far)
