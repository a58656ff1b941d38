"""Smoke test of `sparse-detector bench sparse --quick` (JSON keys only, never timings)."""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

from sparse_detector_ros.tools import bench_sparse

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"bench", "size", "channels", "tile", "halo", "active", "target_active", "dense_ms",
            "dense_variant", "sparse_ms", "sparse_path_ms", "path", "speedup", "ideal",
            "efficiency", "threads"}


def _run(argv):
    p = argparse.ArgumentParser()
    bench_sparse.add_arguments(p)
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            rc = bench_sparse.run(p.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    return rc, [json.loads(line) for line in buf.getvalue().splitlines()]


def test_quick_bench_prints_json_rows():
    rc, rows = _run(["--quick", "--dense-variants", "channels_last", "nchw"])
    assert rc == 0
    data = [r for r in rows if "kind" not in r]
    assert len(data) == 2 * 2   # 2 tiles x 2 fractions
    for r in data:
        assert ROW_KEYS <= r.keys()
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0
        assert 0 < r["active"] <= 1 and r["dense_variant"] in ("channels_last", "nchw")
        assert r["path"] == ("dense" if r["active"] > 0.6 else "sparse")
    full = [r for r in data if r["target_active"] == 1.0]
    assert all(r["active"] == 1.0 and r["path"] == "dense" for r in full)
    kinds = {r.get("kind") for r in rows}
    assert {"crossover", "dense_variants", "layout", "summary"} <= kinds
    layout = next(r for r in rows if r.get("kind") == "layout")
    assert set(layout["sparse_ms"]) == {"nchw", "channels_last"}
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["configs"][0]["size"] == 64


def test_bev_mask_hits_the_tile_fraction():
    for frac in (0.05, 0.1, 0.4, 1.0):
        m = bench_sparse.bev_mask(96, 80, 16, frac, 0)
        from sparse_detector_ros.sparse import reduce_mask
        _, k = reduce_mask(m, 16, 16, backend="torch")
        assert abs(k / (6 * 5) - frac) <= 0.5 / 30 + 1e-9
    assert bench_sparse.bev_mask(32, 32, 8, 0.0, 0).sum() == 0


def test_crossover_interpolation():
    assert abs(bench_sparse._crossover([(0.1, 0.5), (0.5, 1.5)]) - 0.3) < 1e-9
    assert bench_sparse._crossover([(0.1, 1.2), (0.5, 1.5)]) == 0.1
    assert bench_sparse._crossover([(0.1, 0.2), (0.5, 0.6)]) > 0.5


def test_cli_registration():
    out = subprocess.run([sys.executable, "-m", "sparse_detector_ros.cli", "bench", "sparse",
                          "--help"], capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--repeats" in out.stdout
    out = subprocess.run([sys.executable, "bench/bench_sparse.py", "--help"],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == 0 and "--tiles" in out.stdout


def test_make_sparse_figure(tmp_path):
    out = tmp_path / "fig.png"
    res = subprocess.run([sys.executable, "scripts/make_sparse_figure.py", "--out", str(out),
                          "--size", "64"], capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 1000
