"""Static account of the bytes the conv2d + bias + ReLU CUDA path moves in the
passes around its GEMM kernels (operand copies, the ReLU mask, the bias
gradient, weight packing, result copies), before and after issue 11's
"fewer passes" work (no GPU needed).

    python tools/conv_passes.py [--markdown FILE]

For each layer of one AlexNet column at batch 128 in bfloat16, forward and
backward of a training step, with channels_last and with NCHW activations,
it sums the bytes read and written by every pass conv.cpp runs besides the
three GEMMs, as conv.cpp's operand preparation does them:

before (main at 3ccd30d):
  forward   x to NHWC (NCHW: a copy; conv1's folded x: always a padding
            copy); the weight repacked on every call (KRSC: permute copy +
            constant_pad_nd copy; folded: reshape copy + pad copy); NCHW y:
            the NHWC result copied back.
  backward  dy and y to NHWC (NCHW: a copy each), relu_grad (read dy, y,
            write dym), column_sum (read dym again), reduce_splits; dgrad's
            wt rebuilt from the weight (KRSC's two copies + a permute copy);
            dgrad's NCHW dx copied back; wgrad's x to NHWC again (NCHW, and
            conv1's folded x); wgrad's split-K reduction and dw copy.
after:
  backward  one pass reads dy and y where they lie (NCHW or NHWC) and
            writes dym and the bias gradient's partial sums; the rest
            unchanged. With the opt-in weight cache on, dgrad's wt is built
            from the KRSC packing the forward left in the cache (one permute
            copy instead of three).
  forward   unchanged within a training step (the backward that computes a
            weight's gradient drops its cached packings, the optimizer then
            changes it); in evaluation (weights unchanged between calls) with
            the opt-in weight cache on, the packing is a cache hit: the "eval"
            column.
conv1 computes no input gradient in training (its input needs none).

What NCHW still costs: the forward's x copy to NHWC and y copy back, the
backward's dx copy back and wgrad's x copy. The GEMMs gather 16-byte channel
vectors (the reduction runs over channels innermost), which an NCHW tensor
does not have, and the epilogue writes NHWC rows; reading NCHW in the
kernels would need a transposing gather in the k-loop (or an NCHW epilogue),
not a pass outside them. channels_last models pay none of these.
"""
import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conv_model import BATCH, LAYERS  # noqa: E402  (one column of the two-column model)

ELEM = 2            # bfloat16
ACC = 4             # float32 partial sums
VEC = 16 // ELEM    # channels padded to 16-byte vectors
FOLD_VEC = 4        # conv_math.h's kFoldVec
SMS = 132


def up(v, m):
    return -(-v // m) * m


def shapes(spec):
    c, h, k, r, stride, pad = spec
    p = (h + 2 * pad - r) // stride + 1
    cp, kp = up(c, VEC), up(k, VEC)
    # conv.cpp's use_fold: few channels whose padding would multiply the work
    fold = c % VEC != 0 and (stride * c) % FOLD_VEC == 0 and up(r * c, FOLD_VEC) < r * cp
    width = h + 2 * pad
    while width * c % FOLD_VEC:
        width += 1
    return dict(
        x=BATCH * c * h * h * ELEM, xp=BATCH * cp * h * h * ELEM, xf=BATCH * h * width * c * ELEM,
        y=BATCH * k * p * p * ELEM, yp=BATCH * kp * p * p * ELEM,
        w=k * c * r * r * ELEM, wp=kp * cp * r * r * ELEM, wf=kp * r * up(r * c, FOLD_VEC) * ELEM,
        rows=BATCH * p * p, k=k, kp=kp, c=c, cp=cp, fold=fold)


def passes(name, spec, layout, after, cache=False):
    """[(direction, pass, bytes)] of one layer's training step; `cache`: with
    the opt-in packed-weight cache on."""
    s = shapes(spec)
    nchw = layout == "nchw"
    out = []
    add = lambda d, name, b: out.append((d, name, b)) if b else None
    # forward
    if s["fold"]:
        add("fwd", "x folded (padding copy)", s["x"] + s["xf"])
        add("fwd", "weight folded (2 copies)", 2 * (s["w"] + s["wf"]))
    else:
        if nchw or s["c"] != s["cp"]:
            add("fwd", "x to NHWC", s["x"] + s["xp"])
        add("fwd", "weight KRSC (2 copies)", 2 * (s["w"] + s["wp"]))
    if nchw or s["k"] != s["kp"]:
        add("fwd", "y back to NCHW", s["yp"] + s["y"])
    # backward
    rows, kp = s["rows"], s["kp"]
    if after:
        splits = min(128, max(1, -(-SMS * 8 // -(-kp // 32))), -(-rows // 32))
        add("bwd", "relu_grad prep (dy, y -> dym, partial sums)", 2 * s["y"] + s["yp"] + splits * kp * ACC)
        add("bwd", "bias reduce_splits", splits * kp * ACC + s["k"] * ELEM)
    else:
        splits = min(128, max(1, rows // 1024))
        if nchw:
            add("bwd", "dy to NHWC", 2 * s["y"])
            add("bwd", "y to NHWC", 2 * s["y"])
        add("bwd", "relu_grad", 3 * s["y"])
        if s["k"] != s["kp"]:
            add("bwd", "dym channel padding", s["y"] + s["yp"])
        add("bwd", "column_sum (reads dym again)", s["yp"] + splits * kp * ACC)
        add("bwd", "bias reduce_splits", splits * kp * ACC + s["k"] * ELEM)
    if name != "conv1":  # conv1's input needs no gradient
        if after and cache and not s["fold"]:
            add("bwd", "dgrad wt from the cached KRSC", 2 * s["wp"])
        else:
            add("bwd", "dgrad wt (KRSC 2 copies + permute)", 2 * (s["w"] + s["wp"]) + 2 * s["wp"])
        if nchw or s["c"] != s["cp"]:
            add("bwd", "dx back to NCHW", s["xp"] + s["x"])
    if s["fold"]:
        add("bwd", "wgrad x folded (padding copy)", s["x"] + s["xf"])
    elif nchw or s["c"] != s["cp"]:
        add("bwd", "wgrad x to NHWC", s["x"] + s["xp"])
    return out


def table():
    lines = ["# conv passes around the GEMM kernels: bytes moved (static account)", "",
             f"One AlexNet column, batch {BATCH}, bfloat16, training step (fwd + bwd); MB = 1e6 bytes; "
             "`tools/conv_passes.py` (formulas in its docstring). Default: the weight cache off. 'cache on' "
             "(ALEXNET_EXT_CONV_WEIGHT_CACHE=1): backward builds dgrad's wt from the forward's cached KRSC; "
             "'eval fwd': a forward with unchanged weights (packing is a hit). Unchanged passes (wgrad's "
             "split-K reduction and dw copy) left out.", "",
             "| layer | layout | fwd before | fwd after | bwd before | bwd after | bwd saved | bwd, cache on "
             "| eval fwd, cache on |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = lambda ps, direction, skip="": sum(b for d, n, b in ps if d == direction and not (skip and n.startswith(skip)))
    for layout in ("channels_last", "nchw"):
        sums = [0] * 7
        for name, spec in LAYERS:
            before, after = passes(name, spec, layout, False), passes(name, spec, layout, True)
            cached = passes(name, spec, layout, True, cache=True)
            vals = [total(before, "fwd"), total(after, "fwd"), total(before, "bwd"), total(after, "bwd"),
                    total(before, "bwd") - total(after, "bwd"), total(cached, "bwd"), total(cached, "fwd", "weight")]
            sums = [a + b for a, b in zip(sums, vals)]
            lines.append(f"| {name} | {layout} | " + " | ".join(f"{v / 1e6:.1f}" for v in vals) + " |")
        lines.append(f"| **all** | {layout} | " + " | ".join(f"**{v / 1e6:.1f}**" for v in sums) + " |")
    lines += ["", "Per pass, conv3, before -> after (MB):", ""]
    for layout in ("channels_last", "nchw"):
        for label, ps in (("before", passes(*LAYERS[2], layout, False)), ("after", passes(*LAYERS[2], layout, True))):
            lines.append(f"- {layout} {label}: " + "; ".join(f"{d} {n} {b / 1e6:.2f}" for d, n, b in ps))
    lines += ["", "NCHW still costs, per training step, the forward's x copy to NHWC and y copy back, the backward's "
              "dx copy back and wgrad's x copy: the GEMMs gather 16-byte channel vectors and write NHWC rows, "
              "which NCHW tensors do not provide; avoiding them needs a transposing gather / epilogue inside "
              "the kernels. channels_last models pay none of them."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    print(table())
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
