"""Public API results, structure files that mdtraj reads, and the command line."""
import json

import mdtraj
import numpy as np
import pytest
import torch

import digfast
from digfast.cli import main
from digfast.io import load_positions


@pytest.fixture(scope="module")
def result():
    return digfast.sample_batch(digfast.load("mixture"), n=40, steps=30, seed=7, progress=False)


def test_result_carries_what_reproduces_it(result):
    meta = result.metadata
    assert result.positions.shape == (40, 4, 3) and result.positions.dtype == torch.float32
    assert meta["sampler"] == "ancestral" and meta["steps"] == 30 and meta["seed"] == 7
    assert meta["schedule"]["name"] == "linear" and meta["samples_per_second"] > 0
    assert meta["n_nonfinite"] == 0
    again = digfast.sample_batch(digfast.load("mixture"), n=40, steps=30, seed=7,
                                 progress=False)
    assert torch.equal(again.positions, result.positions)


@pytest.mark.parametrize("suffix", [".xtc", ".dcd", ".trr", ".pdb"])
def test_trajectories_round_trip_through_mdtraj(result, tmp_path, suffix):
    written = result.save(tmp_path / f"ens{suffix}")
    assert all(p.exists() for p in written)
    top = None if suffix == ".pdb" else written[1]
    traj = mdtraj.load(str(written[0]), top=str(top) if top else None)
    assert traj.n_frames == 40 and traj.n_atoms == 4
    # positions are Angstrom inside digfast, nm in mdtraj; PDB keeps 3 decimals of Angstrom
    np.testing.assert_allclose(traj.xyz * 10, result.positions.numpy(), atol=2e-2)
    back = load_positions(written[0], top=top)
    np.testing.assert_allclose(back.numpy(), result.positions.numpy(), atol=2e-2)


def test_npz_keeps_positions_exactly(result, tmp_path):
    (path,) = result.save(tmp_path / "ens.npz")
    assert torch.equal(load_positions(path), result.positions)
    assert json.loads(str(np.load(path)["metadata"]))["seed"] == 7


def test_two_dimensional_systems_are_written_flat(tmp_path):
    from digfast.io import save

    sys2d = type("S", (), {"n_atoms": 3, "spatial_dim": 2, "name": "toy"})()
    x = torch.randn(5, 3, 2)
    (path, top) = save(tmp_path / "flat.xtc", x, sys2d)
    traj = mdtraj.load(str(path), top=str(top))
    assert np.abs(traj.xyz[..., 2]).max() == 0


def test_io_errors_are_clear(result, tmp_path):
    with pytest.raises(ValueError, match="unknown output format"):
        result.save(tmp_path / "ens.mol2x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        result.save(tmp_path / "missing" / "ens.xtc")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_positions(tmp_path / "nothing.npz")
    with pytest.raises(ValueError, match="unknown model"):
        digfast.load("no-such-model")


def test_cli_sample_writes_report_files_and_plot(tmp_path, capsys):
    out, plot, rep = tmp_path / "ens.xtc", tmp_path / "energy.png", tmp_path / "report.json"
    code = main(["sample", "-n", "300", "--steps", "50", "--quiet", "-o", str(out), "--plot", str(plot),
                 "--json", str(rep)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "samples/s" in text and "mode weights" in text
    assert out.exists() and (tmp_path / "ens_top.pdb").exists()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(rep.read_text())["report"]
    assert report["n"] == 300 and abs(sum(report["mode_weights"]) - 1) < 1e-9


def test_cli_likelihood(tmp_path, capsys, result):
    (path,) = result.save(tmp_path / "ens.npz")
    code = main(["likelihood", str(path), "--divergence", "exact", "--steps", "20", "-o", str(tmp_path / "lp.npy")])
    assert code == 0
    assert np.load(tmp_path / "lp.npy").shape == (40,)
    assert "log p of 40 structures" in capsys.readouterr().out


def test_cli_errors_exit_2_before_any_work(tmp_path, capsys):
    assert main(["sample", "--model", "nope", "--quiet"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["sample", "-n", "5", "--quiet", "-o", str(tmp_path / "no" / "x.xtc")]) == 2
    assert main(["likelihood", str(tmp_path / "absent.npz")]) == 2


def test_cli_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["digfast"] == digfast.__version__


def test_likelihood_progress_counts_every_score_call(monkeypatch):
    import digfast.api as api

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0

        def update(self):
            self.n += 1

        def close(self):
            pass

    bars = []
    monkeypatch.setattr(api, "_progress", lambda enabled, total, *a: bars.append(Bar(total)) or bars[-1])
    model = digfast.load("mixture")
    x = digfast.sample_batch(model, n=6, steps=10, progress=False).positions
    res = digfast.log_likelihood(model, positions=x, divergence="hutchinson", method="rk4", steps=5,
                                 batch_size=4, progress=True)
    assert bars[-1].n == bars[-1].total == res.n_evals == 2 * 5 * 4  # two batches
