"""`sparse-detector bench sparse`: MAC-counted ideal, dense-path rows, spread, generated tables.

The benchmark's rows are checked for what they claim (each number follows from the others and
from the MAC formula), never for how fast anything ran.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from sparse_detector_ros.sparse import basic_branch, bottleneck_branch, reduce_mask
from sparse_detector_ros.tools import bench_sparse, bench_tables
from sparse_detector_ros.tools.macs import (ConvSpec, conv_specs, dense_macs, ideal_speedup,
                                            tile_macs)

ROOT = Path(__file__).resolve().parents[1]
SPREAD_FIELDS = ("dense_ms", "sparse_ms", "sparse_path_ms")


def _parser():
    p = argparse.ArgumentParser()
    bench_sparse.add_arguments(p)
    return p


def _run(argv):
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            rc = bench_sparse.run(_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    return rc, [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.fixture(scope="module")
def quick_rows():
    rc, rows = _run(["--quick", "--dense-variants", "channels_last", "nchw"])
    assert rc == 0
    return rows


# ---------------------------------------------------------------- MAC counting


def test_tile_macs_bottleneck_hand_counted():
    # 1x1 64->32 on (16+2)^2 cells, 3x3 32->32 writing 16^2, 1x1 32->64 on 16^2
    specs = conv_specs(bottleneck_branch(64, 32))
    assert tile_macs(specs, 16) == 18 * 18 * 64 * 32 + 16 * 16 * 32 * 32 * 9 + 16 * 16 * 32 * 64
    assert tile_macs(specs, 16) == 3_547_136
    # the halo charged on every conv would be 18^2 * (64*32 + 32*32*9 + 32*64) = 4_313_088
    assert dense_macs(specs, 512, 512) == 512 * 512 * (64 * 32 + 32 * 32 * 9 + 32 * 64)
    ideal = ideal_speedup(specs, 512, 512, 16, 102)
    assert ideal == pytest.approx(3_489_660_928 / (102 * 3_547_136), rel=1e-12)
    assert ideal_speedup(specs, 512, 512, 16, 0) is None


def test_tile_macs_basic_hand_counted():
    # 3x3 16->16 writing (8+2)^2 from a (8+4)^2 window, then 3x3 16->16 writing 8^2
    specs = conv_specs(basic_branch(16))
    assert tile_macs(specs, 8) == 10 * 10 * 16 * 16 * 9 + 8 * 8 * 16 * 16 * 9 == 377_856
    # the halo charged on every conv would be 12^2 * 2 * 16*16*9 = 663_552
    assert dense_macs(specs, 40, 24, batch=2) == 2 * 40 * 24 * 2 * 16 * 16 * 9


def test_tile_macs_dilation_groups_and_rectangular_tiles():
    dil = [ConvSpec(8, 8, (3, 3), dilation=(2, 2)), ConvSpec(8, 4)]   # halo 2 from one conv
    assert tile_macs(dil, 4) == 4 * 4 * 8 * 8 * 9 + 4 * 4 * 8 * 4
    dw = [ConvSpec(8, 8, groups=1), ConvSpec(8, 8, (3, 3), groups=8)]  # depthwise 3x3
    assert tile_macs(dw, 4) == 6 * 6 * 8 * 8 + 4 * 4 * 1 * 8 * 9
    rect = [ConvSpec(4, 4, (3, 1)), ConvSpec(4, 2)]                     # halo (1, 0)
    assert tile_macs(rect, (4, 6)) == 4 * 6 * 4 * 4 * 3 + 4 * 6 * 4 * 2


def test_conv_spec_rejects_bad_convs():
    with pytest.raises(ValueError, match="odd"):
        ConvSpec(4, 4, (2, 2))
    with pytest.raises(ValueError, match="groups"):
        ConvSpec(6, 4, groups=4)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        conv_specs(torch.nn.Sequential(torch.nn.ReLU()))


# ---------------------------------------------------------------- the benchmark's rows


def test_spread_is_min_median_max():
    assert bench_sparse.spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0}
    with pytest.raises(ValueError):
        bench_sparse.spread([])


def test_defaults_repeat_with_warmup():
    a = _parser().parse_args([])
    assert a.repeats >= 5 and a.warmup >= 1
    with pytest.raises(ValueError, match="--repeats"):
        _run(["--sizes", "32", "--channels", "8", "--tiles", "8", "--fractions", "0.5",
              "--repeats", "0"])


def _check_row(r):
    """Every number of a data row follows from the others and from the MAC formula."""
    C, mid, B, size, k = r["channels"], r["mid"], r["tile"], r["size"], r["active_tiles"]
    assert r["branch"] == "bottleneck" and mid == C // 2 and r["halo"] == 1
    assert r["total_tiles"] == math.ceil(size / B) ** 2
    assert r["active"] == round(k / r["total_tiles"], 4)
    for f in SPREAD_FIELDS:
        s = r[f]
        assert set(s) == {"min", "median", "max"}
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert r["speedup"] == round(r["dense_ms"]["median"] / r["sparse_ms"]["median"], 3)
    assert r["sparse_path_speedup"] == round(
        r["dense_ms"]["median"] / r["sparse_path_ms"]["median"], 3)
    # MACs by hand: 1x1 C->mid on (B+2)^2, 3x3 mid->mid and 1x1 mid->C on B^2
    assert r["dense_macs"] == size * size * (C * mid + mid * mid * 9 + mid * C)
    assert r["sparse_macs"] == k * ((B + 2) ** 2 * C * mid + B * B * (mid * mid * 9 + mid * C))
    ideal = r["dense_macs"] / r["sparse_macs"]
    assert r["path"] == ("dense" if r["active"] > r["crossover_setting"] else "sparse")
    if r["path"] == "dense":
        assert r["ideal"] is None and r["efficiency"] is None
    else:
        assert r["ideal"] == round(ideal, 3)
        assert r["efficiency"] == pytest.approx(r["speedup"] / ideal, abs=2e-3)
    assert r["sparse_path_efficiency"] == pytest.approx(r["sparse_path_speedup"] / ideal,
                                                        abs=2e-3)


def test_quick_rows_check_out(quick_rows):
    rows = quick_rows
    run = rows[0]
    assert run["kind"] == "run" and run["repeats"] == 3 and run["warmup"] == 1
    data = [r for r in rows if "kind" not in r]
    assert [(r["tile"], r["target_active"]) for r in data] == [(8, 0.1), (8, 1.0),
                                                                (16, 0.1), (16, 1.0)]
    for r in data:
        _check_row(r)
        assert r["repeats"] == 3 and r["dense_variant"] in ("channels_last", "nchw")
    # 100 % active is above the default crossover (0.8): dense path, no efficiency
    assert [r["path"] for r in data] == ["sparse", "dense", "sparse", "dense"]
    assert all(r["efficiency"] is None for r in data if r["target_active"] == 1.0)
    assert all(r["efficiency"] is not None for r in data if r["target_active"] == 0.1)
    # crossover rows: one per tile, from that tile's rows
    cross = [r for r in rows if r.get("kind") == "crossover"]
    assert [c["tile"] for c in cross] == [8, 16]
    for c in cross:
        x = bench_sparse.crossover_of([r for r in data if r["tile"] == c["tile"]])
        assert c["crossover"] == (round(x, 3) if math.isfinite(x) else None)
    layout = next(r for r in rows if r.get("kind") == "layout")
    for s in layout["sparse_ms"].values():
        assert s["min"] <= s["median"] <= s["max"]
    variants = next(r for r in rows if r.get("kind") == "dense_variants")
    assert variants["fastest"] == min(variants["ms"], key=lambda n: variants["ms"][n]["median"])
    assert all(r["dense_variant"] == variants["fastest"] for r in data)
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["configs"][0]["size"] == 64


def test_rows_with_crossover_above_one_all_report_efficiency():
    rc, rows = _run(["--quick", "--crossover", "1.0", "--dense-variants", "channels_last",
                     "--no-layout-check"])
    data = [r for r in rows if "kind" not in r]
    assert rc == 0 and len(data) == 4
    for r in data:
        _check_row(r)
        assert r["path"] == "sparse" and r["efficiency"] is not None


def test_bev_mask_hits_the_tile_fraction():
    for frac in (0.05, 0.1, 0.4, 1.0):
        m = bench_sparse.bev_mask(96, 80, 16, frac, 0)
        _, k = reduce_mask(m, 16, 16, backend="torch")
        assert abs(k / (6 * 5) - frac) <= 0.5 / 30 + 1e-9
    assert bench_sparse.bev_mask(32, 32, 8, 0.0, 0).sum() == 0


def test_crossover_interpolation():
    assert abs(bench_sparse.crossover_fraction([(0.1, 0.5), (0.5, 1.5)]) - 0.3) < 1e-9
    assert bench_sparse.crossover_fraction([(0.5, 1.5), (0.1, 0.5)]) == pytest.approx(0.3)
    assert bench_sparse.crossover_fraction([(0.1, 1.2), (0.5, 1.5)]) == 0.1
    assert bench_sparse.crossover_fraction([(0.1, 0.2), (0.5, 0.6)]) == pytest.approx(0.9)
    assert bench_sparse.crossover_fraction([(0.1, 0.6), (0.5, 0.2)]) == math.inf


def test_crossover_follows_the_forced_sparse_path():
    def row(k, dense, block, forced):
        return {"active_tiles": k, "total_tiles": 10, "dense_ms": {"median": dense},
                "sparse_ms": {"median": block}, "sparse_path_ms": {"median": forced}}

    # the block's own time (dense switch at 100 %) must not move the crossover
    rows = [row(1, 10.0, 2.0, 5.0), row(5, 10.0, 6.0, 15.0), row(10, 10.0, 10.0, 25.0)]
    assert bench_sparse.crossover_of(rows) == pytest.approx(0.1 + 0.5 * 0.4)


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


# ---------------------------------------------------------------- generated tables


def _s(lo, med, hi):
    return {"min": lo, "median": med, "max": hi}


FIXTURE = [
    {"bench": "sparse", "kind": "run", "branch": "bottleneck", "mid_ratio": 0.5, "repeats": 3,
     "warmup": 1, "threads": 2, "crossover_setting": 0.8, "torch": "2.13.0+cpu",
     "cpu": "Test CPU", "cpu_count": 2},
    {"bench": "sparse", "size": 64, "channels": 16, "branch": "bottleneck", "tile": 8,
     "target_active": 0.1, "dense_ms": _s(1.0, 1.2, 1.5), "sparse_ms": _s(0.2, 0.3, 0.4),
     "sparse_path_ms": _s(0.25, 0.3, 0.35), "path": "sparse", "speedup": 4.0,
     "sparse_path_speedup": 4.0, "ideal": 9.817, "efficiency": 0.407,
     "sparse_path_efficiency": 0.407},
    {"bench": "sparse", "size": 64, "channels": 16, "branch": "bottleneck", "tile": 8,
     "target_active": 1.0, "dense_ms": _s(1.0, 1.1, 1.3), "sparse_ms": _s(1.05, 1.1, 1.2),
     "sparse_path_ms": _s(2.0, 2.2, 2.5), "path": "dense", "speedup": 1.0,
     "sparse_path_speedup": 0.5, "ideal": None, "efficiency": None,
     "sparse_path_efficiency": 0.46},
    {"bench": "sparse", "size": 64, "channels": 16, "branch": "bottleneck", "tile": 16,
     "target_active": 0.1, "dense_ms": _s(1.0, 1.1, 1.2), "sparse_ms": _s(0.24, 0.25, 0.3),
     "sparse_path_ms": _s(0.24, 0.25, 0.3), "path": "sparse", "speedup": 4.4,
     "sparse_path_speedup": 4.4, "ideal": 7.686, "efficiency": 0.572,
     "sparse_path_efficiency": 0.572},
    {"bench": "sparse", "size": 64, "channels": 16, "branch": "bottleneck", "tile": 16,
     "target_active": 1.0, "dense_ms": _s(10.5, 123.5, 150.0),
     "sparse_ms": _s(99.0, 130.0, 140.0), "sparse_path_ms": _s(100.0, 110.0, 120.0),
     "path": "dense", "speedup": 0.949, "sparse_path_speedup": 1.122, "ideal": None,
     "efficiency": None, "sparse_path_efficiency": 1.078},
    {"bench": "sparse", "kind": "layout", "size": 64, "channels": 16, "tile": 16,
     "target_active": 0.1, "sparse_ms": {"nchw": _s(0.6, 0.65, 1.1),
                                         "channels_last": _s(0.5, 0.55, 0.6)}},
    {"bench": "sparse", "kind": "crossover", "size": 64, "channels": 16, "tile": 8,
     "crossover": 0.55},
    {"bench": "sparse", "kind": "crossover", "size": 64, "channels": 16, "tile": 16,
     "crossover": 1.25},
    {"bench": "sparse", "kind": "dense_variants", "size": 64, "channels": 16,
     "ms": {"nchw": _s(0.5, 0.7, 8.5), "channels_last": _s(0.29, 0.3, 0.51)},
     "fastest": "channels_last"},
    {"bench": "sparse", "kind": "summary", "configs": []},
]

RUN_LINE = ("Run: bottleneck branch (mid = 0.5 C), warm-up 1, repeats 3, 2 threads for dense "
            "and sparse, torch\n2.13.0+cpu, CPU Test CPU (2 cores), `sparse.dense_crossover` "
            "0.8.")
LEGEND = """\
Cells read "sparse ms median [min–max], speed-up (efficiency)". Speed-up = median dense / median
sparse, from the same interleaved loop; efficiency = speed-up / ideal, the ideal counted in
multiply-accumulates with the halo charged only on the convs that compute it. Above the crossover
setting the block takes the dense path: no efficiency, and the forced sparse path's speed-up
(efficiency) beside it. The dense column is the median of the rows' dense medians [lowest
min–highest max]. Crossover: the active fraction at which the forced sparse path stops beating dense
(interpolated)."""

EXPECTED_FULL = "\n".join([
    bench_tables.GENERATED, "", RUN_LINE, "", LEGEND, "",
    "| map | C | B | dense ms | 10 % active | 100 % active | crossover |",
    "|---|---|---|---|---|---|---|",
    "| 64² | 16 | 8 | 1.15 [1.00–1.50] | 0.30 [0.20–0.40] ms, ×4.00 (0.41) "
    "| 1.10 [1.05–1.20] ms, ×1.00 dense path; forced sparse ×0.50 (0.46) | 0.55 |",
    "| 64² | 16 | 16 | 62.3 [1.00–150] | 0.25 [0.24–0.30] ms, ×4.40 (0.57) "
    "| 130 [99.0–140] ms, ×0.95 dense path; forced sparse ×1.12 (1.08) "
    "| > 1 (extrapolated 1.25) |",
    "",
    "Layout: the sparse block (forced) at 10 % active, B = 16, on an NCHW-stored against a\n"
    "channels_last-stored map, and the dense variants (ms, median [min–max]):",
    "",
    "| map | C | sparse NCHW | sparse channels_last | dense NCHW | dense channels_last "
    "| dense mkldnn | fastest dense |",
    "|---|---|---|---|---|---|---|---|",
    "| 64² | 16 | 0.65 [0.60–1.10] | 0.55 [0.50–0.60] | 0.70 [0.50–8.50] | 0.30 [0.29–0.51] "
    "| – | channels_last |",
    ""])

EXPECTED_HEADLINE = "\n".join([
    bench_tables.GENERATED, "", RUN_LINE, "",
    "Speed-up (efficiency) at B = 16, from the medians of the repeats; efficiency against the "
    "MAC-counted\nideal; \"dense\": the block took the dense path:",
    "",
    "| map × C | dense ms | 10 % | 100 % | best tile at 10 % |",
    "|---|---|---|---|---|",
    "| 64²×16 | 62.3 [1.00–150] | ×4.40 (0.57) | ×0.95 dense | ×4.40 (0.57), B=16 |",
    ""])


@pytest.fixture
def fixture_jsonl(tmp_path):
    p = tmp_path / "bench.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in FIXTURE) + "\n\n", encoding="utf-8")
    return p


def test_tables_from_fixed_jsonl(fixture_jsonl):
    rows = bench_tables.load_rows(fixture_jsonl)
    assert rows == FIXTURE
    assert bench_tables.render_full(rows) == EXPECTED_FULL
    assert bench_tables.render_headline(rows) == EXPECTED_HEADLINE
    # without tile 16 the headline takes the run's middle tile
    no16 = [r for r in rows if r.get("tile") != 16 or "kind" in r]
    assert "at B = 8, from the medians" in bench_tables.render_headline(no16)


def test_no_measurement_gives_the_placeholder(tmp_path):
    assert bench_tables.load_rows(tmp_path / "missing.jsonl") == []
    for render in (bench_tables.render_full, bench_tables.render_headline):
        text = render([])
        assert "Regenerate with" in text
        assert all(part in text for part in bench_tables.FULL_RUN.split(" && "))
        assert render(FIXTURE[:1]) == text          # a run row but no data rows


def test_bad_input_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"bench": "sparse", "kind": "run"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        bench_tables.load_rows(p)
    with pytest.raises(ValueError, match="before the first 'run' row"):
        bench_tables.render_full(FIXTURE[1:])


def test_replace_block_touches_only_the_block():
    m = ("<!-- a -->", "<!-- b -->")
    text = "head\n<!-- a -->\nold\ntable\n<!-- b -->\ntail\n"
    new = bench_tables.replace_block(text, m, "new\n")
    assert new == "head\n<!-- a -->\nnew\n<!-- b -->\ntail\n"
    assert bench_tables.block_of(new, m) == "new\n"
    with pytest.raises(ValueError, match="exactly one"):
        bench_tables.block_of("head\n<!-- a -->\n", m)
    with pytest.raises(ValueError, match="comes before"):
        bench_tables.block_of("<!-- b -->\n<!-- a -->\n", m)


def test_update_docs_rewrites_and_checks(tmp_path, fixture_jsonl):
    (tmp_path / "docs").mkdir()
    docs = tmp_path / "docs" / "sparse_engine.md"
    readme = tmp_path / "README.md"
    docs.write_text("intro\n" + "\n".join(bench_tables.DOCS_MARKERS) + "\nafter\n")
    readme.write_text("top\n" + "\n".join(bench_tables.README_MARKERS) + "\nend\n")
    rows = bench_tables.load_rows(fixture_jsonl)
    assert bench_tables.update_docs(tmp_path, rows, check=True) == [str(docs), str(readme)]
    assert bench_tables.update_docs(tmp_path, rows) == [str(docs), str(readme)]
    assert bench_tables.update_docs(tmp_path, rows, check=True) == []
    assert bench_tables.block_of(docs.read_text(), bench_tables.DOCS_MARKERS) == EXPECTED_FULL
    assert readme.read_text().startswith("top\n") and readme.read_text().endswith("\nend\n")
    # the script: --check fails on a hand edit inside the block
    docs.write_text(docs.read_text().replace("×4.40 (0.57)", "×9.99 (0.99)"))
    res = subprocess.run([sys.executable, "scripts/bench_tables.py", str(fixture_jsonl),
                          "--root", str(tmp_path), "--check"],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert res.returncode == 1 and "out of date" in res.stdout and "sparse_engine.md" in res.stdout


def test_docs_tables_are_generated_from_the_committed_jsonl():
    """README.md and docs/sparse_engine.md hold exactly what the generator makes of
    docs/bench_sparse.jsonl: a hand edit of either table fails here (fix: rerun
    `python scripts/bench_tables.py`)."""
    assert bench_tables.update_docs(ROOT, check=True) == []
