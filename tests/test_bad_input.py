"""Fuzz-style bad-input test: every public entry point and reader gets malformed input and must
raise a specific exception whose message names the problem, and must leave no file behind.

Each case is (setup, call): setup builds the malformed inputs under tmp_path/"in"; call runs
one entry point with any output directed to tmp_path/"out". The test checks the exception type
and message, and that the call changed no file anywhere under tmp_path.
"""
import json
import re
import shutil
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch

import digfast
from digfast.cli import main
from digfast.ensemble import Ensemble, EnsembleError, sample_ensemble
from digfast.io import InputError, load_positions
from digfast.protein.inputs import read_fasta, read_representations
from digfast.validity import BondLengths, Clashes, EnergyCutoff

CASES = []


class Case(NamedTuple):
    call: Callable  # call(tmp_path): the entry point under test
    setup: Callable = lambda tmp: None  # writes the malformed inputs


def case(name, exc, match):
    """Register a Case (or a bare call) expected to raise exc with a message matching match."""
    def register(c):
        CASES.append(pytest.param(c if isinstance(c, Case) else Case(c), exc, match, id=name))
        return c
    return register


def model():
    return digfast.load("mixture")


def sample(**kw):
    args = dict(n=4, steps=2, progress=False)
    args.update(kw)
    return lambda tmp: digfast.sample_batch(model(), **args)


def likelihood(**kw):
    args = dict(positions=torch.zeros(2, 4, 3), steps=2)
    args.update(kw)
    return lambda tmp: digfast.log_likelihood(model(), **args)


# ---- sample_batch arguments ---------------------------------------------------------------
SAMPLE_CASES = [
    ("n-zero", dict(n=0), ValueError, "n must be >= 1"),
    ("n-negative", dict(n=-5), ValueError, "n must be >= 1"),
    ("n-float", dict(n=2.5), TypeError, "n must be an integer"),
    ("n-string", dict(n="10"), TypeError, "n must be an integer"),
    ("n-bool", dict(n=True), TypeError, "n must be an integer"),
    ("n-none", dict(n=None), TypeError, "n must be an integer"),
    ("n-beyond-ids", dict(n=2**32 + 1), ValueError, "n must be <= 4294967296"),
    ("steps-zero", dict(steps=0), ValueError, "steps must be >= 1"),
    ("steps-negative", dict(steps=-3), ValueError, "steps must be >= 1"),
    ("steps-float", dict(steps=1.5), TypeError, "steps must be an integer"),
    ("steps-string", dict(steps="5"), TypeError, "steps must be an integer"),
    ("seed-negative", dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ("seed-too-big", dict(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ("seed-string", dict(seed="0"), TypeError, "seed must be an integer"),
    ("seed-float", dict(seed=0.5), TypeError, "seed must be an integer"),
    ("sampler-unknown", dict(sampler="leapfrog"), ValueError, "unknown sampler 'leapfrog'"),
    ("sampler-none", dict(sampler=None), ValueError, "unknown sampler None"),
    ("batch-zero", dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("batch-negative", dict(batch_size=-2), ValueError, "batch_size must be >= 1"),
    ("batch-word", dict(batch_size="big"), ValueError, "batch_size must be a positive integer or 'auto'"),
    ("batch-float", dict(batch_size=1.5), TypeError, "batch_size must be an integer"),
    ("first-id-negative", dict(first_sample_id=-1), ValueError, "first_sample_id must be >= 0"),
    ("first-id-overflow", dict(first_sample_id=2**32), ValueError, "first_sample_id must be <="),
    ("on-nonfinite-unknown", dict(on_nonfinite="ignore"), ValueError, "unknown on_nonfinite 'ignore'"),
    ("on-invalid-unknown", dict(on_invalid="keep"), ValueError, "unknown on_invalid 'keep'"),
    ("max-attempts-zero", dict(max_attempts=0), ValueError, "max_attempts must be >= 1"),
    ("validity-not-callable", dict(validity="yes"), TypeError, "validity must be a callable"),
    ("bond-check-without-bonds", dict(validity=BondLengths(0.5)), TypeError, "has no bond list"),
    ("t-min-nan", dict(t_min=float("nan")), ValueError, "t_min must be finite"),
    ("t-min-negative", dict(t_min=-0.1), ValueError, "t_min must be >= 0"),
    ("t-min-beyond-t-max", dict(t_min=5.0), ValueError, "t_min must be <="),
    ("device-absent-gpu", dict(device="cuda"), RuntimeError, "torch sees no GPU"),
    ("device-unknown", dict(device="tpu"), RuntimeError, "tpu"),
    ("mask-wrong-length", dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must be"),
    ("mask-no-atoms", dict(mask=torch.zeros(4, dtype=torch.bool)), ValueError, "at least one real atom"),
]
if torch.cuda.is_available():
    SAMPLE_CASES = [c for c in SAMPLE_CASES if c[0] != "device-absent-gpu"]
for name, kw, exc, match in SAMPLE_CASES:
    case(f"sample_batch-{name}", exc, match)(sample(**kw))


def with_free_memory(n_bytes, call):
    """call with the host reporting n_bytes free, so the memory guard is tested on any machine."""
    def patched(tmp):
        with mock.patch("digfast.arguments.available_host_bytes", return_value=n_bytes):
            return call(tmp)
    return patched


case("sample_batch-n-huge-for-memory", ValueError, r"needs 4\.5 GiB of host memory, more than the 1\.0 GiB free.*--out-dir")(
    with_free_memory(2**30, sample(n=10**8)))
case("sample_batch-model-without-score", TypeError, "model must have .schedule and .score")(
    lambda tmp: digfast.sample_batch(object(), model().system, n=2, progress=False))
case("sample_batch-system-without-atoms", TypeError, "lacks 'n_atoms'")(
    lambda tmp: digfast.sample_batch(model(), object(), n=2, progress=False))

# ---- log_likelihood arguments ---------------------------------------------------------------
NAN = torch.zeros(2, 4, 3)
NAN[1, 2, 0] = float("nan")
INF = torch.zeros(2, 4, 3)
INF[0, 0, 1] = float("-inf")
LIKELIHOOD_CASES = [
    ("positions-none", dict(positions=None), ValueError, "positions are required"),
    ("positions-object", dict(positions=np.array([[[None] * 3] * 4], dtype=object)), InputError, "dtype object"),
    ("positions-complex", dict(positions=torch.zeros(2, 4, 3, dtype=torch.complex64)), InputError, "complex64"),
    ("positions-bool", dict(positions=torch.zeros(2, 4, 3, dtype=torch.bool)), InputError, "dtype torch.bool"),
    ("positions-strings", dict(positions=np.full((2, 4, 3), "x")), InputError, "real numbers"),
    ("positions-nan", dict(positions=NAN), InputError, r"1 structures contain NaN/inf coordinates \(first: \[1\]\)"),
    ("positions-inf", dict(positions=INF), InputError, r"NaN/inf coordinates \(first: \[0\]\)"),
    ("positions-empty", dict(positions=torch.zeros(0, 4, 3)), InputError, "no structures"),
    ("positions-no-atoms", dict(positions=torch.zeros(2, 0, 3)), InputError, "no atoms"),
    ("positions-wrong-atoms", dict(positions=torch.zeros(2, 5, 3)), ValueError, r"must be \(n, 4, 3\), got \(2, 5, 3\)"),
    ("positions-2d-points", dict(positions=torch.zeros(2, 4, 2)), ValueError, r"got \(2, 4, 2\)"),
    ("positions-1d", dict(positions=torch.zeros(12)), InputError, r"\(n, atoms, dim\), got shape \(12,\)"),
    ("positions-4d", dict(positions=torch.zeros(1, 2, 4, 3)), InputError, r"got shape \(1, 2, 4, 3\)"),
    ("positions-ragged", dict(positions=[[[0, 0, 0]], [[0, 0]]]), InputError, "not a rectangular array"),
    ("steps-zero", dict(steps=0), ValueError, "steps must be >= 1"),
    ("probes-zero", dict(probes=0), ValueError, "probes must be >= 1"),
    ("probes-float", dict(probes=2.5), TypeError, "probes must be an integer"),
    ("method-unknown", dict(method="rk5"), ValueError, "unknown method 'rk5'"),
    ("divergence-unknown", dict(divergence="magic"), ValueError, "divergence must be one of"),
    ("rtol-negative", dict(rtol=-1.0), ValueError, "rtol must be >= 0"),
    ("atol-nan", dict(atol=float("nan")), ValueError, "atol must be finite"),
    ("seed-negative", dict(seed=-1), ValueError, "seed must be in"),
]
for name, kw, exc, match in LIKELIHOOD_CASES:
    case(f"log_likelihood-{name}", exc, match)(likelihood(**kw))


# ---- structure files: load_positions --------------------------------------------------------
def positions_file(name, array, fmt):
    def setup(tmp):
        path = tmp / "in" / f"{name}.{fmt}"
        np.save(path, array, allow_pickle=True) if fmt == "npy" else np.savez(path, positions=array)
    return Case(lambda tmp: load_positions(tmp / "in" / f"{name}.{fmt}"), setup)


def nan_at(shape, where, value):
    a = np.zeros(shape, np.float32)
    a[where] = value
    return a


BAD_ARRAYS = [
    ("object", np.array([[[1, 2, None]]], dtype=object), "cannot read it as a numpy array|dtype object"),
    ("complex", np.zeros((2, 4, 3), np.complex64), "dtype complex64"),
    ("bool", np.zeros((2, 4, 3), bool), "dtype bool"),
    ("unicode", np.full((2, 4, 3), "a"), "dtype <U1"),
    ("bytes", np.full((2, 4, 3), b"a"), "dtype |S1"),
    ("scalar", np.float32(3.0), r"got shape \(\)"),
    ("vector", np.zeros(12, np.float32), r"got shape \(12,\)"),
    ("4d", np.zeros((1, 2, 4, 3), np.float32), r"got shape \(1, 2, 4, 3\)"),
    ("no-structures", np.zeros((0, 4, 3), np.float32), "no structures"),
    ("no-atoms", np.zeros((2, 0, 3), np.float32), "no atoms"),
    ("5d-points", np.zeros((2, 4, 5), np.float32), "2-D or 3-D points, got dim 5"),
    ("1d-points", np.zeros((2, 4, 1), np.float32), "2-D or 3-D points, got dim 1"),
    ("flat-empty", np.zeros((0, 12), np.float32), "no structures or no coordinates"),
    ("nan", nan_at((3, 4, 3), (2, 1, 1), np.nan), r"1 structures contain NaN/inf coordinates \(first: \[2\]\)"),
    ("inf", nan_at((3, 4, 3), (0, 0, 0), np.inf), r"NaN/inf coordinates \(first: \[0\]\)"),
    ("minus-inf", nan_at((3, 4, 3), (1, 3, 2), -np.inf), r"NaN/inf coordinates \(first: \[1\]\)"),
    ("flat-nan", nan_at((3, 12), (1, 5), np.nan), r"NaN/inf coordinates \(first: \[1\]\)"),
    ("float16-inf", nan_at((2, 4, 3), (1, 0, 0), np.inf).astype(np.float16), "NaN/inf"),
]
for fmt in ("npy", "npz"):
    for name, array, match in BAD_ARRAYS:
        case(f"load_positions-{fmt}-{name}", InputError, match)(positions_file(name, array, fmt))


def truncated(fmt, fraction):
    def setup(tmp):
        whole = tmp / "in" / f"whole.{fmt}"
        x = np.random.default_rng(0).normal(size=(50, 4, 3)).astype(np.float32)
        np.save(whole, x) if fmt == "npy" else np.savez(whole, positions=x)
        data = whole.read_bytes()
        (tmp / "in" / f"cut.{fmt}").write_bytes(data[: int(len(data) * fraction)])
        whole.unlink()
    return Case(lambda tmp: load_positions(tmp / "in" / f"cut.{fmt}"), setup)


for fmt in ("npy", "npz"):
    for fraction in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        case(f"load_positions-truncated-{fmt}-{fraction}", InputError, "cannot read it as a numpy array")(
            truncated(fmt, fraction))


def write_bytes(name, content):
    return lambda tmp: (tmp / "in" / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def write_then_load(name, content, **kw):
    return Case(lambda tmp: load_positions(tmp / "in" / name, **kw), write_bytes(name, content))


def pdb_lines(coords):
    return "".join(f"ATOM  {i + 1:5d} Ar{i + 1:<2d} SYS A   0    {c}  1.00  0.00          Ar  \n"
                   for i, c in enumerate(coords)) + "END\n"


GOOD_XYZ = "   1.243  -0.499  -0.615"
FILE_CASES = [
    ("npz-without-positions", "x.npz", None, "has no 'positions' array"),
    ("empty-npz", "e.npz", b"", "is empty"),
    ("empty-npy", "e.npy", b"", "is empty"),
    ("empty-pdb", "e.pdb", b"", "is empty"),
    ("pickle", "emb.pkl", b"\x80\x04K\x01.", "pickle files are not read"),
    ("pickle-long-suffix", "emb.pickle", b"\x80\x04K\x01.", "pickle files are not read"),
    ("unknown-suffix", "x.mol2", "@<TRIPOS>MOLECULE\n", "unknown format '.mol2'"),
    ("text-as-npy", "t.npy", "just some text, not numpy\n", "cannot read it as a numpy array"),
    ("text-as-npz", "t.npz", "PK but not really a zip", "cannot read it as a numpy array"),
    ("pdb-garbage", "g.pdb", "hello world\nthis is not a pdb\n", "not a readable pdb file"),
    ("pdb-binary", "b.pdb", b"\x00\x01\x02\xff" * 64, "not a readable pdb file"),
    ("pdb-no-atoms", "n.pdb", "REMARK nothing here\nEND\n", "not a readable pdb file|holds no structures"),
    ("pdb-cut-mid-line", "c.pdb", pdb_lines([GOOD_XYZ] * 2)[:100], "not a readable pdb file"),
    ("pdb-nan-coordinate", "nan.pdb", pdb_lines([GOOD_XYZ, "     nan  -0.499  -0.615"]), "NaN/inf coordinates"),
    ("pdb-inf-coordinate", "inf.pdb", pdb_lines([GOOD_XYZ, "     inf  -0.499  -0.615"]), "NaN/inf coordinates"),
    ("pdb-text-coordinate", "txt.pdb", pdb_lines([GOOD_XYZ, "   abcde  -0.499  -0.615"]), "not a readable pdb file"),
    ("xtc-without-topology", "t.xtc", b"\x00\x00\x07\xcb" + b"\x00" * 60, "needs a topology"),
]
for name, filename, content, match in FILE_CASES:
    if name == "npz-without-positions":
        case(f"load_positions-{name}", InputError, match)(Case(
            lambda tmp: load_positions(tmp / "in" / "x.npz"),
            lambda tmp: np.savez(tmp / "in" / "x.npz", coords=np.zeros((2, 4, 3)))))
    else:
        case(f"load_positions-{name}", InputError, match)(write_then_load(filename, content))
case("load_positions-missing-file", FileNotFoundError, "no such file")(
    lambda tmp: load_positions(tmp / "in" / "absent.npz"))
case("load_positions-folder", InputError, "is not a file")(lambda tmp: load_positions(tmp / "in"))
case("load_positions-xtc-missing-topology-file", FileNotFoundError, "no such topology file")(
    write_then_load("t.xtc", b"\x00" * 64, top="/nonexistent/top.pdb"))
case("load_positions-xtc-garbage", InputError, "not a readable xtc file")(Case(
    lambda tmp: load_positions(tmp / "in" / "g.xtc", top=tmp / "in" / "top.pdb"),
    lambda tmp: (write_bytes("top.pdb", pdb_lines([GOOD_XYZ] * 4))(tmp), write_bytes("g.xtc", b"\x13\x37" * 100)(tmp))))


# ---- model folders: digfast.load ------------------------------------------------------------
def model_folder(edit):
    def setup(tmp):
        shutil.copytree(Path(digfast.__file__).parent / "weights" / "dw4", tmp / "in" / "model")
        edit(tmp / "in" / "model")
    return Case(lambda tmp: digfast.load(str(tmp / "in" / "model")), setup)


def edit_config(change):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def truncate_weights(fraction):
    def edit(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: int(len(data) * fraction)])
    return edit


def replace_weights(make):
    def edit(folder):
        from safetensors.torch import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        save_file(make(weights), str(folder / "model.safetensors"))
    return edit


def first_key(w):
    return sorted(k for k in w if w[k].is_floating_point())[0]


MODEL_CASES = [
    ("config-not-json", lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    ("config-binary", lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    ("config-list", lambda f: (f / "config.json").write_text("[1, 2]"), "must hold a JSON object, got list"),
    ("config-missing-network", edit_config(lambda c: c.pop("network")), r"missing \['network'\]"),
    ("config-missing-system", edit_config(lambda c: c.pop("system")), r"missing \['system'\]"),
    ("config-network-not-object", edit_config(lambda c: c.update(network=[1])), "must be JSON objects"),
    ("config-unknown-network-key", edit_config(lambda c: c["network"].update(wings=3)), "bad model config.*wings"),
    ("config-unknown-architecture", edit_config(lambda c: c.update(architecture="unet")), "unknown architecture 'unet'"),
    ("config-unknown-system", edit_config(lambda c: c.update(system="water")), "unknown system 'water'"),
    ("config-bad-schedule", edit_config(lambda c: c.update(schedule={"name": "zigzag"})), "bad model config"),
    ("config-negative-scale", edit_config(lambda c: c.update(position_scale=-1.0)), "position_scale must be finite and > 0"),
    ("config-wider-network", edit_config(lambda c: c["network"].update(width=c["network"]["width"] * 2)),
     "does not fit config.json"),
    ("weights-missing", lambda f: (f / "model.safetensors").unlink(), "model.safetensors not found"),
    ("weights-empty", truncate_weights(0.0), "not a readable safetensors file"),
    ("weights-truncated-header", truncate_weights(0.001), "not a readable safetensors file"),
    ("weights-truncated-half", truncate_weights(0.5), "not a readable safetensors file"),
    ("weights-truncated-end", truncate_weights(0.999), "not a readable safetensors file"),
    ("weights-missing-tensor", replace_weights(lambda w: {k: v for k, v in w.items() if k != first_key(w)}),
     "does not fit config.json.*Missing"),
    ("weights-extra-tensor", replace_weights(lambda w: {**w, "stowaway": torch.zeros(3)}), "Unexpected.*stowaway"),
    ("weights-wrong-shape", replace_weights(lambda w: {**w, first_key(w): torch.zeros(1, 1)}), "size mismatch"),
    ("weights-nan", replace_weights(lambda w: {**w, first_key(w): torch.full_like(w[first_key(w)], float("nan"))}),
     "NaN/inf in"),
]
EXPECTED_MODEL_ERRORS = {"weights-missing": FileNotFoundError}
for name, edit, match in MODEL_CASES:
    case(f"load-{name}", EXPECTED_MODEL_ERRORS.get(name, InputError), match)(model_folder(edit))
case("load-none", TypeError, "model name must be a non-empty string")(lambda tmp: digfast.load(None))
case("load-number", TypeError, "model name must be a non-empty string")(lambda tmp: digfast.load(5))
case("load-empty-name", TypeError, "model name must be a non-empty string")(lambda tmp: digfast.load(""))
case("load-nul-byte", ValueError, "contains a NUL byte")(lambda tmp: digfast.load("dw\x004"))
case("load-unknown", ValueError, "unknown model 'no-such-model'")(lambda tmp: digfast.load("no-such-model"))
case("load-empty-folder", FileNotFoundError, "config.json not found")(lambda tmp: digfast.load(str(tmp / "in")))


# ---- validity checks ------------------------------------------------------------------------
case("validity-energy-nan", ValueError, "max_energy is NaN")(lambda tmp: EnergyCutoff(float("nan")))
case("validity-bond-tolerance-zero", ValueError, "bond tolerance must be > 0")(lambda tmp: BondLengths(0))
case("validity-clash-negative", ValueError, "clash distance must be > 0")(lambda tmp: Clashes(-1.0))
case("validity-clash-inf", ValueError, "clash distance must be > 0")(lambda tmp: Clashes(float("inf")))


# ---- command line (in-process) ---------------------------------------------------------------
def cli(*argv, files=None):
    """main(argv) with {inp}/{out} filled in; an error return becomes SystemExit, as from argparse."""
    def call(tmp):
        code = main([a.format(inp=tmp / "in", out=tmp / "out") for a in argv])
        if code != 0:
            raise SystemExit(code)
    return Case(call, files or (lambda tmp: None))


ARGPARSE_CASES = [
    ("n-zero", ["sample", "-n", "0"], "argument -n: must be >= 1, got 0"),
    ("n-word", ["sample", "-n", "many"], "argument -n: 'many' is not an integer"),
    ("n-float", ["sample", "-n", "2.5"], "argument -n: '2.5' is not an integer"),
    ("steps-negative", ["sample", "--steps", "-1"], "argument --steps: must be >= 1"),
    ("batch-word", ["sample", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    ("batch-zero", ["sample", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    ("seed-negative", ["sample", "--seed", "-5"], r"argument --seed: must be in \[0, 2\*\*64\)"),
    ("seed-huge", ["sample", "--seed", str(2**64)], r"argument --seed: must be in"),
    ("chunk-zero", ["sample", "--chunk-size", "0"], "argument --chunk-size: must be >= 1"),
    ("max-attempts-zero", ["sample", "--max-attempts", "0"], "argument --max-attempts: must be >= 1"),
    ("sampler-unknown", ["sample", "--sampler", "leapfrog"], "argument --sampler: invalid choice: 'leapfrog'"),
    ("on-nonfinite-unknown", ["sample", "--on-nonfinite", "ignore"], "argument --on-nonfinite: invalid choice"),
    ("max-energy-word", ["sample", "--max-energy", "high"], "argument --max-energy: invalid float value"),
    ("unknown-option", ["sample", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("no-command", [], "the following arguments are required: command"),
    ("likelihood-no-input", ["likelihood"], "the following arguments are required: input"),
    ("likelihood-probes-word", ["likelihood", "x.npz", "--probes", "some"], "argument --probes: invalid int value"),
    ("threads-zero", ["sample", "--threads", "0"], "argument --threads: must be >= 1"),
]
for name, argv, match in ARGPARSE_CASES:
    case(f"cli-args-{name}", SystemExit, match)(cli(*argv))


def npz_input(array):
    return lambda tmp: np.savez(tmp / "in" / "x.npz", positions=array)


RUN_CASES = [
    ("unknown-model", ["sample", "--model", "nope", "--quiet", "-o", "{out}/x.xtc"], "unknown model 'nope'", None),
    ("output-format", ["sample", "-n", "4", "--quiet", "-o", "{out}/x.mol2"], "unknown output format '.mol2'", None),
    ("output-folder-missing", ["sample", "-n", "4", "--quiet", "-o", "{out}/no/x.xtc"], "output folder .* does not exist", None),
    ("json-folder-missing", ["sample", "-n", "4", "--quiet", "--json", "{out}/no/r.json"], "output folder .* does not exist", None),
    ("resume-without-out-dir", ["sample", "-n", "4", "--quiet", "--resume"], "--resume needs --out-dir", None),
    ("max-energy-nan", ["sample", "-n", "4", "--quiet", "--max-energy", "nan", "--out-dir", "{out}/run"], "max_energy is NaN", None),
    ("min-distance-negative", ["sample", "-n", "4", "--quiet", "--min-distance", "-1", "--out-dir", "{out}/run"],
     "clash distance must be > 0", None),
    ("bond-check-without-bonds", ["sample", "-n", "4", "--quiet", "--bond-tolerance", "0.5", "--out-dir", "{out}/run"],
     "has no bond list", None),
    ("every-sample-rejected", ["sample", "-n", "3", "--steps", "2", "--quiet", "--max-energy=-1e9", "-o", "{out}/x.xtc"],
     r"all 3 samples were rejected \(0 NaN/inf and 3 invalid draws\)", None),
    ("out-dir-parent-missing", ["sample", "-n", "4", "--quiet", "--out-dir", "{out}/a/b"], "output folder .* does not exist", None),
    ("out-dir-is-a-file", ["sample", "-n", "4", "--quiet", "--out-dir", "{inp}/file"], "exists and is not a folder",
     lambda tmp: (tmp / "in" / "file").write_text("x")),
    ("likelihood-missing-file", ["likelihood", "{inp}/absent.npz", "-o", "{out}/lp.npy"], "no such file", None),
    ("likelihood-nan-file", ["likelihood", "{inp}/x.npz", "-o", "{out}/lp.npy"], "NaN/inf coordinates",
     npz_input(nan_at((2, 4, 3), (1, 1, 1), np.nan))),
    ("likelihood-wrong-atoms", ["likelihood", "{inp}/x.npz", "-o", "{out}/lp.npy"], r"must be \(n, 4, 3\)",
     npz_input(np.zeros((2, 5, 3), np.float32))),
    ("likelihood-pickle", ["likelihood", "{inp}/x.pkl", "-o", "{out}/lp.npy"], "pickle files are not read",
     lambda tmp: (tmp / "in" / "x.pkl").write_bytes(b"\x80\x04K\x01.")),
    ("likelihood-truncated", ["likelihood", "{inp}/x.npz", "-o", "{out}/lp.npy"], "cannot read it as a numpy array",
     lambda tmp: (tmp / "in" / "x.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 10)),
]
for name, argv, match, files in RUN_CASES:
    case(f"cli-{name}", SystemExit, match)(cli(*argv, files=files))


# ---- ensemble folders --------------------------------------------------------------------------
def run_folder(tmp):
    """A finished 10-sample run in tmp/in/run (built once per case, before the call under test)."""
    folder = tmp / "in" / "run"
    sample_ensemble(model(), folder, 10, steps=2, chunk_size=4, model_name="mixture")
    return folder


def damaged(edit, action=lambda folder: Ensemble(folder)):
    return Case(lambda tmp: action(tmp / "in" / "run"), lambda tmp: edit(run_folder(tmp)))


def edit_manifest(change):
    def edit(folder):
        m = json.loads((folder / "manifest.json").read_text())
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))
    return edit


def rewrite_chunk(array_change, index=0):
    """Replace a chunk's content and fix its checksum in the manifest: only the shape check can tell."""
    def edit(folder):
        from digfast.ensemble import sha256_file

        path = folder / f"chunk-{index:06d}.npz"
        with np.load(path) as d:
            data = dict(d)
        array_change(data)
        np.savez(path, **data)
        edit_manifest(lambda m: m["chunks"][index].update(sha256=sha256_file(path)))(folder)
    return edit


def truncate_chunk_keeping_checksum(folder):
    from digfast.ensemble import sha256_file

    path = folder / "chunk-000000.npz"
    path.write_bytes(path.read_bytes()[:200])
    edit_manifest(lambda m: m["chunks"][0].update(sha256=sha256_file(path)))(folder)


def flip_byte(folder):
    path = folder / "chunk-000001.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


READ_ALL = {"chunk-wrong-shape", "chunk-wrong-dtype", "chunk-ids-mismatch", "chunk-no-positions",
            "chunk-truncated-checksum-updated"}
ENSEMBLE_CASES = [
    ("manifest-not-json", lambda f: (f / "manifest.json").write_text("{"), EnsembleError, "manifest is not valid JSON"),
    ("manifest-list", lambda f: (f / "manifest.json").write_text("[]"), EnsembleError, "must be a JSON object"),
    ("manifest-format", edit_manifest(lambda m: m.update(format="other/9")), EnsembleError, "format 'other/9'"),
    ("manifest-no-settings", edit_manifest(lambda m: m.pop("settings")), EnsembleError, "no 'settings' object"),
    ("manifest-n-string", edit_manifest(lambda m: m["settings"].update(n="10")), EnsembleError,
     "settings.n must be a positive integer"),
    ("manifest-chunk-size-zero", edit_manifest(lambda m: m["settings"].update(chunk_size=0)), EnsembleError,
     "settings.chunk_size must be a positive integer"),
    ("manifest-no-chunks", edit_manifest(lambda m: m.update(chunks=[])), EnsembleError, "no chunk list"),
    ("manifest-unfinished", edit_manifest(lambda m: m.update(complete=False)), EnsembleError, "unfinished run"),
    ("manifest-missing", lambda f: (f / "manifest.json").unlink(), FileNotFoundError, "manifest.json missing"),
    ("chunk-missing", lambda f: (f / "chunk-000002.npz").unlink(), EnsembleError, "chunk file chunk-000002.npz is missing"),
    ("chunk-bit-flip", flip_byte, EnsembleError, "checksum does not match"),
    ("chunk-truncated", lambda f: (f / "chunk-000000.npz").write_bytes((f / "chunk-000000.npz").read_bytes()[:50]),
     EnsembleError, "checksum does not match"),
    ("chunk-wrong-shape", rewrite_chunk(lambda d: d.update(positions=np.zeros((4, 5, 3), np.float32))),
     EnsembleError, r"expected 4 float32 structures of \(4, 3\)"),
    ("chunk-wrong-dtype", rewrite_chunk(lambda d: d.update(positions=d["positions"].astype(np.float64))),
     EnsembleError, "expected 4 float32 structures"),
    ("chunk-ids-mismatch", rewrite_chunk(lambda d: d.update(sample_ids=np.arange(3))), EnsembleError,
     r"with \(3,\) ids"),
    ("chunk-no-positions", rewrite_chunk(lambda d: d.pop("positions")), EnsembleError, "unreadable chunk"),
    ("chunk-truncated-checksum-updated", truncate_chunk_keeping_checksum, EnsembleError, "unreadable chunk"),
]
for name, edit, exc, match in ENSEMBLE_CASES:  # checksums hold for READ_ALL: only reading the chunk tells
    case(f"ensemble-{name}", exc, match)(damaged(edit, (lambda f: Ensemble(f).positions()) if name in READ_ALL
                                                 else Ensemble))

case("ensemble-resume-other-seed", EnsembleError, r"settings differ \(seed: 0 in the folder, 1 now\)")(
    damaged(lambda f: None, lambda f: sample_ensemble(model(), f, 10, steps=2, seed=1, resume=True, model_name="mixture")))
case("ensemble-resume-other-model", EnsembleError, "settings differ .*model")(
    damaged(lambda f: None, lambda f: sample_ensemble(model(), f, 10, steps=2, resume=True, model_name="other")))
case("ensemble-reuse-without-resume", FileExistsError, "already holds an ensemble")(
    damaged(lambda f: None, lambda f: sample_ensemble(model(), f, 10, steps=2, chunk_size=4, model_name="mixture")))
case("ensemble-stray-chunks", FileExistsError, "holds chunk files but no manifest.json")(
    damaged(lambda f: (f / "manifest.json").unlink(),
            lambda f: sample_ensemble(model(), f, 10, steps=2, chunk_size=4, model_name="mixture")))
for suffix in (".xtc", ".dcd", ".npy", ".npz"):  # the export fails on the last chunk, after writing the others
    case(f"ensemble-export{suffix}-fails-midway-leaves-nothing", EnsembleError, "chunk-000002.npz: expected")(
        damaged(rewrite_chunk(lambda d: d.update(positions=np.zeros((2, 4, 2), np.float32)), index=2),
                lambda f, sfx=suffix: Ensemble(f).export(f.parent.parent / "out" / f"ens{sfx}")))
case("ensemble-export-format", ValueError, "unknown output format '.mol2'")(
    damaged(lambda f: None, lambda f: Ensemble(f).export(f.parent.parent / "out" / "x.mol2")))
case("ensemble-positions-huge-for-memory", ValueError, "read it chunk by chunk")(
    damaged(lambda f: None, with_free_memory(100, lambda f: Ensemble(f).positions())))
case("ensemble-bad-sampler-touches-nothing", ValueError, "unknown sampler")(
    lambda tmp: sample_ensemble(model(), tmp / "out" / "run", 10, steps=2, sampler="nope"))
case("ensemble-bad-chunk-size", ValueError, "chunk_size must be >= 1")(
    lambda tmp: sample_ensemble(model(), tmp / "out" / "run", 10, steps=2, chunk_size=0))


# ---- protein inputs: AlphaFold2 representations, FASTA, the sampler's sequence ----------------
def protein_file(name, write):
    def setup(tmp):
        write(tmp / "in" / name)
    return Case(lambda tmp: read_representations(tmp / "in" / name), setup)


def npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def raw(content: bytes):
    return lambda path: path.write_bytes(content)


def pickled(obj):
    import pickle

    return lambda path: path.write_bytes(pickle.dumps(obj))


L5 = dict(single=np.ones((5, 384), np.float32), pair=np.ones((5, 5, 128), np.float32))
PROTEIN_CASES = [
    ("pair-not-square", "a.npz", npz(single=L5["single"], pair=np.ones((5, 4, 128))), r"pair must be \(5, 5, 128\)"),
    ("single-wrong-width", "a.npz", npz(single=np.ones((5, 256)), pair=L5["pair"]), r"single must be \(L, 384\)"),
    ("single-empty", "a.npz", npz(single=np.ones((0, 384)), pair=np.ones((0, 0, 128))), r"single must be \(L, 384\)"),
    ("pair-nan", "a.npz", npz(single=L5["single"], pair=np.full((5, 5, 128), np.nan)), "pair contains NaN/inf"),
    ("single-inf", "a.npz", npz(single=np.full((5, 384), np.inf), pair=L5["pair"]), "single contains NaN/inf"),
    ("single-strings", "a.npz", npz(single=np.full((5, 384), "x"), pair=L5["pair"]), "single must be real numbers"),
    ("no-pair", "a.npz", npz(single=L5["single"]), "no 'pair' array"),
    ("truncated-npz", "a.npz", lambda path: (np.savez(path, **L5), path.write_bytes(path.read_bytes()[:200])),
     "cannot read it"),
    ("not-a-zip", "a.npz", raw(b"plain text, not an npz"), "cannot read it"),
    ("pickle-of-list", "a.pkl", pickled([1, 2, 3]), "holds a list, not a dict of arrays"),
    ("pickle-truncated", "a.pkl", lambda path: (pickled(L5)(path), path.write_bytes(path.read_bytes()[:50])),
     "cannot read it"),
    ("pickle-code", "a.pkl", pickled({"single": Path("x")}), "only numpy arrays and dicts are read"),
    ("unknown-suffix", "a.json", raw(b"{}"), "unknown format '.json'"),
]
for name, fname, write, match in PROTEIN_CASES:
    case(f"protein-inputs-{name}", InputError, match)(protein_file(fname, write))
case("protein-inputs-missing-file", FileNotFoundError, "no such file")(
    lambda tmp: read_representations(tmp / "in" / "absent.npz"))
for name, text in (("empty", ">x\n\n"), ("digits", ">x\nACD123\n"), ("no-header-blank", "\n")):
    case(f"protein-fasta-{name}", InputError, "no one-letter sequence")(
        Case(lambda tmp: read_fasta(tmp / "in" / "s.fasta"),
             lambda tmp, t=text: (tmp / "in" / "s.fasta").write_text(t)))


def protein_sample(**kw):
    def call(tmp):
        from protein_helpers import SMALL, random_model

        from digfast.protein.engine import sample_protein

        model = random_model(SMALL, torch.Generator().manual_seed(0))
        single, pair = torch.ones(5, 384), torch.ones(5, 5, 128)
        return sample_protein(model, single, pair, **{"n": 1, "steps": 2, **kw})
    return call


case("protein-sample-sequence-length", ValueError, "sequence has 3 residues, the representations 5")(
    protein_sample(sequence="AAA", out=None))
case("protein-sample-output-without-sequence", ValueError, "needs the sequence")(
    lambda tmp: protein_sample(out=tmp / "out" / "p.xtc")(tmp))


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("c, exc, match", CASES)
def test_malformed_input_is_rejected_cleanly(c, exc, match, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    c.setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(exc) as info:
        c.call(tmp_path)
    text = str(info.value)
    if exc is SystemExit:  # the CLI: exit status 2 and the message on stderr
        assert info.value.code == 2
        text = capsys.readouterr().err
    assert re.search(match, text, flags=re.S), f"message {text!r} does not name the problem ({match!r})"
    assert snapshot(tmp_path) == before, "the failed call wrote or changed files"
