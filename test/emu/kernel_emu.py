"""Run the project's CUDA kernels (kernels/*.cu) on the CPU.

Each ``.cu`` file is compiled, unchanged, by g++ together with ``cuda_emu.h`` (the few CUDA
keywords and built-ins the kernels use) into a shared library. For every
``extern "C" __global__`` kernel, parsed from the source, a generated C++ launcher loops over
the grid's blocks and each block's threads one after another, setting ``blockIdx`` /
``threadIdx`` before calling the kernel. Python calls that launcher through ctypes.

:class:`EmulatedKernels` is a drop-in ``launch(source_file, kernel, total, args)`` for the host
logic of ``sparse_detector_ros.sparse.cupy_backend``, so the tests exercise the same argument
packing, launch geometry and dtype dispatch as the CUDA path. On top of what a GPU would do it
checks every launch: argument count and types against the kernel's C signature (pointer
element types against tensor dtypes, scalar types against numpy scalar types, as CuPy needs
them), and out-of-bounds writes through canary bytes around every buffer.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

HEADER = Path(__file__).resolve().parent / "cuda_emu.h"
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror")

_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_SCALARS = {  # C type -> (ctypes type, numpy scalar type CuPy must be given)
    "int": (ctypes.c_int, np.int32),
    "unsigned int": (ctypes.c_uint, np.uint32),
    "long long": (ctypes.c_longlong, np.int64),
    "float": (ctypes.c_float, np.float32),
    "double": (ctypes.c_double, np.float64),
}
_POINTEES = {  # C pointee type -> tensor dtypes that may be passed for it
    "float": (torch.float32,),
    "double": (torch.float64,),
    "int": (torch.int32,),
    "unsigned short": (torch.int16,),
    "unsigned int": (torch.int32,),
    "unsigned long long": (torch.int64,),
}
CANARY_BYTE = 0x7F      # 0x7F7F7F7F is ~3.4e38 as float32: a stray read shows up in any result
CANARY_ELEMS = 64


def parse_kernels(source: str) -> dict[str, list[tuple[str, str]]]:
    """``{kernel: [(c_type, name), ...]}`` of the ``extern "C" __global__`` kernels in
    ``source``; ``c_type`` is normalised (no const/__restrict__, ``*`` kept)."""
    out = {}
    for m in _KERNEL_RE.finditer(source):
        params = []
        for p in m.group(2).split(","):
            p = " ".join(p.replace("*", " * ").split())
            *ty, name = p.split(" ")
            ty = [t for t in ty if t not in ("const", "__restrict__")]
            params.append((" ".join(ty), name))
        out[m.group(1)] = params
    return out


def _launcher_source(cu_path: Path, kernels: dict[str, list[tuple[str, str]]]) -> str:
    lines = [f'#include "{HEADER}"', f'#include "{cu_path}"', ""]
    for name, params in kernels.items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        call = ", ".join(n for _, n in params)
        lines += [
            f"extern \"C\" void emu_launch_{name}(unsigned emu_gx, unsigned emu_gy, unsigned emu_gz,",
            f"    unsigned emu_bx, unsigned emu_by, unsigned emu_bz, {decl}) {{",
            "    gridDim = dim3(emu_gx, emu_gy, emu_gz); blockDim = dim3(emu_bx, emu_by, emu_bz);",
            "    for (unsigned emu_z = 0; emu_z < emu_gz; ++emu_z)",
            "    for (unsigned emu_y = 0; emu_y < emu_gy; ++emu_y)",
            "    for (unsigned emu_x = 0; emu_x < emu_gx; ++emu_x) {",
            "        blockIdx = dim3(emu_x, emu_y, emu_z);",
            "        for (unsigned emu_tz = 0; emu_tz < emu_bz; ++emu_tz)",
            "        for (unsigned emu_ty = 0; emu_ty < emu_by; ++emu_ty)",
            "        for (unsigned emu_tx = 0; emu_tx < emu_bx; ++emu_tx) {",
            "            threadIdx = dim3(emu_tx, emu_ty, emu_tz);",
            f"            {name}({call});",
            "        }",
            "    }",
            "}",
            "",
        ]
    return "\n".join(lines)


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


class EmulatedKernels:
    """The kernels of every ``.cu`` file in ``kernel_dir``, built into ``build_dir``.

    ``threads`` / ``max_blocks`` override the launch geometry of the CUDA path (e.g. a tiny
    grid, to exercise the grid-stride loops); ``defines`` (``"NAME=VALUE"``) are passed to g++
    as ``-D`` options (e.g. to force a kernel's 64-bit indexing path)."""

    def __init__(self, kernel_dir: Path, build_dir: Path, threads: int | None = None,
                 max_blocks: int | None = None, defines: tuple[str, ...] = ()):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++) on PATH")
        self.threads, self.max_blocks = threads, max_blocks
        self.signatures: dict[str, dict[str, list[tuple[str, str]]]] = {}
        self._libs: dict[str, ctypes.CDLL] = {}
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for cu in sorted(Path(kernel_dir).glob("*.cu")):
            kernels = parse_kernels(cu.read_text())
            self.signatures[cu.name] = kernels
            cpp = build_dir / f"{cu.stem}_emu.cpp"
            lib = build_dir / f"lib{cu.stem}_emu.so"
            cpp.write_text(_launcher_source(cu.resolve(), kernels))
            cmd = [cxx, *CXXFLAGS, *(f"-D{d}" for d in defines), "-o", str(lib), str(cpp)]
            jobs.append((cu.name, lib, cmd, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for name, lib, cmd, proc in jobs:
            log, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"emulation build of {name} failed:\n{' '.join(cmd)}\n{log}")
            self._libs[name] = ctypes.CDLL(str(lib))

    def with_geometry(self, threads: int, max_blocks: int) -> "EmulatedKernels":
        other = object.__new__(EmulatedKernels)
        other.__dict__.update(self.__dict__)
        other.threads, other.max_blocks = threads, max_blocks
        return other

    def __call__(self, filename: str, name: str, total: int, args: tuple) -> None:
        from sparse_detector_ros.sparse import cupy_backend as cb
        kw = {}
        if self.threads:
            kw["threads"] = self.threads
        if self.max_blocks:
            kw["max_blocks"] = self.max_blocks
        blocks, threads = cb.launch_dims(total, **kw)
        self.launch(filename, name, (blocks, 1, 1), (threads, 1, 1), args)

    def launch(self, filename: str, name: str, grid, block, args: tuple) -> None:
        params = self.signatures[filename][name]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        cargs, guarded = [], []
        for (ctype, pname), a in zip(params, args):
            if ctype.endswith("*"):
                pointee = ctype[:-1].strip()
                if not isinstance(a, torch.Tensor):
                    raise TypeError(f"{name}: {pname} ({ctype}) needs a tensor, got {type(a)}")
                if a.dtype not in _POINTEES[pointee]:
                    raise TypeError(f"{name}: {pname} ({ctype}) got a {a.dtype} tensor")
                if a.device.type != "cpu" or not a.is_contiguous():
                    raise TypeError(f"{name}: {pname} must be a contiguous CPU tensor")
                buf = torch.empty(a.numel() + 2 * CANARY_ELEMS, dtype=a.dtype)
                buf.view(torch.uint8).fill_(CANARY_BYTE)
                buf[CANARY_ELEMS:CANARY_ELEMS + a.numel()] = a.reshape(-1)
                guarded.append((pname, a, buf))
                cargs.append(ctypes.c_void_p(buf.data_ptr() + CANARY_ELEMS * a.element_size()))
            else:
                ct, npt = _SCALARS[ctype]
                if type(a) is not npt:
                    raise TypeError(f"{name}: {pname} ({ctype}) needs {npt.__name__}, "
                                    f"got {type(a).__name__}")
                cargs.append(ct(a.item()))
        fn = getattr(self._libs[filename], f"emu_launch_{name}")
        fn.restype = None
        dims = [ctypes.c_uint(int(v)) for v in (*grid, *block)]
        fn(*dims, *cargs)
        for pname, a, buf in guarded:
            raw = buf.view(torch.uint8)
            nb = CANARY_ELEMS * a.element_size()
            if not (bool((raw[:nb] == CANARY_BYTE).all()) and bool((raw[-nb:] == CANARY_BYTE).all())):
                raise AssertionError(f"{name} wrote outside {pname}")
            a.reshape(-1).copy_(buf[CANARY_ELEMS:CANARY_ELEMS + a.numel()])
