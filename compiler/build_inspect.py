"""Look inside compiled stages: dlight-scheduled kernels, their OpenCL source and launch shapes, and
the ELF / instruction facts of exported aarch64 libraries.

Used by tests/integration/test_targets.py to check on an x86 machine what a board would run
(see docs/targets.md):

* `compile_with_schedule(mod, arch)` runs the real build (`compiler.build._relax_pipeline`) and
  also captures the IRModule before and right after dlight scheduled it, so launch shapes come from
  the very schedule that produced the OpenCL source, and references from the same unscheduled
  PrimFuncs.
* `opencl_sources(ex)` splits the OpenCL module's source into its per-kernel programs (TVM 0.27
  keeps one program per kernel: the prototypes of all kernels plus one definition, each headed
  `// Function: X`).
* `gpu_kernels(scheduled_mod, sources)` describes every device launch of every PrimFunc: OpenCL
  kernel name, grid and work-group size (the `T.thread_binding` extents), arguments mapped to
  buffers.
* `elf_header(path)`, `disassemble(path, objdump)`, `count_instructions(disasm, pattern)` read an
  exported library (no `file` needed).

Needs TVM's compiler (build host only; boards never import this module).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_THREAD_TAGS = tuple(f"{k}.{a}" for k in ("blockIdx", "threadIdx") for a in "xyz")


# ---------------------------------------------------------------------------------- compiling


@dataclass
class GpuBuild:
    """A stage compiled for a GPU arch, with the module before and after dlight scheduled it."""

    ex: Any              # the VM executable, as compile_stage would export it
    legalized: Any       # IRModule after LegalizeOps: every kernel as an unscheduled PrimFunc
    scheduled: Any       # IRModule right after dlight's ApplyDefaultSchedule (None on CPU arches)


def compile_with_schedule(mod, arch) -> GpuBuild:
    """`tvm.compile` a stage module exactly as `compiler.build.compile_stage` does (same target,
    same `_relax_pipeline`), capturing the IRModule before and after dlight with a pass
    instrument."""
    import tvm

    from compiler.build import _relax_pipeline

    captured: dict[str, Any] = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, m, info):
            # Snapshot the function map: later passes update the IRModule object in place.
            if info.name == "LegalizeOps" and "legalized" not in captured:
                captured["legalized"] = tvm.IRModule(dict(m.functions.items()))
            elif info.name == "ApplyDefaultSchedule":
                captured["scheduled"] = tvm.IRModule(dict(m.functions.items()))

    with tvm.transform.PassContext(opt_level=3, instruments=[_Capture()]):
        ex = tvm.compile(mod, target=arch.tvm_target(), relax_pipeline=_relax_pipeline(arch))
    return GpuBuild(ex, captured.get("legalized"), captured.get("scheduled"))


def opencl_modules(ex) -> list:
    """The OpenCL device modules of a compiled executable (empty: everything went to the host)."""
    out, todo = [], [ex.mod]
    while todo:   # executable -> host llvm module -> device modules (a tree)
        m = todo.pop()
        if m.kind == "opencl":
            out.append(m)
        todo.extend(m.imports)
    return out


_SECTION = re.compile(r"^// Function: (\w+)\n", re.M)
_SIGNATURE = re.compile(r"__kernel void (\w+)\(([^)]*)\)\s*\{")


def opencl_sources(ex) -> dict[str, str]:
    """kernel name -> the OpenCL program TVM generated for it (across all OpenCL modules)."""
    out: dict[str, str] = {}
    for m in opencl_modules(ex):
        parts = _SECTION.split(m.inspect_source())
        if parts[0].strip():   # an older layout: one program holding every kernel
            for name in re.findall(r"__kernel void (\w+)\([^)]*\)\s*\{", parts[0]):
                out[name] = parts[0]
        for name, src in zip(parts[1::2], parts[2::2], strict=True):
            out[name] = src
    return out


def combined_program(sources: dict[str, str]) -> str:
    """One OpenCL program with every kernel: the shared prototypes once, then all definitions."""
    protos: dict[str, None] = {}
    bodies: dict[str, None] = {}
    for src in sources.values():
        body = []
        for line in src.splitlines():
            if line.startswith("__kernel void ") and line.rstrip().endswith(");"):
                protos.setdefault(line)
            else:
                body.append(line)
        bodies.setdefault("\n".join(body))
    return "\n".join(protos) + "\n\n" + "\n\n".join(bodies) + "\n"


def kernel_args(src: str, name: str) -> list[tuple[str, str]]:
    """(buffer name, OpenCL element type) of kernel `name`'s arguments in order ("x_ptr" -> "x")."""
    for kname, params in _SIGNATURE.findall(src):
        if kname != name:
            continue
        out = []
        for p in params.split(","):
            m = re.fullmatch(r"\s*__global\s+(\w+)\*\s+(?:restrict\s+)?(\w+)\s*", p)
            if not m:
                raise ValueError(f"kernel {name}: argument {p.strip()!r} is not a __global buffer")
            out.append((m.group(2).removesuffix("_ptr"), m.group(1)))
        return out
    raise KeyError(f"no definition of kernel {name} in its source")


# ---------------------------------------------------------------------------------- launches


@dataclass
class Launch:
    """One device kernel launch: the OpenCL kernel, its grid (work-groups) and work-group size."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: list[tuple[str, str]] = field(default_factory=list)   # (buffer name, OpenCL type)
    buffers: set[str] = field(default_factory=set)              # global buffers the nest touches

    @property
    def global_size(self) -> tuple[int, int, int]:
        return tuple(g * b for g, b in zip(self.grid, self.block, strict=True))


@dataclass
class GpuKernel:
    """A scheduled PrimFunc (one `call_tir` target) and the launches it lowers to, in order."""

    name: str
    func: Any                                   # the dlight-scheduled PrimFunc
    params: list[tuple[str, tuple[int, ...], str]]    # (C name, shape, dtype) in call order
    temps: dict[str, tuple[tuple[int, ...], str]]     # global intermediates (root alloc_buffers)
    launches: list[Launch]
    outputs: list[str] = field(default_factory=list)   # params the kernel writes

    @property
    def temp_pool_bytes(self) -> int:
        """An upper bound on any one intermediate allocation after StorageRewrite merged some."""
        import numpy as np

        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.temps.values())


def _children(node) -> list:
    import tvm

    t = tvm.tirx
    if isinstance(node, t.SeqStmt):
        return list(node.seq)
    if isinstance(node, tvm.s_tir.SBlockRealize):
        return [node.block]
    if isinstance(node, tvm.s_tir.SBlock):
        return [c for c in (node.init, node.body) if c is not None]
    if isinstance(node, t.IfThenElse):
        return [c for c in (node.then_case, node.else_case) if c is not None]
    if isinstance(getattr(node, "body", None), t.Stmt):   # For, LetStmt, AttrStmt, AllocBuffer...
        return [node.body]
    return []


def _walk(node, fn) -> None:
    fn(node)
    for c in _children(node):
        _walk(c, fn)


def _root_nests(func) -> tuple[list, Any]:
    import tvm

    body = func.body
    root = body.block if isinstance(body, tvm.s_tir.SBlockRealize) else None
    stmt = root.body if root is not None else body
    while not isinstance(stmt, (tvm.tirx.SeqStmt, tvm.tirx.For)) and _children(stmt):
        stmt = _children(stmt)[0]   # DeclBuffer/AllocBuffer wrappers
    nests = list(stmt.seq) if isinstance(stmt, tvm.tirx.SeqStmt) else [stmt]
    return nests, root


def launch_shapes(nest) -> tuple[tuple[int, int, int], tuple[int, int, int], set[str]]:
    """(grid, work-group size, global buffers touched) of one thread-bound loop nest."""
    import tvm

    ext: dict[str, int] = {}
    bufs: set[str] = set()

    def visit(n):
        if isinstance(n, tvm.tirx.For) and n.kind == tvm.tirx.ForKind.THREAD_BINDING:
            tag = n.thread_binding.thread_tag
            if tag in _THREAD_TAGS:
                e = int(n.extent)
                if ext.setdefault(tag, e) != e:
                    raise ValueError(f"{tag} bound with extents {ext[tag]} and {e} in one kernel")
        if isinstance(n, tvm.s_tir.SBlock):
            for r in (*n.reads, *n.writes):
                buf = r.source if hasattr(r, "source") else r.buffer   # 0.27: TensorRegion.source
                if buf.scope() == "global":
                    bufs.add(_cname(buf.name))

    _walk(nest, visit)
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    return grid, block, bufs


def _cname(name: str) -> str:
    """A buffer name as OpenCL codegen spells it ("adamw.v0" -> "adamw_v0")."""
    return re.sub(r"\W", "_", name)


def _shape(buf) -> tuple[int, ...]:
    return tuple(int(s) for s in buf.shape)


def gpu_kernels(scheduled_mod, sources: dict[str, str]) -> dict[str, GpuKernel]:
    """Every PrimFunc of a dlight-scheduled module that has OpenCL kernels, with its launches.

    The i-th top-level loop nest of a PrimFunc `f` becomes OpenCL kernel `f_kernel` (i = 0) or
    `f_kernel_i`; this is checked: the number of nests must equal the number of kernels, and the
    parameters a kernel takes must be buffers its nest touches.
    """
    import tvm

    out: dict[str, GpuKernel] = {}
    for gv, func in scheduled_mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        present = [name + "_kernel"] if name + "_kernel" in sources else []
        while present and f"{name}_kernel_{len(present)}" in sources:
            present.append(f"{name}_kernel_{len(present)}")
        if not present:
            continue
        nests, root = _root_nests(func)
        if len(nests) != len(present):
            raise ValueError(f"{name}: {len(nests)} top-level loop nests but {len(present)} "
                             f"OpenCL kernels")
        # TVM 0.27: PrimFunc params are the buffers themselves (no buffer_map)
        params = [(_cname(b.name), _shape(b), str(b.dtype)) for b in func.params]
        allocs = root.alloc_buffers if root is not None else []
        temps = {_cname(b.name): (_shape(b), str(b.dtype)) for b in allocs if b.scope() == "global"}
        written: set[str] = set()

        def _writes(n):
            if isinstance(n, tvm.s_tir.SBlock):
                for r in n.writes:
                    written.add(_cname((r.source if hasattr(r, "source") else r.buffer).name))

        _walk(func.body, _writes)
        launches = []
        pnames = {n for n, _, _ in params}
        for kname, nest in zip(present, nests, strict=True):
            grid, block, bufs = launch_shapes(nest)
            args = kernel_args(sources[kname], kname)
            # Parameters keep their names, so they pin the nest -> kernel order. Intermediates may
            # not: StorageRewrite lets a dead temp's memory hold a later one under the first one's
            # name (k*_attention_bwd: dv lives in dpd), so a temp argument need not be in its nest.
            wrong = [a for a, _ in args if (a in pnames and a not in bufs)
                     or (a not in pnames and a not in temps)]
            if wrong:
                raise ValueError(f"{kname}: arguments {wrong} are neither buffers of its loop nest "
                                 f"{sorted(bufs)} nor intermediates {sorted(temps)}")
            launches.append(Launch(kname, grid, block, args, bufs))
        out[name] = GpuKernel(name, func, params, temps, launches,
                              [n for n, _, _ in params if n in written])
    return out


# ---------------------------------------------------------------------------------- ELF / objdump

EM_X86_64, EM_AARCH64 = 62, 183
ET_DYN = 3


def elf_header(path: str | Path) -> dict[str, int]:
    """The identifying fields of an ELF header (no `file`/`readelf` needed)."""
    with open(path, "rb") as f:
        h = f.read(64)
    if len(h) < 20 or h[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    ei_class, ei_data = h[4], h[5]
    endian = "<" if ei_data == 1 else ">"
    e_type, e_machine = struct.unpack(endian + "HH", h[16:20])
    return {"class": ei_class, "data": ei_data, "type": e_type, "machine": e_machine}


def find_objdump(arch_name: str = "aarch64") -> str | None:
    """A disassembler for aarch64 code: the cross binutils' objdump, else llvm-objdump."""
    for exe in (f"{arch_name}-linux-gnu-objdump", "llvm-objdump"):
        if shutil.which(exe):
            return exe
    return None


def disassemble(path: str | Path, objdump: str) -> str:
    r = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                       text=True, check=True)
    return r.stdout


def count_instructions(disasm: str, pattern: str) -> dict[str, int]:
    r"""Per function symbol, how many disassembled instructions match `pattern` (a regex searched in
    "mnemonic<TAB>operands", e.g. r"^fmla\tv\d+\.4s"). Symbols without a match are left out."""
    rx = re.compile(pattern)
    out: dict[str, int] = {}
    sym = "?"
    for line in disasm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            sym = head.group(1)
            continue
        parts = line.split("\t", 2)   # "  addr:" \t mnemonic \t operands
        if len(parts) < 2 or not parts[0].rstrip().endswith(":"):
            continue
        if rx.search("\t".join(parts[1:]).strip()):
            out[sym] = out.get(sym, 0) + 1
    return out
