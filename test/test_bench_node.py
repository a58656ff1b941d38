"""`sparse-detector bench soak` and `sparse-detector bench node`: the rows say what they claim.

The numbers are checked against each other (growth and drift follow from the values they are
computed from, the node's frame counters add up, every processed frame has a latency), never
against how fast anything ran.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from sparse_detector_ros import cli
from sparse_detector_ros.tools import bench_node, bench_soak

ROOT = Path(__file__).resolve().parents[1]
STATS = ("p50", "p90", "p99", "min", "max")


def _cli_rows(argv: list[str]) -> tuple[int, list[dict]]:
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            rc = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, [json.loads(line) for line in buf.getvalue().splitlines()]


def _ordered(stats: dict) -> bool:
    return stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


# ------------------------------------------------------------------------------------ soak

def test_soak_row_growth_drift_and_targets_follow_from_the_samples():
    times = [10.0] * 4 + [12.0] * 4          # the last window 20 % slower
    rss = [(4, 100_000), (8, 106_000)]      # 6 % growth
    row = bench_soak.soak_row(times, rss, window=4, rss_peak_kib=107_000)
    assert row["p50_drift_pct"] == pytest.approx(20.0)
    assert row["p99_drift_pct"] == pytest.approx(20.0)
    assert row["rss_growth_pct"] == pytest.approx(6.0)
    assert row["met"] == {"rss_growth": False, "p99_drift": False, "all": False}
    assert [b["frames"] for b in row["blocks"]] == [[1, 4], [5, 8]]

    steady = bench_soak.soak_row([10.0] * 8, [(4, 100_000), (8, 100_500)], 4, 100_500)
    assert steady["rss_growth_pct"] == pytest.approx(0.5)
    assert steady["p99_drift_pct"] == 0.0
    assert steady["met"] == {"rss_growth": True, "p99_drift": True, "all": True}
    faster = bench_soak.soak_row([12.0] * 4 + [10.0] * 4, [(4, 1000), (8, 1000)], 4, 1000)
    assert faster["p99_drift_pct"] < 0 and faster["met"]["p99_drift"]


def test_soak_row_refuses_windows_and_samples_that_do_not_fit():
    with pytest.raises(ValueError, match="window of 5 frames"):
        bench_soak.soak_row([1.0] * 8, [(5, 1), (8, 1)], 5, 1)
    with pytest.raises(ValueError, match="RSS samples at frames 4 and 8"):
        bench_soak.soak_row([1.0] * 8, [(8, 1)], 4, 1)


def test_proc_readers_read_this_process():
    rss = bench_soak.proc_status_kib("VmRSS")
    assert bench_soak.proc_status_kib("VmHWM") >= rss > 0
    assert bench_node.cpu_seconds(os.getpid()) > 0
    with pytest.raises(RuntimeError, match="no NoSuchKey line"):
        bench_soak.proc_status_kib("NoSuchKey")


def test_bench_soak_prints_consistent_json():
    # one torch thread: on a CPU shared with other work two threads can stall each other
    rc, rows = _cli_rows(["bench", "soak", "--frames", "30", "--scans", "2", "--scenes", "1",
                          "--warmup", "0", "--threads", "1"])
    assert rc == 0
    assert [r["bench"] for r in rows] == ["run", "soak", "summary"]
    run, soak, summary = rows
    assert run["frames"] == 30 and run["scans"] == 2 and run["points_mean"] > 100_000
    assert run["threads"] == 1 and len(run["loadavg_start"]) == 3
    assert soak["frames"] == 30 and soak["window"] == 15          # at most half the frames
    for key in ("ms_first", "ms_last"):
        assert set(soak[key]) == set(STATS) and _ordered(soak[key])
    rss = dict(soak["rss_mib"])
    assert sorted(rss) == [15, 30]
    assert soak["rss_mib_first"] == rss[15] and soak["rss_mib_end"] == rss[30]
    assert soak["rss_growth_pct"] == pytest.approx(
        (rss[30] - rss[15]) / rss[15] * 100, abs=0.01)
    assert soak["rss_peak_mib"] >= soak["rss_mib_end"]
    first, last = soak["ms_first"], soak["ms_last"]
    assert soak["p99_drift_pct"] == pytest.approx((last["p99"] - first["p99"]) / first["p99"]
                                                  * 100, abs=1e-3)
    assert soak["p50_drift_pct"] == pytest.approx((last["p50"] - first["p50"]) / first["p50"]
                                                  * 100, abs=1e-3)
    assert [b["frames"] for b in soak["blocks"]] == [[1, 15], [16, 30]]
    assert soak["blocks"][0]["p99"] == first["p99"] and soak["blocks"][1]["p99"] == last["p99"]
    targets = soak["targets"]
    assert soak["met"]["rss_growth"] == (soak["rss_growth_pct"] < targets["rss_growth_pct"])
    assert soak["met"]["p99_drift"] == (soak["p99_drift_pct"] < targets["p99_drift_pct"])
    assert summary["met"] == soak["met"]["all"] == (soak["met"]["rss_growth"]
                                                    and soak["met"]["p99_drift"])


@pytest.mark.parametrize("script", ["bench_soak.py", "bench_node.py"])
def test_bench_wrappers_show_their_options(script):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("--frames" if script == "bench_soak.py" else "--seconds") in out.stdout


# ------------------------------------------------------------------------------------ node

def _diag(received, processed, dropped, rejected, **extra):
    return {"frames_received": str(received), "frames_processed": str(processed),
            "frames_dropped": str(dropped), "frames_rejected": str(rejected), **extra}


def test_node_row_counts_the_run_only_and_judges_the_target():
    before = _diag(10, 9, 1, 0)
    after = _diag(108, 104, 3, 1, total_ms_p99="41.0")
    row = bench_node.mode_row("occupancy", 100, before, after, [40.0] * 91 + [60.0] * 4,
                              cpu_s=5.0, wall_s=10.0, send_s=10.0, probe_cpu_s=1.0,
                              rss_kib=2048, rss_peak_kib=4096)
    assert row["frames"] == {"sent": 100, "received": 98, "processed": 95, "dropped": 2,
                             "rejected": 1, "lost": 2, "outputs": 95}
    assert row["cpu_percent"] == 50.0 and row["probe_cpu_percent"] == 10.0
    assert row["rss_mib"] == 2.0 and row["rss_peak_mib"] == 4.0
    assert row["node_diagnostics"] == {"total_ms_p99": "41.0"}
    assert not row["target_met"] and not row["aim_met"]          # drops and losses

    assert row["active_fraction_mean"] is None                   # no diagnostics in between
    during = [_diag(12, 12, 0, 0, frames_in_window="3", active_fraction="0.2"),
              _diag(15, 15, 0, 0, frames_in_window="1", active_fraction="0.6"),
              _diag(15, 15, 0, 0, frames_in_window="0", active_fraction="0.000")]
    clean = bench_node.mode_row("dense", 10, _diag(5, 5, 0, 0), _diag(15, 15, 0, 0),
                                [30.0] * 9 + [70.0], 1.0, 1.0, 1.0, 0.1, 1024, 1024, during)
    assert clean["active_fraction_mean"] == pytest.approx(0.3)   # weighted by frames
    assert clean["frames"]["lost"] == 0 and clean["latency_ms"]["max"] == 70.0
    assert clean["target_met"] and not clean["aim_met"]          # p99 between 50 and 100 ms
    slow = bench_node.mode_row("dense", 10, _diag(5, 5, 0, 0), _diag(15, 15, 0, 0),
                               [120.0] * 10, 1.0, 1.0, 1.0, 0.1, 1024, 1024)
    assert not slow["target_met"]
    # a node that counts its own lost frames is believed
    own = bench_node.mode_row("dense", 10, _diag(5, 5, 0, 0, frames_lost="1"),
                              _diag(15, 15, 0, 0, frames_lost="4"), [1.0] * 10, 1, 1, 1, 0,
                              1, 1)
    assert own["frames"]["lost"] == 3


def test_bench_node_refuses_a_map_mask_over_several_scenes():
    p = argparse.ArgumentParser()
    bench_node.add_arguments(p)
    with pytest.raises(SystemExit, match="needs --scenes 1"):
        bench_node.run(p.parse_args(["--modes", "map_prior", "--scenes", "2"]))


@pytest.mark.ros
def test_bench_node_counters_add_up_and_every_processed_frame_has_a_latency():
    out = subprocess.run(
        [sys.executable, "-m", "sparse_detector_ros.cli", "bench", "node", "--seconds", "3",
         "--modes", "occupancy", "--scans", "2", "--scenes", "1", "--warmup", "3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["bench"] for r in rows] == ["run", "node", "summary"]
    run, node, summary = rows
    assert run["modes"] == ["occupancy"] and run["points_mean"] > 100_000
    f = node["frames"]
    assert f["sent"] == 30
    assert f["sent"] >= f["received"] >= f["processed"] + f["dropped"]
    assert f["received"] == f["processed"] + f["dropped"] + f["rejected"]
    assert f["lost"] == f["sent"] - f["received"]
    assert f["processed"] > 0 and f["rejected"] == 0
    assert f["outputs"] == f["processed"]              # a latency for every processed frame
    lat = node["latency_ms"]
    assert set(lat) == set(STATS) and _ordered(lat) and lat["min"] > 0
    assert node["node_diagnostics"]["mask_mode"] == "occupancy"
    assert 0 < node["active_fraction_mean"] <= 1
    assert node["cpu_percent"] > 0 and node["rss_mib"] > 0
    assert node["rss_peak_mib"] >= node["rss_mib"]
    assert node["target_met"] == (lat["p99"] <= summary["targets"]["p99_ms_max"]
                                  and f["dropped"] == 0 and f["lost"] == 0)
    assert summary["target_met"] == {"occupancy": node["target_met"]}
    assert summary["p99_ms"] == {"occupancy": lat["p99"]}


def test_probe_without_kept_messages_records_arrivals_only():
    from types import SimpleNamespace

    from sparse_detector_ros.tools.node_client import Probe

    stamp = SimpleNamespace(sec=3, nanosec=500)
    msg = SimpleNamespace(header=SimpleNamespace(stamp=stamp))
    for keep in (False, True):
        probe = Probe(keep_messages=keep)
        try:
            probe._on_objects(msg)
            probe._on_markers(msg)
            probe._on_mask(msg)
            assert list(probe.arrivals) == [3_000_000_500]       # the arrival is recorded
            kept = [probe.objects, probe.markers, probe.masks]
            assert kept == ([[msg]] * 3 if keep else [[], [], []])
        finally:
            probe.close()
