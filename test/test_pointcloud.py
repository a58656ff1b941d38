"""pointcloud.decode / encode: any PointCloud2 field layout -> (N, 4) float32 x, y, z, intensity.

The round-trip tests build the message bytes themselves with numpy structured arrays (random
field order, offsets with gaps, extra fields, point_step and row padding), so they test decode
independently of encode; encode is then checked against the driver layouts of LAYOUTS.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_detector_ros.pointcloud import (
    DATATYPES, FLOAT32, FLOAT64, INT8, INT16, INT32, LAYOUTS, UINT8, UINT16, UINT32,
    CloudBuffer, CloudError, Layout, PointFieldSpec, decode, encode, validate,
)
from sparse_detector_ros.ros_io import cloud_to_msg

HYP = settings(max_examples=200, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ALL_TYPES = (INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64)


# --------------------------------------------------------------------------- helpers

def F(name, offset, datatype, count=1):
    return PointFieldSpec(name, offset, datatype, count)


def _np_format(f):
    dt = DATATYPES[f.datatype]
    return dt if f.count == 1 else (dt, f.count)


def build_bytes(fields, point_step, values, height=1, row_pad=0):
    """Message bytes for an organized ``height x width`` cloud, with ``row_pad`` bytes of row
    padding, from a ``{field name: (N,) or (N, count) array}`` dict. Built with numpy
    structured arrays, independently of ``encode``. Padding bytes are filled with 0xAB so that
    a decoder reading them gives visible garbage."""
    pt = np.dtype({"names": [f.name for f in fields], "formats": [_np_format(f) for f in fields],
                   "offsets": [f.offset for f in fields], "itemsize": point_step})
    n = len(next(iter(values.values()))) if values else 0
    assert n % height == 0
    width = n // height
    row_step = width * point_step + row_pad
    row = np.dtype({"names": ["pts"], "formats": [(pt, (width,))], "offsets": [0],
                    "itemsize": row_step})
    raw = np.full(height * row_step, 0xAB, np.uint8)
    rows = raw.view(row) if height * row_step else np.zeros(height, row)
    for f in fields:
        rows["pts"][f.name] = np.asarray(values[f.name]).reshape(
            (height, width) + ((f.count,) if f.count > 1 else ()))
    return rows.tobytes() if height * row_step else b"", width, row_step


def duck(fields, point_step, data, height, width, row_step, is_dense=True, big=False,
         ns_fields=True):
    """A duck-typed PointCloud2: plain SimpleNamespace objects, no dataclasses."""
    if ns_fields:
        fields = [SimpleNamespace(name=f.name, offset=f.offset, datatype=f.datatype,
                                  count=f.count) for f in fields]
    return SimpleNamespace(height=height, width=width, fields=list(fields), is_bigendian=big,
                           point_step=point_step, row_step=row_step, data=data,
                           is_dense=is_dense)


def expected_from(values, has_intensity):
    n = len(values["x"])
    out = np.zeros((n, 4), np.float32)
    for col, name in enumerate("xyz"):
        out[:, col] = np.asarray(values[name]).astype(np.float32)
    if has_intensity:
        out[:, 3] = np.asarray(values["intensity"]).astype(np.float32)
    return out


def finite_rows(expected):
    return expected[np.isfinite(expected[:, :3]).all(axis=1)]


def random_values(rng, f, n):
    dt = DATATYPES[f.datatype]
    shape = (n,) if f.count == 1 else (n, f.count)
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 50).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


def xyzi_cloud(points, **kw):
    return encode(np.asarray(points, np.float32), "xyzi", **kw)


# --------------------------------------------------------------------------- random layouts

@st.composite
def random_layouts(draw):
    """(fields in message order, point_step): x, y, z (FLOAT32/FLOAT64), optional intensity of
    any numeric type, 0-3 extra fields (count 1-3), random order, random gaps, random tail."""
    specs = [(c, draw(st.sampled_from((FLOAT32, FLOAT64))), 1) for c in "xyz"]
    inten = draw(st.sampled_from(ALL_TYPES + (None,)))
    if inten is not None:
        specs.append(("intensity", inten, 1))
    n_extra = draw(st.integers(0, 3))
    for k in range(n_extra):
        name = draw(st.sampled_from(("ring", "time", "t", "tag", "reflectivity", "ambient",
                                     "range", "xyz", "intensity2")))
        specs.append((f"{name}_{k}", draw(st.sampled_from(ALL_TYPES)), draw(st.integers(1, 3))))
    order = draw(st.permutations(range(len(specs))))
    fields, offset = [], draw(st.integers(0, 8))
    for i in order:
        name, dt, count = specs[i]
        fields.append(F(name, offset, dt, count))
        offset += DATATYPES[dt].itemsize * count + draw(st.integers(0, 7))
    point_step = offset + draw(st.integers(0, 16))
    return fields, point_step


@HYP
@given(layout=random_layouts(), height=st.integers(1, 4), width=st.integers(0, 9),
       row_pad=st.integers(0, 13), is_dense=st.booleans(), seed=st.integers(0, 2**32 - 1),
       nan_frac=st.sampled_from((0.0, 0.3, 1.0)), buffer_kind=st.sampled_from(
           ("bytes", "bytearray", "ndarray", "memoryview")))
def test_decode_random_layout_matches_struct_reference(layout, height, width, row_pad, is_dense,
                                                       seed, nan_frac, buffer_kind):
    fields, point_step = layout
    rng = np.random.default_rng(seed)
    n = height * width
    values = {f.name: random_values(rng, f, n) for f in fields}
    if n:
        # Poison some coordinates with NaN / +-Inf; decode must drop exactly those points,
        # whatever is_dense says (a driver's hint, not a guarantee).
        for c in "xyz":
            bad = rng.random(n) < nan_frac / 3
            values[c][bad] = rng.choice([np.nan, np.inf, -np.inf], size=bad.sum())
    data, w, row_step = build_bytes(fields, point_step, values, height, row_pad)
    if buffer_kind == "bytearray":
        data = bytearray(data)
    elif buffer_kind == "ndarray":
        data = np.frombuffer(data, np.uint8).copy()
    elif buffer_kind == "memoryview":
        data = memoryview(data)
    msg = duck(fields, point_step, data, height, w, row_step, is_dense=is_dense)
    out = decode(msg)
    expected = finite_rows(expected_from(values, any(f.name == "intensity" for f in fields)))
    assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 4
    np.testing.assert_array_equal(out, expected)


@HYP
@given(layout=random_layouts(), height=st.integers(1, 4), width=st.integers(0, 8),
       seed=st.integers(0, 2**32 - 1), with_intensity=st.booleans())
def test_encode_decode_roundtrip_random_layout(layout, height, width, seed, with_intensity):
    fields, point_step = layout
    lay = Layout(tuple(fields), point_step)
    rng = np.random.default_rng(seed)
    n = height * width
    pts = (rng.standard_normal((n, 4)) * 30).astype(np.float32)
    has_i = any(f.name == "intensity" for f in fields)
    idt = next((DATATYPES[f.datatype] for f in fields if f.name == "intensity"), None)
    if idt is not None and idt.kind in "iu":
        info = np.iinfo(idt)
        pts[:, 3] = rng.integers(max(info.min, -2**20), min(info.max, 2**20), n, endpoint=True)
    extra = {f.name: random_values(rng, f, n) for f in fields
             if f.name not in ("x", "y", "z", "intensity")}
    cloud = encode(pts if with_intensity else pts[:, :3], lay, extra=extra, height=height)
    assert (cloud.height, cloud.width) == (height, width)
    assert cloud.point_step == point_step and cloud.row_step == point_step * width
    assert len(cloud.data) == n * point_step and not cloud.is_bigendian
    out = decode(cloud)
    expected = pts.copy()
    xyz_types = {f.name: DATATYPES[f.datatype] for f in fields}
    for col, c in enumerate("xyz"):
        expected[:, col] = pts[:, col].astype(xyz_types[c]).astype(np.float32)
    if has_i and with_intensity:
        expected[:, 3] = pts[:, 3].astype(idt).astype(np.float32)
    else:
        expected[:, 3] = 0.0
    np.testing.assert_array_equal(out, expected)
    # The extra fields are where the layout says they are.
    arr = np.frombuffer(cloud.data, lay.dtype())
    for name, vals in extra.items():
        np.testing.assert_array_equal(arr[name], vals)


# --------------------------------------------------------------------------- driver layouts

DRIVER_FIELDS = {
    "xyzi": [("x", FLOAT32), ("y", FLOAT32), ("z", FLOAT32), ("intensity", FLOAT32)],
    "velodyne": [("x", FLOAT32), ("y", FLOAT32), ("z", FLOAT32), ("intensity", FLOAT32),
                 ("ring", UINT16), ("time", FLOAT32)],
    "ouster": [("x", FLOAT32), ("y", FLOAT32), ("z", FLOAT32), ("intensity", FLOAT32),
               ("t", UINT32), ("reflectivity", UINT16), ("ring", UINT16), ("ambient", UINT16),
               ("range", UINT32)],
    "livox": [("x", FLOAT32), ("y", FLOAT32), ("z", FLOAT32), ("intensity", FLOAT32),
              ("tag", UINT8), ("line", UINT8), ("timestamp", FLOAT64)],
    "hesai": [("x", FLOAT32), ("y", FLOAT32), ("z", FLOAT32), ("intensity", FLOAT32),
              ("ring", UINT16), ("timestamp", FLOAT64)],
}

# Offsets as published by the drivers (hesai: only the field list is pinned, see below).
DRIVER_OFFSETS = {
    "xyzi": ([0, 4, 8, 12], 16),
    "velodyne": ([0, 4, 8, 12, 16, 18], 22),          # velodyne_pointcloud PointXYZIRT, packed
    "ouster": ([0, 4, 8, 16, 20, 24, 26, 28, 32], 48),  # ouster-ros: 4 pad bytes after z
    "livox": ([0, 4, 8, 12, 16, 17, 18], 26),         # livox_ros_driver2, packed
}


def test_layouts_cover_the_common_drivers():
    assert set(DRIVER_FIELDS) <= set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(DRIVER_FIELDS))
def test_layout_field_list_matches_driver(name):
    lay = LAYOUTS[name]
    assert [(f.name, f.datatype) for f in lay.fields] == DRIVER_FIELDS[name]
    assert all(f.count == 1 for f in lay.fields)
    if name in DRIVER_OFFSETS:
        offsets, step = DRIVER_OFFSETS[name]
        assert [f.offset for f in lay.fields] == offsets
        assert lay.point_step == step


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_fields_do_not_overlap_and_fit_point_step(name):
    lay = LAYOUTS[name]
    spans = sorted((f.offset, f.offset + DATATYPES[f.datatype].itemsize * f.count, f.name)
                   for f in lay.fields)
    assert spans[0][0] >= 0
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{name}: field {an} [{a0},{a1}) overlaps {bn} [{b0},{b1})"
    assert spans[-1][1] <= lay.point_step
    assert len({f.name for f in lay.fields}) == len(lay.fields)
    assert lay.dtype().itemsize == lay.point_step
    assert {"x", "y", "z"} <= {f.name for f in lay.fields}


def test_ouster_layout_point_step_48():
    assert LAYOUTS["ouster"].point_step == 48


def _driver_extra(name, n, rng):
    lay = LAYOUTS[name]
    return {f.name: random_values(rng, f, n) for f in lay.fields
            if f.name not in ("x", "y", "z", "intensity")}


@pytest.mark.parametrize("height", [1, 4])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_encode_decode_driver_layouts(name, height):
    rng = np.random.default_rng(7)
    pts = (rng.standard_normal((24, 4)) * 20).astype(np.float32)
    extra = _driver_extra(name, 24, rng)
    cloud = encode(pts, name, extra=extra, height=height)
    lay = LAYOUTS[name]
    assert isinstance(cloud, CloudBuffer)
    assert cloud.fields == list(lay.fields) and cloud.point_step == lay.point_step
    assert (cloud.height, cloud.width) == (height, 24 // height)
    assert cloud.row_step == lay.point_step * (24 // height)
    assert len(cloud.data) == cloud.row_step * cloud.height
    assert cloud.is_bigendian is False and cloud.is_dense is True
    np.testing.assert_array_equal(decode(cloud), pts)
    arr = np.frombuffer(cloud.data, lay.dtype())
    for k, v in extra.items():
        np.testing.assert_array_equal(arr[k], v)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_encode_xyz_only_gives_zero_intensity_and_zero_extras(name):
    pts = np.arange(30, dtype=np.float32).reshape(10, 3)
    cloud = encode(pts, name)
    out = decode(cloud)
    np.testing.assert_array_equal(out[:, :3], pts)
    np.testing.assert_array_equal(out[:, 3], 0)
    arr = np.frombuffer(cloud.data, LAYOUTS[name].dtype())
    for f in LAYOUTS[name].fields:
        if f.name not in "xyz":
            assert not arr[f.name].any()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_decode_real_ros_message(name):
    from sensor_msgs.msg import PointCloud2
    rng = np.random.default_rng(3)
    pts = (rng.standard_normal((12, 4)) * 10).astype(np.float32)
    pts[5, 1] = np.nan
    msg = cloud_to_msg(encode(pts, name, extra=_driver_extra(name, 12, rng), height=3,
                                     is_dense=False))
    assert isinstance(msg, PointCloud2)
    out = decode(msg)
    np.testing.assert_array_equal(out, np.delete(pts, 5, axis=0))
    msg.is_dense = True  # a hint, not a guarantee: the NaN point is removed all the same
    np.testing.assert_array_equal(decode(msg), np.delete(pts, 5, axis=0))


def test_decode_real_ros_message_is_zero_copy_for_xyzi():
    pts = np.arange(40, dtype=np.float32).reshape(10, 4)
    msg = cloud_to_msg(encode(pts))
    out = decode(msg)
    np.testing.assert_array_equal(out, pts)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_decode_duck_typed_object(name):
    pts = np.arange(32, dtype=np.float32).reshape(8, 4) - 10
    cloud = encode(pts, name, height=2)
    msg = duck(cloud.fields, cloud.point_step, bytes(cloud.data), cloud.height, cloud.width,
               cloud.row_step)
    np.testing.assert_array_equal(decode(msg), pts)


# --------------------------------------------------------------------------- specific layouts

@pytest.mark.parametrize("dtype,values", [
    (FLOAT32, [0.5, 100.25, 255.0, 3e5]),
    (FLOAT64, [0.5, 100.25, 255.0, 3e5]),
    (UINT8, [0, 1, 128, 255]),
    (UINT16, [0, 1, 4096, 65535]),
    (INT16, [-32768, -1, 0, 32767]),
    (INT8, [-128, -1, 0, 127]),
    (UINT32, [0, 1, 2**20, 2**24]),
    (INT32, [-2**24, -1, 0, 2**24]),
])
def test_intensity_types(dtype, values):
    fields = [F("x", 0, FLOAT32), F("y", 4, FLOAT32), F("z", 8, FLOAT32),
              F("intensity", 12, dtype)]
    step = 12 + DATATYPES[dtype].itemsize
    vals = {"x": np.float32([1, 2, 3, 4]), "y": np.float32([5, 6, 7, 8]),
            "z": np.float32([-1, -2, -3, -4]), "intensity": np.array(values, DATATYPES[dtype])}
    data, w, rs = build_bytes(fields, step, vals)
    out = decode(duck(fields, step, data, 1, w, rs))
    np.testing.assert_array_equal(out[:, 3], np.float32(values))
    np.testing.assert_array_equal(out[:, :3].T, [vals["x"], vals["y"], vals["z"]])


def test_intensity_absent_gives_zeros():
    fields = [F("z", 0, FLOAT32), F("ring", 4, UINT16), F("y", 8, FLOAT64), F("x", 16, FLOAT32)]
    vals = {"x": np.float32([1, 2]), "y": np.float64([3, 4]), "z": np.float32([5, 6]),
            "ring": np.uint16([7, 8])}
    data, w, rs = build_bytes(fields, 24, vals)
    out = decode(duck(fields, 24, data, 1, w, rs))
    np.testing.assert_array_equal(out, [[1, 3, 5, 0], [2, 4, 6, 0]])
    assert out.dtype == np.float32


def test_fields_in_reverse_order():
    fields = [F("intensity", 0, FLOAT32), F("z", 4, FLOAT32), F("y", 8, FLOAT32),
              F("x", 12, FLOAT32)]
    vals = {"x": np.float32([1]), "y": np.float32([2]), "z": np.float32([3]),
            "intensity": np.float32([4])}
    data, w, rs = build_bytes(fields, 16, vals)
    np.testing.assert_array_equal(decode(duck(fields, 16, data, 1, w, rs)), [[1, 2, 3, 4]])


def test_organized_cloud_with_row_padding_is_row_major():
    fields = list(LAYOUTS["xyzi"].fields)
    pts = np.arange(3 * 5 * 4, dtype=np.float32).reshape(15, 4)
    vals = {c: pts[:, i] for i, c in enumerate(("x", "y", "z", "intensity"))}
    data, w, rs = build_bytes(fields, 16, vals, height=3, row_pad=12)
    assert rs == 5 * 16 + 12
    out = decode(duck(fields, 16, bytearray(data), 3, w, rs))
    np.testing.assert_array_equal(out, pts)  # padding (0xAB bytes) never read


def test_single_row_with_trailing_row_padding():
    fields = list(LAYOUTS["xyzi"].fields)
    pts = np.arange(12, dtype=np.float32).reshape(3, 4)
    vals = {c: pts[:, i] for i, c in enumerate(("x", "y", "z", "intensity"))}
    data, w, rs = build_bytes(fields, 16, vals, height=1, row_pad=8)
    np.testing.assert_array_equal(decode(duck(fields, 16, data, 1, w, rs)), pts)


def test_first_field_of_a_duplicated_name_wins():
    fields = [F("x", 0, FLOAT32), F("y", 4, FLOAT32), F("z", 8, FLOAT32),
              F("intensity", 12, FLOAT32), F("x", 16, FLOAT32)]
    raw = np.float32([[1, 2, 3, 4, 99]]).tobytes()
    out = decode(duck(fields, 20, raw, 1, 1, 20))
    np.testing.assert_array_equal(out, [[1, 2, 3, 4]])


def test_multi_count_extra_field_is_skipped():
    fields = [F("x", 0, FLOAT32), F("normal", 4, FLOAT32, 3), F("y", 16, FLOAT32),
              F("z", 20, FLOAT32), F("intensity", 24, UINT8)]
    vals = {"x": np.float32([1, 2]), "normal": np.float32([[9, 9, 9], [8, 8, 8]]),
            "y": np.float32([3, 4]), "z": np.float32([5, 6]), "intensity": np.uint8([7, 200])}
    data, w, rs = build_bytes(fields, 28, vals)
    np.testing.assert_array_equal(decode(duck(fields, 28, data, 1, w, rs)),
                                  [[1, 3, 5, 7], [2, 4, 6, 200]])


def test_empty_clouds():
    for cloud in (xyzi_cloud(np.zeros((0, 4))), encode(np.zeros((0, 4), np.float32), "ouster")):
        out = decode(cloud)
        assert out.shape == (0, 4) and out.dtype == np.float32
    fields = list(LAYOUTS["xyzi"].fields)
    out = decode(duck(fields, 16, b"", 0, 0, 0))
    assert out.shape == (0, 4)
    out = decode(duck(fields, 16, b"", 5, 0, 0, is_dense=False))
    assert out.shape == (0, 4)


# --------------------------------------------------------------------------- NaN handling

def test_not_dense_removes_nan_and_inf_points_and_keeps_order():
    pts = np.arange(40, dtype=np.float32).reshape(10, 4)
    pts[1, 0] = np.nan
    pts[4, 1] = np.inf
    pts[6, 2] = -np.inf
    pts[8, 3] = np.nan  # NaN intensity only: not a coordinate, the point stays
    for name in ("xyzi", "ouster", "livox"):
        out = decode(encode(pts, name, height=2, is_dense=False))
        exp = pts[[0, 2, 3, 5, 7, 8, 9]]
        np.testing.assert_array_equal(out, exp)
        assert out.flags.c_contiguous or out.shape[0] == 0


def test_not_dense_all_nan_gives_empty():
    pts = np.full((5, 4), np.nan, np.float32)
    out = decode(encode(pts, is_dense=False))
    assert out.shape == (0, 4) and out.dtype == np.float32


def test_not_dense_without_nan_keeps_everything():
    pts = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.testing.assert_array_equal(decode(encode(pts, "velodyne", is_dense=False)), pts)


def test_not_dense_float64_coordinates_with_nan():
    fields = [F("x", 0, FLOAT64), F("y", 8, FLOAT64), F("z", 16, FLOAT64),
              F("intensity", 24, UINT16)]
    vals = {"x": np.float64([1, np.nan, 3]), "y": np.float64([4, 5, -np.inf]),
            "z": np.float64([7, 8, 9]), "intensity": np.uint16([10, 11, 12])}
    data, w, rs = build_bytes(fields, 32, vals, height=1, row_pad=4)
    out = decode(duck(fields, 32, data, 1, w, rs, is_dense=False))
    np.testing.assert_array_equal(out, [[1, 4, 7, 10]])


# --------------------------------------------------------------------------- zero copy

@pytest.mark.parametrize("height", [1, 2])
def test_xyzi_from_bytearray_is_zero_copy_and_writable_view(height):
    pts = np.arange(32, dtype=np.float32).reshape(8, 4)
    cloud = encode(pts, height=height)
    cloud.data = bytearray(cloud.data)
    out = decode(cloud)
    np.testing.assert_array_equal(out, pts)
    backing = np.frombuffer(cloud.data, np.uint8)
    assert np.shares_memory(out, backing)
    # It really is a view: changing the buffer changes the decoded points.
    np.frombuffer(cloud.data, np.float32)[5] = -7.0
    assert out[1, 1] == -7.0


def test_xyzi_from_ndarray_buffer_is_zero_copy():
    pts = np.arange(32, dtype=np.float32).reshape(8, 4)
    buf = np.frombuffer(encode(pts).data, np.uint8).copy()
    cloud = encode(pts)
    cloud.data = buf
    out = decode(cloud)
    np.testing.assert_array_equal(out, pts)
    assert np.shares_memory(out, buf)


def test_xyzi_from_structured_ndarray_buffer_is_zero_copy():
    pts = np.arange(32, dtype=np.float32).reshape(8, 4)
    arr = np.frombuffer(encode(pts).data, LAYOUTS["xyzi"].dtype()).copy()
    cloud = encode(pts)
    cloud.data = arr
    out = decode(cloud)
    np.testing.assert_array_equal(out, pts)
    assert np.shares_memory(out, arr)


def test_xyzi_from_bytes_is_zero_copy_and_read_only():
    pts = np.arange(32, dtype=np.float32).reshape(8, 4)
    cloud = encode(pts)
    out = decode(cloud)
    assert isinstance(cloud.data, bytes)
    assert np.shares_memory(out, np.frombuffer(cloud.data, np.uint8))
    assert not out.flags.writeable


def test_xyzi_inside_a_larger_point_is_zero_copy():
    # x, y, z, intensity consecutive float32 at offset 8 of a 32-byte point.
    fields = [F("t", 0, FLOAT64), F("x", 8, FLOAT32), F("y", 12, FLOAT32), F("z", 16, FLOAT32),
              F("intensity", 20, FLOAT32), F("ring", 24, UINT16)]
    vals = {"t": np.float64([1, 2, 3]), "x": np.float32([1, 2, 3]), "y": np.float32([4, 5, 6]),
            "z": np.float32([7, 8, 9]), "intensity": np.float32([10, 11, 12]),
            "ring": np.uint16([1, 2, 3])}
    data, w, rs = build_bytes(fields, 32, vals)
    buf = bytearray(data)
    out = decode(duck(fields, 32, buf, 1, w, rs))
    np.testing.assert_array_equal(out, [[1, 4, 7, 10], [2, 5, 8, 11], [3, 6, 9, 12]])
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))


@pytest.mark.parametrize("name", ["ouster", "hesai"])
def test_non_consecutive_xyzi_is_a_correct_copy(name):
    pts = np.arange(32, dtype=np.float32).reshape(8, 4)
    cloud = encode(pts, name)
    cloud.data = bytearray(cloud.data)
    out = decode(cloud)
    np.testing.assert_array_equal(out, pts)
    assert not np.shares_memory(out, np.frombuffer(cloud.data, np.uint8))
    assert out.flags.writeable


def test_misaligned_buffer_decodes_correctly():
    pts = np.arange(32, dtype=np.float32).reshape(8, 4) * 1.5
    raw = encode(pts).data
    store = np.zeros(len(raw) + 1, np.uint8)
    view = store[1:]  # odd address
    view[:] = np.frombuffer(raw, np.uint8)
    cloud = encode(pts)
    cloud.data = view
    np.testing.assert_array_equal(decode(cloud), pts)


def test_packed_odd_point_step_decodes_correctly():
    # velodyne's 22-byte point: the second point's x is not 4-byte aligned.
    pts = np.arange(40, dtype=np.float32).reshape(10, 4) * 0.25
    np.testing.assert_array_equal(decode(encode(pts, "velodyne")), pts)
    np.testing.assert_array_equal(decode(encode(pts, "livox", height=5)), pts)


def test_decode_does_not_modify_the_buffer():
    pts = np.arange(40, dtype=np.float32).reshape(10, 4)
    pts[3, 0] = np.nan
    cloud = encode(pts, "ouster", is_dense=False)
    cloud.data = bytearray(cloud.data)
    before = bytes(cloud.data)
    out = decode(cloud)
    out[:] = 0
    assert bytes(cloud.data) == before


# --------------------------------------------------------------------------- errors

def _xyzi_msg(**over):
    pts = np.arange(16, dtype=np.float32).reshape(4, 4)
    c = encode(pts, "xyzi", height=2)
    msg = duck(c.fields, c.point_step, c.data, c.height, c.width, c.row_step)
    for k, v in over.items():
        setattr(msg, k, v)
    return msg


def _expect(msg, kind, *fragments):
    """decode, and validate (its checks without the points: the node's subscription callback
    runs it), both raise the CloudError ``kind`` with ``fragments`` in the message."""
    for check in (decode, validate):
        with pytest.raises(CloudError) as info:
            check(msg)
        err = info.value
        assert isinstance(err, ValueError)
        assert err.kind == kind
        text = str(err)
        for frag in fragments:
            assert frag in text, f"{frag!r} not in {text!r}"
    return text


def test_validate_passes_every_well_formed_cloud_without_reading_points():
    for name in sorted(LAYOUTS):
        assert validate(encode(np.full((8, 4), np.nan, np.float32), name, height=2)) is None
    assert validate(_xyzi_msg()) is None


def test_cloud_error_is_value_error():
    assert issubclass(CloudError, ValueError)
    e = CloudError("some_kind", "msg")
    assert e.kind == "some_kind" and str(e) == "msg"


def test_error_big_endian():
    _expect(_xyzi_msg(is_bigendian=True), "big_endian", "big-endian", "is_bigendian")


@pytest.mark.parametrize("drop,missing", [("x", "x"), ("y", "y"), ("z", "z"),
                                          ("yz", "y, z"), ("xyz", "x, y, z")])
def test_error_missing_coordinate(drop, missing):
    msg = _xyzi_msg()
    msg.fields = [f for f in msg.fields if f.name not in drop]
    text = _expect(msg, "missing_field", f"no field {missing}")
    for f in msg.fields:
        assert f.name in text  # lists the fields that are there


def test_error_missing_all_fields_says_none():
    _expect(_xyzi_msg(fields=[]), "missing_field", "x, y, z", "none")


@pytest.mark.parametrize("delta", [-1, 1, -16, 16, -64])
def test_error_data_length(delta):
    msg = _xyzi_msg()
    msg.data = bytes(msg.data)[:delta] if delta < 0 else bytes(msg.data) + b"\0" * delta
    n = 64 + delta
    _expect(msg, "bad_length", f"data length {n}", "2*32 = 64")


def test_error_data_for_empty_cloud_with_bytes():
    fields = list(LAYOUTS["xyzi"].fields)
    _expect(duck(fields, 16, b"\0" * 16, 1, 0, 0), "bad_length", "data length 16")


def test_error_row_step_too_small():
    _expect(_xyzi_msg(row_step=31), "bad_row_step", "row_step 31", "2*16")


def test_error_row_step_consistent_with_length_but_too_small():
    # height*row_step equals the data length, but the rows overlap: still an error.
    msg = _xyzi_msg(height=4, width=2, row_step=16)
    _expect(msg, "bad_row_step", "row_step 16", "2*16")


@pytest.mark.parametrize("field,offset,dtype", [
    ("x", 13, FLOAT32), ("intensity", 13, FLOAT32), ("intensity", 12, FLOAT64),
    ("z", 16, FLOAT32), ("y", 12, FLOAT64),
])
def test_error_field_past_point_step(field, offset, dtype):
    msg = _xyzi_msg()
    msg.fields = [F(f.name, offset, dtype) if f.name == field else f for f in msg.fields]
    _expect(msg, "field_past_point_step", f"'{field}'", f"offset {offset}", "point_step 16")


def test_error_multi_count_field_past_point_step():
    msg = _xyzi_msg()
    msg.fields = [F(f.name, f.offset, f.datatype, 2) if f.name == "intensity" else f
                  for f in msg.fields]
    _expect(msg, "field_past_point_step", "'intensity'", "point_step 16")


@pytest.mark.parametrize("extra,kind,fragments", [
    (F("ring", 40, UINT16), "field_past_point_step", ("'ring'", "offset 40", "point_step 16")),
    (F("ring", 15, UINT16), "field_past_point_step", ("'ring'", "offset 15", "point_step 16")),
    (F("normal", 4, FLOAT32, 4), "field_past_point_step", ("'normal'", "FLOAT32 x 4")),
    (F("rgb", 12, 0), "bad_datatype", ("'rgb'", "datatype 0")),
    (F("ring", 12, 9), "bad_datatype", ("'ring'", "datatype 9")),
])
def test_an_unused_field_that_does_not_fit_is_rejected(extra, kind, fragments):
    """The field table describes the bytes: an unused field past point_step or of an unknown
    datatype makes the whole cloud suspect, whatever the field."""
    msg = _xyzi_msg()
    msg.fields = list(msg.fields) + [extra]
    _expect(msg, kind, *fragments)


def test_an_unused_field_inside_point_step_is_fine_and_count_zero_counts_as_one():
    msg = _xyzi_msg()
    msg.fields = list(msg.fields) + [F("ring", 14, UINT16), F("flag", 15, UINT8, 0)]
    np.testing.assert_array_equal(decode(msg), np.arange(16, dtype=np.float32).reshape(4, 4))


def test_every_error_kind_is_listed():
    from sparse_detector_ros.pointcloud import CLOUD_ERROR_KINDS

    source = Path(__file__).resolve().parents[1] / "sparse_detector_ros" / "pointcloud.py"
    raised = set(re.findall(r'CloudError\(\s*"(\w+)"', source.read_text()))
    assert raised == set(CLOUD_ERROR_KINDS)


def test_dense_flag_is_a_hint_nan_points_go_and_all_nan_is_empty():
    pts = np.full((100, 4), np.nan, np.float32)
    for name in ("xyzi", "ouster"):
        assert decode(encode(pts, name, is_dense=True)).shape == (0, 4)
    pts[::3] = 1.0
    out = decode(encode(pts, "velodyne", is_dense=True))
    np.testing.assert_array_equal(out, pts[::3])


@pytest.mark.parametrize("field,datatype", [("intensity", 0), ("intensity", 9), ("x", 42),
                                            ("z", 0)])
def test_error_unknown_datatype(field, datatype):
    msg = _xyzi_msg()
    msg.fields = [F(f.name, f.offset, datatype) if f.name == field else f for f in msg.fields]
    _expect(msg, "bad_datatype", f"'{field}'", f"datatype {datatype}", "FLOAT32")


@pytest.mark.parametrize("dtype,name", [(UINT16, "UINT16"), (INT32, "INT32"), (UINT8, "UINT8")])
def test_error_integer_coordinates(dtype, name):
    msg = _xyzi_msg()
    msg.fields = [F(f.name, f.offset, dtype) if f.name == "y" else f for f in msg.fields]
    _expect(msg, "bad_datatype", "'y'", name, "FLOAT32 or FLOAT64")


def test_error_on_ros_message():
    msg = cloud_to_msg(encode(np.zeros((4, 4), np.float32)))
    msg.row_step = 60
    with pytest.raises(CloudError) as info:
        decode(msg)
    assert info.value.kind == "bad_row_step"


# --------------------------------------------------------------------------- encode errors

def test_encode_rejects_bad_shapes_and_heights():
    with pytest.raises(ValueError, match="shape"):
        encode(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="height 3"):
        encode(np.zeros((4, 4), np.float32), height=3)
    with pytest.raises(ValueError, match="height 0"):
        encode(np.zeros((4, 4), np.float32), height=0)
    with pytest.raises(ValueError, match="no field 'ring'"):
        encode(np.zeros((4, 4), np.float32), "xyzi", extra={"ring": np.zeros(4)})


def test_encode_accepts_float64_points_and_layout_object():
    pts = np.arange(12, dtype=np.float64).reshape(3, 4) / 3
    cloud = encode(pts, LAYOUTS["hesai"], extra={"ring": np.uint16([1, 2, 3])})
    np.testing.assert_array_equal(decode(cloud), pts.astype(np.float32))
    assert list(np.frombuffer(cloud.data, LAYOUTS["hesai"].dtype())["ring"]) == [1, 2, 3]
