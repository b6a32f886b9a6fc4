"""Triton kernels under the interpreter on the CPU, in one subprocess per test module.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own @jit
helpers are built at import), and setting it in the test process would also turn the real
GPU kernels of later tests into interpreted ones. So each module saves its cases, one worker
runs them all with TRITON_INTERPRET=1, and the module compares what comes back.
"""
import os
import subprocess
import sys

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def fresh_generator() -> torch.Generator:
    """New random inputs every run, reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"triton cases rng seed {seed}")
    return torch.Generator().manual_seed(seed)


def run_interpreted(worker: str, inputs, folder):
    """Run `worker` (Python source: reads its cases from sys.argv[1] with torch.load, writes its
    outputs to sys.argv[2]; sys.argv[3] is the tests folder) on inputs; returns its outputs."""
    src, dst = folder / "cases.pt", folder / "outs.pt"
    torch.save(inputs, src)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", worker, str(src), str(dst), TESTS_DIR], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"triton worker failed:\n{proc.stderr[-4000:]}"
    return torch.load(dst)


def jvp_along(reference, args: dict, names, tangents: dict, dtype):
    """(out, d out) of reference(**args) along tangents {name: tensor} of the arguments in
    names (the others held fixed), the tangents cast to dtype."""
    def f(*xs):
        return reference(**{**args, **dict(zip(names, xs))})
    return torch.func.jvp(f, tuple(args[n] for n in names), tuple(tangents[n].to(dtype) for n in names))
