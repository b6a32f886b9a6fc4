"""DSM training: smoke test on a tiny model, bit-for-bit resume, model save/load."""
import json
import time

import pytest
import torch

import digfast
from digfast.models import Graphormer3D, Graphormer3DConfig
from digfast.models.score_model import ScoreModel
from digfast.schedules import LinearVP
from digfast.systems import DoubleWell4
from digfast.training import TrainConfig, Trainer, TrainingDiverged


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    net = Graphormer3D(Graphormer3DConfig(layers=1, width=16, heads=2, ffn=16, gaussians=8))
    return ScoreModel(net, LinearVP(), DoubleWell4(), position_scale=1.8, default_steps=20)


def _data(rng, n=64):
    return 2.0 * torch.randn(n, 4, 2, generator=rng)


def _cfg(**kw):
    base = dict(steps=12, batch_size=16, warmup=2, val_every=4, checkpoint_every=6, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss(rng):
    data = _data(rng, 256)
    trainer = Trainer(_tiny_model(), data, data[:64], _cfg(steps=150, lr=3e-3, val_every=50, batch_size=64))
    first = trainer.validate()
    hist = trainer.fit(progress=False)
    assert hist[-1]["val_loss"] < first, hist
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_resume_is_bit_for_bit(rng, tmp_path):
    data = _data(rng)
    straight = Trainer(_tiny_model(), data, data[:16], _cfg())
    straight.fit(progress=False)
    half = Trainer(_tiny_model(), data, data[:16], _cfg())
    half.fit(progress=False, until=5)  # stop between checkpoints, as a crash would
    half.save_checkpoint(tmp_path)
    resumed = Trainer.resume(tmp_path, data, data[:16])
    assert resumed.step == 5
    resumed.fit(progress=False)
    for a, b in zip(straight.model.net.state_dict().values(), resumed.model.net.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_a_deadline_stops_training_with_a_checkpoint_to_resume(rng, tmp_path):
    data = _data(rng)
    trainer = Trainer(_tiny_model(), data, data[:16], _cfg(steps=100_000, checkpoint_every=10_000), out_dir=tmp_path)
    step = trainer.train_step
    trainer.train_step = lambda: (time.sleep(0.02), step())[1]
    trainer.fit(progress=False, deadline=time.monotonic() + 0.3)
    assert 1 <= trainer.step < 100_000
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == trainer.step  # saved on stopping
    assert Trainer.resume(tmp_path, data, data[:16]).step == trainer.step
    before = trainer.step
    trainer.fit(progress=False, deadline=time.monotonic() - 1)  # already past: no step taken
    assert trainer.step == before


def test_a_non_finite_loss_stops_training_before_the_update(rng, tmp_path):
    data = _data(rng)
    trainer = Trainer(_tiny_model(), data, data[:16], _cfg(), out_dir=tmp_path)
    trainer.fit(progress=False, until=6)  # a checkpoint at step 6
    before = {k: v.clone() for k, v in trainer.model.net.state_dict().items()}
    saved = (tmp_path / "checkpoint.safetensors").read_bytes()
    trainer._loss = lambda *a: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(TrainingDiverged, match="nan at step 7"):
        trainer.fit(progress=False)
    assert trainer.step == 6
    assert all(torch.equal(before[k], v) for k, v in trainer.model.net.state_dict().items())
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == saved


def test_damaged_checkpoints_are_refused_by_name(rng, tmp_path):
    import json

    from digfast.io import InputError
    from digfast.training.dsm import CHECKPOINT_STATE, CHECKPOINT_TENSORS

    data = _data(rng)
    trainer = Trainer(_tiny_model(), data, None, _cfg())
    trainer.fit(progress=False, until=2)
    good = trainer.save_checkpoint(tmp_path / "good")
    state = json.loads((good / CHECKPOINT_STATE).read_text())
    tensors = (good / CHECKPOINT_TENSORS).read_bytes()

    def damaged(name, state_text=None, tensor_bytes=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / CHECKPOINT_STATE).write_text(state_text if state_text is not None else json.dumps(state))
        (folder / CHECKPOINT_TENSORS).write_bytes(tensor_bytes if tensor_bytes is not None else tensors)
        return folder

    cases = {
        "truncated tensors": damaged("trunc", tensor_bytes=tensors[: len(tensors) // 2]),
        "state not JSON": damaged("json", state_text="{step: 3"),
        "state without model": damaged("nomodel", state_text=json.dumps({k: v for k, v in state.items()
                                                                          if k != "model"})),
        "wider network": damaged("wide", state_text=json.dumps(
            {**state, "model": {**state["model"], "network": {**state["model"]["network"], "width": 32}}})),
    }
    for what, folder in cases.items():
        with pytest.raises(InputError, match=f"checkpoint in {folder}"):
            Trainer.resume(folder, data, None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer.resume(tmp_path / "absent", data, None)
    with pytest.raises(ValueError, match="training data must be"):
        Trainer.resume(good, data[:, :3], None)
    assert Trainer.resume(good, data, None).step == 2


def test_saved_model_loads_and_samples(rng, tmp_path):
    model = _tiny_model()
    model.save(tmp_path / "m")
    again = digfast.load(str(tmp_path / "m"))
    x, t = torch.randn(5, 4, 2, generator=rng), torch.rand(5, generator=rng) * 0.9 + 0.05
    with torch.no_grad():
        torch.testing.assert_close(again.score(x, t), model.score(x, t))
    out = digfast.sample_batch(again, n=6, steps=5, progress=False)
    assert out.positions.shape == (6, 4, 2) and out.metadata["n_nonfinite"] == 0
    lik = digfast.log_likelihood(again, positions=out.positions, steps=5, divergence="hutchinson", probes=2)
    assert torch.isfinite(lik.log_prob).all()


def test_bad_training_input_is_refused(rng, tmp_path):
    with pytest.raises(ValueError, match="training data must be"):
        Trainer(_tiny_model(), torch.randn(8, 5, 2), None, _cfg())
    bad = _data(rng)
    bad[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Trainer(_tiny_model(), bad, None, _cfg())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer.resume(tmp_path, _data(rng), None)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ScoreModel.load(tmp_path)


def test_cli_train_smoke(tmp_path, rng, capsys):
    import numpy as np

    from digfast.cli import main

    data = tmp_path / "dw4.npy"
    np.save(data, (2.0 * torch.randn(200, 8, generator=rng)).numpy())
    code = main(["train", "--system", "dw4", "--data", str(data), "--out", str(tmp_path / "m"), "--steps", "6",
                 "--batch-size", "16", "--quiet"])
    assert code == 0, capsys.readouterr().err
    model = digfast.load(str(tmp_path / "m"))
    assert model.info["train_steps"] == 6
    assert (tmp_path / "m" / "run" / "checkpoint.json").exists()
    assert main(["train", "--system", "nope", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--system", "dw4", "--data", str(tmp_path / "absent.npy"), "--out", str(tmp_path / "x")]) == 2


def test_fine_tune_starts_from_the_given_weights(tmp_path, rng):
    import numpy as np

    from digfast.cli import main
    from digfast.training.recipes import build_trainer

    data = tmp_path / "dw4.npy"
    np.save(data, (2.0 * torch.randn(200, 8, generator=rng)).numpy())
    start = digfast.load("dw4")
    trainer = build_trainer("dw4", str(data), run_dir=tmp_path / "run", init="dw4", overrides={"batch_size": 8})
    for (name, p), q in zip(trainer.model.net.named_parameters(), start.net.parameters()):
        assert torch.equal(p, q) and p.requires_grad, name
    assert trainer.step == 0 and torch.equal(next(iter(trainer.ema.parameters())), next(iter(start.net.parameters())))
    assert main(["train", "--system", "dw4", "--data", str(data), "--init", "dw4", "--out", str(tmp_path / "ft"),
                 "--steps", "3", "--batch-size", "8", "--quiet"]) == 0
    tuned = digfast.load(str(tmp_path / "ft"))
    assert tuned.info["init"] == "dw4" and tuned.info["init_train_steps"] == start.info["train_steps"]
    assert tuned.info["train_steps"] == 3
    assert not torch.equal(tuned.net.embed.weight, start.net.embed.weight)  # it trained
    with pytest.raises(ValueError, match="not a trained dw4 model"):
        build_trainer("dw4", str(data), init="lj13")


def test_recipe_on_shipped_alanine_split_with_force_targets(tmp_path):
    pytest.importorskip("openmm")  # forces of the training structures come from OpenMM
    from digfast.systems.alanine import TRAIN_FRAMES
    from digfast.training.recipes import build_trainer, train_and_save

    trainer = build_trainer("alanine-dipeptide", None, run_dir=tmp_path / "run", steps=3,
                            overrides={"batch_size": 8, "tsm_sigma": 0.1, "val_every": 3, "val_batches": 1})
    assert trainer.train.shape == (TRAIN_FRAMES, 22, 3) and trainer.forces.shape == trainer.train.shape
    model = digfast.load(str(train_and_save(trainer, tmp_path / "m", progress=False)))
    assert model.info["data"] == "alanine-dipeptide shipped training split" and model.info["train_steps"] == 3
    assert model.net.cfg.max_path > 0  # the molecule's bond graph is part of the input


@pytest.mark.parametrize("name", ["dw4", "lj13", "alanine-dipeptide", "alanine-dipeptide-flexible"])
def test_shipped_models_load_and_sample(name):
    from digfast.api import WEIGHTS_DIR

    if not (WEIGHTS_DIR / name / "config.json").exists():
        pytest.skip(f"no shipped weights for {name} in this checkout")
    model = digfast.load(name)
    if name.startswith("alanine-dipeptide"):  # bonds and basins besides the energies below
        from digfast.systems import alanine as ala

        out = digfast.sample_batch(model, n=64, steps=100, progress=False)
        assert out.metadata["n_nonfinite"] == 0
        assert ala.broken_structures(out.positions).float().mean() < 0.05
        phi, _ = ala.phi_psi(out.positions.double().numpy())
        assert (phi < 0).mean() > 0.9
    out = digfast.sample_batch(model, n=64, steps=20, sampler="dpm++2m", progress=False)
    assert out.metadata["n_nonfinite"] == 0
    # a trained model lands near the reference energies (an untrained one is off by orders of magnitude)
    e, ref = out.energies(), model.system.energy(model.system.reference_samples(64))
    assert abs(float(e.median() - ref.median())) < 3 * float(ref.std())


@pytest.mark.parametrize("name, data", [("dw4-pidp", "PIDP on"), ("dw4-pidp-dsm-1pct", "1% of the public"),
                                        ("dw4-energy-mc", "PIDP on")])
def test_shipped_pidp_models_load_and_sample(name, data):
    """The PIDP demonstrations of bench/RESULTS.md, shipped by name (not accurate models: see
    the README's PIDP section)."""
    model = digfast.load(name)
    assert data in model.info["data"]
    if name == "dw4-energy-mc":  # the Monte-Carlo score term alone, no prior
        cfg = model.info["train_config"]
        assert model.prior is None and cfg["pidp_residual_weight"] == 0 and cfg["pidp_mc_weight"] > 0
    else:
        assert model.prior["name"] == "boltzmann"
    out = digfast.sample_batch(model, n=32, steps=20, progress=False)
    assert out.metadata["n_nonfinite"] == 0


def test_weighted_batches_follow_the_weights(rng):
    data = _data(rng, 40)
    weights = torch.zeros(40)
    weights[:10] = 1.0
    trainer = Trainer(_tiny_model(), data, None, _cfg(batch_size=256, augment_rotations=False), weights=weights)
    x0 = trainer._batch(trainer.train, trainer.weights)[0]
    allowed = trainer.train[:10].reshape(10, -1)
    dist = (x0.reshape(len(x0), 1, -1) - allowed[None]).abs().amax(-1).min(1).values
    assert dist.max() == 0, "a zero-weight structure was drawn"
    with pytest.raises(ValueError, match="weights"):
        Trainer(_tiny_model(), data, None, _cfg(), weights=-torch.ones(40))


def _force_target_slope(trainer, t, s, f_sign, rng, n=40_000):
    """Least-squares slope of the regression target on x_t for x_0 ~ N(0, s^2) (F = -x_0 / s^2)
    and its standard error; the optimal eps predictor has slope sigma / (alpha^2 s^2 + sigma^2)."""
    sched = trainer.model.schedule
    alpha, sigma = (float(v) for v in (sched.alpha(torch.tensor(t)), sched.sigma(torch.tensor(t))))
    x0 = s * torch.randn(n, 4, 2, generator=rng, dtype=torch.float64)
    eps = torch.randn(n, 4, 2, generator=rng, dtype=torch.float64)
    xt = alpha * x0 + sigma * eps
    target = trainer._target(eps, f_sign * -x0 / s**2, torch.tensor(alpha), torch.tensor(sigma))
    slope = float((target * xt).sum() / (xt * xt).sum())
    resid = target - slope * xt
    se = float(resid.std() / (xt * xt).sum().sqrt())
    return slope, se, sigma / (alpha**2 * s**2 + sigma**2), float(resid.var()), float((eps - slope * xt).var())


def test_force_target_is_unbiased_and_quieter(rng):
    data = _data(rng)
    trainer = Trainer(_tiny_model(), data, None, _cfg(tsm_sigma=0.1), forces=torch.randn_like(data))
    for t in (0.003, 0.05, 0.4):
        slope, se, want, var_target, var_eps = _force_target_slope(trainer, t, 0.7, 1.0, rng)
        assert abs(slope - want) < 4 * se, (t, slope, want, se)
        if t < 0.01:
            assert var_target < 0.1 * var_eps  # the point of the force target: far less noise
    # a force of the wrong sign is caught by the same statistic
    slope, se, want, _, _ = _force_target_slope(trainer, 0.003, 0.7, -1.0, rng)
    assert abs(slope - want) > 10 * se


def test_training_with_forces_runs_and_needs_both(rng):
    data = _data(rng)
    forces = DoubleWell4().force(data.double()).float()
    trainer = Trainer(_tiny_model(), data, data[:16], _cfg(tsm_sigma=0.1), forces=forces)
    hist = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    with pytest.raises(ValueError, match="need forces"):
        Trainer(_tiny_model(), data, None, _cfg(tsm_sigma=0.1))
    with pytest.raises(ValueError, match="shaped like"):
        Trainer(_tiny_model(), data, None, _cfg(tsm_sigma=0.1), forces=forces[:5])


def test_cli_t_power_reaches_the_trainer(tmp_path, capsys):
    import numpy as np

    from digfast.cli import main

    data = tmp_path / "dw4.npy"
    np.save(data, DoubleWell4().reference_samples(64, seed=3).numpy())
    out = tmp_path / "m"
    assert main(["train", "--system", "dw4", "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--t-power", "2.5", "--quiet"]) == 0, capsys.readouterr().err
    assert digfast.load(str(out)).info["train_config"]["t_power"] == 2.5
    with pytest.raises(ValueError, match="t_power"):
        Trainer(_tiny_model(), torch.randn(16, 4, 2), None, _cfg(t_power=0.0))


def test_trainer_to_cpu_is_the_same_run(tmp_path):
    """Batches come from the trainer's CPU generator whatever the device: .to("cpu") changes
    nothing, and a model comes back on the CPU with its backend free."""
    data = DoubleWell4().reference_samples(64, seed=5)
    a, b = (Trainer(_tiny_model(), data, None, _cfg()) for _ in range(2))
    b.to("cpu")
    assert [a.train_step() for _ in range(3)] == [b.train_step() for _ in range(3)]
    model = b.ema_model()
    assert model.net.backend is None and next(model.net.parameters()).device.type == "cpu"


def test_trainer_refuses_a_missing_gpu(monkeypatch):
    data = DoubleWell4().reference_samples(32, seed=6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for objective, forces in (("dsm", None), ("pidp", torch.randn_like(data))):
        with pytest.raises(RuntimeError, match="no GPU"):
            Trainer(_tiny_model(), data, None, _cfg(objective=objective), forces=forces).to("cuda")


def test_cli_train_refuses_a_missing_gpu_before_reading_data(tmp_path, monkeypatch, capsys):
    from digfast.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = tmp_path / "absent.npy"  # never read: the device is checked first
    assert main(["train", "--system", "dw4", "--data", str(missing), "--out", str(tmp_path / "m"),
                 "--device", "cuda", "--quiet"]) == 2
    assert "no GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_matches_cpu():
    """The same seed on the GPU draws the same batches: losses agree to float32 rounding."""
    data = DoubleWell4().reference_samples(64, seed=7)
    cpu = Trainer(_tiny_model(), data, None, _cfg())
    gpu = Trainer(_tiny_model(), data, None, _cfg()).to("cuda")
    for _ in range(3):
        on_cpu, on_gpu = cpu.train_step(), gpu.train_step()
        assert abs(on_cpu - on_gpu) <= 1e-4 * abs(on_cpu) + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("terms", [dict(pidp_probes=2), dict(pidp_residual_weight=0.0, pidp_mc_weight=1.0,
                                                             pidp_mc_samples=64)])
def test_gpu_pidp_training_matches_cpu(terms):
    """PIDP (Fokker-Planck residual with probes; the Monte-Carlo score) on the GPU: the same
    batches, probes and proposals as on the CPU, so the same losses to rounding."""
    system = DoubleWell4()
    data = system.reference_samples(64, seed=8)
    cpu, gpu = (Trainer(_tiny_model(), data, None, _cfg(objective="pidp", **terms), forces=system.force(data))
                for _ in range(2))
    gpu.to("cuda")
    for _ in range(3):
        on_cpu, on_gpu = cpu.train_step(), gpu.train_step()
        assert abs(on_cpu - on_gpu) <= 1e-3 * abs(on_cpu) + 1e-5


def test_cli_network_sizes(tmp_path, capsys):
    import numpy as np

    from digfast.cli import main

    data = tmp_path / "dw4.npy"
    np.save(data, DoubleWell4().reference_samples(64, seed=4).numpy())
    out = tmp_path / "m"
    assert main(["train", "--system", "dw4", "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--network", "layers=1,width=24,heads=3,ffn=16,gaussians=8",
                 "--quiet"]) == 0, capsys.readouterr().err
    cfg = digfast.load(str(out)).net.cfg
    assert (cfg.layers, cfg.width, cfg.heads, cfg.ffn, cfg.gaussians) == (1, 24, 3, 16, 8)
    for bad in ("depth=3", "width=0", "width=wide"):
        with pytest.raises(SystemExit):
            main(["train", "--system", "dw4", "--out", str(tmp_path / "x"), "--network", bad])
    assert "unknown network size 'depth'" in capsys.readouterr().err
