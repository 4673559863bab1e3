"""Microbenchmarks of the Triton kernels against their baselines, on a CUDA GPU.

    python kernels/bench.py triangle [--sizes 64 128 256 512 1024] [--heads 4] [--dim 32] [--dtype bf16]
    python kernels/bench.py radius [--atoms 1000 10000 100000 1000000] [--features 128] [--cutoff 5]
    python kernels/bench.py compile [--arch 90 80] [--quick]

For each size and implementation: forward and forward + backward time (median of
triton.testing.do_bench), throughput (TFLOP/s for triangle attention, GB/s of compulsory traffic for
message passing) with its fraction of the GPU's peak, and peak memory allocated beyond the inputs.
Baselines, each measured in the same run. Triangle attention: the naive PyTorch reference,
torch.compile of it, and, when installed, trifast and cuEquivariance. Message passing: the unfused
gather / scatter layer over an explicit edge list (the PyTorch reference, PyG style), torch.compile of
it, and, when torch_cluster is installed, its radius_graph feeding the same gather / scatter.
A baseline that fails (not installed, out of memory, another API version) gets its error in the table
instead of a number. Writes OUT/bench_<kernel>.md (the table) and OUT/bench_<kernel>.png.

The kernels run only on a GPU; on a CPU their correctness is covered by tests/ in Triton's
interpreter, and the two benchmarks say so and exit. `--smoke` (with TRITON_INTERPRET=1) runs the
same benchmark code on the CPU, kernels in the interpreter, one timed call per row and no
torch.compile: a check that the script works end to end (tests/test_bench.py), not a measurement.

`compile` needs no GPU: it compiles every kernel ahead of time (Triton's own PTX and ptxas, shipped
with triton) for each configuration the launchers can pick, and prints per kernel and configuration:
ok or the error, shared memory, registers and spill bytes (from `ptxas -v`). It exits non-zero if a compile fails or needs more shared memory than the
target has; --quick compiles one configuration per kernel for sm_90 (tests/test_kernels_compile.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import kernels.radius_graph as radius_graph  # noqa: E402
import kernels.triangle_attention as triangle  # noqa: E402
from kernels.radius_graph import edge_filter, radius_message_passing, radius_message_passing_reference  # noqa: E402
from kernels.triangle_attention import triangle_attention, triangle_attention_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense tensor-core peaks in TFLOP/s for 16-bit inputs (vendor data sheets), to report a fraction of peak.
PEAK_TFLOPS_16BIT = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}
PEAK_HBM_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}


def device_peak(table: dict) -> float | None:
    name = torch.cuda.get_device_name()
    for key, peak in table.items():  # most specific names first
        if key in name:
            return peak
    return None


def triangle_implementations(smoke: bool) -> dict:
    """name -> fn(q, k, v, bias, mask); optional libraries only when they import."""
    impls = {"triton (ours)": triangle_attention, "naive torch": triangle_attention_reference}
    if not smoke:
        impls["torch.compile(naive)"] = torch.compile(triangle_attention_reference, dynamic=False)
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


def measure(fn, make_inputs, backward: bool) -> tuple[float, float | None]:
    """(median ms, peak MiB allocated beyond the inputs) of fn, forward or forward + backward.
    On the CPU (--smoke): the time of a single call, no warm-up (in the interpreter a call costs seconds and its time
    means nothing), and no memory figure."""
    from triton.testing import do_bench

    inputs = make_inputs()
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]  # radius inputs hold a float cutoff

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, grads, torch.ones_like(out))

    if not grads[0].is_cuda:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3, None
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
    peak = device_peak(PEAK_TFLOPS_16BIT) if dtype != torch.float32 and not args.smoke else None
    dev = "cpu" if args.smoke else "cuda"
    rows = []
    for n in args.sizes:
        def make_inputs():
            g = torch.Generator(device=dev).manual_seed(0)
            shape = (args.batch, args.heads, n, n, args.dim)
            q, k, v = (torch.randn(shape, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
            bias = torch.randn(shape[:-1], device=dev, dtype=dtype, generator=g).requires_grad_()
            mask = torch.ones(args.batch, n, n, device=dev, dtype=torch.bool)
            return q, k, v, bias, mask

        # Two N^3 D matmuls forward (q k^T, p v); the backward does 2.5x that (FlashAttention-2 count).
        flops_fwd = 4 * args.batch * args.heads * n ** 3 * args.dim
        for name, fn in triangle_implementations(args.smoke).items():
            for mode, backward, flops in (("fwd", False, flops_fwd), ("fwd+bwd", True, 3.5 * flops_fwd)):
                rows.append(timed_row(name, n, mode, fn, make_inputs, backward, flops / 1e12, peak))
    return rows


def timed_row(impl: str, size: int, mode: str, fn, make_inputs, backward: bool, work: float, peak) -> dict:
    """One table row: time fn, turn `work` (TFLOP or GB per call) into a rate and a fraction of peak."""
    row = {"impl": impl, "N": size, "mode": mode}
    try:
        ms, mem = measure(fn, make_inputs, backward)
        rate = work / (ms * 1e-3)
        row.update(ms=ms, rate=rate, peak_frac=rate / peak if peak else None, mem_mib=mem)
    except Exception as e:  # OOM, a missing kernel for this dtype, another library API: report it, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(format_row(row), flush=True)
    return row


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['impl']} | {r['N']} | {r['mode']} | {r['error']} | | | |"
    frac = f"{100 * r['peak_frac']:.1f} %" if r.get("peak_frac") is not None else "n/a"
    mem = f"{r['mem_mib']:.0f}" if r["mem_mib"] is not None else "n/a"
    return f"| {r['impl']} | {r['N']} | {r['mode']} | {r['ms']:.3f} | {r['rate']:.4g} | {frac} | {mem} |"


def radius_implementations(smoke: bool) -> dict:
    """name -> fn(pos, x, batch, cutoff, filter_weight); torch_cluster only when it imports."""
    impls = {"triton (ours)": radius_message_passing, "gather/scatter (torch)": radius_message_passing_reference}
    if not smoke:
        impls["torch.compile(gather/scatter)"] = torch.compile(radius_message_passing_reference, dynamic=True)
    try:
        from torch_cluster import radius_graph

        def cluster(pos, x, batch, cutoff, w):
            # torch_cluster finds the edges (source row 0, target row 1); the message step is the same
            # unfused gather / scatter, so this row isolates the neighbour search.
            j, i = radius_graph(pos, r=cutoff, batch=batch, loop=False, max_num_neighbors=1024)
            d = (pos[j] - pos[i]).norm(dim=-1)
            return torch.zeros_like(x).index_add_(0, i, x[j] * edge_filter(d, cutoff, w))

        impls["torch_cluster + gather/scatter"] = cluster
    except ImportError:
        pass
    return impls


def bench_radius(args) -> list[dict]:
    """Molecule-like structures of --atoms-per-structure atoms at liquid-water atom density
    (0.1 atoms / A^3) in non-periodic boxes, so the neighbour count per atom is realistic."""
    peak = None if args.smoke else device_peak(PEAK_HBM_GBS)
    dev = "cpu" if args.smoke else "cuda"
    rows = []
    for n_atoms in args.atoms:
        def make_inputs():
            g = torch.Generator(device=dev).manual_seed(0)
            per = args.atoms_per_structure
            batch = torch.arange(n_atoms, device=dev) // per
            side = (per / 0.1) ** (1 / 3)
            pos = (torch.rand(n_atoms, 3, device=dev, generator=g) * side).requires_grad_()
            x = torch.randn(n_atoms, args.features, device=dev, generator=g).requires_grad_()
            w = (torch.randn(args.rbf, args.features, device=dev, generator=g) / args.rbf ** 0.5).requires_grad_()
            return pos, x, batch, args.cutoff, w

        # Compulsory traffic: read pos and x, write y (forward); backward reads dy and writes dpos, dx.
        bytes_fwd = n_atoms * (12 + 8 * args.features)
        for name, fn in radius_implementations(args.smoke).items():
            for mode, backward, nbytes in (("fwd", False, bytes_fwd), ("fwd+bwd", True, 2 * bytes_fwd + n_atoms * 12)):
                rows.append(timed_row(name, n_atoms, mode, fn, make_inputs, backward, nbytes / 1e9, peak))
    return rows


# Shared memory a block may use (opt-in maximum), in bytes, per compute capability.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
RADIUS_N_RBF = 16  # models/egnn.py's default; a loop bound, so other values give the same code


def entry_points(module) -> list:
    """The module's launched kernels (named *_kernel), not the @triton.jit helpers they call."""
    return [f for name, f in vars(module).items() if name.endswith("_kernel") and isinstance(f, triton.JITFunction)]


def triangle_compile_configs(quick: bool):
    """(kernel, config label, argument types, constexprs + num_warps) for every launch the triangle
    attention launcher can make on a GPU with its default blocks: each dtype and head dim, and a bias
    in fp32 next to 16-bit q, k, v (the bias may have any float dtype)."""
    for dtype in (torch.bfloat16,) if quick else triangle.DTYPES:
        for D in (32,) if quick else triangle.HEAD_DIMS:
            meta = triangle._launch_config(D, dtype, on_gpu=True)
            for bias_dtype in dict.fromkeys((dtype,) if quick else (dtype, torch.float32)):
                qkv, bias = f"*{TRITON_TYPES[dtype]}", f"*{TRITON_TYPES[bias_dtype]}"
                types = dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"), qkv)
                types.update(Bias=bias, DBias=bias, Mask="*u8", LSE="*fp32", Delta="*fp32", H="i32", N="i32",
                             scale="fp32")
                label = (f"{TRITON_TYPES[dtype]} D={D} blocks={meta['BLOCK_J']}x{meta['BLOCK_K']} "
                         f"FP32_DOT={meta['FP32_DOT']}" + ("" if bias_dtype == dtype else " bias=fp32"))
                for kernel in entry_points(triangle):
                    if bias_dtype == dtype or "Bias" in kernel.arg_names:
                        yield kernel, label, types, meta


def radius_compile_configs(quick: bool):
    """Same for the radius-graph launcher: feature widths of the model presets (BLOCK_F 16 to 256), with
    and without a cell. The kernels see fp32 only: the wrapper upcasts fp16 / bf16 on the host."""
    types = dict.fromkeys(("Pos", "X", "DY", "Cell", "InvCell", "Wf", "Y", "DX", "DPos", "DWPart"), "*fp32")
    types.update(Batch="*i32", Start="*i32", End="*i32", A="i32", F="i32", cutoff="fp32", mu_step="fp32",
                 gamma="fp32")
    for F in (128,) if quick else (16, 32, 64, 128, 256):
        for periodic in (False, True):
            meta = dict(radius_graph._launch_config(F, on_gpu=True), N_RBF=RADIUS_N_RBF, PERIODIC=periodic)
            label = f"fp32 F={F} blocks={meta['BLOCK_I']}x{meta['BLOCK_J']}x{meta['BLOCK_F']} PERIODIC={periodic}"
            for kernel in entry_points(radius_graph):
                yield kernel, label, types, meta


def compile_kernel(kernel, types: dict, meta: dict, arch: int) -> dict:
    """Compile one kernel for sm_<arch> without a GPU: shared memory from Triton, registers and spills
    from the `ptxas -v` log of Triton's own ptxas run (backends/nvidia/compiler.py make_cubin), so they
    are its cubin's, and ptxas runs once. Pointers are marked 16-byte aligned, as torch allocates them
    and as the launcher would specialise them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {name: meta[name] for name in kernel.arg_names if name in meta}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    # Triton prints the log to stdout, and on a ptxas failure the whole PTX: captured. A binary from its
    # cache would come without a log, hence always_compile.
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), \
            contextlib.redirect_stdout(io.StringIO()) as stdout:
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        options = {name: meta[name] for name in ("num_warps", "num_stages") if name in meta}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    row = {"smem": compiled.metadata.shared}
    log = stdout.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    row["regs"] = int(regs.group(1)) if regs else None
    row["spill"] = f"{spills.group(1)}/{spills.group(2)}" if spills else None
    if row["smem"] > SMEM_LIMIT[arch]:
        row["error"] = f"shared memory {row['smem']} B > sm_{arch} limit {SMEM_LIMIT[arch]} B"
    return row


def error_line(e: Exception) -> str:
    """First line of the innermost error: Triton chains the real one (say, a tl.dot shape check in a
    helper) as the cause of a CompilationError whose own message is only a source excerpt."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = e.error_message if isinstance(e, triton.CompilationError) and e.error_message else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def compile_all(arches: list[int], quick: bool) -> bool:
    """Print one table row per (kernel, configuration, arch); True if all compiled within the limits."""
    print("| kernel | config | arch | result | smem B | regs | spill st/ld B |\n|---|---|---|---|---|---|---|",
          flush=True)
    ok = True
    for configs in (triangle_compile_configs(quick), radius_compile_configs(quick)):
        for kernel, label, types, meta in configs:
            for arch in arches:
                try:
                    row = compile_kernel(kernel, types, meta, arch)
                except Exception as e:  # any failure is a result to report; go on with the others
                    row = {"error": error_line(e)}
                ok &= "error" not in row
                name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"
                result = f"error: {row['error']}" if "error" in row else "ok"
                print(f"| {name} | {label} | sm_{arch} | {result} | {row.get('smem', '')} | "
                      f"{row.get('regs') or ''} | {row.get('spill') or ''} |", flush=True)
    return ok


def write_report(rows: list[dict], title: str, out: Path, stem: str, rate_unit: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    header = f"| impl | N | mode | ms | {rate_unit} | of peak | peak MiB |\n|---|---|---|---|---|---|---|\n"
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
    tri.add_argument("--smoke", action="store_true", help="CPU check of this script (needs TRITON_INTERPRET=1); no measurement")
    rad = sub.add_parser("radius", help="fused radius-graph message passing (GNN, force-field student)")
    rad.add_argument("--atoms", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000], help="atoms in the batch")
    rad.add_argument("--atoms-per-structure", type=int, default=32, help="atoms in each structure")
    rad.add_argument("--features", type=int, default=128, help="feature width F")
    rad.add_argument("--rbf", type=int, default=32, help="radial basis functions of the filter")
    rad.add_argument("--cutoff", type=float, default=5.0, help="radius cutoff in A")
    rad.add_argument("--out", type=Path, default=Path("out/bench"), help="where the table and plot go")
    rad.add_argument("--smoke", action="store_true", help="CPU check of this script (needs TRITON_INTERPRET=1); no measurement")
    comp = sub.add_parser("compile", help="compile every kernel configuration ahead of time, no GPU needed")
    comp.add_argument("--arch", type=int, nargs="+", choices=sorted(SMEM_LIMIT),
                      help="compute capabilities to compile for (default: 90 80, or 90 with --quick)")
    comp.add_argument("--quick", action="store_true",
                      help="one configuration per kernel (triangle bf16 D=32, radius F=128 with and without cell)")
    args = parser.parse_args()
    if args.kernel == "compile":
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("kernels/bench.py compile needs the real compiler; unset TRITON_INTERPRET")
        sys.exit(0 if compile_all(args.arch or ([90] if args.quick else [90, 80]), args.quick) else 1)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("kernels/bench.py --smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        device = "CPU smoke run, kernels in Triton's interpreter: the times are not kernel performance"
    elif not torch.cuda.is_available():
        sys.exit("kernels/bench.py measures GPU kernels and needs a CUDA device. On a CPU, the kernels' "
                 "correctness is tested in Triton's interpreter: python -m pytest tests/test_triangle_attention.py "
                 "tests/test_radius_graph.py; and this script with TRITON_INTERPRET=1 and --smoke")
    else:
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    if args.kernel == "triangle":
        title = f"triangle attention: {device}, B={args.batch} H={args.heads} D={args.dim} {args.dtype}"
        print(title)
        write_report(bench_triangle(args), title, args.out, "bench_triangle", "TFLOP/s")
    else:
        title = (f"radius message passing: {device}, {args.atoms_per_structure} atoms/structure, F={args.features}, "
                 f"{args.rbf} rbf, cutoff {args.cutoff} A, fp32")
        print(title)
        write_report(bench_radius(args), title, args.out, "bench_radius", "GB/s")


if __name__ == "__main__":
    main()
