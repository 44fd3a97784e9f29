"""Compile every Triton kernel for Hopper (sm_90) ahead of time, on any machine: no GPU needed.

Triton's compiler and the ptxas it ships build each kernel's cubin with the constexpr configurations its
launcher passes on a GPU; ``cuobjdump --dump-resource-usage`` (also shipped with Triton) then reads registers,
stack frame and spill bytes (both local memory: a large stack is a slow kernel) and shared memory per kernel, and
the PTX says which tensor-core instructions the dots became (``wgmma`` on Hopper, or the older ``mma.sync``). The interpreter tests run the kernels' Python; this
checks what only the real compiler sees (dot shapes and operand types, layouts, shared memory, register
pressure), at no device time. Each case names the integer arguments of a llama-1B-shaped launch (``args``) and
is specialised as Triton's JIT specialises a real launch: an integer equal to 1 (a unit stride) becomes a
constant, integers divisible by 16 and the (16-byte aligned) pointers carry the divisibility hint that lets loads
vectorise; integers not named stay generic.

    python bench/triton_sm90.py [--out results.json] [--jobs 2]   # a table; exit 1 if a kernel fails to compile

Run without ``TRITON_INTERPRET`` (the script clears it before Triton is imported; tests/test_triton_sm90.py
runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: real JIT functions, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

H100_SMEM = 227 * 1024  # the most shared memory one block may use on an H100
TARGET = GPUTarget("cuda", 90, 64)
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
OPT_TYPES = {"g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "buf_ptr": "*fp32", "step_ptr": "*fp32",
             "rows_ptr": "*i64", "slots_ptr": "*i64", "lr": "fp32", "lr_ptr": "*fp32", "found_ptr": "*fp32",
             **{k: "fp32" for k in ("lr_lo", "b1_hi", "b1_lo", "b2_hi", "b2_lo", "w1", "w2", "eps", "weight_decay",
                                     "decay", "momentum", "one_minus_dampening")}}


def _module(name):
    return importlib.import_module(f"ct_fast.kernels.{name}")  # the module (the package re-exports launchers)


def cases() -> list[dict]:
    """``{name, kernel, types, constexprs, args, num_warps, num_stages}``: the configurations the launchers use on a
    GPU; ``types`` of pointer and float arguments, ``args`` the values of integer ones."""
    se, rg, mw, mo = (_module(m) for m in ("score_edges", "residual_grads", "masked_weight_grad", "masked_optim"))
    from bench_score_edges import RESID_TILES, SCORE_TILES  # the tile variants the GPU check times

    out = []
    score = [(dt, tdt, has_w, 64, {}) for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                      ("fp16", torch.float16)) for has_w in (True, False)]
    score += [(dt, tdt, True, se.max_head_width(tdt), {}) for dt, tdt in (("fp32", torch.float32),
                                                                           ("bf16", torch.bfloat16))
              if se.max_head_width(tdt) > 64]  # the widest heads each dtype takes (Llama-3-8B's 128)
    score += [("bf16", torch.bfloat16, True, 64, v) for v in SCORE_TILES if v]
    for dt, tdt, has_w, width, variant in score:
        cfg, p = {**se.tile_config(tdt, width), **variant}, PTR[dt]
        out.append(dict(name=f"score_edges {dt} {'heads' if has_w else 'residual'}" + (f" w={width}" if width != 64
                                                                                        else "")
                        + (f" {variant}" if variant else ""),
                        kernel=se._score_edges_kernel, types={"table_ptr": "*i64", "g_ptr": p, "s_ptr": "*fp32"},
                        constexprs=dict(HAS_W=has_w, OP=TL[dt], FP32_DOTS=dt == "fp32",
                                        ALIGN=128 // TL[dt].primitive_bitwidth, EVEN_U=True, BU=cfg["BU"],
                                        BW=width if has_w else 16, BN=cfg["BN"], BT=cfg["BT"], BK=cfg["BK"]),
                        # one grouped launch of a layer's run of 496 upstream nodes (score_edges_into)
                        args=dict(n_vec=0, w=width, n_d=49, c=2048, d=2048 * width // 64, tokens_per_split=32,
                                  split_stride=496 * 49)
                        if has_w else dict(n_vec=16, w=2048, n_d=49, c=2048, d=2048, tokens_per_split=32,
                                           split_stride=496 * 49),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    out.append(dict(name="score_edges split reduction", kernel=se._accumulate_partials_kernel,  # into a score block
                    types={"p_ptr": "*fp32", "out_ptr": "*fp32", "alpha": "fp32"}, constexprs=dict(BLOCK=1024),
                    args=dict(splits=64, n=496 * 49, n_cols=49, out_row_stride=1552, out_col_stride=1)))
    resid = [(dt, has_w, two, norm, 64, 1, {}) for dt, has_w, two, norm in (
        ("bf16", True, False, 1), ("bf16", True, True, 1), ("fp32", True, False, 2), ("bf16", False, False, 2),
        ("fp16", True, True, 0), ("fp32", True, True, 1))]
    resid += [("bf16", True, True, 1, 512, 1, {})]  # split-MLP nodes (gate and up) up to RESIDUAL_KERNEL_WIDTH wide
    resid += [("bf16", True, False, 1, 64, 3, {}), ("fp32", True, False, 1, 64, 3, {})]  # a layer's q, k, v at once
    resid += [("bf16", True, False, 1, 64, 1, v) for v in RESID_TILES if v]
    for dt, has_w, two, norm, width, blocks, variant in resid:
        tdt, p = torch.float32 if dt == "fp32" else torch.bfloat16, PTR[dt]
        tag = (f"{dt} w={has_w} two={two} norm={norm}" + (f" width={width}" if width != 64 else "")
               + (f" blocks={blocks}" if blocks > 1 else "") + (f" {variant}" if variant else ""))
        consts = dict(HAS_W=has_w, TWO=two, NORM=norm, HAS_GAMMA=norm != 0, FP32_DOTS=dt == "fp32", BI=64,
                      NI=width // 64 if has_w else 1, BLOCKS=blocks)
        types = {"out_ptr": p, "s_ptr": "*fp32", "sum_ptr": "*fp32", "x_ptr": p, "gamma_ptr": "*fp32",
                 "mean_ptr": "*fp32",
                 "rstd_ptr": "*fp32", "r0_ptr": p, "w0_ptr": p, "r1_ptr": p, "w1_ptr": p, "r2_ptr": p, "w2_ptr": p}
        # llama-1B: 32 query heads (row stride 2048), then 8 key and 8 value heads (512)
        args = dict(x_stride=2048, r0_stride=2048 * width // 64, r1_stride=512 if blocks > 1 else 2048 * width // 64,
                    r2_stride=512, n_0=32, n_01=40, n=48 if blocks > 1 else 32, width0=width, width1=width, c=2048,
                    d=2048, **(dict(w0_n=width * 2048, w0_i=2048, w0_k=1, w1_n=width * 2048, w1_i=2048, w1_k=1)
                               if has_w else {}))
        cfg = {**rg.tiles(tdt), **variant}
        cfg.pop("dots", None)
        out.append(dict(name=f"residual_grads {tag}", kernel=rg._residual_grads_kernel, types=types,
                        constexprs=dict(consts, BT=cfg["BT"], BK=cfg["BK"], NB=cfg["NB"], SUMS=True), args=args,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        if norm:  # the norm's reductions, launched first
            cfg = {**rg.dot_tiles(tdt), **variant.get("dots", {})}
            # SPLIT_X: half-precision weights into an fp32 output (the normalised input as two half-precision parts)
            plain_bf16 = (dt, has_w, two, blocks, variant) == ("bf16", True, False, 1, {})
            for split in (False, True) if plain_bf16 else (False,):
                out.append(dict(name=f"residual_grads dots {tag}" + (" split_x" if split else ""),
                                kernel=rg._norm_dots_kernel,
                                types={k: v for k, v in types.items() if k not in ("out_ptr", "sum_ptr")},
                                constexprs=dict(consts, BT=cfg["BT"], BK=cfg["BK"], SPLIT_X=split), args=args,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    sms = mw._num_sms
    mw._num_sms = lambda device: 132  # an H100's, as the launcher would read it there
    try:
        for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            cfg = mw.default_config(torch.device("cuda"), tdt, 512, 4096, 8192)
            for has_index in (True, False):
                p = PTR[dt]
                out.append(dict(name=f"masked_weight_grad {dt} index={has_index}", kernel=mw._masked_weight_grad_kernel,
                                types={"a_ptr": p, "b_ptr": p, "idx_ptr": "*i64", "c_ptr": "*fp32"},
                                constexprs=dict(HAS_INDEX=has_index, DOT_DTYPE=TL[dt],
                                                PRECISION="ieee" if dt == "fp32" else "tf32", BLOCK_M=cfg["block_m"],
                                                BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"]),
                                args=dict(N=8192, K=512, NB=4096, tokens_per_split=8192, stride_an=4096, stride_aa=1,
                                          stride_bn=4096, stride_bb=1, stride_cs=0, stride_cm=4096),
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    finally:
        mw._num_sms = sms
    for dt in ("fp32", "bf16"):
        for dev in (True, False):
            flags = dict(LR_PTR=dev, CHECK=dev, MAXIMIZE=False, BF16=dt == "bf16", BLOCK=mo._block(1 << 20))
            tag = f"{dt} {'lr tensor + flag' if dev else 'float lr'}"
            rows = dict(stride_row=4096, stride_col=1, M=4096)  # a circuit row of a [*, 4096] weight
            out.append(dict(name=f"masked_adamw_ {tag}", kernel=mo._masked_adamw_kernel,
                            types={"p_ptr": PTR[dt], **OPT_TYPES}, constexprs=flags, args=rows))
            out.append(dict(name=f"masked_sgd_ {tag}", kernel=mo._masked_sgd_kernel,
                            types={"p_ptr": PTR[dt], **OPT_TYPES}, args=rows,
                            constexprs=dict(flags, HAS_WD=True, MOMENTUM=True, NESTEROV=dev)))
    for dt in ("fp32", "bf16"):  # the tiles: a column view (an output projection's head columns; unit row stride)
        flags = dict(LR_PTR=True, CHECK=True, MAXIMIZE=False, BF16=dt == "bf16", BR=mo.TILE_ROWS, BM=mo.TILE_COLS)
        cols = dict(stride_row=1, stride_col=2048, M=2048)  # K (the selected columns) stays generic
        out.append(dict(name=f"masked_adamw_ tiles {dt} column view", kernel=mo._masked_adamw_tiles_kernel,
                        types={"p_ptr": PTR[dt], **OPT_TYPES}, constexprs=flags, args=cols))
        out.append(dict(name=f"masked_sgd_ tiles {dt} column view", kernel=mo._masked_sgd_tiles_kernel,
                        types={"p_ptr": PTR[dt], **OPT_TYPES}, args=cols,
                        constexprs=dict(flags, HAS_WD=True, MOMENTUM=True, NESTEROV=False)))
    out.append(dict(name="nonfinite_flag_", kernel=mo._nonfinite_kernel,
                    types={"g_ptr": "*fp32", "found_ptr": "*fp32"}, constexprs=dict(BLOCK=4096), args=dict(n=1 << 20)))
    return out


def _resources(cubin: bytes) -> dict:
    """Registers, local memory (spills / stack) and shared memory of a cubin, read by Triton's cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    return {} if m is None else dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups())))


def _specialize_int(value: int) -> tuple:
    """``(type or "constexpr", hint)`` of an integer launch argument, as the JIT of this Triton makes it (3.6 and
    later: ``native_specialize_impl``; 3.4-3.5: ``create_specialize_impl``; 3.3: the same, its hook per call)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    if hasattr(jit, "native_specialize_impl"):
        return jit.native_specialize_impl(BaseBackend, value, False, True, True)
    try:
        return jit.create_specialize_impl(BaseBackend.get_arg_specialization)(value, False, True, True)
    except TypeError:  # Triton 3.3
        return jit.create_specialize_impl()(value, BaseBackend.get_arg_specialization, False, True, True)


def specialise(case: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``, as the JIT derives them from a launch's arguments."""
    from triton.compiler.compiler import make_backend

    backend = make_backend(TARGET)
    signature, constexprs, attrs = {}, dict(case["constexprs"]), {}
    for i, name in enumerate(inspect.signature(case["kernel"].fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.get("args", {}):
            kind, hint = _specialize_int(case["args"][name])
            if kind == "constexpr":  # an integer equal to 1
                signature[name], constexprs[name] = "constexpr", hint
            else:
                signature[name] = kind
                attrs[(i,)] = backend.parse_attr(hint)
        else:
            signature[name] = case["types"].get(name, "i32")
            if signature[name].startswith("*"):  # torch's allocations are aligned far beyond 16 bytes
                attrs[(i,)] = backend.parse_attr("D")
    return signature, constexprs, attrs


def compile_case(case: dict) -> dict:
    from triton.compiler import ASTSource

    kernel = case["kernel"]
    signature, constexprs, attrs = specialise(case)
    rec = {"name": case["name"], "num_warps": case.get("num_warps", 4), "num_stages": case.get("num_stages", 3)}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=TARGET,
                                  options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})
    except Exception as e:  # noqa: BLE001 - report every failure, go on with the next kernel
        return {**rec, "ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
    shared = compiled.metadata.shared
    mma = sorted({"wgmma" if m.startswith("wgmma") else m
                  for m in re.findall(r"\b(wgmma\.mma_async|mma\.sync)", compiled.asm["ptx"])})
    v4 = len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.", compiled.asm["ptx"]))  # 128-bit loads (vectorised)
    return {**rec, "ok": shared <= H100_SMEM, "shared_bytes": shared, "tensor_cores": "+".join(mma) or "none",
            "vector_loads": v4,
            **_resources(compiled.asm["cubin"]),
            **({} if shared <= H100_SMEM else {"error": f"{shared} bytes of shared memory > {H100_SMEM}"})}


def _compile_index(i: int) -> dict:
    return compile_case(cases()[i])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    a = ap.parse_args(argv)
    n = len(cases())
    if a.jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            recs = list(pool.map(_compile_index, range(n)))
    else:
        recs = [_compile_index(i) for i in range(n)]
    print(f"Triton {triton.__version__}, sm_90\n\n| kernel | ok | tensor cores | 128-bit loads | regs | stack B | local B "
          "| shared B |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recs:
        print(f"| {r['name']} | {'yes' if r['ok'] else 'NO'} | {r.get('tensor_cores', '?')} | {r.get('vector_loads', '?')} "
              f"| {r.get('registers', '?')} "
              f"| {r.get('stack', '?')} | {r.get('local', '?')} | {r.get('shared_bytes', '?')} |")
    for r in recs:
        if not r["ok"]:
            print(f"\n{r['name']}: {r['error']}")
    if a.out:
        with open(a.out, "w") as f:
            from ct_fast.app import harness

            json.dump({"env": harness.env(), "triton": triton.__version__, "target": "sm_90", "kernels": recs}, f,
                      indent=1)
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
