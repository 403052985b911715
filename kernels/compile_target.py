"""Compile a captured kernel launch for a GPU architecture on the CPU and read its resources.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the
whole pipeline down to a cubin, and the wheel's cuobjdump reads registers, local memory
(spills) and the SASS back. A launch is captured by running the real launcher on `meta`
tensors with the kernel object swapped for a recorder, so the configuration compiled is
exactly the one the launcher picks (constexprs, num_warps, and Triton's own argument
specialisation: ints equal to 1 become constants, 16-divisible ints and 16-byte aligned
pointers get divisibility hints). Used by compile_report.py.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

# Largest shared memory one block may use, bytes (opt-in maximum, CUDA programming guide).
SMEM_LIMIT = {90: 232_448, 100: 232_448, 120: 101_376}
# SASS opcodes of tensor-core instructions: Hopper warpgroup MMA (bf16/fp8/int8), warp MMA,
# Blackwell tcgen05 MMA.
_TC_OPS = re.compile(r"\b(HGMMA|QGMMA|IGMMA|HMMA|QMMA|IMMA|UTCHMMA|UTCQMMA|UTCIMMA|UTCOMMA)\b")
_SPILL_OPS = re.compile(r"\bSTL(\.\w+)*\b")


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments by name, launch options."""

    kernel: Any
    args: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


class _Recorder:
    """Stands in for a JIT kernel: `rec[grid](*args, **kw)` records instead of launching."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            names = self.kernel.arg_names
            bound = dict(zip(names, args))
            opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
            bound.update(kwargs)
            missing = [n for n in names if n not in bound]
            assert not missing, f"{self.kernel.__name__}: launch misses arguments {missing}"
            self.sink.append(Launch(self.kernel, bound, opts))
        return record


@contextlib.contextmanager
def recording(targets: dict[str, list[str]]) -> Iterator[list[Launch]]:
    """Swap the named kernels of the named modules for recorders for the duration of the block."""
    sink: list[Launch] = []
    saved = []
    for mod_name, names in targets.items():
        mod = importlib.import_module(mod_name)
        for n in names:
            saved.append((mod, n, getattr(mod, n)))
            setattr(mod, n, _Recorder(getattr(mod, n), sink))
    try:
        yield sink
    finally:
        for mod, n, k in saved:
            setattr(mod, n, k)


_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
        torch.bool: "*i1", torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5"}


def _spec(value: Any) -> tuple[str, str | None]:
    """Triton's launch-time specialisation of one argument: (type, 'D' | '' | None)."""
    if isinstance(value, torch.Tensor):
        # meta tensors report data_ptr 0: alignment is that of the view's offset (allocations are 256 B)
        return _PTR[value.dtype], "D" if (value.storage_offset() * value.element_size()) % 16 == 0 else ""
    try:                                    # Triton's own rule where this version exposes it
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
        return native_specialize_impl(BaseBackend, value, False, True, True)
    except ImportError:                     # the same rule, written out
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            return "constexpr", None
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
        if isinstance(value, float):
            return "fp32", None
        raise TypeError(f"cannot specialise a launch argument of type {type(value).__name__}")


def source_of(launch: Launch, overrides: dict[str, Any] | None = None) -> Any:
    """ASTSource for a recorded launch (constexpr overrides applied, e.g. DOT_F32=False)."""
    from triton.compiler import ASTSource
    fn = launch.kernel
    args = dict(launch.args, **(overrides or {}))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = args[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        ty, hint = _spec(v)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = v
        elif hint == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def cuda_tool(name: str) -> str:
    from triton.backends.nvidia import compiler as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    assert os.path.exists(path), f"{name} not found at {path}: this Triton wheel lacks the CUDA tools"
    return path


def resources(cubin: bytes) -> dict[str, Any]:
    """Registers, local memory, static shared memory and SASS opcode counts of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuda_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuda_tool("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert m, f"cuobjdump printed no resource usage:\n{usage}"
    reg, stack, shared, local = map(int, m.groups())
    tc = sorted(set(_TC_OPS.findall(sass)))
    return dict(registers=reg, stack_bytes=stack, static_shared=shared, local_bytes=local,
                spill_stores=len(_SPILL_OPS.findall(sass)), tensor_core_ops=tc)


def compile_launch(launch: Launch, arch: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile one recorded launch for sm_<arch>; its resources, or the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    src = source_of(launch, overrides)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as e:                       # the report carries the error; the test fails on it
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # the cause is the last line; the two before it are the offending source line and caret
        return dict(ok=False, error=f"{type(e).__name__}: {lines[-1] if lines else ''} | at: "
                    f"{' | '.join(lines[-3:-1])}"[:1200])
    res = resources(k.asm["cubin"])
    shared = int(k.metadata.shared) + res["static_shared"]
    return dict(ok=True, num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
                shared_bytes=shared, shared_limit=SMEM_LIMIT.get(arch), has_dot="tt.dot" in k.asm["ttir"],
                ptx_vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", k.asm["ptx"])),
                ptx_scalar_b16_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", k.asm["ptx"])),
                ptx_traps=len(re.findall(r"\btrap;", k.asm["ptx"])), **res)


def supported_archs() -> list[int]:
    """The CUDA architectures this Triton can target from here: sm_90, and sm_100 when it works."""
    return [90, 100]
