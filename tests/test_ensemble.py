"""Chunked on-disk ensembles: identical to one in-memory run, resumable after damage or SIGKILL,
and identical whatever the number of torch.distributed ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import mdtraj
import numpy as np
import pytest
import torch

import digfast
import digfast.api
from digfast.cli import main
from digfast.ensemble import MANIFEST, Ensemble, EnsembleError, sample_ensemble

STEPS = 6


@pytest.fixture(scope="module")
def model():
    return digfast.load("mixture")


def in_memory(model, n, **kw):
    return digfast.sample_batch(model, n=n, steps=kw.pop("steps", STEPS), progress=False, **kw)


def test_chunks_hold_exactly_the_in_memory_ensemble(model, tmp_path):
    ens = sample_ensemble(model, tmp_path / "run", 23, steps=STEPS, seed=4, chunk_size=7)
    whole = in_memory(model, 23, seed=4).positions
    assert [(c["start"], c["stop"]) for c in ens.chunks] == [(0, 7), (7, 14), (14, 21), (21, 23)]
    assert torch.equal(ens.positions(), whole) and ens.sample_ids().tolist() == list(range(23))
    assert torch.equal(Ensemble(tmp_path / "run").positions(max_samples=9), whole[:9])
    (npy,) = ens.export(tmp_path / "all.npy")
    assert np.array_equal(np.load(npy), whole.numpy())
    xtc, top = ens.export(tmp_path / "all.xtc")
    traj = mdtraj.load(str(xtc), top=str(top))
    np.testing.assert_allclose(traj.xyz * 10, whole.numpy(), atol=1e-5)  # nm on disk, Angstrom inside
    assert not list(tmp_path.rglob(".*partial*"))


def test_dropped_samples_keep_their_ids(model, tmp_path):
    from digfast.validity import EnergyCutoff

    cut = EnergyCutoff(float(model.system.energy(in_memory(model, 30, seed=1).positions).median()))
    ens = sample_ensemble(model, tmp_path / "run", 30, steps=STEPS, seed=1, chunk_size=8, validity=cut)
    ref = in_memory(model, 30, seed=1, validity=cut)
    assert torch.equal(ens.positions(), ref.positions) and ens.counts["n_dropped"] == ref.metadata["n_dropped"] > 0
    dropped = set(ref.metadata["dropped_sample_ids"])
    assert ens.sample_ids().tolist() == [k for k in range(30) if k not in dropped]


def test_resume_redraws_only_missing_or_damaged_chunks(model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = sample_ensemble(model, run, 30, steps=STEPS, seed=2, chunk_size=6).positions()
    (run / "chunk-000001.npz").unlink()  # lost file
    (run / "chunk-000003.json").unlink()  # killed before its record was written
    data = bytearray((run / "chunk-000004.npz").read_bytes())
    data[-30] ^= 0xFF  # flipped bits
    (run / "chunk-000004.npz").write_bytes(bytes(data))
    with pytest.raises(EnsembleError, match="missing|checksum"):
        Ensemble(run)
    calls = []
    real = digfast.api.sample_batch
    monkeypatch.setattr(digfast.api, "sample_batch", lambda *a, **k: calls.append(k["first_sample_id"]) or real(*a, **k))
    again = sample_ensemble(model, run, 30, steps=STEPS, seed=2, resume=True)  # chunk size from the folder
    assert sorted(calls) == [6, 18, 24]
    assert torch.equal(again.positions(), first)


def test_resume_refuses_other_settings_and_plain_runs_refuse_used_folders(model, tmp_path):
    run = tmp_path / "run"
    sample_ensemble(model, run, 10, steps=STEPS, chunk_size=5)
    with pytest.raises(EnsembleError, match=r"settings differ \(seed: 0 in the folder, 1 now\)"):
        sample_ensemble(model, run, 10, steps=STEPS, seed=1, resume=True)
    with pytest.raises(EnsembleError, match="steps: 6 in the folder, 7 now"):
        sample_ensemble(model, run, 10, steps=7, resume=True)
    with pytest.raises(FileExistsError, match="already holds an ensemble"):
        sample_ensemble(model, run, 10, steps=STEPS)


def test_unfinished_runs_are_not_read_as_ensembles(model, tmp_path):
    run = tmp_path / "run"
    sample_ensemble(model, run, 10, steps=STEPS, chunk_size=5)
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["complete"] = False
    (run / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EnsembleError, match="unfinished run"):
        Ensemble(run)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_gloo_ranks_draw_the_same_ensemble_as_one_process(tmp_path):
    args = ["sample", "-n", "26", "--steps", str(STEPS), "--seed", "3", "--chunk-size", "4", "--quiet",
            "--max-energy", "6", "--on-invalid", "redraw"]  # redraws exercised across ranks too
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "digfast", *args, "--out-dir", str(tmp_path / "two")],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("26 samples in") == 1  # rank 0 alone reports
    assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    two, one = Ensemble(tmp_path / "two"), Ensemble(tmp_path / "one")
    assert len(one) == 26 and one.counts["n_redrawn"] > 0
    assert torch.equal(two.positions(), one.positions()) and torch.equal(two.sample_ids(), one.sample_ids())
    assert two.counts == one.counts


def test_a_refused_folder_stops_every_rank_instead_of_hanging(tmp_path):
    args = ["sample", "-n", "8", "--steps", "2", "--quiet", "--out-dir", str(tmp_path / "used")]
    assert main(args) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "digfast", *args], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "already holds an ensemble" in proc.stderr and "rank 0 could not prepare" in proc.stderr


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_ensemble(model, tmp_path):
    run = tmp_path / "run"
    args = ["sample", "-n", "300", "--steps", "100", "--seed", "8", "--chunk-size", "10", "--quiet",
            "--out-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "digfast", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "chunk-000000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no chunk written in 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(run.glob("chunk-*.json")))
    assert 1 <= done < 30, "the run finished before it was killed: make it longer"
    with pytest.raises(EnsembleError, match="unfinished run"):
        Ensemble(run)
    assert main([*args, "--resume"]) == 0
    resumed = Ensemble(run)
    uninterrupted = in_memory(model, 300, steps=100, seed=8).positions
    assert torch.equal(resumed.positions(), uninterrupted)
    assert resumed.sample_ids().tolist() == list(range(300))
    assert not list(run.glob(".*partial*"))
