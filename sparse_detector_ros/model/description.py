"""The model contract: a model description that ships with the weights.

What a trained network was trained on is a property of its weights, not a runtime choice: the
BEV grid (extent, resolution, height slices, hence the input channels), the classes and the
architecture sizes. They live in a YAML file next to the weights (``model.yaml``), the way
Autoware ships an ``ml_package`` parameter file with each model; the node's runtime parameter
file keeps only what really is runtime (thresholds, mask mode, backend, device, QoS)::

    sparse_detector_model:
      version: 1                 # format of this file (FORMAT_VERSION)
      name: default
      grid: {x_min: -51.2, x_max: 51.2, y_min: -51.2, y_max: 51.2, z_min: -3.0, z_max: 2.0,
             resolution: 0.2, z_slices: 5, intensity_max: 255.0, density_saturation: 64}
      channels: 7                # BEV input channels = grid.z_slices + 2 (checked)
      classes: [car, pedestrian, cyclist]
      architecture: {...}        # network sizes (ints, floats, strings or lists of them)
      weights: model.pt          # checkpoint next to this file; empty = no trained weights

A checkpoint (:func:`save_checkpoint`) stores the description it was trained with beside the
state dict. :func:`load_checkpoint` refuses, with one message naming every difference, weights
whose grid, channels, classes or architecture differ from the description that configures the
run: a model applied to a grid it was not trained on gives wrong boxes without any error. A
weights file that is missing, corrupt or truncated is refused with a message naming it and the
description (``pipeline.Detector`` adds: tensors that do not fit the network).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, GridConfig

__all__ = ["FORMAT_VERSION", "ROOT_KEY", "DEFAULT_MODEL", "ModelDescription", "ModelError",
           "load_description", "save_checkpoint", "load_checkpoint", "differences"]

FORMAT_VERSION = 1
ROOT_KEY = "sparse_detector_model"
#: the model shipped with the package, relative to the share dir (see ``paths.py``)
DEFAULT_MODEL = "models/default/model.yaml"
_KEYS = ("version", "name", "grid", "channels", "classes", "architecture", "weights")


class ModelError(ConfigError):
    """An unusable model description or checkpoint; the message names the file and the value."""


def _arch_value(v: Any) -> bool:
    scalar = (int, float, str)
    return (isinstance(v, scalar) and not isinstance(v, bool)) or (
        isinstance(v, (list, tuple)) and all(_arch_value(x) for x in v))


@dataclass(frozen=True)
class ModelDescription:
    """A validated model description. ``source`` is the file it was read from (if any); the
    weights file is resolved next to it."""
    grid: GridConfig = field(default_factory=GridConfig)
    classes: tuple[str, ...] = ("car", "pedestrian", "cyclist")
    architecture: Mapping[str, Any] = field(default_factory=dict)
    name: str = "unnamed"
    weights: str = ""
    version: int = FORMAT_VERSION
    source: Path | None = field(default=None, compare=False)

    @property
    def channels(self) -> int:
        """BEV input channels of the network (``grid.z_slices + 2``, see ``bev.py``)."""
        return self.grid.channels

    @property
    def weights_path(self) -> Path | None:
        """The checkpoint file, resolved next to the description; None when there is none."""
        if not self.weights:
            return None
        p = Path(self.weights)
        return p if p.is_absolute() or self.source is None else self.source.parent / p

    # ---------------------------------------------------------------- dict / YAML form
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "grid": self.grid.to_dict(),
                "channels": self.channels, "classes": list(self.classes),
                "architecture": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in self.architecture.items()},
                "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> "ModelDescription":
        """Validate a description dict (with or without the ``sparse_detector_model:`` root).
        Raises :class:`ModelError` naming the source, the key and what is wrong."""
        where = f"model description '{source}'" if source else "model description"

        def fail(msg: str) -> ModelError:
            return ModelError(f"{where}: {msg}")

        if isinstance(data, Mapping) and set(data) == {ROOT_KEY}:
            data = data[ROOT_KEY]
        if not isinstance(data, Mapping):
            raise fail(f"expected a mapping under '{ROOT_KEY}', got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise fail(f"unknown key(s) {', '.join(unknown)}: allowed {', '.join(_KEYS)}")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise fail(f"version = {version!r} is not supported: this package reads version "
                       f"{FORMAT_VERSION}")
        grid_data = data.get("grid")
        if not isinstance(grid_data, Mapping):
            raise fail("'grid' must be a mapping of grid.* values (x_min ... density_saturation)")
        try:
            grid = GridConfig.from_dict(grid_data)
        except ConfigError as exc:
            raise fail(str(exc)) from None
        channels = data.get("channels", grid.channels)
        if channels != grid.channels:
            raise fail(f"channels = {channels!r} does not match the grid: z_slices "
                       f"{grid.z_slices} + 2 = {grid.channels} BEV channels")
        classes = data.get("classes")
        if (not isinstance(classes, (list, tuple)) or not classes
                or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)):
            raise fail(f"classes = {classes!r} must be a non-empty list of distinct names")
        arch = data.get("architecture") or {}
        if not isinstance(arch, Mapping):
            raise fail(f"architecture = {arch!r} must be a mapping")
        for k, v in arch.items():
            if not isinstance(k, str) or not _arch_value(v):
                raise fail(f"architecture.{k} = {v!r} must be a number, a string or a list "
                           "of them")
        name = data.get("name", "unnamed")
        weights = data.get("weights") or ""
        if not isinstance(name, str) or not isinstance(weights, str):
            raise fail("'name' and 'weights' must be strings")
        return cls(grid=grid, classes=tuple(classes),
                   architecture={k: tuple(v) if isinstance(v, list) else v
                                 for k, v in arch.items()},
                   name=name, weights=weights, version=version,
                   source=Path(source) if source else None)

    @classmethod
    def load(cls, path: str | Path) -> "ModelDescription":
        """Read ``model.yaml`` (or the ``model.yaml`` of a folder)."""
        import yaml

        path = Path(path)
        if path.is_dir():
            path = path / "model.yaml"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"model description '{path}' cannot be read: "
                             f"{exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ModelError(f"model description '{path}' is not valid YAML: {exc}") from None
        return cls.from_dict(data, path)

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        path.write_text(yaml.safe_dump({ROOT_KEY: self.to_dict()}, sort_keys=False),
                        encoding="utf-8")
        return path


def load_description(path: str | Path | None = None) -> ModelDescription:
    """The description at ``path`` (a ``model.yaml`` or its folder); with no path (``None`` or
    ``""``, the default of the ``model.path`` parameter) the model shipped with the package."""
    if not path:
        from ..paths import find_share_file
        path = find_share_file(DEFAULT_MODEL)
    return ModelDescription.load(path)


def differences(trained: ModelDescription, configured: ModelDescription) -> list[str]:
    """What a network trained with ``trained`` would get wrong under ``configured``:
    ``["grid.resolution: trained 0.1, configured 0.2", ...]`` (empty when compatible)."""
    out = []
    tg, cg = trained.grid.to_dict(), configured.grid.to_dict()
    out += [f"grid.{k}: trained {tg[k]!r}, configured {cg[k]!r}" for k in tg if tg[k] != cg[k]]
    if trained.classes != configured.classes:
        out.append(f"classes: trained {list(trained.classes)}, configured "
                   f"{list(configured.classes)}")
    # a key that one side leaves out means its code default (weights written before a key
    # existed -- heading, iou_head -- were trained with its default)
    from .network import ARCH_DEFAULTS

    ta = {**ARCH_DEFAULTS, **trained.architecture}
    ca = {**ARCH_DEFAULTS, **configured.architecture}
    out += [f"architecture.{k}: trained {ta.get(k)!r}, configured {ca.get(k)!r}"
            for k in sorted(set(ta) | set(ca)) if ta.get(k) != ca.get(k)]
    return out


def save_checkpoint(path: str | Path, description: ModelDescription,
                    state_dict: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``{"description": ..., "state_dict": ..., **extra}`` with ``torch.save``."""
    import torch

    path = Path(path)
    torch.save({"description": description.to_dict(), "state_dict": dict(state_dict), **extra},
               path)
    return path


def load_checkpoint(description: ModelDescription, path: str | Path | None = None,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load the checkpoint of ``description`` (its ``weights`` file, or ``path``) and check that
    it was trained for the same grid, classes and architecture. Returns the checkpoint dict
    (``state_dict`` and whatever else was saved). Raises :class:`ModelError` with one message
    naming the files and every difference."""
    import torch

    path = Path(path) if path is not None else description.weights_path
    if path is None:
        raise ModelError(f"model description '{description.source}' names no weights file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"weights '{path}' of model description '{description.source}' do "
                         "not exist") from None
    except Exception as exc:  # a truncated, corrupt or foreign file: say which one
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        why = why if len(why) <= 300 else why[:300] + " ..."
        raise ModelError(f"weights '{path}' of model description '{description.source}' cannot "
                         f"be read (corrupt, truncated or not a torch checkpoint): {why}"
                         ) from None
    if (not isinstance(ckpt, dict) or "description" not in ckpt or "state_dict" not in ckpt
            or not isinstance(ckpt["state_dict"], Mapping)):
        raise ModelError(f"weights '{path}' are not a sparse_detector_ros checkpoint (no "
                         "'description' and 'state_dict')")
    trained = ModelDescription.from_dict(ckpt["description"], f"{path} (embedded)")
    diff = differences(trained, description)
    if diff:
        raise ModelError(
            f"weights '{path}' do not match model description '{description.source}': "
            + "; ".join(diff) + ". The BEV grid, classes and architecture are fixed by the "
            "weights: use the description the weights were trained with, or retrain")
    return ckpt
