"""Compile every .cu file under csrc/ with nvcc for sm_80 and sm_90 and
print registers, shared memory and spill bytes per kernel (`make cuda-check`).

Needs nvcc and the CUDA runtime headers only (no PyTorch): the .cu files
include no PyTorch headers by design. Exits non-zero on a compiler error, or
when a kernel spills registers.
"""
import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90")

FUNC_RE = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def compile_one(nvcc, path, extra):
    out_dir = os.path.join(ROOT, ".cuda-check")
    os.makedirs(out_dir, exist_ok=True)
    obj = os.path.join(out_dir, os.path.basename(path) + ".o")
    cmd = [nvcc, "-c", path, "-o", obj, "-std=c++17", "-O3", "--expt-relaxed-constexpr",
           "-DALEXNET_EXT_WITH_CUDA", "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += extra
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return path, proc.returncode, proc.stdout + proc.stderr


def parse(log):
    rows, current = [], None
    for line in log.splitlines():
        m = FUNC_RE.search(line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": "?", "smem": "0",
                       "stack": "?", "spill_st": "?", "spill_ld": "?"}
            rows.append(current)
            continue
        if current is None:
            continue
        m = SPILL_RE.search(line)
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = m.groups()
        m = REGS_RE.search(line)
        if m:
            current["regs"] = m.group(1)
            current["smem"] = m.group(2) or "0"
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    args = ap.parse_args()
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        sys.exit("cuda-check: nvcc not found (install the CUDA toolkit or set NVCC)")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    extra = os.environ.get("NVCC_FLAGS", "").split()
    failed, spilled = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: compile_one(nvcc, s, extra), sources))
    for path, rc, log in results:
        rel = os.path.relpath(path, ROOT)
        if rc != 0:
            failed.append(rel)
            print(f"== {rel}: COMPILE ERROR\n{log}")
            continue
        rows = parse(log)
        # Signature without its argument list: templates say enough.
        names = [n.replace("(anonymous namespace)::", "").split("(")[0]
                 for n in demangle([r["kernel"] for r in rows])]
        print(f"== {rel}: {len(rows)} kernel builds")
        print(f"   {'arch':6s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill st/ld':>11s}  kernel")
        for row, name in zip(rows, names):
            spill = f"{row['spill_st']}/{row['spill_ld']}"
            print(f"   {row['arch']:6s} {row['regs']:>4s} {row['smem']:>6s} {row['stack']:>5s} {spill:>11s}  {name[:150]}")
            if row["spill_st"] not in ("0", "?") or row["spill_ld"] not in ("0", "?"):
                spilled.append(f"{rel}: {row['arch']} {name[:150]}")
        warnings = [l for l in log.splitlines() if "warning" in l.lower()]
        for w in warnings:
            print(f"   {w}")
    print(f"cuda-check: {len(sources)} files, {len(failed)} failed to compile, {len(spilled)} kernel builds spill")
    for s in spilled:
        print(f"   spills: {s}")
    if failed or (spilled and not args.allow_spills):
        sys.exit(1)


if __name__ == "__main__":
    main()
