"""`digfast sample-protein` end to end on a fake public-layout checkpoint, and the input
readers (.npz, .pkl with a "representations" key, FASTA) with their errors."""
import pickle

import numpy as np
import pytest
import torch

from digfast.cli import main
from digfast.io import InputError
from digfast.protein.inputs import read_fasta, read_representations

from protein_helpers import SMALL, random_state


def write_inputs(tmp_path, rng, L, kind="npz"):
    single = torch.randn(L, 384, generator=rng).numpy()
    pair = torch.randn(L, L, 128, generator=rng).numpy()
    if kind == "npz":
        path = tmp_path / "feats.npz"
        np.savez(path, single=single, pair=pair)
    else:
        path = tmp_path / "feats.pkl"
        with open(path, "wb") as f:
            pickle.dump({"representations": {"single": single, "pair": pair}, "msa": np.zeros(3)}, f)
    return path, single, pair


@pytest.mark.parametrize("kind", ["npz", "pkl"])
def test_read_representations(tmp_path, rng, kind):
    path, single, pair = write_inputs(tmp_path, rng, 5, kind)
    s, p = read_representations(path)
    assert s.dtype == torch.float32 and np.array_equal(s.numpy(), single) and np.array_equal(p.numpy(), pair)


def test_input_errors(tmp_path, rng):
    np.savez(tmp_path / "bad.npz", single=np.zeros((5, 384)), pair=np.zeros((5, 4, 128)))
    with pytest.raises(InputError, match=r"pair must be \(5, 5, 128\)"):
        read_representations(tmp_path / "bad.npz")
    np.savez(tmp_path / "none.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="no 'single' or 'pair' array"):
        read_representations(tmp_path / "none.npz")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"single": Evil()}, f)
    with pytest.raises(InputError, match="only numpy arrays and dicts"):
        read_representations(tmp_path / "evil.pkl")
    (tmp_path / "x.fasta").write_text(">x\n\n")
    with pytest.raises(InputError, match="no one-letter sequence"):
        read_fasta(tmp_path / "x.fasta")


def test_cli_sample_protein_writes_xtc(tmp_path, rng, capsys):
    import mdtraj
    torch.save({"state_dict": {"module." + k: v for k, v in random_state(SMALL, rng).items()}}, tmp_path / "ckpt.pth")
    feats, _, _ = write_inputs(tmp_path, rng, 6, "pkl")
    (tmp_path / "seq.fasta").write_text(">test protein\nMKTAY\nI\n")
    rc = main(["sample-protein", "--checkpoint", str(tmp_path / "ckpt.pth"), "--inputs", str(feats),
               "--fasta", str(tmp_path / "seq.fasta"), "-n", "3", "--steps", "3", "-o", str(tmp_path / "ens.xtc"),
               "--device", "cpu", "--quiet", "--json", str(tmp_path / "run.json")])
    assert rc == 0, capsys.readouterr().err
    traj = mdtraj.load(str(tmp_path / "ens.xtc"), top=str(tmp_path / "ens_top.pdb"))
    assert traj.n_frames == 3 and traj.n_atoms == 24
    assert "".join(r.code for r in traj.topology.residues) == "MKTAYI"
    assert "structures/s" in capsys.readouterr().out


def test_cli_sample_protein_reports_bad_checkpoint(tmp_path, rng, capsys):
    state = random_state(SMALL, rng)
    del state["x2d_proj.1.weight"]
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    feats, _, _ = write_inputs(tmp_path, rng, 3)
    (tmp_path / "seq.fasta").write_text(">t\nAAA\n")
    rc = main(["sample-protein", "--checkpoint", str(tmp_path / "ckpt.pth"), "--inputs", str(feats),
               "--fasta", str(tmp_path / "seq.fasta"), "-o", str(tmp_path / "x.xtc"), "--quiet"])
    assert rc == 2
    assert "missing keys" in capsys.readouterr().err
