"""CLI of issue 7: sample --guide, train-property, path (small smoke runs)."""
import numpy as np
import torch

from digfast.cli import main
from digfast.property_model import NoisyPropertyModel


def test_train_property_then_guided_sample(tmp_path, capsys):
    folder = tmp_path / "prop"
    assert main(["train-property", "--model", "dw4", "--property", "distance:0,1", "--steps", "30",
                 "--out", str(folder)]) == 0
    pm = NoisyPropertyModel.load(folder)
    mean, std = pm(torch.randn(3, 4, 2), torch.full((3,), 0.5))
    assert mean.shape == std.shape == (3,) and (std > 0).all()
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", "dw4", "-n", "8", "--steps", "5", "--sampler", "dpm++2m", "--quiet",
                 "--guide-model", str(folder), "--guide-target", "3.0", "-o", str(out)]) == 0
    assert out.exists()


def test_guide_needs_a_target(capsys):
    assert main(["sample", "--model", "mixture", "-n", "4", "--steps", "3", "--quiet", "--guide", "rg"]) == 2
    assert "--guide-target" in capsys.readouterr().err


def test_path_command(tmp_path, capsys, mixture):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, mixture.means[:1].float().numpy())
    np.save(b, mixture.means[1:2].float().numpy())
    assert main(["path", "--model", "mixture", str(a), str(b), "-n", "4", "--steps", "20",
                 "-o", str(tmp_path / "p.pdb"), "--plot", str(tmp_path / "p.png")]) == 0
    assert "highest" in capsys.readouterr().out
    assert (tmp_path / "p.png").exists()
