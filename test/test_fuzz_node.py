"""Fuzzing and overload of the running node over DDS (``tools/fuzz.py``,
``tools/bench_overload.py``): a seeded set of generated malformed clouds of every kind, a flood of
tiny malformed clouds, and 120k-point clouds at three times the node's measured capacity.

The first tests check the generators without ROS (every kind drawn, deterministic for a seed, and
the cases are what they claim to be, judged by ``pointcloud.decode``); the node tests assert
behaviour only: outcomes and counters, never wall-clock times (the overload's latency bound is
derived from the node's own measured per-frame time under that load)."""
import json
import os

import numpy as np
import pytest

from sparse_detector_ros.pointcloud import CloudError, decode
from sparse_detector_ros.tools.bench_overload import rss_kb, run_overload
from sparse_detector_ros.tools.fuzz import (FLOOD_KINDS, INTERNAL_ERROR, KINDS,
                                            TWO_MILLION_EVERY, Counters, FuzzCase, _expected,
                                            _outcome, allocate, generate_cases, run_fuzz)

SEED = 20261129
CI_CASES = 5 * len(KINDS)  # every kind five times (two_million once)
FLOOD = 500


# ------------------------------------------------------------------------ generators, no ROS

def test_allocation_covers_every_kind_and_caps_two_million():
    per = allocate(CI_CASES)
    assert sum(per.values()) == CI_CASES and set(per) == set(KINDS)
    assert min(per.values()) >= 1 and per["two_million"] == 1
    per = allocate(1000)
    assert sum(per.values()) == 1000 and per["two_million"] == 1000 // TWO_MILLION_EVERY
    assert allocate(3) == {k: int(k in KINDS[:3]) for k in KINDS}


def test_cases_are_deterministic_for_a_seed():
    a = [c.describe() for c in generate_cases(CI_CASES, SEED)]
    b = [c.describe() for c in generate_cases(CI_CASES, SEED)]
    assert a == b
    assert {d["kind"] for d in a} == set(KINDS)
    assert a != [c.describe() for c in generate_cases(CI_CASES, SEED + 1)]


def _decode(case: FuzzCase):
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # garbage bytes cast to float32
            return decode(case.to_msg())
    except CloudError as exc:
        return exc.kind


def test_cases_are_what_they_claim_to_be():
    """Judged by ``pointcloud.decode``: the malformed kinds it checks are refused; the
    well-formed kinds decode to exactly the values the case wrote (so the node's 'processed'
    expectation is about the node, not about a broken generator)."""
    cases = [c for c in generate_cases(4 * CI_CASES, SEED) if c.kind != "two_million"]
    refused = {"bad_length": "bad_length", "bad_row_step": "bad_row_step",
               "big_endian": "big_endian", "missing_field": "missing_field"}
    seen = set()
    for case in cases:
        got = _decode(case)
        if case.kind in refused:
            assert got == refused[case.kind], case.describe()
        elif case.kind in ("odd_layout", "huge_coords") or (
                case.kind == "absurd_stamp" and case.expect == "processed"):
            assert not isinstance(got, str), (got, case.describe())
            want = case.values()[:, :3].astype(np.float32)
            assert got.shape == (case.points, 4)
            np.testing.assert_array_equal(got[:, :3], want)
        elif case.kind == "nan_inf" and not case.is_dense:
            # decode drops the points with a non-finite coordinate: none left <=> rejected
            assert (isinstance(got, str) or len(got) == 0) == (case.expect == "rejected"), \
                case.describe()
        elif case.kind == "zero_points":
            assert isinstance(got, str) or len(got) == 0, case.describe()
        seen.add(case.kind)
    assert seen == set(KINDS) - {"two_million"}
    # the nan_inf and absurd_stamp kinds produce both outcomes
    for kind in ("nan_inf", "absurd_stamp"):
        assert {c.expect for c in cases if c.kind == kind} == {"processed", "rejected"}, kind


def test_two_million_case_builds_a_full_size_cloud():
    case = next(c for c in generate_cases(len(KINDS), SEED) if c.kind == "two_million")
    points = _decode(case)
    assert points.shape == (2_000_000, 4)
    np.testing.assert_array_equal(points[:, :3], case.values()[:, :3].astype(np.float32))


def test_flood_cases_are_tiny_and_all_malformed():
    cases = generate_cases(FLOOD, SEED, FLOOD_KINDS, max_points=8)
    assert len(cases) == FLOOD and {c.kind for c in cases} == set(FLOOD_KINDS)
    assert all(c.points <= 8 and c.expect == "rejected" for c in cases)


def test_outcome_of_counter_deltas():
    def delta(**kw):
        return Counters(**kw)

    assert _outcome(delta(received=1, processed=1)) == "processed"
    assert _outcome(delta(received=1, rejected=1, by_kind={"bad_length": 1})) == \
        "rejected.bad_length"
    assert _outcome(delta(lost=1)) == "lost"
    assert _outcome(delta(received=1, dropped=1)) == "dropped"
    assert _outcome(delta(received=2, processed=1, rejected=1,
                          by_kind={"empty": 1})).startswith("unclear")
    case = generate_cases(1, SEED, ("bad_length",))[0]
    assert _expected(case, "rejected.bad_length")
    assert not _expected(case, "processed")
    assert not _expected(case, "rejected." + INTERNAL_ERROR)  # a node bug is not a rejection
    before = Counters(received=3, processed=1, rejected=2, by_kind={"empty": 2})
    after = Counters(received=5, processed=2, rejected=3, by_kind={"empty": 2, "big_endian": 1})
    assert after.minus(before).by_kind == {"big_endian": 1} and after.settled


def test_rss_of_this_process():
    assert rss_kb(os.getpid()) > 0
    assert rss_kb(2**22 + 12345) is None  # no such process


# --------------------------------------------------------------------------- the running node

def _dump(report: dict) -> str:
    return json.dumps(report, indent=1, default=str)[-6000:]


@pytest.fixture(scope="module")
def fuzz_report():
    """One node, started with tools.fuzz.FUZZ_PARAMS (reliable, deep queue): the seeded cases,
    a good scan, the flood of tiny malformed clouds, a good scan again, SIGINT."""
    return run_fuzz(CI_CASES, SEED, flood_count=FLOOD)


@pytest.mark.ros
def test_fuzzed_clouds_are_counted_by_kind_and_good_scans_still_detected(fuzz_report):
    r = fuzz_report
    assert r["cases"] == CI_CASES and set(r["by_kind"]) == set(KINDS), _dump(r)
    assert r["crashes"] == 0, _dump(r)
    assert r["unexpected"] == [], _dump(r)  # every case got the outcome it expects
    outcomes = {o for row in r["by_kind"].values() for o in row["outcomes"]}
    assert "processed" in outcomes and {"crash", "unaccounted"}.isdisjoint(outcomes), _dump(r)
    # every rejected frame is counted under its kind, with a reason
    node = r["node"]
    by_kind = {k: v for k, v in node.items() if k.startswith("rejected.")}
    assert r["rejected_sum_matches"] and sum(by_kind.values()) == node["frames_rejected"]
    assert node["frames_rejected"] >= sum(row["sent"] for k, row in r["by_kind"].items()
                                          if k in FLOOD_KINDS), _dump(r)
    assert r["rejections_without_reason"] == 0 and all(r["reasons"].values()), _dump(r)
    assert f"rejected.{INTERNAL_ERROR}" not in node, _dump(r)
    # every cloud sent over reliable QoS is accounted for
    assert r["accounted"], _dump(r)
    assert node["frames_received"] + node.get("frames_lost", 0) == r["clouds_sent"]
    assert node["frames_processed"] + node["frames_dropped"] + node["frames_rejected"] == \
        node["frames_received"]
    # stamps far from the node's clock are processed, but counted as a clock problem; no other
    stamps = r["by_kind"]["absurd_stamp"]
    assert stamps["clock_skew"] == stamps["outcomes"].get("processed", 0) >= 1, _dump(r)
    assert all(row["clock_skew"] == 0 for k, row in r["by_kind"].items()
               if k != "absurd_stamp"), _dump(r)
    assert r["detections_after"] >= 1, _dump(r)  # good frames that follow are still detected
    assert r["node_alive"] and r["exit_code"] == 0, _dump(r)


@pytest.mark.ros
def test_flood_of_tiny_malformed_clouds_is_accounted_for(fuzz_report):
    f = fuzz_report["flood"]
    assert f["accounted"], _dump(fuzz_report)
    assert f["sent"] == FLOOD == f["received"] + f["lost"], f
    assert f["processed"] == 0, f  # none of them is a cloud to detect in
    assert f["rejected"] + f["dropped"] == f["received"], f
    assert f["rejected"] >= 1 and sum(f["rejected_by_kind"].values()) == f["rejected"], f
    assert fuzz_report["detections_after_flood"] >= 1, _dump(fuzz_report)  # still responsive


@pytest.mark.ros
def test_overload_drops_old_frames_keeps_latency_bounded_and_memory_flat():
    # A queue deep enough for the executor's stalls on a loaded machine: with the default depth
    # (5) a stalled executor lets DDS overwrite clouds in the queue, unreported (the bench shows
    # them as unreported_loss); this test is about the node's own newest-frame-only handling.
    r = run_overload(seconds=8.0, factor=3.0, points=120_000, capacity_frames=4, warmup=2,
                     qos_depth=100)
    f = r["frames"]
    assert r["accounted"] and f["unreported_loss"] == 0, _dump(r)
    assert f["sent"] == f["received"] + f["lost"], _dump(r)
    assert f["received"] == f["processed"] + f["dropped"] + f["rejected"], _dump(r)
    assert f["rejected"] == 0 and f["processed"] >= 2, _dump(r)
    assert f["dropped"] > 0, _dump(r)  # three times too many clouds: the old ones are dropped
    assert f["outputs"] == f["processed"], _dump(r)  # every processed frame was published
    # newest-frame-only: a cloud waits at most for the frame in hand, so its latency stays
    # within a few of the node's own cycles (measured under this load), instead of growing
    # with a backlog (about 2/3 of the elapsed time at 3x)
    assert r["latency_within_bound"], _dump(r)
    assert r["latency_ms"]["max"] <= r["latency_bound_ms"], _dump(r)
    assert r["rss_mb"]["end"] < 1.5 * r["rss_mb"]["start"], _dump(r)
    assert r["node_alive"] and r["exit_code"] == 0, _dump(r)
