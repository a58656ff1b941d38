"""``sparse-detector eval``: the reports (one block per preset, one column per mode), the held-out
marking, the README block, determinism, and the mask-recall lookup of ground-truth centres."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparse_detector_ros.cli import main
from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.model.description import ModelDescription
from sparse_detector_ros.tools.eval_cli import README_MARKERS, centre_active, eval_modes

PRESETS = ["vlp16", "mid360"]          # a training preset and one held out of training
MODES = ["occupancy", "map_prior"]     # the default mode and the one that needs the scene's map
README = ("# project\n\nintro text\n\n{begin}\nold headline\n{end}\n\n## later section\n"
          "kept as it is\n").format(begin=README_MARKERS[0], end=README_MARKERS[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs with the same options (the first also rewrites a README copy) on a tiny model
    with random weights; a low score threshold so that the random network does detect."""
    d = tmp_path_factory.mktemp("eval")
    grid = GridConfig(x_min=-25.6, x_max=25.6, y_min=-25.6, y_max=25.6)
    model = ModelDescription(grid=grid, name="tiny", architecture={
        "stage_channels": [8, 16, 32], "stage_blocks": [1, 1, 1], "neck_channels": 8,
        "head_channels": 8}).save(d / "model.yaml")
    params = d / "params.yaml"
    params.write_text("detector:\n  score_thresholds: [0.05]\n  top_k: 10\n")
    readme = d / "README.md"
    readme.write_text(README)
    argv = ["eval", "--model", str(model), "--params-file", str(params), "--presets", *PRESETS,
            "--scenes", "1", "--frames", "2", "--modes", *MODES, "--no-progress"]
    assert main([*argv, "--out", str(d / "a"), "--readme", str(readme)]) == 0
    assert main([*argv, "--out", str(d / "b")]) == 0
    return d


def load(d):
    return json.loads((d / "eval.json").read_text())


def test_one_block_per_preset_and_one_column_per_mode(runs):
    res = load(runs / "a")
    assert list(res) == PRESETS
    for preset in PRESETS:
        assert list(res[preset]) == MODES
        for mode in MODES:
            run = res[preset][mode]["run"]
            assert (run["preset"], run["mask_mode"]) == (preset, mode)
            assert run["default_mode"] == (mode == "occupancy")
            assert res[preset][mode]["frames"] == 2
    md = (runs / "a" / "eval.md").read_text()
    assert "| preset | metric | occupancy (default) | map_prior |" in md
    for preset in PRESETS:
        assert md.count(f"| **{preset}**") == 3          # summary, range and points tables


def test_values_are_fractions_or_null_and_objects_are_evaluated(runs):
    res = load(runs / "a")
    seen = []

    def walk(obj, key=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, k)
        elif key.startswith("ap") or key in ("mask_recall", "active_fraction"):
            assert obj is None or (isinstance(obj, float) and 0.0 <= obj <= 1.0), (key, obj)
            seen.append(obj)

    walk(res)
    assert any(v is not None for v in seen)
    for preset in PRESETS:
        for mode in MODES:
            r = res[preset][mode]
            assert sum(c["num_gt"] for c in r["classes"].values()) > 0
            assert sum(c["num_det"] for c in r["classes"].values()) > 0
            assert r["mask_recall_objects"] > 0 and r["mask_recall"] is not None
            assert 0.0 < r["extra"]["active_fraction"] < 1.0
        # the scene's map and the frame's pose reached the map prior: it never fell back
        assert res[preset]["map_prior"]["fallback_frames"] == 0


def test_held_out_preset_is_marked(runs):
    res = load(runs / "a")
    assert {p: res[p][MODES[0]]["run"]["held_out"] for p in PRESETS} == {"vlp16": False,
                                                                         "mid360": True}
    md = (runs / "a" / "eval.md").read_text()
    assert "| **mid360** (held out) |" in md and "| **vlp16** |" in md
    assert "**vlp16** (held out)" not in md


def test_readme_rewrite_touches_only_the_block(runs):
    text = (runs / "README.md").read_text()
    begin, end = README_MARKERS
    head, rest = text.split(begin)
    block, tail = rest.split(end)
    assert head == README.split(begin)[0] and tail == README.split(end)[1]
    assert "old headline" not in block
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| preset | mask |")
    assert rows[1].startswith("| vlp16 | occupancy |")
    assert rows[2].startswith("| mid360 (held out) | occupancy |")


def test_same_options_give_identical_reports(runs):
    assert (runs / "a" / "eval.json").read_bytes() == (runs / "b" / "eval.json").read_bytes()
    assert (runs / "a" / "eval.md").read_bytes() == (runs / "b" / "eval.md").read_bytes()


def test_centre_active_looks_up_row_x_col_y_at_the_head_stride():
    grid = GridConfig(x_min=-8.0, x_max=8.0, y_min=-4.0, y_max=4.0, resolution=0.5)
    stride = 4                                   # output cells of 2 m: 8 x 4 of them
    active = torch.zeros(8, 4, dtype=torch.bool)
    active[5, 1] = True                          # x in [2, 4), y in [-2, 0)
    boxes = np.zeros((6, 7))
    boxes[:, 3:6] = 1.0
    boxes[:, :2] = [[3.0, -1.0],                 # in the active cell
                    [2.0, -2.0],                 # its lower corner: inside ([lo, hi))
                    [-1.0, 3.0],                 # x and y swapped: another cell
                    [4.0, -1.0],                 # the next row
                    [3.0, 0.0],                  # the next column
                    [30.0, -1.0]]                # off the grid
    assert centre_active(active, boxes, grid, stride).tolist() == [True, True, False, False,
                                                                   False, False]
    with pytest.raises(ValueError, match="Ho, Wo"):
        centre_active(active[None], boxes, grid, stride)


def test_default_modes_add_the_configured_mode_once():
    assert eval_modes(None, "occupancy") == ["dense", "occupancy", "map_prior", "net"]
    assert eval_modes(None, "union") == ["dense", "occupancy", "map_prior", "net", "union"]
    assert eval_modes(["net", "dense", "net"], "occupancy") == ["net", "dense"]


def test_unknown_preset_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown LiDAR preset 'hdl128'.*vlp16"):
        main(["eval", "--presets", "hdl128", "--scenes", "1", "--frames", "1",
              "--out", str(tmp_path), "--no-progress"])
    assert not (tmp_path / "eval.json").exists()
