"""sensor_msgs/PointCloud2 <-> numpy, for any field layout. ROS-free (numpy only).

:func:`decode` turns a cloud into an ``(N, 4)`` float32 array ``x, y, z, intensity``. It accepts
anything with PointCloud2's attributes (``height, width, fields, is_bigendian, point_step,
row_step, data, is_dense``): an rclpy message, a ``rosbags`` message or a :class:`CloudBuffer`.
Fields may come in any order and at any offset, with padding, ``point_step`` larger than the
fields, organized clouds (``height > 1``) with ``row_step`` padding; intensity may be any numeric
type (float32/float64/uint8/uint16/...) or absent (zeros). When ``x, y, z, intensity`` are four
consecutive float32s, rows are unpadded and the buffer is aligned, the result is a zero-copy
strided view of the message's buffer (read-only if the buffer is). Points with a NaN/Inf
coordinate are removed (that copies), whatever ``is_dense`` says: a driver's ``is_dense`` is a
hint, not a guarantee, and one pass over the coordinates costs far less than the frame.

The whole field table is checked, the fields the decoder does not use included: every field
must have a known datatype and lie within ``point_step``; a table that does not describe the
bytes is a malformed cloud whatever field is wrong.

:func:`encode` builds a :class:`CloudBuffer` (a plain mirror of PointCloud2) from numpy arrays
in one of the driver layouts of :data:`LAYOUTS`, with one structured-array copy.

Malformed clouds raise :class:`CloudError` (a ``ValueError``) with a precise message and a
``kind`` (:data:`CLOUD_ERROR_KINDS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# sensor_msgs/PointField datatype codes -> numpy little-endian dtypes.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
DATATYPES: dict[int, np.dtype] = {
    INT8: np.dtype("i1"), UINT8: np.dtype("u1"), INT16: np.dtype("<i2"), UINT16: np.dtype("<u2"),
    INT32: np.dtype("<i4"), UINT32: np.dtype("<u4"), FLOAT32: np.dtype("<f4"),
    FLOAT64: np.dtype("<f8"),
}
_CODES = {dt: code for code, dt in DATATYPES.items()}
_NAMES = {INT8: "INT8", UINT8: "UINT8", INT16: "INT16", UINT16: "UINT16", INT32: "INT32",
          UINT32: "UINT32", FLOAT32: "FLOAT32", FLOAT64: "FLOAT64"}


#: the ``kind`` of each :class:`CloudError` :func:`decode` raises
CLOUD_ERROR_KINDS = ("big_endian", "missing_field", "bad_datatype", "field_past_point_step",
                     "bad_row_step", "bad_length")


class CloudError(ValueError):
    """A PointCloud2 that cannot be decoded; the message says what is wrong and ``kind`` names
    the class of problem (for per-kind counting and log throttling)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PointFieldSpec:
    """Mirror of sensor_msgs/PointField."""
    name: str
    offset: int
    datatype: int
    count: int = 1


@dataclass(frozen=True)
class Layout:
    """A driver's point layout: fields and point_step."""
    fields: tuple[PointFieldSpec, ...]
    point_step: int

    def dtype(self) -> np.dtype:
        return _struct_dtype(self.fields, self.point_step)


def _f(name: str, offset: int, datatype: int) -> PointFieldSpec:
    return PointFieldSpec(name, offset, datatype, 1)


# Field layouts as published by common drivers (all little-endian).
LAYOUTS: dict[str, Layout] = {
    # Plain x, y, z, intensity (e.g. PCL PointXYZI without padding).
    "xyzi": Layout((_f("x", 0, FLOAT32), _f("y", 4, FLOAT32), _f("z", 8, FLOAT32),
                    _f("intensity", 12, FLOAT32)), 16),
    # velodyne_pointcloud (ROS 2): PointXYZIRT, packed; time is relative to the scan start [s].
    "velodyne": Layout((_f("x", 0, FLOAT32), _f("y", 4, FLOAT32), _f("z", 8, FLOAT32),
                        _f("intensity", 12, FLOAT32), _f("ring", 16, UINT16),
                        _f("time", 18, FLOAT32)), 22),
    # ouster-ros OS1: 4 bytes of padding after z, t in ns since scan start, point_step 48.
    "ouster": Layout((_f("x", 0, FLOAT32), _f("y", 4, FLOAT32), _f("z", 8, FLOAT32),
                      _f("intensity", 16, FLOAT32), _f("t", 20, UINT32),
                      _f("reflectivity", 24, UINT16), _f("ring", 26, UINT16),
                      _f("ambient", 28, UINT16), _f("range", 32, UINT32)), 48),
    # livox_ros_driver2 PointCloud2 output: tag and line bytes, absolute timestamp (float64).
    "livox": Layout((_f("x", 0, FLOAT32), _f("y", 4, FLOAT32), _f("z", 8, FLOAT32),
                     _f("intensity", 12, FLOAT32), _f("tag", 16, UINT8), _f("line", 17, UINT8),
                     _f("timestamp", 18, FLOAT64)), 26),
    # Hesai ROS 2 driver PointXYZIRT (PCL-aligned): padding after z, aligned float64 timestamp.
    "hesai": Layout((_f("x", 0, FLOAT32), _f("y", 4, FLOAT32), _f("z", 8, FLOAT32),
                     _f("intensity", 16, FLOAT32), _f("ring", 20, UINT16),
                     _f("timestamp", 24, FLOAT64)), 32),
}


@dataclass
class CloudBuffer:
    """A PointCloud2 without ROS: the same attribute names, so :func:`decode` takes it and
    ``ros_io.cloud_to_msg`` turns it into a message."""
    height: int
    width: int
    fields: list[PointFieldSpec]
    is_bigendian: bool
    point_step: int
    row_step: int
    data: bytes
    is_dense: bool = True


def _struct_dtype(fields: Sequence[Any], itemsize: int) -> np.dtype:
    return np.dtype({
        "names": [f.name for f in fields],
        "formats": [DATATYPES[f.datatype] if f.count == 1 else (DATATYPES[f.datatype], f.count)
                    for f in fields],
        "offsets": [f.offset for f in fields],
        "itemsize": itemsize,
    })


def _as_uint8(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _field_table(msg: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for f in msg.fields:
        table.setdefault(f.name, f)  # first wins, as in sensor_msgs tools
    return table


def check_fields(fields: Sequence[Any], point_step: int) -> None:
    """:class:`CloudError` unless every field of the table has a known datatype
    (``bad_datatype``) and lies within ``point_step`` (``field_past_point_step``): the unused
    fields too, since a table that does not describe the bytes cannot be trusted for the
    others. ``count`` 0 is taken as 1 (some drivers write it)."""
    for f in fields:
        if f.datatype not in DATATYPES:
            supported = ", ".join(f"{c}={s}" for c, s in _NAMES.items())
            raise CloudError("bad_datatype", f"field '{f.name}' has unsupported datatype "
                             f"{f.datatype} (supported: {supported})")
        end = int(f.offset) + DATATYPES[f.datatype].itemsize * max(1, int(f.count))
        if f.offset < 0 or end > point_step:
            raise CloudError("field_past_point_step",
                             f"field '{f.name}' (offset {f.offset}, {_NAMES[f.datatype]}"
                             f"{f' x {f.count}' if f.count > 1 else ''}) runs past point_step "
                             f"{point_step}")


def _checked(msg: Any) -> tuple[list[Any], np.ndarray]:
    """The structural checks of :func:`decode` (nothing of the point data is read): ``(wanted
    fields x, y, z[, intensity], data as uint8)`` or :class:`CloudError`."""
    if msg.is_bigendian:
        raise CloudError("big_endian",
                         "big-endian point clouds are not supported (is_bigendian = true)")
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    n = height * width
    table = _field_table(msg)
    missing = [c for c in "xyz" if c not in table]
    if missing:
        raise CloudError("missing_field", f"point cloud has no field {', '.join(missing)} "
                         f"(fields: {', '.join(table) or 'none'})")
    wanted = [table[c] for c in "xyz"] + ([table["intensity"]] if "intensity" in table else [])
    for f in wanted[:3]:
        if f.datatype in DATATYPES and f.datatype not in (FLOAT32, FLOAT64):
            raise CloudError("bad_datatype", f"field '{f.name}' has unsupported datatype "
                             f"{_NAMES[f.datatype]}: coordinates must be FLOAT32 or FLOAT64")
    check_fields(wanted, point_step)       # the used fields first: their message is the clearest
    check_fields(msg.fields, point_step)
    if n > 0 and row_step < width * point_step:
        raise CloudError("bad_row_step", f"row_step {row_step} is smaller than "
                         f"width*point_step = {width}*{point_step}")
    buf = _as_uint8(msg.data)
    expected = row_step * height
    if buf.size != expected and not (n == 0 and buf.size == 0):  # empty data: fine when n == 0
        raise CloudError("bad_length", f"data length {buf.size} does not match "
                         f"height*row_step = {height}*{row_step} = {expected} "
                         f"(width {width}, point_step {point_step})")
    return wanted, buf


def validate(msg: Any) -> None:
    """Every check of :func:`decode` that does not read the points (header fields, field
    table, lengths: microseconds, whatever the size of the cloud); :class:`CloudError` as
    :func:`decode` raises it. The node runs it in the subscription callback, so that a
    malformed cloud never reaches the worker thread."""
    _checked(msg)


def decode(msg: Any) -> np.ndarray:
    """PointCloud2-like ``msg`` -> ``(N, 4)`` float32 ``[x, y, z, intensity]``.

    N is ``width * height`` (row-major over the organized grid) minus the points with a
    non-finite coordinate (whatever ``msg.is_dense`` says). Intensity is returned in the
    driver's own scale (no normalisation) and is 0 when the cloud has no ``intensity`` field.

    Raises :class:`CloudError` for big-endian data, missing x/y/z, integer coordinates, a data
    length that does not match ``row_step * height`` (``row_step >= width * point_step``), and
    any field (used or not) with an unsupported datatype or running past ``point_step``
    (:func:`validate`).
    """
    wanted, buf = _checked(msg)
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    n = height * width
    if n == 0:
        return np.zeros((0, 4), np.float32)

    xf, yf, zf = wanted[:3]
    inten = wanted[3] if len(wanted) == 4 else None
    fast = (
        all(f.datatype == FLOAT32 for f in wanted) and inten is not None
        and yf.offset == xf.offset + 4 and zf.offset == xf.offset + 8
        and inten.offset == xf.offset + 12
        and (height == 1 or row_step == width * point_step)
        and point_step % 4 == 0 and (buf.ctypes.data + xf.offset) % 4 == 0
    )
    if fast:  # zero-copy strided view
        out = np.ndarray((n, 4), dtype=np.float32, buffer=buf, offset=xf.offset,
                         strides=(point_step, 4))
    else:
        out = np.empty((n, 4), np.float32)
        out2d = out.reshape(height, width, 4)
        runs = [r for r in _float32_runs(wanted) if r[2] > 1]
        for col, src_off, k in runs:
            # Copy runs of adjacent float32 fields as opaque k*4-byte blocks: one strided
            # memcpy per point, whatever the alignment (much faster than field-wise casts).
            block = np.dtype((np.void, 4 * k))
            dest = out.view(np.dtype({"names": ["r"], "formats": [block], "offsets": [4 * col],
                                      "itemsize": 16})).reshape(height, width)
            dest["r"] = np.ndarray((height, width), dtype=block, buffer=buf, offset=src_off,
                                   strides=(row_step, point_step))
        in_runs = {col + i for col, _, k in runs for i in range(k)}
        for col, f in enumerate(wanted):
            if col not in in_runs:  # single fields: a typed strided copy (with a cast)
                out2d[..., col] = np.ndarray((height, width), dtype=DATATYPES[f.datatype],
                                             buffer=buf, offset=f.offset,
                                             strides=(row_step, point_step))
        if inten is None:
            out[:, 3] = 0.0
    # Always, is_dense or not (a hint from the driver, not a guarantee). x*0 is 0 for finite x
    # and NaN for NaN/Inf: one cheap pass instead of isfinite().all(1).
    with np.errstate(invalid="ignore"):
        probe = out[:, 0] * 0.0
        probe += out[:, 1] * 0.0
        probe += out[:, 2] * 0.0
    finite = probe == 0.0
    if not finite.all():
        out = np.compress(finite, out, axis=0)
    return out


def _float32_runs(wanted: Sequence[Any]) -> list[tuple[int, int, int]]:
    """(dest column, source offset, length) of runs of float32 fields adjacent in both the
    output column order and the source point."""
    runs: list[list[int]] = []
    for col, f in enumerate(wanted):
        if f.datatype != FLOAT32:
            continue
        if runs and runs[-1][0] + runs[-1][2] == col and runs[-1][1] + 4 * runs[-1][2] == f.offset:
            runs[-1][2] += 1
        else:
            runs.append([col, f.offset, 1])
    return [tuple(r) for r in runs]


def encode(points: np.ndarray, layout: str | Layout = "xyzi",
           extra: Mapping[str, np.ndarray] | None = None, height: int = 1,
           is_dense: bool = True) -> CloudBuffer:
    """``(N, 4)`` (or ``(N, 3)``) points -> :class:`CloudBuffer` in a driver layout.

    ``layout`` is a key of :data:`LAYOUTS` or a :class:`Layout`. ``extra`` gives per-point values
    for the layout's other fields (``ring``, ``time``, ...), each an ``(N,)`` array; fields not
    given are zero. ``height > 1`` makes an organized cloud of ``height`` rows (N must divide).
    """
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] not in (3, 4):
        raise ValueError(f"points must have shape (N, 3) or (N, 4), got {pts.shape}")
    n = pts.shape[0]
    if height < 1 or n % height:
        raise ValueError(f"height {height} does not divide the {n} points")
    names = [f.name for f in lay.fields]
    arr = np.zeros(n, dtype=lay.dtype())
    for i, name in enumerate("xyz"):
        arr[name] = pts[:, i]
    if pts.shape[1] == 4 and "intensity" in names:
        arr["intensity"] = pts[:, 3]
    for name, values in (extra or {}).items():
        if name not in names:
            raise ValueError(f"layout has no field '{name}' (fields: {', '.join(names)})")
        arr[name] = values
    width = n // height
    return CloudBuffer(height=height, width=width, fields=list(lay.fields), is_bigendian=False,
                       point_step=lay.point_step, row_step=lay.point_step * width,
                       data=arr.tobytes(), is_dense=is_dense)
