"""Typed, validated configuration shared by the ROS node and the ROS-free tools.

Every runtime tunable is listed once in :data:`PARAMS` with its default, a description and its
allowed range (or choices); the dataclasses take their defaults from there. The BEV grid is not
a runtime tunable: it is a property of the trained model, validated with :data:`GRID_PARAMS`
when the model description is loaded (``model/description.py``).

The node declares each runtime tunable as a ROS parameter (with a ``ParameterDescriptor`` built
from the same spec, see ``node.py``); the tools load the same values from a plain YAML file.
Both paths end in :func:`Config.from_flat`, so an invalid value gives the same single message
everywhere::

    parameter 'sparse.tile_size' = 2 is out of range: allowed [4, 64]

Every problem is reported at once: :class:`ConfigError` carries the list of problems
(``problems``) and its message joins them, one line. An unknown name is an error everywhere
(node, tools), with a close match suggested when there is one (``difflib``)::

    2 problems: parameter 'sparse.tile_size' = 2 is out of range: allowed [4, 64]; unknown
    parameter 'node.qos_dpeth' = 5: did you mean 'node.qos_depth'?

The names every ROS 2 node accepts (:data:`ROS_NODE_PARAMS`: ``use_sim_time``,
``start_type_description_service``, ``qos_overrides.*``) are not ours but not unknown either:
they are left to rclpy (the two booleans are type-checked here).

Parameter names are dotted (``sparse.tile_size``); in a YAML file they may be nested
(``sparse: {tile_size: 16}``) and may sit under ``<node_name>: ros__parameters:`` as ROS
parameter files do. A ROS parameter file is read as ROS reads it (:func:`ros_file_params`):
only the entries whose node name matches the node (``/sparse_detector``; ``/**`` and ``*``
wildcards, nested namespaces) apply, in file order (a later entry wins), and a list must hold
one type (``[0, 0, 0.5]`` mixes integers and floats: rcl refuses it, so do we).
:func:`config_from_ros_arguments` reads the ``--params-file`` and ``-p name:=value`` arguments
of a ROS command line the same way, so that the node can report every problem in one message
before ``rclpy.init`` (which stops at the first with an RCLError traceback).

Live parameters: a spec with ``live=True`` (:data:`LIVE_PARAMS`: ``detector.*``, ``mask.*``,
``node.latency_budget_ms``) may be changed while the node runs (``ros2 param set``); the node
applies it between two frames. Every other parameter is set at start-up only.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

NODE_NAME = "sparse_detector"
#: names every rclpy node may be given that are not ours (exact names, then prefixes)
ROS_NODE_PARAMS = ("use_sim_time", "start_type_description_service")
ROS_NODE_PARAM_PREFIXES = ("qos_overrides.",)


class ConfigError(ValueError):
    """An invalid configuration; the message names the parameter, value and allowed range.

    ``problems``: every problem found, each a complete sentence (one, for a single problem);
    the message joins them on one line (:func:`join_problems`)."""

    def __init__(self, message: str = "", problems: Sequence[str] | None = None):
        problems = [p for p in (problems or ()) if p] or [message]
        super().__init__(message or join_problems(problems))
        self.problems: list[str] = list(problems)


def join_problems(problems: Sequence[str]) -> str:
    """One line: the problem itself, or ``"<n> problems: a; b; c"``."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems)


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (a typo, a missing or wrong section), or None."""
    known = list(known)
    section = next((k for k in known if k.startswith(name + ".")), None)   # a section alone
    if section is not None:
        return section
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if match:
        return match[0]
    tails: dict[str, str] = {}            # the name without its section, or in another one
    for k in known:
        tails.setdefault(k.rsplit(".", 1)[-1], k)
    match = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.7)
    return tails[match[0]] if match else None


def unknown_parameter(name: str, value: Any, known: Iterable[str]) -> str:
    """The message for an unknown parameter name: a suggestion, else the known names."""
    known = list(known)
    close = suggest(name, known)
    hint = (f"did you mean '{close}'?" if close is not None
            else "known parameters are " + ", ".join(known))
    return f"unknown parameter '{name}' = {value!r}: {hint}"


def is_ros_node_param(name: str) -> bool:
    """True for the parameters every rclpy node accepts (:data:`ROS_NODE_PARAMS`)."""
    return name in ROS_NODE_PARAMS or name.startswith(ROS_NODE_PARAM_PREFIXES)


@dataclass(frozen=True)
class ParamSpec:
    """One runtime parameter: ``name`` (dotted), ``default`` (its type is the parameter's: a
    tuple of floats is a ROS double array), ``min``/``max`` (inclusive; of every element of a
    list), ``choices`` (allowed strings), ``length`` (a list's exact number of values, None: any
    non-empty list) and ``live`` (may be changed while the node runs)."""
    name: str
    default: Any
    description: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple[str, ...] | None = None
    length: int | None = None
    live: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is tuple:
            count = "numbers" if self.length is None else f"exactly {self.length} numbers"
            return f"a list of {count} in [{self.min}, {self.max}]"
        if self.min is not None or self.max is not None:
            return f"[{self.min}, {self.max}]"
        return f"any {self.type.__name__}"

    def check(self, value: Any) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise :class:`ConfigError`.
        A list parameter (a tuple default: a ROS double array) takes a non-empty list of numbers
        (exactly ``length`` of them when set), each within ``[min, max]``, and returns a tuple of
        floats."""
        t = self.type
        if t is tuple:
            seq = list(value) if isinstance(value, (list, tuple)) or (
                hasattr(value, "typecode") and hasattr(value, "tolist")) else None
            if not seq or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  for v in seq):
                raise ConfigError(f"parameter '{self.name}' = {value!r} has the wrong type: "
                                  f"expected a non-empty list of numbers, allowed {self.allowed()}")
            if self.length is not None and len(seq) != self.length:
                raise ConfigError(f"parameter '{self.name}' = {seq!r} has {len(seq)} value"
                                  f"{'' if len(seq) == 1 else 's'}: allowed {self.allowed()}")
            for v in seq:
                if not math.isfinite(v) or v < self.min or v > self.max:
                    raise ConfigError(f"parameter '{self.name}' = {seq!r} is out of range: "
                                      f"allowed {self.allowed()}")
            return tuple(float(v) for v in seq)
        ok_type = (
            isinstance(value, bool) if t is bool
            else isinstance(value, int) and not isinstance(value, bool) if t is int
            else isinstance(value, (int, float)) and not isinstance(value, bool) if t is float
            else isinstance(value, str)
        )
        if not ok_type:
            raise ConfigError(
                f"parameter '{self.name}' = {value!r} has the wrong type: expected {t.__name__}, "
                f"allowed {self.allowed()}")
        if t is float:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"parameter '{self.name}' = {value!r} is not finite: "
                                  f"allowed {self.allowed()}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"parameter '{self.name}' = {value!r} is not allowed: "
                              f"allowed {self.allowed()}")
        below = self.min is not None and value < self.min
        if below or (self.max is not None and value > self.max):
            raise ConfigError(f"parameter '{self.name}' = {value!r} is out of range: "
                              f"allowed {self.allowed()}")
        return value


# The BEV grid is a property of a trained model, not a runtime parameter: it is set by the model
# description that ships with the weights (``model/description.py``) and validated with these
# specs. Order = order in a model description's ``grid:`` block.
GRID_PARAMS: tuple[ParamSpec, ...] = (
    # row = x index, col = y index; see bev.py.
    ParamSpec("grid.x_min", -51.2, "BEV grid lower x bound in the sensor frame [m]", -250.0, 250.0),
    ParamSpec("grid.x_max", 51.2, "BEV grid upper x bound in the sensor frame [m]", -250.0, 250.0),
    ParamSpec("grid.y_min", -51.2, "BEV grid lower y bound in the sensor frame [m]", -250.0, 250.0),
    ParamSpec("grid.y_max", 51.2, "BEV grid upper y bound in the sensor frame [m]", -250.0, 250.0),
    ParamSpec("grid.z_min", -3.0, "lowest z kept, sensor frame [m]", -20.0, 20.0),
    ParamSpec("grid.z_max", 2.0, "highest z kept, sensor frame [m]", -20.0, 20.0),
    ParamSpec("grid.resolution", 0.2, "BEV cell size [m]", 0.02, 2.0),
    ParamSpec("grid.z_slices", 5, "number of height-slice occupancy channels", 1, 64),
    ParamSpec("grid.intensity_max", 255.0,
              "intensity mapped to 1.0 in the intensity channel (255 for 8-bit drivers, 1 for "
              "normalised ones)", 1e-6, 1e6),
    ParamSpec("grid.density_saturation", 64, "points per cell at which the density channel "
              "saturates at 1.0 (log scale)", 2, 100000),
)

# The single list of runtime tunables (ROS parameters). Order = order in
# config/sparse_detector.yaml.
PARAMS: tuple[ParamSpec, ...] = (
    # --- model (model/description.py): which trained model to run.
    ParamSpec("model.path", "", "model description (model.yaml, or its folder) that fixes the "
              "BEV grid, classes and weights; empty = the model shipped with the package"),
    # --- sparse engine (sparse/).
    ParamSpec("sparse.backend", "auto", "gather/scatter backend: auto (CuPy kernels on a GPU, "
              "else torch), cupy, torch", choices=("auto", "cupy", "torch")),
    ParamSpec("sparse.tile_size", 16, "output tile size in BEV cells (block size B)", 4, 64),
    ParamSpec("sparse.threshold", 0.0, "a tile is active when its pooled mask value exceeds this",
              0.0, 1.0),
    ParamSpec("sparse.pooling", "max", "tile pooling of the computation mask",
              choices=("max", "avg")),
    ParamSpec("sparse.dense_crossover", 0.8, "active-tile fraction above which the dense path "
              "runs instead (measured by `sparse-detector bench sparse`)", 0.0, 1.0),
    # --- computation mask (masks.py): where the sparse backbone runs.
    ParamSpec("mask.mode", "occupancy", "computation mask: dense (everything), occupancy (cells "
              "with points above the local ground), map_prior (road of a nav2 map around the "
              "sensor pose), net (low-resolution network), union (of the two in mask.union)",
              choices=("dense", "occupancy", "map_prior", "net", "union"), live=True),
    ParamSpec("mask.union", "map_prior,occupancy", "the two masks that mask.mode 'union' joins",
              choices=("map_prior,occupancy", "map_prior,net", "occupancy,net"), live=True),
    ParamSpec("mask.map_yaml", "", "nav2 map_server map (YAML) for the map_prior mask", live=True),
    ParamSpec("mask.map_margin", 2.0, "the road region of the map prior is grown by this [m] "
              "(parked cars, pedestrians on the sidewalk)", 0.0, 50.0, live=True),
    ParamSpec("mask.map_road_min_value", -1, "map image value at or above which a cell is road; "
              "-1: every free cell of the nav2 map", -1, 255, live=True),
    ParamSpec("mask.map_fallback", "occupancy", "mask used while the map prior has no map or no "
              "pose", choices=("dense", "occupancy"), live=True),
    ParamSpec("mask.map_required", True, "a mask.map_yaml that cannot be read (missing, corrupt) "
              "stops start-up (and a live change to it is refused); false: the map prior gives "
              "way to mask.map_fallback, reported in diagnostics (WARN, mask_fallback)",
              live=True),
    ParamSpec("mask.occupancy_min_points", 1, "points above the local ground a cell needs to be "
              "active (2 would drop far objects seen by single points per cell: 0.8 % of the "
              "os1-64 centres)", 1, 10000, live=True),
    ParamSpec("mask.occupancy_min_height", 0.25, "height above the local ground from which a point "
              "counts [m]", 0.0, 5.0, live=True),
    ParamSpec("mask.occupancy_ground_cell", 3.2, "size of the cells over which the local ground "
              "(lowest point) is estimated [m]", 0.1, 50.0, live=True),
    ParamSpec("mask.occupancy_dilation", 12, "active cells are grown by this many cells (12: the "
              "centre of a car seen from one side stays inside; >= 99 % of the object centres "
              "on every evaluated preset)", 0, 64, live=True),
    ParamSpec("mask.net_threshold", 0.1, "the net mask is active where its probability exceeds "
              "this (low: recall first)", 0.0, 1.0, live=True),
    # --- detector: decoding of the head's outputs into boxes (model/decode.py).
    ParamSpec("detector.score_thresholds", (0.3,), "minimum score of a detection, one value for "
              "every class or one per class of the model (in the order of its classes)", 0.0,
              1.0, live=True),
    ParamSpec("detector.top_k", 100, "at most this many peaks per frame enter box decoding",
              1, 10000, live=True),
    ParamSpec("detector.nms_iou", 0.2, "BEV IoU above which the lower-scored of two boxes of "
              "one class is suppressed (colliding peaks)", 0.0, 1.0, live=True),
    ParamSpec("detector.iou_weight", 0.5, "for models with an IoU output (iou_head: 1): score = "
              "heatmap^(1 - w) x predicted IoU^w, so that tight boxes rank first; the "
              "score_thresholds apply to the heatmap alone (0: the "
              "heatmap alone; models without the output ignore it)", 0.0, 0.9, live=True),
    ParamSpec("detector.box_radius", 1, "each box averages the regressions of the cells within "
              "this many output cells of its peak, weighted by their heatmap score (cells whose "
              "box lies elsewhere are left out; for models trained with a regression radius); "
              "0: the peak cell alone", 0, 3, live=True),
    # --- transform (frames.py): where the cloud's frame sits in the detection frame, the frame
    # the model was trained in (level a tilted sensor, lift the origin to the trained height).
    ParamSpec("transform.translation", (0.0, 0.0, 0.0), "position (x, y, z) of the cloud's frame "
              "in the detection frame: a point p of the cloud is detected at R p + translation "
              "[m]; boxes are published back in the cloud's frame", -100.0, 100.0, length=3),
    ParamSpec("transform.rpy", (0.0, 0.0, 0.0), "orientation (roll, pitch, yaw; fixed axes, "
              "R = Rz(yaw) Ry(pitch) Rx(roll)) of the cloud's frame in the detection frame "
              "[rad]", -math.pi, math.pi, length=3),
    # --- node (node.py).
    ParamSpec("node.device", "auto", "torch device: auto (cuda if available), cpu, cuda",
              choices=("auto", "cpu", "cuda")),
    ParamSpec("node.threads", 0, "CPU threads of the network (torch intra-op threads); 0: "
              "torch's default, one per core", 0, 1024),
    ParamSpec("node.qos_reliability", "best_effort", "input/points subscription reliability "
              "(best_effort = sensor-data QoS)", choices=("best_effort", "reliable")),
    ParamSpec("node.qos_depth", 5, "input/points subscription queue depth", 1, 1000),
    ParamSpec("node.diagnostics_period", 1.0, "period of /diagnostics messages [s]", 0.05, 60.0),
    ParamSpec("node.log_throttle_sec", 5.0, "minimum time between two logs of one kind of "
              "rejected input [s]", 0.0, 3600.0),
    ParamSpec("node.latency_budget_ms", 100.0, "diagnostics turn WARN when the p99 latency "
              "(cloud stamp to boxes) exceeds this [ms]", 0.1, 1e6, live=True),
    ParamSpec("node.input_timeout_s", 2.0, "diagnostics turn ERROR when no cloud arrived on "
              "input/points for this long [s]", 0.01, 3600.0),
    ParamSpec("node.max_stamp_skew_s", 5.0, "a cloud stamped further than this from the node's "
              "clock (sim time included) is a clock problem: processed, but counted "
              "(frames_clock_skew, WARN) and kept out of the latency statistics [s]", 0.001,
              1e6),
    ParamSpec("node.odometry_timeout_s", 0.5, "input/odometry further than this from the "
              "cloud's stamp (or none) means no pose: the map prior gives way to "
              "mask.map_fallback [s]", 0.0, 3600.0),
    ParamSpec("node.stats_window", 100, "frames over which diagnostics report the p50/p99 "
              "timings", 1, 100000),
    ParamSpec("node.publish_markers", True, "publish output/markers (MarkerArray: boxes, "
              "headings, labels)"),
    ParamSpec("node.publish_mask", True, "publish output/mask (OccupancyGrid: where the network "
              "computed)"),
)
LIVE_PARAMS: frozenset[str] = frozenset(p.name for p in PARAMS if p.live)
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}
GRID_SPECS: dict[str, ParamSpec] = {p.name: p for p in GRID_PARAMS}


def _default(name: str) -> Any:
    """The default of a spec: the dataclasses below take their defaults from the specs, so each
    default is written once."""
    return (SPECS.get(name) or GRID_SPECS[name]).default


def _check_values(specs: Mapping[str, ParamSpec], values: Mapping[str, Any], section: str
                  ) -> dict[str, Any]:
    """``{"<section>.key": value}`` -> ``{"key": checked value}``; one ConfigError listing every
    unknown name (with a suggestion), wrong type and value out of range."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None or not name.startswith(section + "."):
            problems.append(unknown_parameter(name, value, specs))
            continue
        try:
            out[name[len(section) + 1:]] = spec.check(value)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems=problems)
    return out


@dataclass(frozen=True)
class GridConfig:
    """The BEV grid (see ``bev.py``). A property of a trained model: it comes from the model
    description (``model/description.py``), never from the runtime parameter file."""
    x_min: float = _default("grid.x_min")
    x_max: float = _default("grid.x_max")
    y_min: float = _default("grid.y_min")
    y_max: float = _default("grid.y_max")
    z_min: float = _default("grid.z_min")
    z_max: float = _default("grid.z_max")
    resolution: float = _default("grid.resolution")
    z_slices: int = _default("grid.z_slices")
    intensity_max: float = _default("grid.intensity_max")
    density_saturation: int = _default("grid.density_saturation")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) = (rows along x, cols along y)."""
        return (round((self.x_max - self.x_min) / self.resolution),
                round((self.y_max - self.y_min) / self.resolution))

    @property
    def channels(self) -> int:
        """BEV feature channels: z_slices occupancy + intensity + density."""
        return self.z_slices + 2

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "GridConfig":
        """Build from dotted names (``{"grid.resolution": 0.1}``); unset names keep defaults.
        Raises :class:`ConfigError` naming the value (unknown, wrong type, out of range, or an
        extent the resolution does not divide)."""
        grid = cls(**_check_values(GRID_SPECS, values, "grid"))
        grid._check_consistency()
        return grid

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "GridConfig":
        """Build from ``{"resolution": 0.1, ...}`` (the ``grid:`` block of a description)."""
        return cls.from_flat(flatten(data or {}, "grid."))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _check_consistency(self) -> None:
        for lo, hi in (("x_min", "x_max"), ("y_min", "y_max"), ("z_min", "z_max")):
            if getattr(self, lo) >= getattr(self, hi):
                raise ConfigError(
                    f"parameter 'grid.{lo}' = {getattr(self, lo)!r} must be below 'grid.{hi}' = "
                    f"{getattr(self, hi)!r}")
        for axis in ("x", "y"):
            extent = getattr(self, f"{axis}_max") - getattr(self, f"{axis}_min")
            cells = extent / self.resolution
            if abs(cells - round(cells)) > 1e-6 * max(1.0, cells):
                raise ConfigError(
                    f"parameter 'grid.resolution' = {self.resolution!r} must divide the {axis} "
                    f"extent {extent!r} m into whole cells")
            if not 1 <= round(cells) <= 8192:
                raise ConfigError(
                    f"parameter 'grid.resolution' = {self.resolution!r} gives {round(cells)} "
                    f"cells along {axis}: allowed [1, 8192]")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _default("model.path")


@dataclass(frozen=True)
class SparseConfig:
    backend: str = _default("sparse.backend")
    tile_size: int = _default("sparse.tile_size")
    threshold: float = _default("sparse.threshold")
    pooling: str = _default("sparse.pooling")
    dense_crossover: float = _default("sparse.dense_crossover")


@dataclass(frozen=True)
class MaskConfig:
    mode: str = _default("mask.mode")
    union: str = _default("mask.union")
    map_yaml: str = _default("mask.map_yaml")
    map_margin: float = _default("mask.map_margin")
    map_road_min_value: int = _default("mask.map_road_min_value")
    map_fallback: str = _default("mask.map_fallback")
    map_required: bool = _default("mask.map_required")
    occupancy_min_points: int = _default("mask.occupancy_min_points")
    occupancy_min_height: float = _default("mask.occupancy_min_height")
    occupancy_ground_cell: float = _default("mask.occupancy_ground_cell")
    occupancy_dilation: int = _default("mask.occupancy_dilation")
    net_threshold: float = _default("mask.net_threshold")


@dataclass(frozen=True)
class DetectorConfig:
    score_thresholds: tuple[float, ...] = _default("detector.score_thresholds")
    top_k: int = _default("detector.top_k")
    nms_iou: float = _default("detector.nms_iou")
    iou_weight: float = _default("detector.iou_weight")
    box_radius: int = _default("detector.box_radius")

    def thresholds_for(self, classes: tuple[str, ...]) -> tuple[float, ...]:
        """One threshold per class: a single value applies to every class. ConfigError when
        the list has another length than ``classes``."""
        t = self.score_thresholds
        if len(t) == 1:
            return t * len(classes)
        if len(t) != len(classes):
            raise ConfigError(
                f"parameter 'detector.score_thresholds' = {list(t)!r} has {len(t)} values but "
                f"the model has {len(classes)} classes {list(classes)}: give one value, or one "
                "per class")
        return t


@dataclass(frozen=True)
class TransformConfig:
    """The cloud frame's pose in the detection frame (``frames.MountTransform``)."""
    translation: tuple[float, ...] = _default("transform.translation")
    rpy: tuple[float, ...] = _default("transform.rpy")


@dataclass(frozen=True)
class NodeConfig:
    device: str = _default("node.device")
    threads: int = _default("node.threads")
    qos_reliability: str = _default("node.qos_reliability")
    qos_depth: int = _default("node.qos_depth")
    diagnostics_period: float = _default("node.diagnostics_period")
    log_throttle_sec: float = _default("node.log_throttle_sec")
    latency_budget_ms: float = _default("node.latency_budget_ms")
    input_timeout_s: float = _default("node.input_timeout_s")
    max_stamp_skew_s: float = _default("node.max_stamp_skew_s")
    odometry_timeout_s: float = _default("node.odometry_timeout_s")
    stats_window: int = _default("node.stats_window")
    publish_markers: bool = _default("node.publish_markers")
    publish_mask: bool = _default("node.publish_mask")


_SECTIONS = {"model": ModelConfig, "sparse": SparseConfig, "mask": MaskConfig,
             "detector": DetectorConfig, "transform": TransformConfig, "node": NodeConfig}


@dataclass(frozen=True)
class Config:
    """The runtime configuration (the node's ROS parameters). The BEV grid is not part of it: it
    belongs to the model (:class:`GridConfig`, from the model description)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    node: NodeConfig = field(default_factory=NodeConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], problems: Sequence[str] = ()) -> "Config":
        """Build from dotted names (``{"sparse.tile_size": 8}``); unset names keep defaults.

        Raises one :class:`ConfigError` listing every problem: ``problems`` the caller found
        before (first), an unknown name (with a close match suggested), a wrong type, a value
        out of range, a grid parameter (``grid.*``, which belongs to the model description). The
        parameters of every ROS node (:func:`is_ros_node_param`) are accepted and left out.
        """
        problems = list(problems)
        sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for name, value in values.items():
            if name in GRID_SPECS:
                problems.append(grid_is_model_property(name, value))
            elif is_ros_node_param(name):
                if name in ROS_NODE_PARAMS and not isinstance(value, bool):
                    problems.append(f"parameter '{name}' = {value!r} has the wrong type: "
                                    "expected bool, allowed any bool")
            elif name in SPECS:
                sections[name.split(".", 1)[0]][name] = value
            else:
                problems.append(unknown_parameter(name, value, SPECS))
        checked: dict[str, Any] = {}
        for s, kv in sections.items():
            try:
                checked[s] = _SECTIONS[s](**_check_values(SPECS, kv, s))
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems=problems)
        return cls(**checked)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, node: str = "/" + NODE_NAME,
                  source: str = "") -> "Config":
        """Build from a nested or dotted dict, or a ROS parameter file's content (read as ROS
        reads it for the node ``node``, see :func:`ros_file_params`). One ConfigError lists
        every problem."""
        values, problems = ros_file_params(data, node, source)
        return cls.from_flat(values, problems)

    @classmethod
    def from_yaml(cls, path: str | Path, node: str = "/" + NODE_NAME) -> "Config":
        """Read a YAML file (a ROS parameter file, or a plain nested/dotted mapping). A file
        that cannot be read or parsed is a ConfigError naming it (and the line)."""
        data, problem = read_yaml(path, "parameter file")
        if problem:
            raise ConfigError(problem)
        return cls.from_dict(data, node, source=str(path))

    def to_flat(self) -> dict[str, Any]:
        out = {}
        for section in _SECTIONS:
            obj = getattr(self, section)
            for f in fields(obj):
                out[f"{section}.{f.name}"] = getattr(obj, f.name)
        return out

    def updated(self, values: Mapping[str, Any]) -> "Config":
        """A copy with the dotted ``values`` changed, validated like :meth:`from_flat`
        (:class:`ConfigError` naming every bad value)."""
        return Config.from_flat({**self.to_flat(), **values})

    def changes(self, other: "Config") -> dict[str, Any]:
        """``{dotted name: value in other}`` for every parameter whose value differs."""
        mine, theirs = self.to_flat(), other.to_flat()
        return {k: v for k, v in theirs.items() if mine[k] != v}


def start_up_only(name: str) -> str:
    """The message for a change of a parameter that is not live."""
    return (f"parameter '{name}' is set at start-up only: restart the node to change it "
            f"(live parameters: {', '.join(sorted(LIVE_PARAMS))})")


def grid_is_model_property(name: str, value: Any) -> str:
    """The message for a ``grid.*`` value given as a runtime parameter."""
    return (f"parameter '{name}' = {value!r} is not a runtime parameter: the BEV grid is a "
            "property of the trained model and is set by its model description (see "
            "'model.path'); remove it from the parameter file, or run a model trained on the "
            "grid you want")


def unwrap_ros_params(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the ``ros__parameters`` mapping of a ROS parameter file, or ``data`` unchanged."""
    for value in data.values():
        if isinstance(value, Mapping) and "ros__parameters" in value:
            return value["ros__parameters"] or {}
    if "ros__parameters" in data:
        return data["ros__parameters"] or {}
    return data


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted names."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- ROS files, args
def read_yaml(path: str | Path, what: str) -> tuple[Any, str]:
    """``(content, "")`` of a YAML file, or ``(None, problem)`` naming the file (and the line
    of a syntax error)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, f"{what} '{path}' cannot be read: {why}"
    try:
        return yaml.safe_load(text), ""
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return None, f"{what} '{path}' is not valid YAML{where}: {problem}"


_NODE_KEY_TOKEN = re.compile(r"\*\*|\*|[A-Za-z0-9_]+")


def node_key_problem(key: str) -> str:
    """Why rcl refuses ``key`` as a parameter file's node name ("" when it takes it): every
    ``/``-separated part is ``**``, ``*`` or alphanumerics and ``_``."""
    tokens = key.strip("/").split("/")
    if all(_NODE_KEY_TOKEN.fullmatch(t) for t in tokens):
        return ""
    return (f"node name '{key}' must not contain characters other than alphanumerics or '_' "
            "(or be * or ** between slashes)")


def node_name_pattern(key: str) -> re.Pattern:
    """The node names a parameter file's node key applies to, as rcl matches them: a key
    without a leading ``/`` is absolute all the same, ``/**`` stands for any number of
    namespace levels (none included), ``/*`` for exactly one name."""
    key = key if key.startswith("/") else "/" + key
    out = []
    for token in key.strip("/").split("/") if key != "/" else []:
        out.append(r"(?:/[^/]+)*" if token == "**" else
                   "/[^/]+" if token == "*" else "/" + re.escape(token))
    return re.compile("".join(out))


def node_matches(key: str, node: str) -> bool:
    """Whether the parameter file node key ``key`` applies to the node ``node`` (its fully
    qualified name, ``/namespace/name``)."""
    return node_name_pattern(key).fullmatch(node) is not None


def ros_value_problem(name: str, value: Any) -> str:
    """Why rcl would refuse ``value`` of parameter ``name`` from a parameter file or a ``-p``
    argument ("" when it takes it): no value, a mapping inside a list, or a list mixing types
    (rcl wants one type: ``[0.0, 0.5]``, not ``[0, 0.5]``)."""
    if value is None:
        return f"parameter '{name}' has no value"
    if isinstance(value, list):
        kinds = {"bool" if isinstance(v, bool) else "integer" if isinstance(v, int)
                 else "float" if isinstance(v, float) else "string" if isinstance(v, str)
                 else "other" for v in value}
        if "other" in kinds:
            return (f"parameter '{name}' = {value!r}: a list may hold only numbers, booleans or "
                    "strings")
        if len(kinds) > 1:
            hint = (" (write every number with a decimal point, e.g. 0.0)"
                    if kinds == {"integer", "float"} else "")
            return (f"parameter '{name}' = {value!r} mixes {' and '.join(sorted(kinds))} "
                    f"values: a ROS parameter list holds one type{hint}")
    return ""


def _ros_entries(data: Mapping[str, Any], prefix: str, problems: list[str], where: str
                 ) -> list[tuple[str, Mapping[str, Any]]]:
    """``[(node key, parameters)]`` of a ROS parameter file, in file order (nested namespace
    keys joined with ``/``)."""
    out = []
    for key, value in data.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if key == "ros__parameters":
            if not prefix:
                out.append(("/**", value))         # a bare block: for any node
            elif value is None:
                problems.append(f"{where}node '{prefix}': ros__parameters is empty (rcl refuses "
                                "that: give it '{}' or remove the entry)")
            elif not isinstance(value, Mapping):
                problems.append(f"{where}node '{prefix}': ros__parameters must be a mapping of "
                                f"parameters, got {value!r}")
            elif node_key_problem(prefix):
                problems.append(where + node_key_problem(prefix))
            else:
                out.append((prefix, value))
        elif isinstance(value, Mapping):
            out += _ros_entries(value, name, problems, where)
        else:
            problems.append(f"{where}'{name}' = {value!r} is not under a "
                            "'<node>: ros__parameters:' block")
    return out


def is_ros_file(data: Any) -> bool:
    """Whether ``data`` is a ROS parameter file's content (has a ``ros__parameters`` key at
    some depth of its first mappings)."""
    if not isinstance(data, Mapping):
        return False
    return "ros__parameters" in data or any(is_ros_file(v) for v in data.values())


def ros_file_entries(data: Any, source: str = "", ros_only: bool = False
                     ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """``([(node key, dotted values)], problems)`` of a parameter file's content, in file order,
    every node key absolute (``sparse_detector`` -> ``/sparse_detector``).

    A ROS parameter file (:func:`is_ros_file`, or any content with ``ros_only``: a file given
    to ``--params-file``) is checked as rcl checks it, every entry included (rcl refuses the
    whole file): every value must be one rcl takes (:func:`ros_value_problem`), and nothing may
    sit outside a ``<node>: ros__parameters:`` block. Anything else (None, a plain nested or
    dotted mapping) is one entry for every node (``/**``)."""
    where = f"parameter file '{source}': " if source else ""
    if data is None:
        return [], []
    if not isinstance(data, Mapping):
        return [], [f"{where}expected a mapping of parameters, got {type(data).__name__}"]
    if not ros_only and not is_ros_file(data):
        return [("/**", flatten(data))], []
    problems: list[str] = []
    entries = []
    for key, params in _ros_entries(data, "", problems, where):
        values = {}
        for name, value in flatten(params or {}).items():
            problem = ros_value_problem(name, value)
            if problem:
                problems.append(where + problem)
            else:
                values[name] = value
        entries.append((key if key.startswith("/") else "/" + key, values))
    return entries, problems


def merge_entries(merged: dict[str, dict[str, Any]],
                  entries: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Add ``entries`` to ``merged`` as rcl does: one slot per node key, in the order the keys
    first appear (over every file and ``-p``), a later value of the same key overwriting."""
    for key, values in entries:
        merged.setdefault(key, {}).update(values)


def values_for_node(merged: Mapping[str, Mapping[str, Any]], node: str) -> dict[str, Any]:
    """The values of ``merged`` (:func:`merge_entries`) for the node ``node``: the slots whose
    key matches it, applied in slot order (as rclpy does)."""
    out: dict[str, Any] = {}
    for key, values in merged.items():
        if node_matches(key, node):
            out.update(values)
    return out


def ros_file_params(data: Any, node: str = "/" + NODE_NAME, source: str = "",
                    ros_only: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``(dotted values, problems)`` of a parameter file's content for the node ``node``: the
    entries of :func:`ros_file_entries` whose key matches ``node`` (:func:`node_matches`),
    merged as rcl merges them (:func:`merge_entries`)."""
    entries, problems = ros_file_entries(data, source, ros_only)
    merged: dict[str, dict[str, Any]] = {}
    merge_entries(merged, entries)
    return values_for_node(merged, node), problems


@dataclass
class RosArguments:
    """The parts of a ROS command line (``--ros-args ... [--]``) that set parameters:
    ``steps`` in command-line order, each ``("file", path)`` or ``("param", "[node:]name",
    value text)``; the node's name and namespace after ``__node``/``__ns`` remapping."""
    steps: list[tuple[str, ...]] = field(default_factory=list)
    node_name: str = NODE_NAME
    namespace: str = "/"

    @property
    def node(self) -> str:
        """The node's fully qualified name."""
        return self.namespace.rstrip("/") + "/" + self.node_name


# rcl options that take a value (besides -r/-p/--params-file, handled below)
_ROS_VALUE_OPTIONS = ("-e", "--enclave", "--log-level", "--log-file-name", "--log-config-file")


def parse_ros_arguments(args: Sequence[str], node_name: str = NODE_NAME) -> RosArguments:
    """The parameter files, ``-p`` overrides and node name/namespace remaps of ``args`` (a
    command line; only its ``--ros-args`` sections count, each up to ``--``)."""
    out = RosArguments(node_name=node_name)
    inside, i = False, 0
    args = list(args)
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a == "--ros-args":
            inside = True
        elif not inside:
            pass
        elif a == "--":
            inside = False
        elif a == "--params-file" and nxt is not None:
            out.steps.append(("file", nxt))
            i += 1
        elif a in ("-p", "--param") and nxt is not None:
            rule, _, value = nxt.partition(":=")
            out.steps.append(("param", rule, value))
            i += 1
        elif a in ("-r", "--remap") and nxt is not None:
            rule, _, value = nxt.partition(":=")
            target, _, what = rule.rpartition(":")
            if not target or target == node_name:
                if what in ("__node", "__name"):
                    out.node_name = value
                elif what == "__ns":
                    out.namespace = value if value.startswith("/") else "/" + value
            i += 1
        elif a in _ROS_VALUE_OPTIONS:
            i += 1
        i += 1
    return out


def config_from_ros_arguments(args: Sequence[str], node_name: str = NODE_NAME
                              ) -> tuple[Config, list[str]]:
    """The :class:`Config` a node named ``node_name`` gets from the ``--params-file`` and
    ``-p`` arguments of ``args`` as ROS applies them, and notes worth a warning (a file with no
    entry for the node). Like rcl, the values are kept in one slot per node key (``/**`` for a
    plain ``-p name:=value``; ``-p node:name:=value`` for one node), in the order the keys first
    appear on the command line, a later value of the same key overwriting
    (:func:`merge_entries`); the node then takes the slots that match it, in that order.

    Raises one :class:`ConfigError` listing every problem: a file that cannot be read or is
    not valid YAML, a value rcl would refuse (no value, a list of mixed types), and every
    problem of :meth:`Config.from_flat` (unknown names with suggestions, types, ranges)."""
    import yaml

    ros = parse_ros_arguments(args, node_name)
    node = ros.node
    problems: list[str] = []
    notes: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    for step in ros.steps:
        if step[0] == "file":
            data, problem = read_yaml(step[1], "parameter file")
            if problem:
                problems.append(problem)
                continue
            entries, file_problems = ros_file_entries(data, step[1], ros_only=True)
            problems += file_problems
            if entries and not any(node_matches(k, node) for k, _ in entries):
                notes.append(f"parameter file '{step[1]}' has no entry for node '{node}' "
                             f"(entries: {', '.join(k for k, _ in entries)}): none of its "
                             "values apply")
            merge_entries(merged, entries)
        else:
            _, rule, text = step
            target, _, name = rule.rpartition(":")
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError as exc:
                problems.append(f"-p {rule}:={text}: the value is not valid YAML "
                                f"({getattr(exc, 'problem', None) or exc})")
                continue
            problem = ros_value_problem(name, value)
            if problem:
                problems.append(f"-p {rule}:={text}: {problem}")
                continue
            key = ("/" + target if target and not target.startswith("/") else target) or "/**"
            merge_entries(merged, [(key, {name: value})])
    return Config.from_flat(values_for_node(merged, node), problems), notes


def params_yaml() -> str:
    """The text of ``config/sparse_detector.yaml``: every runtime parameter with its default,
    description and allowed range (``python -m sparse_detector_ros.config`` prints it; a test
    keeps the file equal to it)."""
    lines = ["# sparse_detector_node runtime parameters (ROS 2 parameter file).",
             "# Every value here is the built-in default; ranges are enforced at start-up.",
             "# Parameters marked 'live' may be changed while the node runs (ros2 param set: "
             "applied",
             "# from the next frame, checked like at start-up); the others are set at start-up "
             "only.",
             "# The BEV grid and the classes are not here: they are properties of the trained "
             "model, set by",
             "# its model description (model.path; default: models/default/model.yaml of the "
             "package).",
             "# Generated by: python -m sparse_detector_ros.config > config/sparse_detector.yaml",
             "# Use: ros2 run sparse_detector_ros sparse_detector_node --ros-args --params-file "
             "<this file>",
             f"{NODE_NAME}:", "  ros__parameters:"]
    section = None
    for p in PARAMS:
        sec, key = p.name.split(".", 1)
        if sec != section:
            lines.append(f"    {sec}:")
            section = sec
        lines.append(f"      # {p.description}; allowed {p.allowed()}"
                     + ("; live (ros2 param set)" if p.live else ""))
        lines.append(f"      {key}: {_yaml_value(p.default)}")
    return "\n".join(lines) + "\n"


def _yaml_value(v: Any) -> str:
    """A default as YAML text (``true``/``false`` as every YAML parser reads them)."""
    if isinstance(v, str):
        return '""' if v == "" else v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ", ".join(repr(x) for x in v) + "]"
    return repr(v)


if __name__ == "__main__":
    print(params_yaml(), end="")
