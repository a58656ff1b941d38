"""config: one list of runtime parameters (PARAMS) and of grid specs (GRID_PARAMS), dataclass
defaults, the YAML file, validation."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_detector_ros.config import (
    GRID_PARAMS, GRID_SPECS, LIVE_PARAMS, NODE_NAME, PARAMS, SPECS, Config, ConfigError,
    DetectorConfig, GridConfig, MaskConfig, ModelConfig, NodeConfig, ParamSpec, SparseConfig,
    TransformConfig, flatten, start_up_only, unwrap_ros_params,
)

ROOT = Path(__file__).resolve().parents[1]
YAML_PATH = ROOT / "config" / "sparse_detector.yaml"

ALL = PARAMS + GRID_PARAMS
NUMERIC = [p for p in ALL if p.choices is None and p.type in (int, float)]
CHOICE = [p for p in ALL if p.choices is not None]
IDS = lambda p: p.name  # noqa: E731


def defaults() -> dict:
    return {p.name: p.default for p in PARAMS}


def load(flat: dict):
    """Runtime names through Config, grid names through GridConfig (the model description's
    validation): both give the same messages."""
    if flat and all(k.startswith("grid.") for k in flat):
        return GridConfig.from_flat(flat)
    return Config.from_flat(flat)


def load_nested(nested: dict):
    return GridConfig.from_dict(nested["grid"]) if list(nested) == ["grid"] \
        else Config.from_dict(nested)


def assert_config_error(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(exc.value)
    assert isinstance(exc.value, ValueError)
    for frag in fragments:
        assert frag in text, f"{frag!r} not in {text!r}"
    return text


# --------------------------------------------------------------------------- PARAMS vs dataclasses

def test_every_default_equals_the_dataclass_default():
    assert Config().to_flat() == defaults()


def test_params_and_dataclass_fields_are_one_to_one_in_order():
    flat = Config().to_flat()
    assert list(flat) == [p.name for p in PARAMS]
    assert len(SPECS) == len(PARAMS)
    for p in PARAMS:
        assert type(flat[p.name]) is p.type, p.name


def test_dataclass_field_defaults_match_specs():
    sections = (("grid", GridConfig, GRID_SPECS), ("model", ModelConfig, SPECS),
                ("sparse", SparseConfig, SPECS), ("mask", MaskConfig, SPECS),
                ("detector", DetectorConfig, SPECS), ("transform", TransformConfig, SPECS),
                ("node", NodeConfig, SPECS))
    for section, cls, specs in sections:
        names = [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
        assert names == [p for p in specs if p.startswith(section + ".")]
        for f in dataclasses.fields(cls):
            spec = specs[f"{section}.{f.name}"]
            assert f.default == spec.default and type(f.default) is spec.type
    assert GridConfig().to_dict() == {p.name[5:]: p.default for p in GRID_PARAMS}


def test_grid_is_not_a_runtime_parameter():
    assert not set(SPECS) & set(GRID_SPECS)
    for p in GRID_PARAMS:
        with pytest.raises(ConfigError) as e:
            Config.from_flat({p.name: p.default})
        assert_config_error(e, f"'{p.name}'", "not a runtime parameter", "model description",
                            "model.path")


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_spec_is_well_formed(p: ParamSpec):
    assert re.fullmatch(r"(grid|model|sparse|mask|detector|transform|node)\.[a-z_]+", p.name)
    assert p.description.strip()
    assert p.type in (int, float, str, bool, tuple)
    assert p.check(p.default) == p.default  # every default is valid
    if p.choices is not None:
        assert p.type is str and p.default in p.choices and p.min is None and p.max is None
    if p.type in (int, float):
        assert p.min is not None and p.max is not None and p.min <= p.default <= p.max
    if p.type is tuple:
        assert p.default and all(type(v) is float and p.min <= v <= p.max for v in p.default)
        assert p.length is None or len(p.default) == p.length
    else:
        assert p.length is None


def test_from_flat_and_from_dict_of_nothing_are_the_defaults():
    assert Config.from_flat({}) == Config()
    assert Config.from_dict({}) == Config()
    assert Config.from_dict(None) == Config()


def test_to_flat_from_flat_round_trip():
    cfg = Config.from_flat({"model.path": "/m", "sparse.backend": "torch",
                            "node.qos_depth": 10})
    assert Config.from_flat(cfg.to_flat()) == cfg
    assert cfg.model.path == "/m" and cfg.sparse.backend == "torch"
    assert cfg.node.qos_depth == 10 and cfg.sparse.tile_size == 16


# --------------------------------------------------------------------------- the YAML file

def test_yaml_loads_and_equals_the_defaults():
    assert Config.from_yaml(YAML_PATH) == Config()
    assert Config.from_yaml(str(YAML_PATH)) == Config()


def test_yaml_is_a_ros_parameter_file_listing_every_parameter_with_its_default():
    raw = yaml.safe_load(YAML_PATH.read_text(encoding="utf-8"))
    assert list(raw) == [NODE_NAME]
    assert list(raw[NODE_NAME]) == ["ros__parameters"]
    flat = flatten(raw[NODE_NAME]["ros__parameters"])
    assert list(flat) == [p.name for p in PARAMS]  # same order as PARAMS
    for p in PARAMS:
        value = tuple(flat[p.name]) if p.type is tuple else flat[p.name]  # YAML list
        assert value == p.default and type(value) is p.type, p.name


def test_yaml_file_is_the_generated_text():
    from sparse_detector_ros.config import params_yaml

    assert YAML_PATH.read_text(encoding="utf-8") == params_yaml(), (
        "regenerate: python -m sparse_detector_ros.config > config/sparse_detector.yaml")


def test_yaml_documents_every_allowed_range():
    text = YAML_PATH.read_text(encoding="utf-8")
    for p in PARAMS:
        assert f"allowed {p.allowed()}" in text, p.name


def test_from_yaml_file_with_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("sparse_detector:\n  ros__parameters:\n    sparse:\n      tile_size: 8\n"
                 "      pooling: avg\n    node:\n      device: cpu\n", encoding="utf-8")
    cfg = Config.from_yaml(f)
    assert cfg.sparse.tile_size == 8 and cfg.sparse.pooling == "avg" and cfg.node.device == "cpu"
    assert cfg.to_flat() == defaults() | {"sparse.tile_size": 8, "sparse.pooling": "avg",
                                          "node.device": "cpu"}


def test_from_yaml_with_a_grid_value_is_refused(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("sparse_detector:\n  ros__parameters:\n    grid:\n      resolution: 0.4\n",
                 encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(f)
    assert_config_error(e, "'grid.resolution' = 0.4", "not a runtime parameter")


def test_from_yaml_empty_file_is_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("", encoding="utf-8")
    assert Config.from_yaml(f) == Config()


def test_from_yaml_bad_value_names_the_parameter(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sparse_detector:\n  ros__parameters:\n    sparse:\n      tile_size: 3\n",
                 encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(f)
    assert_config_error(e, "'sparse.tile_size'", "3", "[4, 64]")


# --------------------------------------------------------------------------- dict shapes

OVERRIDES = {"model.path": "/opt/m", "sparse.tile_size": 32, "sparse.threshold": 0.1,
             "sparse.pooling": "avg", "node.qos_reliability": "reliable"}


def _nested(flat):
    out: dict = {}
    for k, v in flat.items():
        a, b = k.split(".")
        out.setdefault(a, {})[b] = v
    return out


@pytest.mark.parametrize("shape", ["dotted", "nested", "mixed", "ros", "ros_wildcard",
                                   "ros_bare", "ros_dotted"])
def test_dict_shapes_all_load(shape):
    nested = _nested(OVERRIDES)
    data = {
        "dotted": OVERRIDES,
        "nested": nested,
        "mixed": {"sparse": {"tile_size": 32, "pooling": "avg"}, "sparse.threshold": 0.1,
                  "model.path": "/opt/m", "node": {"qos_reliability": "reliable"}},
        "ros": {"sparse_detector": {"ros__parameters": nested}},
        "ros_wildcard": {"/**": {"ros__parameters": nested}},
        "ros_bare": {"ros__parameters": nested},
        "ros_dotted": {"sparse_detector": {"ros__parameters": OVERRIDES}},
    }[shape]
    cfg = Config.from_dict(data)
    expected = defaults() | OVERRIDES
    assert cfg.to_flat() == expected


def test_ros_wrapper_with_empty_parameters_is_defaults():
    assert Config.from_dict({"sparse_detector": {"ros__parameters": {}}}) == Config()
    # `ros__parameters:` with nothing after it: rcl refuses the file, so do we
    with pytest.raises(ConfigError, match="'sparse_detector': ros__parameters is empty"):
        Config.from_dict({"sparse_detector": {"ros__parameters": None}})


def test_flatten_and_unwrap():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e.f": 3}) == {"a.b": 1, "a.c.d": 2, "e.f": 3}
    inner = {"grid": {"z_slices": 3}}
    assert unwrap_ros_params({"n": {"ros__parameters": inner}}) is inner
    assert unwrap_ros_params(inner) is inner


def test_errors_in_ros_wrapped_dict_name_the_dotted_parameter():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"sparse_detector": {"ros__parameters": {"sparse": {"tile_size": 0}}}})
    assert_config_error(e, "'sparse.tile_size'", "= 0", "[4, 64]")


def test_int_accepted_for_float_parameter_and_stored_as_float():
    cfg = Config.from_dict({"sparse": {"dense_crossover": 1}})
    assert cfg.sparse.dense_crossover == 1.0 and type(cfg.sparse.dense_crossover) is float
    g = GridConfig.from_dict({"x_min": -50, "x_max": 50, "y_min": -20, "y_max": 20,
                              "resolution": 1})
    assert g.x_min == -50.0 and type(g.x_min) is float
    assert type(g.resolution) is float and g.shape == (100, 40)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparse.tile_size = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        GridConfig().resolution = 0.1  # type: ignore[misc]


# --------------------------------------------------------------------------- bad values

def test_documented_message_format():
    with pytest.raises(ConfigError) as e:
        Config.from_flat({"sparse.tile_size": 2})
    assert str(e.value) == "parameter 'sparse.tile_size' = 2 is out of range: allowed [4, 64]"
    with pytest.raises(ConfigError) as e:
        GridConfig.from_flat({"grid.resolution": 5.0})
    assert str(e.value) == "parameter 'grid.resolution' = 5.0 is out of range: allowed [0.02, 2.0]"


def _below(p):
    return p.min - (1 if p.type is int else max(abs(p.min) * 0.5, 1e-3))


def _above(p):
    return p.max + (1 if p.type is int else max(abs(p.max) * 0.5, 1e-3))


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("p", NUMERIC, ids=IDS)
def test_out_of_range(p, side):
    value = _below(p) if side == "below" else _above(p)
    with pytest.raises(ConfigError) as e:
        load({p.name: value})
    assert_config_error(e, f"'{p.name}'", repr(p.type(value)), f"[{p.min}, {p.max}]",
                        "out of range")
    # Same through a nested dict and through the ParamSpec itself.
    with pytest.raises(ConfigError) as e:
        load_nested(_nested({p.name: value}))
    assert_config_error(e, f"'{p.name}'", f"[{p.min}, {p.max}]")
    with pytest.raises(ConfigError):
        p.check(value)


@pytest.mark.parametrize("p", NUMERIC, ids=IDS)
def test_range_bounds_are_inclusive(p):
    assert p.check(p.min) == p.min and p.check(p.max) == p.max


def _wrong_types(p):
    if p.type is tuple:
        return ["0.3", 0.3, [], ["a"], [True], None]
    if p.type is float:
        return ["0.5", True, None, [1.0]]
    if p.type is int:
        return [float(p.default), "5", True, None]
    if p.type is bool:
        return [1, 0, "true", None, [True]]
    return [1, 1.5, True, None, ["auto"]]


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_wrong_type(p):
    for value in _wrong_types(p):
        with pytest.raises(ConfigError) as e:
            load({p.name: value})
        assert_config_error(e, f"'{p.name}'", repr(value), "wrong type",
                            "list" if p.type is tuple else p.type.__name__,
                            f"allowed {p.allowed()}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("p", [p for p in NUMERIC if p.type is float], ids=IDS)
def test_non_finite_float(p, value):
    with pytest.raises(ConfigError) as e:
        load({p.name: value})
    assert_config_error(e, f"'{p.name}'", repr(value), f"[{p.min}, {p.max}]")


@pytest.mark.parametrize("p", CHOICE, ids=IDS)
def test_bad_choice(p):
    for value in ("bogus", p.default.upper(), "", p.default + " "):
        with pytest.raises(ConfigError) as e:
            Config.from_flat({p.name: value})
        text = assert_config_error(e, f"'{p.name}'", repr(value), "not allowed")
        for c in p.choices:
            assert repr(c) in text


@pytest.mark.parametrize("p", CHOICE, ids=IDS)
def test_every_choice_accepted(p):
    for c in p.choices:
        assert getattr(getattr(Config.from_flat({p.name: c}), p.name.split(".")[0]),
                       p.name.split(".")[1]) == c


@pytest.mark.parametrize("name,close", [
    ("grid.bogus", None), ("bogus", None), ("grid", None), ("sparse.tile", "sparse.tile_size"),
    ("node.device.x", "node.device"), ("Grid.resolution", None), ("model", "model.path"),
    ("sparse.node.device", "node.device"), ("qos_dpeth", "node.qos_depth"),
    ("node.qos_dpeth", "node.qos_depth"), ("tile_size", "sparse.tile_size"),
    ("mask.map_yml", "mask.map_yaml")])
def test_unknown_name(name, close):
    """An unknown name is an error naming it, with the close match when there is one (difflib),
    else the list of every known name."""
    with pytest.raises(ConfigError) as e:
        Config.from_flat({name: 0.25})
    text = assert_config_error(e, f"unknown parameter '{name}' = 0.25: ")
    if close is not None:
        assert text.endswith(f"did you mean '{close}'?"), text
    else:
        assert "did you mean" not in text
        for p in PARAMS:  # the allowed names
            assert p.name in text


def test_unknown_name_in_nested_dict_is_dotted():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"sparse": {"tile_sise": 8}})
    assert_config_error(e, "'sparse.tile_sise'", "8", "sparse.tile_size")
    with pytest.raises(ConfigError) as e:
        GridConfig.from_dict({"resolutoin": 0.1})
    assert_config_error(e, "'grid.resolutoin'", "0.1", "grid.resolution")


def test_error_is_a_single_value_error_subclass():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- grid consistency

@pytest.mark.parametrize("axis", ["x", "y", "z"])
@pytest.mark.parametrize("delta", [0.0, -1.0])
def test_min_not_below_max(axis, delta):
    lo = {"x": -51.2, "y": -51.2, "z": -3.0}[axis]
    bad_max = lo + delta
    with pytest.raises(ConfigError) as e:
        GridConfig.from_flat({f"grid.{axis}_max": bad_max})
    assert_config_error(e, f"'grid.{axis}_min'", repr(lo), f"'grid.{axis}_max'", repr(bad_max),
                        "below")


@pytest.mark.parametrize("res,axis", [(0.3, "x"), (0.15, "x"), (0.7, "x")])
def test_resolution_must_divide_extent(res, axis):
    with pytest.raises(ConfigError) as e:
        GridConfig.from_flat({"grid.resolution": res})
    assert_config_error(e, "'grid.resolution'", repr(res), "102.4", "whole cells")


def test_resolution_must_divide_y_extent_too():
    with pytest.raises(ConfigError) as e:
        GridConfig.from_flat({"grid.y_min": -51.1, "grid.resolution": 0.2})
    assert_config_error(e, "'grid.resolution'", "0.2", "y extent", "whole cells")


def test_too_many_cells():
    with pytest.raises(ConfigError) as e:
        GridConfig.from_flat({"grid.x_min": -250.0, "grid.x_max": 250.0, "grid.resolution": 0.02})
    assert_config_error(e, "'grid.resolution'", "0.02", "25000 cells", "[1, 8192]")


@pytest.mark.parametrize("flat,shape", [
    ({}, (512, 512)),
    ({"grid.resolution": 0.1}, (1024, 1024)),
    ({"grid.resolution": 0.16}, (640, 640)),
    ({"grid.x_min": 0.0, "grid.x_max": 69.12, "grid.y_min": -39.68, "grid.y_max": 39.68,
      "grid.resolution": 0.16}, (432, 496)),          # the KITTI PointPillars grid
    ({"grid.x_min": -2.0, "grid.x_max": 0.0, "grid.y_min": 0.0, "grid.y_max": 2.0,
      "grid.resolution": 2.0}, (1, 1)),
])
def test_valid_grids_and_shapes(flat, shape):
    g = GridConfig.from_flat(flat)
    assert g.shape == shape and g.channels == g.z_slices + 2


# --------------------------------------------------------------------------- random valid values

def _valid_values(p: ParamSpec):
    if p.choices is not None:
        return st.sampled_from(p.choices)
    if p.type is int:
        return st.integers(int(p.min), int(p.max))
    if p.type is str:
        return st.text(max_size=20)
    if p.type is bool:
        return st.booleans()
    if p.type is tuple:
        return st.lists(st.floats(p.min, p.max, allow_nan=False), min_size=p.length or 1,
                        max_size=p.length or 4).map(tuple)
    return st.floats(p.min, p.max, allow_nan=False)


_FREE = PARAMS


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({}, optional={p.name: _valid_values(p) for p in _FREE}))
def test_any_valid_values_load_and_round_trip(values):
    cfg = Config.from_flat(values)
    flat = cfg.to_flat()
    for k, v in values.items():
        assert flat[k] == v
    assert Config.from_flat(flat) == cfg
    assert Config.from_dict(_nested(values)) == cfg
    assert Config.from_dict({"sparse_detector": {"ros__parameters": _nested(values)}}) == cfg


@settings(max_examples=150, deadline=None)
@given(p=st.sampled_from(NUMERIC), data=st.data())
def test_any_out_of_range_value_is_rejected(p, data):
    if p.type is int:
        value = data.draw(st.one_of(st.integers(max_value=int(p.min) - 1),
                                    st.integers(min_value=int(p.max) + 1)))
    else:
        value = data.draw(st.one_of(
            st.floats(max_value=p.min, exclude_max=True, allow_nan=False, allow_infinity=False),
            st.floats(min_value=p.max, exclude_min=True, allow_nan=False, allow_infinity=False)))
    with pytest.raises(ConfigError) as e:
        p.check(value)
    assert_config_error(e, f"'{p.name}'", repr(p.type(value)), f"[{p.min}, {p.max}]")



# --------------------------------------------------------------------------- list parameters

def test_score_thresholds_one_for_all_or_one_per_class():
    import array

    classes = ("car", "pedestrian", "cyclist")
    assert Config().detector.thresholds_for(classes) == (0.3, 0.3, 0.3)
    cfg = Config.from_dict({"detector": {"score_thresholds": [0.5, 0, 1]}})
    assert cfg.detector.score_thresholds == (0.5, 0.0, 1.0)
    assert all(type(v) is float for v in cfg.detector.score_thresholds)
    assert cfg.detector.thresholds_for(classes) == (0.5, 0.0, 1.0)
    # a ROS double array arrives as array.array
    assert SPECS["detector.score_thresholds"].check(array.array("d", [0.25])) == (0.25,)
    with pytest.raises(ConfigError) as e:
        cfg.detector.thresholds_for(("car", "pedestrian"))
    assert_config_error(e, "'detector.score_thresholds'", "3 values", "2 classes",
                        "['car', 'pedestrian']")


def test_score_thresholds_out_of_range_names_the_list():
    with pytest.raises(ConfigError) as e:
        Config.from_flat({"detector.score_thresholds": [0.2, 1.5]})
    assert_config_error(e, "'detector.score_thresholds'", "[0.2, 1.5]", "out of range",
                        "[0.0, 1.0]")


def test_transform_lists_need_exactly_three_values():
    cfg = Config.from_dict({"transform": {"translation": [1, 0, 1.8], "rpy": [0, 0.1, -3]}})
    assert cfg.transform.translation == (1.0, 0.0, 1.8) and cfg.transform.rpy == (0.0, 0.1, -3.0)
    for name in ("transform.translation", "transform.rpy"):
        for bad in ([0.0, 0.0], [0.0], [0.0, 0.0, 0.0, 0.0]):
            with pytest.raises(ConfigError) as e:
                Config.from_flat({name: bad})
            assert_config_error(e, f"'{name}'", repr(bad), f"has {len(bad)} value",
                                "exactly 3 numbers")


def test_rpy_is_in_radians_within_pi():
    assert SPECS["transform.rpy"].check([math.pi, -math.pi, 0]) == (math.pi, -math.pi, 0.0)
    with pytest.raises(ConfigError) as e:
        Config.from_flat({"transform.rpy": [0.0, 0.0, 90.0]})  # degrees by mistake
    assert_config_error(e, "'transform.rpy'", "out of range", f"[{-math.pi}, {math.pi}]")


# --------------------------------------------------------------------------- live parameters

def test_live_parameters_are_the_detector_mask_and_latency_budget():
    assert LIVE_PARAMS == {p.name for p in PARAMS if p.name.startswith(("detector.", "mask."))} \
        | {"node.latency_budget_ms"}
    text = YAML_PATH.read_text(encoding="utf-8")
    for p in PARAMS:  # the parameter file says which ones are live
        comment = text.split(f"\n      {p.name.split('.', 1)[1]}:")[0].rsplit("\n", 1)[1]
        assert comment.endswith("; live (ros2 param set)") == (p.name in LIVE_PARAMS), p.name


def test_updated_validates_and_changes_lists_the_differences():
    cfg = Config()
    new = cfg.updated({"detector.score_thresholds": [1.0], "mask.mode": "dense"})
    assert new.detector.score_thresholds == (1.0,) and new.mask.mode == "dense"
    assert cfg.changes(new) == {"detector.score_thresholds": (1.0,), "mask.mode": "dense"}
    assert cfg.changes(cfg) == {}
    with pytest.raises(ConfigError) as e:
        cfg.updated({"detector.nms_iou": 2.0})
    assert_config_error(e, "'detector.nms_iou' = 2.0 is out of range")
    msg = start_up_only("node.device")
    assert "'node.device' is set at start-up only" in msg and "detector.top_k" in msg


# --------------------------------------------------------------------------- every problem at once

def test_every_problem_is_reported_in_one_error():
    with pytest.raises(ConfigError) as e:
        Config.from_flat({"sparse.tile_size": 2, "node.qos_dpeth": 5, "grid.resolution": 0.1,
                          "mask.mode": "bogus", "node.qos_depth": 0})
    err = e.value
    assert len(err.problems) == 5, err.problems
    text = str(err)
    assert text.startswith("5 problems: ") and "\n" not in text
    for fragment in ("'sparse.tile_size' = 2 is out of range",
                     "unknown parameter 'node.qos_dpeth' = 5: did you mean 'node.qos_depth'?",
                     "'grid.resolution' = 0.1 is not a runtime parameter",
                     "'mask.mode' = 'bogus' is not allowed",
                     "'node.qos_depth' = 0 is out of range"):
        assert fragment in text
    # one problem: the message is the problem itself (the documented format)
    with pytest.raises(ConfigError) as e:
        Config.from_flat({"sparse.tile_size": 2})
    assert e.value.problems == [str(e.value)]


def test_ros_node_parameters_are_accepted_and_checked():
    cfg = Config.from_flat({"use_sim_time": True, "start_type_description_service": False,
                            "qos_overrides./input/points.subscription.depth": 3})
    assert cfg == Config()
    with pytest.raises(ConfigError, match="'use_sim_time' = 1 has the wrong type: expected bool"):
        Config.from_flat({"use_sim_time": 1})


def test_from_yaml_unreadable_or_unparseable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"parameter file '.*nothere.yaml' cannot be read: No "
                                          "such file"):
        Config.from_yaml(tmp_path / "nothere.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("sparse_detector:\n  ros__parameters:\n    sparse: {tile_size: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(f)
    assert_config_error(e, f"parameter file '{f}' is not valid YAML (line 4, column 1)")


def test_from_yaml_unknown_key_suggests_and_lists_all_problems(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("sparse_detector:\n  ros__parameters:\n    node:\n      qos_dpeth: 5\n"
                 "    sparse:\n      tile_size: 3\n")
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(f)
    assert e.value.problems == [
        "unknown parameter 'node.qos_dpeth' = 5: did you mean 'node.qos_depth'?",
        "parameter 'sparse.tile_size' = 3 is out of range: allowed [4, 64]"]


def test_ros_file_lists_must_hold_one_type_as_rcl_wants():
    ros = {"sparse_detector": {"ros__parameters": {"transform": {"translation": [0, 0, 0.5]}}}}
    with pytest.raises(ConfigError) as e:
        Config.from_dict(ros)
    assert_config_error(e, "'transform.translation' = [0, 0, 0.5] mixes float and integer",
                        "decimal point")
    # a plain (non-ROS) dict of the tools takes integers for floats
    assert Config.from_dict({"transform": {"translation": [0, 0, 0.5]}}).transform.translation \
        == (0.0, 0.0, 0.5)
    ros["sparse_detector"]["ros__parameters"]["transform"]["translation"] = [0.0, 0.0, 0.5]
    assert Config.from_dict(ros).transform.translation == (0.0, 0.0, 0.5)


@pytest.mark.parametrize("key,fqn,applies", [
    ("sparse_detector", "/sparse_detector", True), ("/sparse_detector", "/sparse_detector", True),
    ("/**", "/sparse_detector", True), ("/**", "/a/b/sparse_detector", True),
    ("/**/sparse_detector", "/sparse_detector", True),
    ("/**/sparse_detector", "/ns/sparse_detector", True),
    ("/*/sparse_detector", "/ns/sparse_detector", True),
    ("/*/sparse_detector", "/sparse_detector", False),
    ("/robot/*", "/robot/sparse_detector", True), ("robot/**", "/robot/sparse_detector", True),
    ("/**/robot/*", "/robot/sparse_detector", True), ("/robot/*", "/sparse_detector", False),
    ("ns/sparse_detector", "/ns/sparse_detector", True),
    ("sparse_detector", "/ns/sparse_detector", False), ("other_node", "/sparse_detector", False),
    ("/sparse_detector.x", "/sparse_detectorAx", False),
])
def test_node_keys_match_as_in_rcl(key, fqn, applies):
    from sparse_detector_ros.config import node_matches

    assert node_matches(key, fqn) is applies


def test_only_the_entries_for_this_node_apply_later_ones_win():
    data = {"/**": {"ros__parameters": {"sparse": {"tile_size": 8}, "node.qos_depth": 7}},
            "other_node": {"ros__parameters": {"sparse": {"tile_size": 32}, "bogus": 1}},
            "sparse_detector": {"ros__parameters": {"sparse": {"tile_size": 16, "pooling": "avg"}}},
            "robot": {"sparse_detector": {"ros__parameters": {"sparse": {"tile_size": 4}}}}}
    cfg = Config.from_dict(data)
    # other_node (and its unknown 'bogus') is not ours; /robot/sparse_detector is another node
    assert (cfg.sparse.tile_size, cfg.sparse.pooling, cfg.node.qos_depth) == (16, "avg", 7)
    assert Config.from_dict(data, node="/robot/sparse_detector").sparse.tile_size == 4
    assert Config.from_dict(data, node="/robot/sparse_detector").sparse.pooling == "max"
    with pytest.raises(ConfigError, match="'bogus' = 1: known parameters"):
        Config.from_dict(data, node="/other_node")
    with pytest.raises(ConfigError, match=r"'top_level_value' = 3 is not under a '<node>: "
                                          "ros__parameters:' block"):
        Config.from_dict({"top_level_value": 3, "sparse_detector": {"ros__parameters": {}}})


# --------------------------------------------------------------------------- ROS command line

def test_parse_ros_arguments_reads_only_the_ros_args_sections():
    from sparse_detector_ros.config import parse_ros_arguments

    ros = parse_ros_arguments([
        "prog", "-p", "not:=ours", "--ros-args", "--log-level", "debug", "--params-file", "a.yaml",
        "-p", "sparse.tile_size:=8", "-r", "__ns:=/robot", "--", "--params-file", "b.yaml",
        "--ros-args", "--remap", "sparse_detector:__node:=det", "--param", "x:=1",
        "-r", "other:__node:=nope", "-e", "/enclave"])
    assert ros.steps == [("file", "a.yaml"), ("param", "sparse.tile_size", "8"),
                         ("param", "x", "1")]
    assert (ros.node_name, ros.namespace, ros.node) == ("det", "/robot", "/robot/det")


def _params_file(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return str(f)


def test_config_from_ros_arguments_applies_files_and_overrides_in_order(tmp_path):
    from sparse_detector_ros.config import config_from_ros_arguments

    a = _params_file(tmp_path, "a.yaml", "/**:\n  ros__parameters:\n    sparse:\n"
                     "      tile_size: 8\n      pooling: avg\n")
    b = _params_file(tmp_path, "b.yaml", "sparse_detector:\n  ros__parameters:\n"
                     "    sparse.tile_size: 32\n    use_sim_time: true\n")
    cfg, notes = config_from_ros_arguments(["p", "--ros-args", "--params-file", a, "-p",
                                            "sparse.tile_size:=4", "--params-file", b])
    assert (cfg.sparse.tile_size, cfg.sparse.pooling, notes) == (32, "avg", [])
    cfg, _ = config_from_ros_arguments(["p", "--ros-args", "--params-file", b,
                                        "-p", "sparse.tile_size:=4",
                                        "-p", "other_node:sparse.tile_size:=64",
                                        "-p", "sparse_detector:sparse.pooling:=avg"])
    assert (cfg.sparse.tile_size, cfg.sparse.pooling) == (4, "avg")
    # a file with no entry for this node (here: after a namespace remap) is noted
    cfg, notes = config_from_ros_arguments(["p", "--ros-args", "--params-file", b,
                                            "-r", "__ns:=/robot"])
    assert cfg.sparse.tile_size == 16
    assert notes == [f"parameter file '{b}' has no entry for node '/robot/sparse_detector' "
                     "(entries: /sparse_detector): none of its values apply"]


def test_config_from_ros_arguments_reports_every_problem_at_once(tmp_path):
    from sparse_detector_ros.config import config_from_ros_arguments

    broken = _params_file(tmp_path, "broken.yaml", "sparse_detector:\n  ros__parameters:\n"
                          "    sparse: {tile_size: 8\n")
    mixed = _params_file(tmp_path, "mixed.yaml", "sparse_detector:\n  ros__parameters:\n"
                         "    transform:\n      rpy: [0, 0, 0.5]\n    node:\n      qos_dpeth: 5\n"
                         "    mask:\n      map_yaml:\n")
    with pytest.raises(ConfigError) as e:
        config_from_ros_arguments(["p", "--ros-args", "--params-file", broken,
                                   "--params-file", str(tmp_path / "missing.yaml"),
                                   "--params-file", mixed, "-p", "sparse.tile_size:=2",
                                   "-p", "detector.top_k:=[1, a]", "-p", "grid.resolution:=0.1"])
    problems = e.value.problems
    expected = [f"parameter file '{broken}' is not valid YAML",
                f"parameter file '{tmp_path / 'missing.yaml'}' cannot be read",
                "'transform.rpy' = [0, 0, 0.5] mixes float and integer values",
                "'mask.map_yaml' has no value",
                "-p detector.top_k:=[1, a]: parameter 'detector.top_k' = [1, 'a'] mixes",
                "unknown parameter 'node.qos_dpeth' = 5: did you mean 'node.qos_depth'?",
                "'sparse.tile_size' = 2 is out of range",
                "'grid.resolution' = 0.1 is not a runtime parameter"]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)


@pytest.mark.parametrize("text", [
    "n:\n  ros__parameters:\n    a: [1, 2.5]\n", "n:\n  ros__parameters:\n    a: [1, 'x']\n",
    "n:\n  ros__parameters:\n    a:\n", "n:\n  ros__parameters:\n    a: [1, 2\n",
    "sparse_*:\n  ros__parameters:\n    a: 1\n", "a-b:\n  ros__parameters:\n    a: 1\n",
    "a.b:\n  ros__parameters:\n    a: 1\n",
    "n:\n  a: 1\n", "a: 1\n", "n:\n  ros__parameters:\n",
    # accepted by both
    "n:\n  ros__parameters:\n    a: []\n", "/**:\n  ros__parameters:\n    a.b: 1\n",
    "ns:\n  n:\n    ros__parameters:\n      a: [true, false]\n", "",
])
def test_ros_file_problems_are_the_ones_rcl_refuses(tmp_path, text):
    """Our reading of a parameter file refuses exactly what rclpy.init refuses (an RCLError),
    so that the node can report it in one message before rclpy.init."""
    import rclpy
    from rclpy.impl.implementation_singleton import rclpy_implementation

    from sparse_detector_ros.config import read_yaml, ros_file_params

    f = _params_file(tmp_path, "p.yaml", text)
    data, problem = read_yaml(f, "parameter file")
    ours = bool(problem) or bool(ros_file_params(data, "/n", f, ros_only=True)[1])
    ctx = rclpy.Context()
    try:
        rclpy.init(args=["p", "--ros-args", "--params-file", f], context=ctx)
        refused = False
        rclpy.shutdown(context=ctx)
    except rclpy_implementation.RCLError:
        refused = True
    assert ours == refused


ORDER_CASES = [  # (files and -p in order, expected value of 'sparse.tile_size')
    ([("f", "/**", 8), ("f", "sparse_detector", 32)], 32),
    ([("f", "sparse_detector", 32), ("f", "/**", 8)], 8),
    # one slot per node key, in first-appearance order: a later /** does not beat the node's
    ([("f", "/**", 8), ("f", "sparse_detector", 32), ("f", "/**", 4)], 32),
    ([("f", "sparse_detector", 32), ("p", "", 4)], 4),
    ([("p", "", 4), ("f", "sparse_detector", 32)], 32),
    ([("p", "", 4), ("f", "/**", 8)], 8),
    ([("p", "sparse_detector", 32), ("p", "", 4)], 4),
    ([("p", "", 4), ("p", "sparse_detector", 32)], 32),
]


def _order_args(tmp_path, steps):
    args = ["p", "--ros-args"]
    for i, (kind, key, value) in enumerate(steps):
        if kind == "f":
            args += ["--params-file", _params_file(
                tmp_path, f"o{i}.yaml", f"{key}:\n  ros__parameters:\n    sparse:\n"
                f"      tile_size: {value}\n")]
        else:
            args += ["-p", f"{key + ':' if key else ''}sparse.tile_size:={value}"]
    return args


@pytest.mark.parametrize("steps,expected", ORDER_CASES)
def test_files_and_overrides_merge_as_rcl_merges_them(tmp_path, steps, expected):
    from sparse_detector_ros.config import config_from_ros_arguments

    cfg, _ = config_from_ros_arguments(_order_args(tmp_path, steps))
    assert cfg.sparse.tile_size == expected


@pytest.mark.ros
def test_merge_order_is_the_one_rclpy_gives_a_node(tmp_path):
    """The expectations above are what rclpy itself gives a node (checked in-process: one
    node per case, DDS on loopback)."""
    import rclpy
    from rclpy.node import Node

    for steps, expected in ORDER_CASES:
        ctx = rclpy.Context()
        rclpy.init(args=_order_args(tmp_path, steps), context=ctx)
        try:
            node = Node(NODE_NAME, context=ctx,
                        automatically_declare_parameters_from_overrides=True)
            assert node.get_parameter("sparse.tile_size").value == expected, steps
            node.destroy_node()
        finally:
            rclpy.shutdown(context=ctx)
