"""The DW-4 equilibrium check and the reweighting benchmark run end to end on tiny settings."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(relative):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parallel_tempering_then_reweighting(tmp_path):
    pt = _load("scripts/dw4_parallel_tempering.py")
    pt.main(["--ladders", "16", "--sweeps", "60", "--burn-in", "20", "--every", "5", "--groups", "2",
             "--json", str(tmp_path / "pt.json"), "--save", str(tmp_path / "pt.npz")])
    summary = json.loads((tmp_path / "pt.json").read_text())
    assert abs(sum(summary["populations"]) - 1) < 1e-9 and len(summary["populations"]) == 7
    assert 0.2 < min(summary["acceptance"]) < 0.9, "the step size should give a working Metropolis chain"
    assert np.load(tmp_path / "pt.npz")["positions"].shape == (16 * 8, 4, 2)  # 8 kept sweeps x 16 ladders

    bench = _load("bench/pidp_reweight.py")
    bench.main(["--models", "dw4", "-n", "12", "--steps", "4", "--equilibrium", str(tmp_path / "pt.npz"),
                "--json", str(tmp_path / "rw.json")])
    (result,) = json.loads((tmp_path / "rw.json").read_text())["results"]
    assert 1 <= result["ess"] <= 12
    assert set(result["against"]) == {"reference", "equilibrium"}
    for side in result["against"].values():
        assert [r["statistic"] for r in side["weighted"]] == ["energy W1", "distance W1", "mode populations"]
        assert all(np.isfinite(r["value"]) and np.isfinite(r["floor_at_ess"]) for r in side["weighted"])

    accuracy = _load("bench/accuracy.py")
    floors = {}
    for label, extra in (("shipped", []), ("equilibrium", ["--reference", str(tmp_path / "pt.npz")])):
        accuracy.main(["--system", "dw4", "-n", "12", "--runs", "ancestral:4", "--json", str(tmp_path / "acc.json")]
                      + extra)
        rows = json.loads((tmp_path / "acc.json").read_text())
        floors[label] = [r["floor"] for r in rows]
    # the same model and samples, other reference structures: other floors
    assert all(np.isfinite(floors["equilibrium"])) and floors["equilibrium"] != floors["shipped"]


def test_accuracy_reference_of_another_system_is_refused(tmp_path, rng, capsys):
    accuracy = _load("bench/accuracy.py")
    np.save(tmp_path / "lj13.npy", torch.randn(40, 13, 3, generator=rng).numpy())
    with pytest.raises(SystemExit):
        accuracy.main(["--system", "dw4", "-n", "8", "--runs", "ancestral:2", "--reference", str(tmp_path / "lj13.npy")])
    assert "dw4 needs (4, 2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--system", "dw4", "--reference", str(tmp_path / "missing.npz")])
    assert "no such file" in capsys.readouterr().err

    # flat rows of the right size are structures of the system
    flat = torch.randn(40, 8, generator=rng)
    system = accuracy.digfast.load("dw4").system
    assert torch.equal(accuracy.structures_of(system, flat), flat.reshape(40, 4, 2))
