"""bench/gpu_train.py (issue 3's prepared GPU run) end to end on the CPU with tiny settings."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import digfast

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "bench" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_train_to_the_deadline_and_are_scored_beside_the_shipped_model(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script = _script()
    reference = digfast.load("lj13").system.reference_data()
    pick = torch.randperm(len(reference), generator=rng)[:400]
    np.savez(tmp_path / "data.npz", positions=reference[pick].numpy())
    code = script.main(["--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "out"), "--minutes", "0.5",
                        "--device", "cpu", "--threads", "1", "-n", "30", "--runs", "ancestral:4",
                        "--variant", "small:batch_size=8,lr=1e-4", "--variant", "t2:batch_size=4,t_power=2",
                        "--variant", "energy:objective=pidp,pidp_residual_weight=0,pidp_mc_weight=1,"
                                     "pidp_mc_samples=4,batch_size=4",
                        "--variant", "tiny:layers=1,width=16,heads=2,ffn=16,gaussians=8,batch_size=4",
                        "--variant", "dw4e:system=dw4,objective=pidp,pidp_residual_weight=0,pidp_mc_weight=1,"
                                     "pidp_mc_samples=4,batch_size=4"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    systems = {(r["variant"], r["system"]) for r in result["rows"]}
    assert systems == {("shipped lj13", "lj13"), ("small", "lj13"), ("t2", "lj13"), ("energy", "lj13"), ("tiny", "lj13"),
                       ("shipped dw4", "dw4"), ("shipped dw4-energy-mc", "dw4"), ("dw4e", "dw4")}
    assert all(np.isfinite(r["value"]) and r["floor"] > 0 for r in result["rows"])
    for name, system in (("energy", "lj13"), ("dw4e", "dw4")):
        energy_only = digfast.load(str(tmp_path / "out" / name))
        assert energy_only.system.name == system
        assert energy_only.info["train_config"]["objective"] == "pidp" and "init" not in energy_only.info
    scratch = digfast.load(str(tmp_path / "out" / "tiny"))  # network sizes: a new network, not a fine-tune
    assert scratch.net.cfg.width == 16 and "init" not in scratch.info
    for name in ("small", "t2"):
        trained = result["trained"][name]
        assert 20 < trained["steps"] <= trained["planned_steps"]
        model = digfast.load(str(tmp_path / "out" / name))
        assert model.info["train_config"]["batch_size"] == result["variants"][name]["batch_size"]
        # fine-tuned from the shipped weights: changed, but not from scratch
        shipped, tuned = digfast.load("lj13").net.state_dict(), model.net.state_dict()
        assert any(not torch.equal(shipped[k], tuned[k]) for k in shipped)


def test_variant_settings_are_checked():
    script = _script()
    assert script.parse_variant("b:batch_size=64,lr=2e-4") == ("b", {"system": "lj13", "batch_size": 64, "lr": 2e-4})
    assert script.parse_variant("e:system=dw4,objective=pidp")[1] == {"system": "dw4", "objective": "pidp"}
    assert script.parse_variant("w:width=256,scratch=1")[1] == {"system": "lj13", "width": 256, "scratch": 1}
    for bad in ("b:batch=64", "b:lr", ":lr=1", "a b:lr=1", "b:objective=ode", "b:lr=fast", "b:system=ala",
                "b:system=dw4"):  # the last: DSM variants are LJ-13 fine-tunes
        with pytest.raises(ValueError):
            script.parse_variant(bad)
