"""Static model of the conv2d + bias + ReLU CUDA kernels on AlexNet's layers
(no GPU needed).

    python tools/conv_model.py [--markdown FILE] [--label NAME] [--verbose]

For every layer of the two-column AlexNet (one column's convolutions,
batch 128), every pass (fwd, dgrad, wgrad) and the tensor-core dtypes
(bf16, fp16, fp32 as TF32) it prints:
  - exec/useful: the MMA FLOPs the launch grid executes (every block's full
    BM x BN x BK tiles over its reduction tiles: padded channels, padded
    reduction tiles and M/N tile overhang included) over the useful FLOPs
    2 * N*P*Q * K * R*S*C of the unpadded convolution. The same useful count
    is used for dgrad, so the zero taps of a strided dgrad count as waste;
  - waves: blocks / (132 SMs x blocks resident per SM), residency from the
    cubin's registers and static shared memory (H100: 64K registers in
    256-register warp allocations, 228 KB shared memory with 1 KB reserved
    per block, at most 32 blocks and 64 warps per SM); split-K is shown;
  - SASS/MMA: instructions of the k-loop (the innermost SASS loop that holds
    the HMMA instructions, from `nvcc -cubin -arch=sm_90 -O3` + cuobjdump)
    per HMMA instruction in it;
  - div: whether that loop holds a runtime integer division (the
    I2F.U32.RP / MUFU.RCP sequence nvcc emits for `/` and `%` by a runtime
    value);
  - STG per thread: the kernel's global store instructions by width (the
    epilogue's, unrolled: scalar 16-bit stores per element, or 128-bit
    vectors through shared memory).
The tile shape, grid and split-K count come from the host code itself
(the `_conv2d_relu_plan` op, the plan the CUDA launcher launches), so the
model follows the launcher. Targets (issue 11): exec/useful <= 1.15,
>= 2 waves (or split-K with >= 1 wave), no division in any k-loop.

Needs nvcc and cuobjdump (see tools/sass_model.py); without them the SASS
columns are left out and the rest is still printed.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import sass_model  # noqa: E402  (find_tool, compile_cubin, disassemble, Function)

import torch  # noqa: E402

BATCH = 128
SMS = 132
REGS_PER_SM, SMEM_PER_SM, SMEM_RESERVED, MAX_BLOCKS, MAX_WARPS = 65536, 228 * 1024, 1024, 32, 64
TARGET_RATIO, TARGET_WAVES = 1.15, 2.0

# One column of the two-column model: name: (C, H, K, R, stride, padding).
# conv3's input is both columns' conv2 outputs (2 x 128 channels).
LAYERS = [
    ("conv1", (3, 224, 48, 11, 4, 2)),
    ("conv2", (48, 27, 128, 5, 1, 2)),
    ("conv3", (256, 13, 192, 3, 1, 1)),
    ("conv4", (192, 13, 192, 3, 1, 1)),
    ("conv5", (192, 13, 128, 3, 1, 1)),
]
PASSES = ("fwd", "dgrad", "wgrad")
DTYPES = {"bf16": (torch.bfloat16, True, "__nv_bfloat16"), "fp16": (torch.float16, True, "__half"),
          "tf32": (torch.float32, True, "float")}
PLAN_FIELDS = ("bm", "bn", "bk", "threads", "splits", "mma", "grid_x", "grid_y", "grid_z", "M", "N", "Kred",
               "k_tiles", "kind", "variant", "fold", "gemm_pass", "chunk", "chunks")
KINDS = {0: "K-major", 1: "wgrad", 2: "folded fwd", 3: "folded wgrad", 4: "dgrad columns"}
DGRAD_COLUMNS = 3  # the gemm_pass of the strided dgrad by columns + col2im gather


def plan(spec, dtype, tf32, pass_index):
    import alexnet_ext  # noqa: F401  (registers the ops)
    c, h, k, r, stride, padding = spec
    # Only shapes and the dtype matter: stride-0 views allocate nothing.
    x = torch.empty(1, dtype=dtype).expand(BATCH, c, h, h)
    w = torch.empty(1, dtype=dtype).expand(k, c, r, r)
    vals = torch.ops.alexnet_ext._conv2d_relu_plan(x, w, [stride] * 2, [padding] * 2, 1, pass_index, tf32)
    return dict(zip(PLAN_FIELDS, vals))


def useful_flops(spec):
    c, h, k, r, stride, padding = spec
    p = (h + 2 * padding - r) // stride + 1
    return 2 * BATCH * p * p * k * r * r * c


def executed_flops(pl):
    """MMA FLOPs of every launch of the plan: one launch, or (dgrad by
    columns) one per chunk of images, the last chunk with the rest."""
    per_launch = lambda grid_x: 2 * grid_x * pl["bm"] * pl["grid_y"] * pl["bn"] * (pl["grid_z"] // pl["splits"]) \
        * pl["k_tiles"] * pl["bk"]
    if pl["chunks"] == 1:
        return per_launch(pl["grid_x"])
    rows_per_image = pl["M"] // pl["chunk"]
    last = BATCH - (pl["chunks"] - 1) * pl["chunk"]
    return (pl["chunks"] - 1) * per_launch(pl["grid_x"]) + per_launch(-(-last * rows_per_image // pl["bm"]))


def col2im_bytes(spec, pl, elem_bytes):
    """Extra memory traffic of dgrad by columns: the float32 columns written
    by the GEMM and read once by the gather (dx itself is written either
    way, and the direct dgrad reads dy and the weight too)."""
    if pl["gemm_pass"] != DGRAD_COLUMNS:
        return 0
    c, h, k, r, stride, padding = spec
    p = (h + 2 * padding - r) // stride + 1
    acc_bytes = 8 if elem_bytes == 8 else 4
    return 2 * BATCH * p * p * r * r * c * acc_bytes


# ---------------------------------------------------------------------------
# SASS: resource usage and the k-loop of each kernel

def resource_usage(dis, cubin, filt):
    """{demangled kernel: (registers, static shared bytes)} from cuobjdump -res-usage."""
    text = subprocess.run([dis, "-res-usage", cubin], check=True, capture_output=True, text=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+).*?SHARED:(\d+)", line)
        if m and name:
            out[name] = (int(m.group(1)), int(m.group(2)))
            name = None
    names = list(out)
    dem = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {d: out[n] for n, d in zip(names, dem)}


def resident_blocks(regs, smem, threads):
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED)
    return max(0, min(by_regs, by_smem, MAX_BLOCKS, MAX_WARPS // warps))


DIV_OPS = ("I2F.U32.RP", "MUFU.RCP")


def k_loop(instrs):
    """(instructions, HMMAs, has division) of the innermost loop holding HMMA."""
    fn = sass_model.Function(instrs)
    best = None
    for lo, hi in fn.loops:
        hmma = sum(1 for a, t in fn.instrs if lo <= a <= hi and sass_model.opcode(t).startswith("HMMA"))
        if hmma and (best is None or hi - lo < best[1] - best[0]):
            best = (lo, hi, hmma)
    if best is None:
        return None
    lo, hi, hmma = best
    body = [t for a, t in fn.instrs if lo <= a <= hi]
    div = any(sass_model.opcode(t).startswith(d) for t in body for d in DIV_OPS)
    return len(body), hmma, div


def global_stores(instrs):
    """The kernel's global stores as "count x bits" per width, widest first
    (e.g. "8x128"): the epilogue's per-thread stores, its loops being
    unrolled (the k-loop stores nothing to global memory: cp.async)."""
    widths = {}
    for _, t in instrs:
        b = sass_model.access_bytes(sass_model.opcode(t), "STG")
        if b:
            widths[b * 8] = widths.get(b * 8, 0) + 1
    return " + ".join(f"{n}x{bits}" for bits, n in sorted(widths.items(), reverse=True)) or "-"


def load_sass(src_root, cache):
    nvcc, dis, mode, filt, missing = sass_model.tools()
    if missing or mode != "cuobjdump":
        return None, f"SASS columns skipped: {', '.join(missing) or 'cuobjdump'} not found"
    os.makedirs(cache, exist_ok=True)
    cubin = sass_model.compile_cubin(nvcc, src_root, "conv/conv_cuda.cu", cache)
    funcs = sass_model.disassemble(dis, mode, cubin, filt)
    res = resource_usage(dis, cubin, filt)
    return (funcs, res), None


def kernel_name(funcs, tname, pl):
    """The conv_gemm_kernel<T, kind, mma, BM, BN> instantiation the plan launches."""
    mma = "true" if pl["mma"] else "false"
    want = f"conv_gemm_kernel<{tname}, {pl['kind']}, {mma}, {pl['bm']}, {pl['bn']}>"
    hits = [f for f in funcs if want in f]
    return hits[0] if hits else None


# ---------------------------------------------------------------------------

def run_model(src_root, cache):
    sass, why = load_sass(src_root, cache)
    rows = []
    for dt, (dtype, tf32, tname) in DTYPES.items():
        for name, spec in LAYERS:
            for pi, pass_name in enumerate(PASSES):
                pl = plan(spec, dtype, tf32, pi)
                blocks = pl["grid_x"] * pl["grid_y"] * pl["grid_z"]
                executed = executed_flops(pl)
                cols = pl["gemm_pass"] == DGRAD_COLUMNS
                tile = f"{pl['bm']}x{pl['bn']}x{pl['bk']}" + (" folded" if pl["fold"] else "") + \
                    (" columns" if cols else "")
                grid = f"{pl['grid_x']}x{pl['grid_y']}x{pl['grid_z']}" + (f" x{pl['chunks']}" if pl["chunks"] > 1 else "")
                row = dict(layer=name, pass_=pass_name, dtype=dt, tile=tile, grid=grid, splits=pl["splits"],
                           chunk=pl["chunk"], chunks=pl["chunks"],
                           extra_bytes=col2im_bytes(spec, pl, torch.empty(0, dtype=dtype).element_size()),
                           useful=useful_flops(spec), executed=executed, blocks=blocks, waves=None,
                           resident=None, sass_per_mma=None, div=None, kernel=None, regs=None, smem=None,
                           stores=None)
                if sass is not None:
                    funcs, res = sass
                    k = kernel_name(funcs, tname, pl)
                    if k is not None:
                        row["kernel"] = k
                        regs, smem = res.get(k, (0, 0))
                        row["regs"], row["smem"] = regs, smem
                        row["stores"] = global_stores(funcs[k])
                        row["resident"] = resident_blocks(regs, smem, pl["threads"])
                        row["waves"] = blocks / (SMS * row["resident"]) if row["resident"] else float("inf")
                        loop = k_loop(funcs[k])
                        if loop is not None:
                            n, hmma, div = loop
                            row["sass_per_mma"], row["div"] = n / hmma, div
                rows.append(row)
    return rows, why


def meets(r):
    ok_ratio = r["executed"] / r["useful"] <= TARGET_RATIO
    ok_waves = r["waves"] is None or r["waves"] >= TARGET_WAVES or (r["splits"] > 1 and r["waves"] >= 1.0)
    ok_div = not r["div"]
    return ok_ratio, ok_waves, ok_div


def table(rows, title, note=None):
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| layer | pass | dtype | tile BMxBNxBK | grid | split-K | exec/useful | waves (blocks/SM) | "
              "SASS per MMA (k-loop) | div in k-loop | regs | STG per thread (count x bits) | meets |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["executed"] / r["useful"]
        waves = "-" if r["waves"] is None else f"{r['waves']:.2f} ({r['resident']})"
        spm = "-" if r["sass_per_mma"] is None else f"{r['sass_per_mma']:.1f}"
        div = "-" if r["div"] is None else ("yes" if r["div"] else "no")
        ok = meets(r)
        miss = [n for n, o in zip(("ratio", "waves", "div"), ok) if not o]
        lines.append(f"| {r['layer']} | {r['pass_']} | {r['dtype']} | {r['tile']} | {r['grid']} | {r['splits']} | "
                     f"{ratio:.2f} | {waves} | {spm} | {div} | {r['regs'] or '-'} | {r['stores'] or '-'} | "
                     f"{'yes' if not miss else 'no: ' + ', '.join(miss)} |")
    for dt in DTYPES:
        sel = [r for r in rows if r["dtype"] == dt]
        train = [r for r in sel if not (r["layer"] == "conv1" and r["pass_"] == "dgrad")]
        ex, us = sum(r["executed"] for r in train), sum(r["useful"] for r in train)
        lines.append("")
        ex_all, us_all = sum(r["executed"] for r in sel), sum(r["useful"] for r in sel)
        lines.append(f"{dt}: one column's training step (every row but conv1 dgrad, which training does not run): "
                     f"{ex / 1e9:.0f} GFLOP executed for {us / 1e9:.0f} useful ({ex / us:.2f}x); all rows: "
                     f"{ex_all / 1e9:.0f} for {us_all / 1e9:.0f} ({ex_all / us_all:.2f}x); "
                     f"rows meeting all targets: {sum(all(meets(r)) for r in sel)}/{len(sel)}")
        for r in sel:
            if r["extra_bytes"]:
                last = BATCH - (r["chunks"] - 1) * r["chunk"]
                lines.append(f"{dt} {r['layer']} {r['pass_']} by columns: {r['chunks']} launches of {r['chunk']} images "
                             f"(the last {last}; waves shown for a full one) + a col2im gather each; the float32 "
                             f"columns are {r['extra_bytes'] / 2 / 1e6:.0f} MB written and read once: "
                             f"{r['extra_bytes'] / 1e6:.0f} MB of extra traffic (not MMA work)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(ROOT, "csrc"))
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "alexnet_ext_conv_model"))
    ap.add_argument("--verbose", action="store_true", help="print the kernel of each row")
    args = ap.parse_args(argv)
    rows, why = run_model(os.path.abspath(args.src), args.cache)
    note = ("Batch 128, one column, H100 (132 SMs). exec/useful: executed MMA FLOPs / 2*N*P*Q*K*R*S*C. "
            "waves: blocks / (132 x resident blocks per SM). Targets: exec/useful <= 1.15, waves >= 2 "
            "(or split-K with >= 1 wave), no runtime division in the k-loop.")
    if why:
        note += f" {why}."
    text = table(rows, f"conv static model: {args.label}", note)
    print(text)
    if args.verbose:
        for r in rows:
            print(r["layer"], r["pass_"], r["dtype"], r["kernel"], r["regs"], r["smem"])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
