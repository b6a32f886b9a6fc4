"""The recomputed backwards size their row chunks from free GPU memory (kernels/recompute.py)."""
import torch

from digfast.kernels import recompute


def test_cpu_chunk_is_the_floor():
    assert recompute.chunk_elements(torch.device("cpu"), 12345) == 12345


def test_gpu_chunk_grows_with_free_memory_and_keeps_the_floor(monkeypatch):
    free = {"bytes": 64 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    cuda = torch.device("cuda")
    big = recompute.chunk_elements(cuda, 1 << 22)
    # an eighth of 64 GiB over 16 float32 intermediates: 128 Mi elements each, 32x the floor
    assert big == (64 << 30) // (8 * 4 * 16) and big > 1 << 22
    free["bytes"] = 1 << 20
    assert recompute.chunk_elements(cuda, 1 << 22) == 1 << 22


def test_spatial_bias_backward_on_a_gpu_runs_in_few_chunks(monkeypatch):
    """The shape that took 32 chunks on an H200 (B = 16, N = 256, K = 128) now takes one."""
    sb = __import__("pytest").importorskip("digfast.kernels.spatial_bias")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 30, 140 << 30))
    assert sb.backward_chunk_rows(16, 256, 128, torch.device("cpu")) == 8
    assert sb.backward_chunk_rows(16, 256, 128, torch.device("cuda")) >= 256
