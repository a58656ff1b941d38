"""Typed, validated configuration shared by the ROS node and the ROS-free tools.

Every tunable is listed once in :data:`PARAMS` with its default, a description and its allowed
range (or choices). The node declares each as a ROS parameter (with a ``ParameterDescriptor``
built from the same spec, see ``node.py``); the tools load the same values from a plain YAML
file. Both paths end in :func:`Config.from_flat`, so an invalid value gives the same single
message everywhere::

    parameter 'grid.resolution' = 5.0 is out of range: allowed [0.02, 2.0]

Parameter names are dotted (``grid.resolution``); in a YAML file they may be nested
(``grid: {resolution: 0.2}``) and may sit under ``<node_name>: ros__parameters:`` as ROS
parameter files do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

NODE_NAME = "sparse_detector"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the parameter, value and allowed range."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple[str, ...] | None = None

    @property
    def type(self) -> type:
        return type(self.default)

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.min is not None or self.max is not None:
            return f"[{self.min}, {self.max}]"
        return f"any {self.type.__name__}"

    def check(self, value: Any) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise :class:`ConfigError`."""
        t = self.type
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


# The single list of tunables. Order = order in config/sparse_detector.yaml.
PARAMS: tuple[ParamSpec, ...] = (
    # --- BEV grid (bev.py). row = x index, col = y index; see bev.py.
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
    # --- node (node.py).
    ParamSpec("node.device", "auto", "torch device: auto (cuda if available), cpu, cuda",
              choices=("auto", "cpu", "cuda")),
    ParamSpec("node.qos_reliability", "best_effort", "input/points subscription reliability "
              "(best_effort = sensor-data QoS)", choices=("best_effort", "reliable")),
    ParamSpec("node.qos_depth", 5, "input/points subscription queue depth", 1, 1000),
    ParamSpec("node.diagnostics_period", 1.0, "period of /diagnostics messages [s]", 0.05, 60.0),
    ParamSpec("node.log_throttle_sec", 5.0, "minimum time between two logs of one kind of "
              "rejected input [s]", 0.0, 3600.0),
)
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}


@dataclass(frozen=True)
class GridConfig:
    x_min: float = -51.2
    x_max: float = 51.2
    y_min: float = -51.2
    y_max: float = 51.2
    z_min: float = -3.0
    z_max: float = 2.0
    resolution: float = 0.2
    z_slices: int = 5
    intensity_max: float = 255.0
    density_saturation: int = 64

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) = (rows along x, cols along y)."""
        return (round((self.x_max - self.x_min) / self.resolution),
                round((self.y_max - self.y_min) / self.resolution))

    @property
    def channels(self) -> int:
        """BEV feature channels: z_slices occupancy + intensity + density."""
        return self.z_slices + 2


@dataclass(frozen=True)
class SparseConfig:
    backend: str = "auto"
    tile_size: int = 16
    threshold: float = 0.0
    pooling: str = "max"
    dense_crossover: float = 0.8


@dataclass(frozen=True)
class NodeConfig:
    device: str = "auto"
    qos_reliability: str = "best_effort"
    qos_depth: int = 5
    diagnostics_period: float = 1.0
    log_throttle_sec: float = 5.0


_SECTIONS = {"grid": GridConfig, "sparse": SparseConfig, "node": NodeConfig}


@dataclass(frozen=True)
class Config:
    grid: GridConfig = field(default_factory=GridConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    node: NodeConfig = field(default_factory=NodeConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "Config":
        """Build from dotted names (``{"grid.resolution": 0.1}``); unset names keep defaults.

        Raises :class:`ConfigError` for an unknown name, a wrong type or a value out of range.
        """
        sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for name, value in values.items():
            spec = SPECS.get(name)
            if spec is None:
                raise ConfigError(f"unknown parameter '{name}' = {value!r}: known parameters are "
                                  + ", ".join(SPECS))
            section, key = name.split(".", 1)
            sections[section][key] = spec.check(value)
        cfg = cls(**{s: _SECTIONS[s](**kw) for s, kw in sections.items()})
        cfg._check_consistency()
        return cfg

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Config":
        """Build from a nested or dotted dict, or a ROS parameter file's content."""
        return cls.from_flat(flatten(unwrap_ros_params(data or {})))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f))

    def to_flat(self) -> dict[str, Any]:
        out = {}
        for section in _SECTIONS:
            obj = getattr(self, section)
            for f in fields(obj):
                out[f"{section}.{f.name}"] = getattr(obj, f.name)
        return out

    def _check_consistency(self) -> None:
        g = self.grid
        for lo, hi in (("x_min", "x_max"), ("y_min", "y_max"), ("z_min", "z_max")):
            if getattr(g, lo) >= getattr(g, hi):
                raise ConfigError(
                    f"parameter 'grid.{lo}' = {getattr(g, lo)!r} must be below 'grid.{hi}' = "
                    f"{getattr(g, hi)!r}")
        for axis in ("x", "y"):
            extent = getattr(g, f"{axis}_max") - getattr(g, f"{axis}_min")
            cells = extent / g.resolution
            if abs(cells - round(cells)) > 1e-6 * max(1.0, cells):
                raise ConfigError(
                    f"parameter 'grid.resolution' = {g.resolution!r} must divide the {axis} extent "
                    f"{extent!r} m into whole cells")
            if not 1 <= round(cells) <= 8192:
                raise ConfigError(
                    f"parameter 'grid.resolution' = {g.resolution!r} gives {round(cells)} cells "
                    f"along {axis}: allowed [1, 8192]")


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
