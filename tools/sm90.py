"""
What kernel.py's kernels compile to on an H100, found without one: both kernels compiled for sm_90 down to a
cubin by the ptxas in the triton wheel and read back with the wheel's cuobjdump, for every config they may run.
Per kernel and config it prints

    registers and stack bytes per thread (stack bytes are spills),
    the SASS instructions of the inner loop per source (the loop over sources does U per step),
    its global loads (LDG) and cp.async copies (LDGSTS) per source,
    the share of a row's lanes that are masked padding (the kernels tile d into power-of-two blocks).

    python tools/sm90.py                  d = 1152, bf16, per-token query, LayerNorm + modulate fused
    python tools/sm90.py --d 384 768      other widths

test_parity.py -k hopper runs it and fails on a spill, or on more than 12% masked lanes at d = 1152.
A file of its own because it stands in for the CUDA driver, which leans on Triton internals nothing else should
touch: on a Triton whose internals moved it exits with code 3 (the test then skips instead of failing).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # kernel.py


def stand_in_for_driver():
    """Make Triton compile for sm_90 without libcuda (nothing is launched)."""
    try:
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaDriver
        from triton.runtime import driver

        class Hopper(CudaDriver):
            def __init__(self):
                self.utils = None

            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_active_torch_device(self):
                return torch.device("cpu")

        driver.set_active(Hopper())
    except Exception as e:
        print(f"cannot stand in for a CUDA driver on this Triton: {e!r}")
        sys.exit(3)


def compile_kernel(kind, config, D, dtype, q_mode=2, mod=True):
    """The compiled forward ("fwd") or backward ("bwd") at width D for 57 sources and 256 rows per sample."""
    import torch

    import kernel

    table, flags, f = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.int32), torch.empty(1)
    x = torch.empty(1, dtype=dtype)
    meta = {k: v for k, v in kernel._meta([torch.empty(1, 1, D, dtype=dtype)]).items() if k not in ("N", "NB")}
    launch = dict(N=57, NB=64, Q=f, GAMMA=f, SHIFT=f, SCALE=f, T=256, MOD_STRIDE=6 * D, Q_MODE=q_mode, HAS_MOD=mod,
                  num_warps=config.num_warps, **config.kwargs, **meta)
    if kind == "fwd":
        return kernel._forward_kernel.warmup(table, X=x, H=x, H32=f, LSE=f, STORE_H=mod, SAVE=True, grid=(1,),
                                             **launch)
    return kernel._backward_kernel.warmup(table, DSRC=table, ACC=flags, H32=f, LSE=f, DX=x, DH=x, DQ=x, PART=f,
                                         J=2, R=8, HAS_DH=mod, grid=(1, 1), **launch)


def tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(cubin):
    """(registers, stack bytes, SASS as [(address, instruction)]) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    code = [(int(a, 16), op.strip()) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    return registers, stack, code


def inner_loop(code):
    """The instructions of the innermost loop: the shortest span from a backward branch's target to the branch
    (the source loop; the backward's loop over rows encloses it)."""
    loops = []
    for address, op in code:
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", op)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        return []
    start, end = min(loops, key=lambda span: span[1] - span[0])
    return [op for address, op in code if start <= address <= end]


def masked_share(meta):
    # BD: one block per row, the kernel before the split (docs/kernel.md's "before" table: this file next to it)
    lanes = meta["BA"] + meta["BB"] if "BA" in meta else meta["BD"]
    return 1 - meta["D"] / lanes


def programs_per_sm(registers, shared, warps):
    """Programs an H100 / H200 SM holds at once: 64K registers (allocated per warp in units of 8 per thread),
    228 KB of shared memory (1 KB reserved per program), 64 warps, 32 programs."""
    return min(32, 64 // warps, 65536 // (warps * 32 * -(-registers // 8) * 8), 228 * 1024 // (shared + 1024))


def measure(kind, config, D):
    """One row of the table (bf16, per-token query, LayerNorm fused) as a dict."""
    import torch

    import kernel

    dtype = torch.bfloat16
    compiled = compile_kernel(kind, config, D, dtype)
    registers, stack, code = read_cubin(compiled.asm["cubin"])
    U, stages = config.kwargs["U"], config.kwargs.get("STAGES", 1)  # (no STAGES: the kernel before pipelining)
    loop = inner_loop(code)
    opcode = lambda op: op.split()[1] if op.startswith("@") else op.split()[0]
    programs = programs_per_sm(registers, compiled.metadata.shared, config.num_warps)
    # A step's loads: U source rows (the backward also reads U gradient rows), `stages` steps ahead.
    row_bytes = D * torch.empty(0, dtype=dtype).element_size() * (1 if kind == "fwd" else 2)
    issued = len(loop) / U * config.num_warps
    pin = kernel.PINNED[kind]
    return dict(kind=kind, U=U, warps=config.num_warps, stages=stages, registers=registers, stack=stack,
                programs=programs, in_flight=programs * U * stages * row_bytes / 1024, per_source=len(loop) / U,
                issued=issued, at_n=[issued * -(-n // U) * U / n for n in AT_N],
                pinned=(config.kwargs, config.num_warps) == (pin.kwargs, pin.num_warps),
                ldgsts=sum(opcode(op).split(".")[0] == "LDGSTS" for op in loop) / U,
                masked=masked_share(kernel._meta([torch.empty(1, 1, D, dtype=dtype)])))


# A loop step of U sources runs whole, padding included: per real source, N sources cost ceil(N / U) U / N of
# the instructions per source row. N = 5 and 9: chunk 4's mean at SiT-B/2 and XL/2; 57: dense at XL/2.
AT_N = (5, 9, 57)
HEADER = ["| d | kernel | U | warps | stages | registers | spill bytes | programs / SM | KB in flight / SM "
          "| SASS / source | warp instructions / source row | " + " | ".join(f"at N = {n}" for n in AT_N) +
          " | LDGSTS / source | pinned | masked lanes |",
          "|---" * 17 + "|"]


def row(D, m):
    return (f"| {D} | {m['kind']} | {m['U']} | {m['warps']} | {m['stages']} | {m['registers']} | {m['stack']} | "
            f"{m['programs']} | {m['in_flight']:.0f} | {m['per_source']:.0f} | {m['issued']:.0f} | "
            + " | ".join(f"{x:.0f}" for x in m["at_n"]) + f" | {m['ldgsts']:.1f} | {'yes' if m['pinned'] else ''} "
            f"| {m['masked']:.0%} |")


def table(widths, space=False):
    """Markdown rows, one per kernel and config (every one the kernels may run, or with `space` every
    U x warps x stages a config could take), and the spills found."""
    import triton

    import kernel

    grid = {kind: [triton.Config({"U": u, "STAGES": s}, num_warps=w) for u in (1, 2, 4) for w in (4, 8, 16)
                   for s in (1, 3)] for kind in ("fwd", "bwd")}
    rows, spills = list(HEADER), []
    for D in widths:
        for kind in ("fwd", "bwd"):
            for config in (grid if space else kernel.CONFIGS)[kind]:
                m = measure(kind, config, D)
                rows.append(row(D, m))
                if m["stack"]:
                    spills.append(f"d={D} {kind} U={m['U']} warps={m['warps']} stages={m['stages']}: "
                                  f"{m['stack']} bytes")
    return rows, spills


def other_flags():
    """Compile the other flag combinations with the pinned configs (one query without the LayerNorm in fp32; one
    query per sample at an odd width); print each, return their spills."""
    import torch

    import kernel

    spills = []
    for D, q_mode, mod, dtype in [(1152, 0, False, torch.float32), (100, 1, True, torch.float32)]:
        for kind in ("fwd", "bwd"):
            compiled = compile_kernel(kind, kernel.PINNED[kind], D, dtype, q_mode, mod)
            registers, stack, _ = read_cubin(compiled.asm["cubin"])
            line = f"d={D} q_mode={q_mode} LN={mod} {str(dtype)[6:]} {kind}: {registers} registers, {stack} spill bytes"
            print(line)
            spills += [line] if stack else []
    return spills


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[1152], help="widths to compile at")
    p.add_argument("--space", action="store_true", help="every U x warps x stages, not only kernel.CONFIGS")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    stand_in_for_driver()
    import triton

    rows, spills = table(args.d, args.space)
    print(f"Triton {triton.__version__}, sm_90, bf16, per-token query, LayerNorm + modulate fused, 57 sources")
    print("\n".join(rows))
    spills += other_flags()
    print("spills:", spills)


if __name__ == "__main__":
    main()
