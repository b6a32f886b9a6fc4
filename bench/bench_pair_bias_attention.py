"""Benchmark of pair-bias attention on a GPU: the flash Triton kernel against PyTorch's paths.

    python bench/bench_pair_bias_attention.py [--out DIR] [--tokens 16384] [--sizes 64,256,...]

Public Graphormer-3D sizes: H = 32 heads, head dim 24 (768 / 32), bfloat16, N in
{64, 256, 1024, 4096} tokens, the batch B = --tokens // N (a fixed token budget). Inputs as
the model makes them: q, k, v permuted views of one (B, N, 3, H, dh) projection, a float
bias (B, H, N, N) with -inf on padded keys (about 10% padded, never a whole sample).
Candidates, all on the same tensors:
    triton          digfast's flash kernel (kernels/pair_bias_attention.py)
    sdpa_<backend>  F.scaled_dot_product_attention(q, k, v, attn_mask=bias) pinned to each
                    SDPA backend (math, efficient, flash, cudnn); one that refuses a float
                    bias or these shapes is reported as unsupported with torch's reason
    flex            torch.compile(flex_attention) with score_mod adding bias[b, h, i, j]
    reference       digfast's eager reference (pair_bias_attention_reference)
Modes: forward (under no_grad) and forward+backward (gradients for q, k, v and the bias,
as DSM training needs). Times are medians with the 10th/90th percentiles per call after a
warm-up. Each row also has the peak memory above the inputs, TFLOP/s and GB/s, and (forward)
max |out - fp32 reference| / max |reference|. FLOPs count the useful matmuls only:
4 B H N^2 dh forward, 3.5x that for forward+backward (dv, dp, dq, dk and one recomputed
q k^T). Bytes are the unavoidable traffic: forward reads the bias, q, k, v and writes out;
the backward reads the bias, q, k, v, out, dout again and writes dq, dk, dv and dbias.
Prints a table and writes DIR/bench_pair_bias_attention.json. Without a CUDA device it says
so and exits 0.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from digfast.ops import _backend
from digfast.ops.pair_bias_attention import pair_bias_attention, pair_bias_attention_reference

from bench_sampler_step import quantiles, time_cuda  # noqa: E402  (bench/ is on sys.path)
from common import environment, write_json  # noqa: E402

HEADS, HEAD_DIM = 32, 24
SIZES = [64, 256, 1024, 4096]
DTYPE = torch.bfloat16
SDPA_BACKENDS = ("math", "efficient", "flash", "cudnn")


def make_inputs(B, N, device, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)
    H, dh = HEADS, HEAD_DIM
    qkv = torch.randn(B, N, 3, H, dh, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)
    mask = torch.rand(B, N, generator=g) < 0.9
    mask[:, 0] = True  # no sample fully padded (SDPA would return NaN rows)
    bias = torch.randn(B, H, N, N, generator=g).to(device, dtype)
    bias.masked_fill_(~mask.to(device)[:, None, None, :], float("-inf"))
    return dict(q=qkv[0], k=qkv[1], v=qkv[2], bias=bias)


def sdpa_fn(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def attend(q, k, v, bias):
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attend


_FLEX = None


def flex_fn():
    """torch.compile(flex_attention) with the bias as a captured tensor in score_mod."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)

    def attend(q, k, v, bias):
        def add_bias(score, b, h, i, j):
            return score + bias[b, h, i, j]
        return _FLEX(q, k, v, score_mod=add_bias)
    return attend


def candidates():
    out = {"triton": lambda q, k, v, bias: pair_bias_attention(q, k, v, bias, backend="triton")}
    for name in SDPA_BACKENDS:
        out[f"sdpa_{name}"] = sdpa_fn(name)
    try:
        out["flex"] = flex_fn()
    except ImportError as err:
        print(f"bench_pair_bias_attention: no FlexAttention in this torch ({err})")
    out["reference"] = pair_bias_attention_reference
    return out


def call(attend, inputs, backward):
    """One forward (under no_grad), or forward + backward with a fixed output gradient."""
    if not backward:
        def forward():
            with torch.no_grad():
                attend(inputs["q"], inputs["k"], inputs["v"], inputs["bias"])
        return forward
    leaves = {k: t.detach().requires_grad_(True) for k, t in inputs.items()}
    grad = torch.randn(inputs["q"].shape, device=inputs["q"].device, dtype=inputs["q"].dtype)

    def fwd_bwd():
        out = attend(leaves["q"], leaves["k"], leaves["v"], leaves["bias"])
        torch.autograd.grad(out, list(leaves.values()), grad)
    return fwd_bwd


def reference_fp32(inputs, chunk=1):
    """The reference in float32, a few samples at a time (its logits are (B, H, N, N))."""
    B = inputs["q"].shape[0]
    outs = []
    with torch.no_grad():
        for b0 in range(0, B, chunk):
            part = [inputs[k][b0:b0 + chunk].float() for k in ("q", "k", "v", "bias")]
            outs.append(pair_bias_attention_reference(*part))
    return torch.cat(outs)


def traffic_bytes(B, N, elt, backward):
    """Unavoidable memory traffic of one call (see the module doc)."""
    pairs, rows = B * HEADS * N * N, B * HEADS * N * HEAD_DIM
    fwd = (pairs + 4 * rows) * elt              # bias, q, k, v read; out written
    bwd = (2 * pairs + 8 * rows) * elt          # bias read, dbias written; q, k, v, out, dout
    return fwd + bwd if backward else fwd       # read, dq, dk, dv written


def flops(B, N, backward):
    fwd = 4 * B * HEADS * N * N * HEAD_DIM
    return fwd * (3.5 if backward else 1.0)


def short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def run(tokens, sizes, warmup, repeat, modes, only):
    rows = []
    cands = candidates()
    if only:
        cands = {k: v for k, v in cands.items() if k in only}
    for N in sizes:
        B = max(1, tokens // N)
        inputs = make_inputs(B, N, "cuda")
        ref = reference_fp32(inputs, chunk=max(1, (1 << 28) // (HEADS * N * N)))
        scale = float(ref.abs().max())
        base_mem = torch.cuda.memory_allocated()
        for mode in modes:
            backward = mode != "forward"
            results = {}
            for name, attend in cands.items():
                row = dict(op="pair_bias_attention", device="cuda", backend=name, mode=mode, B=B,
                           N=N, H=HEADS, head_dim=HEAD_DIM, dtype="bf16", bias="float, -inf padded",
                           tokens=B * N)
                try:
                    if not backward:
                        with torch.no_grad():
                            out = attend(inputs["q"], inputs["k"], inputs["v"], inputs["bias"])
                        row["rel_diff_vs_fp32_reference"] = float(
                            (out.float() - ref).abs().max()) / scale
                        del out
                    torch.cuda.reset_peak_memory_stats()
                    fn = call(attend, inputs, backward)
                    times = time_cuda(fn, warmup, repeat, inner=3)
                    med, p10, p90 = quantiles(times)
                    row.update(status="ok", median_ms=med * 1e3, p10_ms=p10 * 1e3, p90_ms=p90 * 1e3,
                               peak_extra_gb=(torch.cuda.max_memory_allocated() - base_mem) / 1e9,
                               tflop_per_s=flops(B, N, backward) / med / 1e12,
                               gb_per_s=traffic_bytes(B, N, 2, backward) / med / 1e9,
                               samples_per_s=B / med)
                    results[name] = med
                except torch.cuda.OutOfMemoryError as err:
                    row.update(status="oom", reason=short(err))
                except Exception as err:  # noqa: BLE001  (an SDPA backend refusing a bias, ...)
                    row.update(status="unsupported", reason=short(err))
                finally:
                    fn = None
                    torch.cuda.empty_cache()
                rows.append(row)
            torch_paths = [t for k, t in results.items() if k != "triton"]
            best = min(torch_paths) if torch_paths else None
            for row in rows:
                if row["N"] == N and row["mode"] == mode and row["status"] == "ok" and best:
                    row["speedup_vs_best_torch"] = best / row["median_ms"] * 1e3
        del inputs, ref
        torch.cuda.empty_cache()
    return rows


def print_table(rows):
    head = (f"{'backend':15} {'mode':16} {'B':>5} {'N':>5} {'median ms':>10} {'p10':>8} {'p90':>8} "
            f"{'x best':>6} {'TFLOP/s':>8} {'GB/s':>7} {'peak GB':>8} {'rel diff':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['backend']:15} {r['mode']:16} {r['B']:5d} {r['N']:5d} {r['status']}: "
                  f"{r.get('reason', '')[:80]}")
            continue
        rel = r.get("rel_diff_vs_fp32_reference")
        print(f"{r['backend']:15} {r['mode']:16} {r['B']:5d} {r['N']:5d} {r['median_ms']:10.4f} "
              f"{r['p10_ms']:8.4f} {r['p90_ms']:8.4f} {r.get('speedup_vs_best_torch', 0):6.2f} "
              f"{r['tflop_per_s']:8.2f} {r['gb_per_s']:7.0f} {r['peak_extra_gb']:8.2f} "
              f"{'' if rel is None else f'{rel:9.1e}'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for bench_pair_bias_attention.json "
                                                   "('' to skip)")
    parser.add_argument("--tokens", type=int, default=1 << 14,
                        help="tokens per call (B = tokens // N)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated N")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_pair_bias_attention: no CUDA device, nothing to time (the Triton kernel runs "
              "on GPUs)")
        return 0
    if not _backend.available("triton", torch.device("cuda")):
        print("bench_pair_bias_attention: triton is not installed, nothing to compare")
        return 0
    modes = ["forward"] + ([] if args.forward_only else ["forward+backward"])
    sizes = [int(n) for n in args.sizes.split(",") if n]
    only = {c for c in args.only.split(",") if c}
    rows = run(args.tokens, sizes, args.warmup, args.repeat, modes, only)
    env = environment()
    print(f"# GPU {env['gpu']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "bench_pair_bias_attention.json"), env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
