"""The CUDA kernels compile with NVRTC for every GPU generation the project targets, with the
exact options the CuPy backend uses at run time; the kernel sources follow the project's
rules and are found where the backend looks for them. No GPU needed: NVRTC is a library.
CuPy's NVRTC bindings and libnvrtc are pinned test requirements (``cupy-cuda13x``,
``nvidia-cuda-nvrtc``): when they do not load, these tests fail, they do not skip.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

from sparse_detector_ros.sparse import cupy_backend as cb

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("75", "80", "86", "87", "89", "90")


def _load_emu():
    spec = importlib.util.spec_from_file_location("kernel_emu",
                                                  ROOT / "test" / "emu" / "kernel_emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nvrtc():
    from cupy_backends.cuda.libs import nvrtc
    nvrtc.getVersion()  # loads libnvrtc; raises when it is missing
    return nvrtc


def _compile(nvrtc, source: str, name: str, options: tuple[str, ...]):
    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as e:
            pytest.fail(f"NVRTC failed on {name} with {options}: {e}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog)
        cubin = any(o.startswith("-arch=sm_") for o in options)
        binary = nvrtc.getCUBIN(prog) if cubin else nvrtc.getPTX(prog)
        return binary, log
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(cb.KERNELS))
def test_kernels_compile_for_arch(filename, arch):
    nvrtc = _nvrtc()
    options = cb.nvrtc_compile_options(arch)
    assert options[:len(cb.NVRTC_OPTIONS)] == cb.NVRTC_OPTIONS
    cubin, log = _compile(nvrtc, cb.kernel_source(filename), filename, options)
    assert "warning" not in log.lower(), log
    assert cubin[:4] == b"\x7fELF", "NVRTC did not produce a cubin"
    for kernel in cb.KERNELS[filename]:   # extern "C": unmangled symbols in the cubin
        assert kernel.encode() + b"\0" in cubin, f"{kernel} missing from the {arch} cubin"


def test_add_kernels_use_atomics_and_copies_do_not():
    """Serial CPU emulation cannot tell an atomicAdd from a plain +=; the PTX can."""
    nvrtc = _nvrtc()
    options = tuple(o for o in cb.nvrtc_compile_options("80")
                    if not o.startswith("-arch")) + ("-arch=compute_80",)
    ptx, _ = _compile(nvrtc, cb.kernel_source("sparse_scatter.cu"), "sparse_scatter.cu", options)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    bodies = dict(re.findall(r"\.entry\s+(\w+)\s*\((.*?)\n}", ptx, re.S))
    assert set(bodies) == set(cb.KERNELS["sparse_scatter.cu"])
    for name, body in bodies.items():
        atomic = re.search(r"\b(red|atom)\.global\.add\.(f32|f64)", body)
        if "_add_" in name:
            assert atomic and atomic.group(2) == name[-3:], f"{name} does not add atomically"
        else:
            assert not re.search(r"\b(red|atom)\.", body), f"{name} uses atomics"


def test_runtime_options_match_cupy():
    """nvrtc_compile_options mirrors what cupy.RawModule hands NVRTC: our NVRTC_OPTIONS, then
    -ftz=true, -arch=sm_XX and --device-as-default-execution-space (cupy.cuda.compiler)."""
    from cupy.cuda import compiler
    src = inspect.getsource(compiler)
    for opt in cb.CUPY_ADDED_OPTIONS:
        assert f"'{opt}'" in src, f"CuPy no longer adds {opt}; update nvrtc_compile_options"
    assert "f'-arch=sm_{arch}'" in src
    for arch in ARCHS:  # CuPy compiles to a cubin (-arch=sm_XX) for every target NVRTC knows
        assert int(arch) <= int(compiler._get_max_compute_capability())
    opts = cb.nvrtc_compile_options("86")
    assert set(cb.CUPY_ADDED_OPTIONS) <= set(opts) and "-arch=sm_86" in opts


# --------------------------------------------------------------------------------------------
# source rules
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", sorted(cb.KERNELS))
def test_kernel_sources_follow_the_rules(filename):
    src = (ROOT / "kernels" / filename).read_text()
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", src, flags=re.S)
    assert "#include" not in code, "kernels must not include headers (NVRTC and the emulation)"
    for banned in ("__shared__", "__syncthreads", "__shfl", "__syncwarp", "cooperative_groups"):
        assert banned not in code, f"{banned}: threads must be independent (serial CPU emulation)"
    assert code.count("__global__") == len(re.findall(r'extern\s+"C"\s+__global__', code))
    kernels = _load_emu().parse_kernels(src)
    assert sorted(kernels) == sorted(cb.KERNELS[filename])
    # one op, one parameter list: the variants differ only in element types
    names = {tuple(n for _, n in params) for params in kernels.values()}
    assert len(names) == 1


# --------------------------------------------------------------------------------------------
# kernel_dir(): source tree, ament share directory, sys.prefix share directory
# --------------------------------------------------------------------------------------------

def _fake_kernels(d: Path, files=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in files if files is not None else cb.KERNELS:
        (d / f).write_text("// test copy\n")
    return d


@pytest.fixture
def no_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSE_DETECTOR_KERNEL_DIR", raising=False)
    monkeypatch.setattr(cb, "source_kernel_dir", lambda: tmp_path / "no_checkout" / "kernels")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty_prefix"))
    return tmp_path


def _fake_ament(monkeypatch, share: Path | None):
    def get_package_share_directory(name):
        if share is None or name != cb.PACKAGE:
            raise LookupError(f"package '{name}' not found")  # ament raises PackageNotFoundError
        return str(share)
    pkg = types.ModuleType("ament_index_python")
    mod = types.ModuleType("ament_index_python.packages")
    mod.get_package_share_directory = get_package_share_directory
    pkg.packages = mod
    monkeypatch.setitem(sys.modules, "ament_index_python", pkg)
    monkeypatch.setitem(sys.modules, "ament_index_python.packages", mod)


def test_kernel_dir_in_source_tree(monkeypatch):
    monkeypatch.delenv("SPARSE_DETECTOR_KERNEL_DIR", raising=False)
    assert cb.kernel_dir() == ROOT / "kernels"


def test_kernel_dir_env_override(monkeypatch, tmp_path):
    d = _fake_kernels(tmp_path / "k")
    monkeypatch.setenv("SPARSE_DETECTOR_KERNEL_DIR", str(d))
    assert cb.kernel_dir() == d


def test_kernel_dir_from_ament_share(monkeypatch, no_source_tree):
    share = no_source_tree / "install" / "share" / cb.PACKAGE
    _fake_kernels(share / "kernels")
    _fake_ament(monkeypatch, share)
    assert cb.kernel_dir() == share / "kernels"


def test_kernel_dir_from_sys_prefix(monkeypatch, no_source_tree):
    _fake_ament(monkeypatch, None)  # ament present but the package is not in its index
    d = _fake_kernels(Path(sys.prefix) / "share" / cb.PACKAGE / "kernels")
    assert cb.kernel_dir() == d
    monkeypatch.setitem(sys.modules, "ament_index_python", None)  # no ament at all
    monkeypatch.setitem(sys.modules, "ament_index_python.packages", None)
    assert cb.kernel_dir() == d


def test_kernel_dir_missing_or_incomplete(monkeypatch, no_source_tree):
    _fake_ament(monkeypatch, None)
    _fake_kernels(Path(sys.prefix) / "share" / cb.PACKAGE / "kernels", files=["reduce_mask.cu"])
    with pytest.raises(FileNotFoundError, match="not found in") as e:
        cb.kernel_dir()
    assert "no_checkout" in str(e.value) and "empty_prefix" in str(e.value)
    assert cb.available() is False


def test_setup_installs_the_kernels():
    setup = (ROOT / "setup.py").read_text()
    assert re.search(r'"share/"\s*\+\s*package_name\s*\+\s*"/kernels",\s*glob\("kernels/\*\.cu"\)',
                     setup)
