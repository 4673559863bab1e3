"""Microbenchmarks of the Triton kernels against their baselines, on a CUDA GPU.

    python kernels/bench.py triangle [--sizes 64 128 256 512 1024] [--heads 4] [--dim 32] [--dtype bf16]

For each size and implementation: forward and forward + backward time (median of
triton.testing.do_bench), TFLOP/s and the fraction of the GPU's dense peak, and peak memory
allocated beyond the inputs. Baselines, each measured in the same run: the naive PyTorch reference,
torch.compile of it, and, when installed, trifast and cuEquivariance. A baseline that fails (not
installed, out of memory, another API version) gets its error in the table instead of a number.
Writes OUT/bench_triangle.md (the table) and OUT/bench_triangle.png (time against N).

The kernels compile only for a GPU; on a CPU their correctness is covered by tests/ in Triton's
interpreter, and this script says so and exits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from kernels.triangle_attention import triangle_attention, triangle_attention_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense tensor-core peaks in TFLOP/s for 16-bit inputs (vendor data sheets), to report a fraction of peak.
PEAK_TFLOPS_16BIT = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(dtype: torch.dtype) -> float | None:
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS_16BIT.items():  # most specific names first
        if key in name:
            return peak if dtype != torch.float32 else None
    return None


def triangle_implementations() -> dict:
    """name -> fn(q, k, v, bias, mask); optional libraries only when they import."""
    impls = {"triton (ours)": triangle_attention, "naive torch": triangle_attention_reference,
             "torch.compile(naive)": torch.compile(triangle_attention_reference, dynamic=False)}
    try:
        from trifast import triangle_attention as trifast_attention
        impls["trifast"] = trifast_attention
    except ImportError:
        pass
    try:
        import cuequivariance_torch as cuet

        def cue(q, k, v, bias, mask):
            # Its layout: q, k, v [B, N(i), H, Q(j), D], bias [B, 1, H, Q, K], mask [B, N(i), 1, 1, K] (True =
            # keep). The head/row swap is a view here; whatever copy it costs inside is part of its time.
            t = lambda x: x.transpose(1, 2)
            return t(cuet.triangle_attention(t(q), t(k), t(v), bias[:, None], mask[:, :, None, None, :]))

        impls["cuEquivariance"] = cue
    except ImportError:
        pass
    return impls


def measure(fn, make_inputs, backward: bool) -> tuple[float, float]:
    """(median ms, peak MiB allocated beyond the inputs) of fn, forward or forward + backward."""
    from triton.testing import do_bench

    inputs = make_inputs()
    grads = [t for t in inputs if t.requires_grad]

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, grads, torch.ones_like(out))

    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return do_bench(step, warmup=10, rep=50), peak


def bench_triangle(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    peak = peak_tflops(dtype)
    rows = []
    for n in args.sizes:
        def make_inputs():
            g = torch.Generator(device="cuda").manual_seed(0)
            shape = (args.batch, args.heads, n, n, args.dim)
            q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
            bias = torch.randn(shape[:-1], device="cuda", dtype=dtype, generator=g).requires_grad_()
            mask = torch.ones(args.batch, n, n, device="cuda", dtype=torch.bool)
            return q, k, v, bias, mask

        # Two N^3 D matmuls forward (q k^T, p v); the backward does 2.5x that (FlashAttention-2 count).
        flops_fwd = 4 * args.batch * args.heads * n ** 3 * args.dim
        for name, fn in triangle_implementations().items():
            for mode, backward, flops in (("fwd", False, flops_fwd), ("fwd+bwd", True, 3.5 * flops_fwd)):
                row = {"impl": name, "N": n, "mode": mode}
                try:
                    ms, mem = measure(fn, make_inputs, backward)
                    tflops = flops / ms / 1e9
                    row.update(ms=ms, tflops=tflops, peak_frac=tflops / peak if peak else None, mem_mib=mem)
                except Exception as e:  # OOM, missing kernel for this dtype, another library API: report it
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['impl']} | {r['N']} | {r['mode']} | {r['error']} | | | |"
    frac = f"{100 * r['peak_frac']:.1f} %" if r.get("peak_frac") is not None else "n/a"
    return f"| {r['impl']} | {r['N']} | {r['mode']} | {r['ms']:.3f} | {r['tflops']:.1f} | {frac} | {r['mem_mib']:.0f} |"


def write_report(rows: list[dict], title: str, out: Path, stem: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    header = "| impl | N | mode | ms | TFLOP/s | of peak | peak MiB |\n|---|---|---|---|---|---|---|\n"
    (out / f"{stem}.md").write_text(f"{title}\n\n" + header + "\n".join(format_row(r) for r in rows) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["N"], r["ms"]) for r in rows if r["impl"] == impl and r["mode"] == mode and "ms" in r]
            if pts:
                ax.plot(*zip(*pts), "o-", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="N", ylabel="ms", title=mode)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.png')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kernel", required=True)
    tri = sub.add_parser("triangle", help="triangle attention (Pairformer)")
    tri.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="N values")
    tri.add_argument("--batch", type=int, default=1, help="batch size B")
    tri.add_argument("--heads", type=int, default=4, help="heads H")
    tri.add_argument("--dim", type=int, default=32, help="head dimension D")
    tri.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    tri.add_argument("--out", type=Path, default=Path("out/bench"), help="where the table and plot go")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py measures GPU kernels and needs a CUDA device. On a CPU, the kernels' "
                 "correctness is tested in Triton's interpreter: python -m pytest tests/test_triangle_attention.py")
    title = (f"{args.kernel}: {torch.cuda.get_device_name()}, torch {torch.__version__}, B={args.batch} "
             f"H={args.heads} D={args.dim} {args.dtype}")
    print(title)
    write_report(bench_triangle(args), title, args.out, "bench_triangle")


if __name__ == "__main__":
    main()
