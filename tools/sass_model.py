"""Static SASS model of the LRN and max-pool CUDA kernels (no GPU needed).

    python tools/sass_model.py [--src CSRC_DIR] [--label NAME] [--markdown FILE]

For each kernel the host code launches at AlexNet's shapes (batch 128; LRN
96x55x55 and 256x27x27, pool 96x55x55, 256x27x27, 256x13x13; float32 and
bfloat16; NCHW and channels_last) it prints:
  - the minimum DRAM bytes (each tensor read or written once) and the time
    they take at the copy bandwidth of an H100 (~3.0 TB/s): the floor;
  - the SASS instructions issued per output element, counted from
    `nvcc -cubin -arch=sm_90 -O3` disassembled with cuobjdump (or nvdisasm);
  - the issue time, warp instructions / 0.92e12 per second (132 SMs x 4
    schedulers x ~1.75 GHz), and its ratio to the floor. A kernel whose
    ratio is well under 1 can reach the bandwidth limit as far as
    instruction issue goes; one above 1 cannot.

How instructions are counted, per thread: loops are the backward branches
of the SASS. The hot loop is the innermost loop that stores the output
(most elements stored per trip, counting only the widest stores; among
equals the one storing most bytes, i.e. pool forward's loop that also
writes the argmax, the training path, not the inference one); it runs
outputs-per-thread / elements-per-trip times. A loop outside it that loads but stores nothing to global memory
(shared-memory staging) runs input-elements-per-thread / elements-loaded-
per-trip times. Every other instruction counts once per thread, including
loops nested in the hot loop (once per hot trip) and code that is skipped at
run time; subroutines (slow paths reached by CALL) are not counted. So the
figures are estimates of issue work, not of latency, and loops with runtime
trip counts nested inside the hot loop are under-counted (as in main's
kernels, whose figures are therefore lower bounds). The geometry (threads
per launch) mirrors the host code's choices; a GPU run has to confirm all of
it.

Needs nvcc and cuobjdump or nvdisasm (the PyPI packages nvidia-cuda-cuobjdump
/ nvidia-cuda-nvdisasm provide the latter two). Without them it says so and
exits 0, so the benchmarks that print it do not fail.
"""
import argparse
import glob
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_BW = 3.0e12          # bytes/s, H100 SXM device-to-device copy
ISSUE_RATE = 0.92e12      # warp instructions/s
TARGET = 0.6              # issue time / floor the issue asks for (bfloat16)
BATCH = 128
LRN_SHAPES = [(96, 55, 55), (256, 27, 27)]
POOL_SHAPES = [(96, 55, 55), (256, 27, 27), (256, 13, 13)]
DTYPES = {"fp32": ("float", 4), "bf16": ("__nv_bfloat16", 2)}


# ---------------------------------------------------------------------------
# Tools

def find_tool(name):
    cands = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", name))
    for sp in sys.path:  # PyPI wheels: nvidia/cu13/bin, nvidia/cuda_cuobjdump/bin, ...
        cands += glob.glob(os.path.join(sp, "nvidia", "*", "bin", name))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def tools():
    nvcc = find_tool("nvcc")
    dis = find_tool("cuobjdump")
    mode = "cuobjdump"
    if dis is None:
        dis, mode = find_tool("nvdisasm"), "nvdisasm"
    filt = find_tool("cu++filt") or shutil.which("c++filt")
    missing = [n for n, t in (("nvcc", nvcc), ("cuobjdump or nvdisasm", dis), ("c++filt", filt)) if t is None]
    return nvcc, dis, mode, filt, missing


def compile_cubin(nvcc, src_root, rel, cache_dir):
    path = os.path.join(src_root, rel)
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(src_root, "**", "*.h*"), recursive=True)) + [path]:
        with open(f, "rb") as fh:
            h.update(f.encode() + fh.read())
    out = os.path.join(cache_dir, f"{os.path.basename(rel)}.{h.hexdigest()[:16]}.cubin")
    if not os.path.exists(out):
        cmd = [nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
               "-DALEXNET_EXT_WITH_CUDA", "-I", src_root, path, "-o", out + ".tmp"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out + ".tmp", out)
    return out


INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def disassemble(dis, mode, cubin, filt):
    if mode == "cuobjdump":
        text = subprocess.run([dis, "-sass", cubin], check=True, capture_output=True, text=True).stdout
        head = re.compile(r"Function : (\S+)")
    else:
        text = subprocess.run([dis, "-c", cubin], check=True, capture_output=True, text=True).stdout
        head = re.compile(r"^\s*\.text\.(\S+):|^(\S+):\s*$")
    funcs, cur = {}, None
    for line in text.splitlines():
        m = head.search(line)
        if m:
            cur = next(g for g in m.groups() if g)
            funcs[cur] = []
            continue
        m = INSTR_RE.match(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    names = list(funcs)
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {d: funcs[n] for n, d in zip(names, out)}


# ---------------------------------------------------------------------------
# SASS analysis

def opcode(text):
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t.split() else ""


def branch_target(text):
    m = re.search(r"\b(?:BRA|BRX)\b.*?(0x[0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def access_bytes(op, prefix):
    """Bytes of a global access whose opcode starts with `prefix` (STG or
    LDG), None for other instructions."""
    if not op.startswith(prefix):
        return None
    for suffix, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return b
    return 4


class Function:
    def __init__(self, instrs):
        # Subroutines (slow paths reached by CALL) sit after the kernel body.
        calls = [branch_target(t.replace("CALL.REL.NOINC", "BRA").replace("CALL.REL", "BRA"))
                 for _, t in instrs if opcode(t).startswith("CALL")]
        end = min([c for c in calls if c is not None], default=None)
        body = [(a, t) for a, t in instrs if (end is None or a < end) and opcode(t) != "NOP"]
        # The trailing `BRA self` after the last EXIT is padding, not a loop.
        while body and branch_target(body[-1][1]) == body[-1][0]:
            body.pop()
        # The pow() path of beta != 0.75 (AlexNet's beta is 0.75): a region a
        # forward branch skips that holds powf's log polynomial constant and no
        # memory access or rsqrt. Skipped at run time, so not counted.
        skip = set()
        for a, t in body:
            tgt = branch_target(t)
            if tgt is None or tgt <= a or not opcode(t).startswith("BRA"):
                continue
            region = [(b, u) for b, u in body if a < b < tgt]
            text = " ".join(u for _, u in region)
            if "0x3a2c32e4" in text and "MUFU.RSQ" not in text and not re.search(r"\b(LDG|STG|LDS|STS)", text):
                skip.update(b for b, _ in region)
        body = [(a, t) for a, t in body if a not in skip]
        self.instrs = body
        self.loops = []
        for a, t in body:
            tgt = branch_target(t)
            if tgt is not None and tgt <= a and opcode(t).startswith("BRA"):
                self.loops.append((tgt, a))

    def count(self, lo, hi):
        return sum(1 for a, _ in self.instrs if lo <= a <= hi)

    def elements(self, lo, hi, elem, which):
        """Elements of `elem` bytes accessed in [lo, hi]. For stores, only the
        widest stores count: a loop that also writes pool's 1-byte argmax
        (one byte per output, so narrower stores) writes no more outputs."""
        sizes = []
        for a, t in self.instrs:
            if lo <= a <= hi:
                b = access_bytes(opcode(t), "STG" if which == "st" else "LDG")
                if b is not None and b >= elem and b % elem == 0:
                    sizes.append(b)
        if which == "st" and sizes:
            sizes = [b for b in sizes if b == max(sizes)]
        return sum(b // elem for b in sizes)

    def bytes_stored(self, lo, hi):
        return sum(access_bytes(opcode(t), "STG") or 0 for a, t in self.instrs if lo <= a <= hi)

    def has(self, lo, hi, prefix):
        return any(lo <= a <= hi and opcode(t).startswith(prefix) for a, t in self.instrs)

    def model(self, elem, outputs_per_thread, inputs_per_thread):
        """Instructions per thread, and a description of the loops used."""
        total = len(self.instrs)
        storing = [l for l in self.loops if self.elements(*l, elem, "st") > 0]
        inner = [l for l in storing if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in storing)]
        if not inner:
            return float(total), "no loop", 0, 0
        hot = max(inner, key=lambda l: (self.elements(*l, elem, "st"), self.bytes_stored(*l), -(l[1] - l[0])))
        per_trip = self.elements(*hot, elem, "st")
        body = self.count(*hot)
        trips = outputs_per_thread / per_trip
        n = body * trips + (total - body)
        notes = f"hot loop {body} instr / {per_trip} out"
        return n, notes, body, per_trip


# ---------------------------------------------------------------------------
# Which kernel runs, and with how many threads (mirrors the host code)

def cdiv(a, b):
    return (a + b - 1) // b


def grid_for(work, threads, max_blocks=65535 * 8):
    return max(1, min(cdiv(work, threads), max_blocks))


def lrn_cases(funcs, op, layout, tname, esize, C, H, W):
    """[(kernel name, threads, outputs, inputs)] for one LRN launch."""
    N, P, size = BATCH, H * W, 5
    out = N * C * P
    walks = [f for f in funcs if f"lrn_{op}_kernel<{tname}, " in f]
    if not walks:  # main: one tiled kernel per dtype, both layouts
        k = next(f for f in funcs if f"lrn_{op}_kernel<{tname}>" in f)
        blocks = N * cdiv(P, 64) * cdiv(C, 32)
        return k, blocks * 256, out
    if layout == "nchw":
        pix = 4
        full = "true" if P >= 64 * pix else "false"
        k = next(f for f in walks if f"ChannelWalk<{size}, {pix}, true, {full}>" in f
                 or f"ChannelWalk<{size}, {pix}, true>" in f)
        tiles = N * cdiv(P, 64 * pix)
        seg = C
        while seg > 16 and tiles * 64 * cdiv(C, seg) < (1 << 15):
            seg = (seg + 1) // 2
        return k, min(tiles, 4096) * 64 * cdiv(C, seg), out
    vec = max(int(m.group(1)) for f in walks for m in [re.search(rf"ChunkWalk<{size}, (\d+), ", f)] if m)
    k = next(f for f in walks if f"ChunkWalk<{size}, {vec}, {'true' if C % vec == 0 else 'false'}, true>" in f)
    chunks = cdiv(C, vec)
    per_block = 256 // chunks
    return k, grid_for(N * P, per_block, 1024) * chunks * per_block, out


def pool_cases(funcs, op, layout, tname, esize, C, H, W):
    N = BATCH
    OH, OW = (H - 3) // 2 + 1, (W - 3) // 2 + 1
    out, inp = N * C * OH * OW, N * C * H * W
    new = any("forward_3x3s2<" in f for f in funcs)
    if op == "forward":
        if not new:
            if layout == "nchw" and H * W * esize <= 32 * 1024:
                k = next(f for f in funcs if f"forward_staged_planes<{tname}, unsigned char>" in f)
                per_block = max(1, min(cdiv(1024, OH * OW), (32 * 1024) // (H * W * esize), N * C))
                return k, cdiv(N * C, per_block) * 256, out, inp
            k = next(f for f in funcs if f"forward_per_output<{tname}, unsigned char, {'true' if layout != 'nchw' else 'false'}, true, int>" in f)
            return k, grid_for(out, 256) * 256, out, inp
        return new_pool_forward(funcs, layout, tname, esize, N, C, H, W, OH, OW)
    if not new:
        k = next(f for f in funcs if f"backward_gather<{tname}, unsigned char, {'true' if layout != 'nchw' else 'false'}, int>" in f)
        return k, grid_for(inp, 256) * 256, inp, out
    return new_pool_backward(funcs, layout, tname, esize, N, C, H, W, OH, OW)


def column_segments(columns, out_h, want=1 << 15):
    """Output-row segments of the forward column walk (pool_cuda.cu)."""
    segments = 1
    while segments < out_h and columns * segments < want:
        segments += 1
    return segments


def new_pool_forward(funcs, layout, tname, esize, N, C, H, W, OH, OW):
    out, inp = N * C * OH * OW, N * C * H * W
    vec = 1 if layout == "nchw" or C % (16 // esize) else 16 // esize
    cl = "false" if layout == "nchw" else "true"
    cols = 2 if layout == "nchw" and OW >= 2 else 1
    k = next(f for f in funcs if f"forward_3x3s2<{tname}, {cl}, {vec}, {cols}>" in f)
    columns = out // vec // OH // OW * cdiv(OW, cols)
    rows = cdiv(OH, column_segments(columns, OH))
    return k, grid_for(columns, 256) * 256 * cdiv(OH, rows), out, inp


def new_pool_backward(funcs, layout, tname, esize, N, C, H, W, OH, OW):
    out, inp = N * C * OH * OW, N * C * H * W
    if layout == "nchw":
        planes = 2 if (N * C) % 2 == 0 else 1
        k = next(f for f in funcs if f"backward_3x3s2_columns<{tname}, {planes}>" in f)
        items = N * C // planes * cdiv(cdiv(W, 2), 2)
        return k, grid_for(items, 256) * 256, inp, out
    vec = 1 if C % (16 // esize) else 16 // esize
    k = next(f for f in funcs if f"backward_3x3s2<{tname}, true, {vec}>" in f)
    items = N * C * cdiv(H, 2) * cdiv(W, 2) // vec
    return k, grid_for(items, 256, 1024) * 256, inp, out


def min_bytes(op_name, esize, inp, out):
    if op_name == "lrn forward":
        return 2 * inp * esize
    if op_name == "lrn backward":
        return 3 * inp * esize
    if op_name == "pool forward":
        return inp * esize + out * (esize + 1)  # y and the 1-byte argmax
    return out * (esize + 1) + inp * esize      # dy and argmax in, dx out


def run_model(src_root, label, cache_dir, only=None):
    nvcc, dis, mode, filt, missing = tools()
    if missing:
        print(f"sass_model: skipped, {', '.join(missing)} not found (install the CUDA toolkit's nvcc and "
              f"`pip install nvidia-cuda-cuobjdump`)")
        return None
    os.makedirs(cache_dir, exist_ok=True)
    funcs = {}
    for rel in ("lrn/lrn_cuda.cu", "maxpool/pool_cuda.cu"):
        if only and not rel.startswith({"lrn": "lrn", "pool": "maxpool"}[only]):
            continue
        cubin = compile_cubin(nvcc, src_root, rel, cache_dir)
        funcs[rel] = disassemble(dis, mode, cubin, filt)
    rows = []
    for op_name, rel, shapes in (("lrn forward", "lrn/lrn_cuda.cu", LRN_SHAPES),
                                 ("lrn backward", "lrn/lrn_cuda.cu", LRN_SHAPES),
                                 ("pool forward", "maxpool/pool_cuda.cu", POOL_SHAPES),
                                 ("pool backward", "maxpool/pool_cuda.cu", POOL_SHAPES)):
        if rel not in funcs:
            continue
        for dt, (tname, esize) in DTYPES.items():
            for layout in ("nchw", "channels_last"):
                for C, H, W in shapes:
                    fs = funcs[rel]
                    if op_name.startswith("lrn"):
                        k, threads, outputs = lrn_cases(fs, op_name.split()[1], layout, tname, esize, C, H, W)
                        inputs = outputs
                        inp_el, out_el = outputs, outputs
                    else:
                        k, threads, outputs, inputs = pool_cases(fs, op_name.split()[1], layout, tname, esize, C, H, W)
                        inp_el, out_el = (inputs, outputs) if op_name.endswith("forward") else (outputs, inputs)
                    fn = Function(fs[k])
                    per_thread, notes, _, _ = fn.model(esize, outputs / threads, inputs / threads)
                    warp_instr = per_thread * threads / 32
                    nbytes = min_bytes(op_name, esize, inp_el, out_el)
                    floor = nbytes / COPY_BW
                    issue = warp_instr / ISSUE_RATE
                    short = re.sub(r"\(anonymous namespace\)::|alexnet_ext::\w+::|void ", "", k)
                    short = short.split("(")[0].replace("__nv_bfloat16", "bf16").replace("unsigned char", "u8")
                    rows.append(dict(label=label, op=op_name, dtype=dt, layout=layout, shape=f"{C}x{H}x{W}",
                                     kernel=short, mbytes=nbytes / 1e6, floor_us=floor * 1e6,
                                     instr_per_elem=per_thread * threads / outputs, issue_us=issue * 1e6,
                                     ratio=issue / floor, notes=notes))
    return rows


def table(rows, title):
    lines = [f"### {title}", "",
             "| op | dtype | layout | shape (N=128) | min MB | floor us | SASS instr / output | issue us | issue / floor | kernel |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['dtype']} | {r['layout']} | {r['shape']} | {r['mbytes']:.1f} | "
                     f"{r['floor_us']:.1f} | {r['instr_per_elem']:.2f} | {r['issue_us']:.1f} | {r['ratio']:.2f} | "
                     f"`{r['kernel']}` |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(ROOT, "csrc"), help="csrc directory to model")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "alexnet_ext_sass_model"))
    ap.add_argument("--verbose", action="store_true", help="print the loop used for each kernel")
    ap.add_argument("--op", choices=("lrn", "pool"), help="only this op")
    args = ap.parse_args(argv)
    rows = run_model(os.path.abspath(args.src), args.label, args.cache, args.op)
    if rows is None:
        return 0
    text = table(rows, f"SASS model: {args.label}")
    print(text)
    if args.verbose:
        for r in rows:
            print(f"{r['op']:14s} {r['dtype']} {r['layout']:13s} {r['shape']:10s} {r['notes']}")
    bf16 = [r["ratio"] for r in rows if r["dtype"] == "bf16"] or [0.0]
    print(f"\nworst bf16 issue/floor: {max(bf16):.2f} (target <= {TARGET})")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
