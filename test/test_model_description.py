"""The model contract: the description that ships with the weights, and the check that refuses
weights trained on another grid."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sparse_detector_ros.config import Config, GridConfig
from sparse_detector_ros.model import (DEFAULT_MODEL, FORMAT_VERSION, ModelDescription,
                                       ModelError, differences, load_checkpoint,
                                       load_description, save_checkpoint)
from sparse_detector_ros.pipeline import Pipeline, build_modules

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data, name="model.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def base(**over) -> dict:
    d = {"version": FORMAT_VERSION, "name": "t", "grid": {"resolution": 0.4, "z_slices": 3},
         "channels": 5, "classes": ["car", "pedestrian"],
         "architecture": {"stage_channels": [8, 16], "stage_blocks": [1, 1]},
         "weights": ""}
    d.update(over)
    return {"sparse_detector_model": d}


def test_shipped_description_is_the_default_grid_and_three_classes():
    d = load_description("")
    assert d.source == ROOT / DEFAULT_MODEL
    assert d.grid == GridConfig() and d.channels == 7 and d.grid.shape == (512, 512)
    assert d.classes == ("car", "pedestrian", "cyclist")
    assert load_description(None) == d == load_description(ROOT / "models" / "default")


def test_load_save_round_trip(tmp_path):
    d = ModelDescription.load(write(tmp_path, base()))
    assert d.grid.resolution == 0.4 and d.grid.z_slices == 3 and d.channels == 5
    assert d.grid.shape == (256, 256) and d.classes == ("car", "pedestrian")
    assert d.architecture == {"stage_channels": (8, 16), "stage_blocks": (1, 1)}
    again = ModelDescription.load(d.save(tmp_path / "copy.yaml"))
    assert again == d and again.source == tmp_path / "copy.yaml"
    # without the root key, too
    assert ModelDescription.from_dict(base()["sparse_detector_model"]) == d


def test_weights_path_is_next_to_the_description(tmp_path):
    d = ModelDescription.load(write(tmp_path, base(weights="w.pt")))
    assert d.weights_path == tmp_path / "w.pt"
    assert ModelDescription.load(write(tmp_path, base())).weights_path is None


@pytest.mark.parametrize("data,fragments", [
    (base(version=2), ["version = 2", "version 1"]),
    (base(bogus=1), ["unknown key(s) bogus"]),
    (base(grid={"resolution": 7.5}), ["'grid.resolution' = 7.5", "[0.02, 2.0]"]),
    (base(grid={"resolution": 0.3}), ["'grid.resolution' = 0.3", "whole cells"]),
    (base(grid={"resolutoin": 0.2}), ["unknown parameter 'grid.resolutoin'"]),
    (base(grid=None), ["'grid' must be a mapping"]),
    (base(channels=7), ["channels = 7", "z_slices 3 + 2 = 5"]),
    (base(classes=[]), ["classes = []"]),
    (base(classes=["car", "car"]), ["distinct"]),
    (base(architecture={"widths": {"a": 1}}), ["architecture.widths"]),
    (base(architecture={"flag": True}), ["architecture.flag = True"]),
    ([1, 2], ["expected a mapping"]),
])
def test_bad_descriptions_name_the_file_and_the_value(tmp_path, data, fragments):
    p = write(tmp_path, data)
    with pytest.raises(ModelError) as e:
        ModelDescription.load(p)
    text = str(e.value)
    assert text.startswith(f"model description '{p}': "), text
    for f in fragments:
        assert f in text, (f, text)


def test_unreadable_description(tmp_path):
    with pytest.raises(ModelError, match="cannot be read"):
        ModelDescription.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n", encoding="utf-8")
    with pytest.raises(ModelError, match="not valid YAML"):
        ModelDescription.load(bad)


def _checkpoint(tmp_path, trained: dict, configured: dict):
    """A checkpoint saved with ``trained`` and a description file ``configured`` naming it."""
    t = ModelDescription.from_dict(trained)
    state = {"w": torch.arange(6.0).view(2, 3)}
    save_checkpoint(tmp_path / "w.pt", t, state, step=7)
    return ModelDescription.load(write(tmp_path, configured)), state


def test_matching_checkpoint_loads(tmp_path):
    d, state = _checkpoint(tmp_path, base(), base(weights="w.pt"))
    ckpt = load_checkpoint(d)
    assert torch.equal(ckpt["state_dict"]["w"], state["w"]) and ckpt["step"] == 7


def test_a_left_out_architecture_key_means_its_default(tmp_path):
    # weights written before heading / iou_head existed load under a description naming their
    # defaults; a description asking for another heading is refused
    arch = {"stage_channels": [8, 16], "stage_blocks": [1, 1]}
    d, _ = _checkpoint(tmp_path, base(),
                       base(weights="w.pt", architecture={**arch, "heading": "sincos",
                                                          "iou_head": 0}))
    load_checkpoint(d)
    d, _ = _checkpoint(tmp_path, base(),
                       base(weights="w.pt", architecture={**arch, "heading": "axis"}))
    with pytest.raises(ModelError, match="architecture.heading: trained 'sincos', configured "
                                         "'axis'"):
        load_checkpoint(d)


def test_weights_trained_on_another_grid_are_refused_with_one_message(tmp_path):
    d, _ = _checkpoint(tmp_path, base(grid={"resolution": 0.2, "z_slices": 3}),
                       base(weights="w.pt"))
    with pytest.raises(ModelError) as e:
        load_checkpoint(d)
    text = str(e.value)
    assert f"weights '{tmp_path / 'w.pt'}' do not match model description" in text
    assert "grid.resolution: trained 0.2, configured 0.4" in text
    assert "retrain" in text and text.count("\n") == 0


def test_classes_and_architecture_differences_are_all_named(tmp_path):
    d, _ = _checkpoint(tmp_path, base(classes=["car"], architecture={
        "stage_channels": [8, 32], "stage_blocks": [1, 1]}), base(weights="w.pt"))
    with pytest.raises(ModelError) as e:
        load_checkpoint(d)
    assert "classes: trained ['car'], configured ['car', 'pedestrian']" in str(e.value)
    assert "architecture.stage_channels: trained (8, 32), configured (8, 16)" in str(e.value)


def test_differences_lists_each_grid_field():
    a = ModelDescription(grid=GridConfig(z_slices=3, x_max=60.0))
    assert differences(a, a) == []
    assert differences(a, ModelDescription()) == [
        "grid.x_max: trained 60.0, configured 51.2", "grid.z_slices: trained 3, configured 5"]


def test_missing_or_foreign_weights_are_refused(tmp_path):
    d = ModelDescription.load(write(tmp_path, base(weights="nope.pt")))
    with pytest.raises(ModelError, match="do not exist"):
        load_checkpoint(d)
    torch.save({"just": "weights"}, tmp_path / "nope.pt")
    with pytest.raises(ModelError, match="not a sparse_detector_ros checkpoint"):
        load_checkpoint(d)
    (tmp_path / "nope.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be read"):
        load_checkpoint(d)
    with pytest.raises(ModelError, match="names no weights file"):
        load_checkpoint(ModelDescription.load(write(tmp_path, base())))


def test_detector_refuses_mismatched_weights_before_any_frame(tmp_path):
    d, _ = _checkpoint(tmp_path, base(grid={"resolution": 0.8, "z_slices": 3}),
                       base(weights="w.pt"))
    with pytest.raises(ModelError, match="grid.resolution: trained 0.8, configured 0.4"):
        Pipeline(Config(), d)


def test_detector_loads_matching_weights(tmp_path):
    d = ModelDescription.load(write(tmp_path, base(weights="w.pt")))
    modules = build_modules(d, Config())
    with torch.no_grad():
        for p in modules.parameters():
            p.uniform_(-0.1, 0.1)
    save_checkpoint(tmp_path / "w.pt", d, modules.state_dict())
    det = Pipeline(Config(), d).detector
    assert det.trained and det.rasterizer.grid == d.grid
    w = det.modules["mask_net"].state_dict()
    for k, v in modules["mask_net"].state_dict().items():
        torch.testing.assert_close(w[k], v)
    # a checkpoint of the right grid but for another network is refused with the keys named
    save_checkpoint(tmp_path / "w.pt", d, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit the network"):
        Pipeline(Config(), d)


def test_shipped_description_writes_out_every_architecture_size():
    from sparse_detector_ros.model.network import ARCH_DEFAULTS, architecture

    d = load_description()
    assert set(d.architecture) == set(ARCH_DEFAULTS)       # nothing left to the code defaults
    assert architecture(d) == dict(d.architecture)


def test_corrupt_truncated_or_missing_weights_name_the_file_and_description(tmp_path):
    d = ModelDescription.load(write(tmp_path, base(weights="w.pt")))
    modules = build_modules(d, Config())
    save_checkpoint(tmp_path / "w.pt", d, modules.state_dict())
    whole = (tmp_path / "w.pt").read_bytes()
    for name, content in (("truncated", whole[: len(whole) // 2]),
                          ("corrupt", b"PK\x03\x04 not a zip"), ("empty", b"")):
        (tmp_path / "w.pt").write_bytes(content)
        with pytest.raises(ModelError) as e:
            Pipeline(Config(), d)
        text = str(e.value)
        assert f"weights '{tmp_path / 'w.pt'}' of model description '{d.source}' cannot be " \
               "read (corrupt, truncated or not a torch checkpoint)" in text, (name, text)
        assert "\n" not in text
    (tmp_path / "w.pt").unlink()
    with pytest.raises(ModelError, match=r"weights '.*w.pt' of model description .* do not "
                                         "exist"):
        Pipeline(Config(), d)


def test_weights_of_another_network_shape_name_the_file(tmp_path):
    """The right description embedded, but tensors of other shapes: a ModelError naming the
    file (not a torch RuntimeError from load_state_dict)."""
    d = ModelDescription.load(write(tmp_path, base(weights="w.pt")))
    state = build_modules(d, Config()).state_dict()
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(1, 1, 1, 1)
    save_checkpoint(tmp_path / "w.pt", d, state)
    with pytest.raises(ModelError) as e:
        Pipeline(Config(), d)
    text = str(e.value)
    assert f"weights '{tmp_path / 'w.pt'}' do not fit the network of model description" in text
    assert "size mismatch" in text and key.split(".", 1)[1] in text and "\n" not in text
