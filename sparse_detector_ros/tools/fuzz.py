"""Fuzz the running ``sparse_detector_node`` with malformed PointCloud2 messages over real DDS.

The cases come from hypothesis strategies (:data:`STRATEGIES`, one per kind of fault in
:data:`KINDS`): a strategy draws a :class:`FuzzCase` (the field table, shape, steps, flags,
header and a recipe for the point values, whose bulk bytes are made from a drawn seed with
numpy), and :meth:`FuzzCase.to_msg` turns it into a raw rclpy ``sensor_msgs/PointCloud2``,
without any of the checks :func:`pointcloud.encode` would apply. Every case says what the node
must do with it (:attr:`FuzzCase.expect`): ``"processed"`` (detect, publish), ``"rejected"``
(count it under ``rejected.<kind>`` of /diagnostics, with a reason) or ``"any"`` (either, but
never a crash).

:func:`run_fuzz` sends the cases one at a time into a node (started here, or given) over
reliable QoS with a keep-all publisher, and after each waits until the node's counters account
for every cloud sent (``frames_received + frames_lost == sent`` and ``frames_processed +
frames_dropped + frames_rejected == frames_received``), so each outcome belongs to one case.
Then :func:`good_scan` sends a simulated hdl64e scan that the shipped weights detect objects in,
and :func:`flood` (optional) publishes many tiny malformed clouds as fast as possible and waits
until every one is accounted for. The result is a JSON-able report (:func:`run_fuzz`'s
docstring). Used by ``test/test_fuzz_node.py`` (a small seeded set) and ``scripts/fuzz_node.py``
(nightly size, 1000 cases).

Callers set up DDS first (``node_client.local_dds_env``): loopback only, own domain, and the
package's Fast DDS profile, whose 64 MiB shared-memory segment carries the 2-million-point
clouds (32 to 44 MB).
"""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from ..pointcloud import DATATYPES, FLOAT32, FLOAT64, LAYOUTS, UINT16, PointFieldSpec

#: the kinds of generated clouds, in the order of the issue; ``odd_layout`` are well-formed
#: clouds in unusual layouts (the controls: they must be processed)
KINDS = ("bad_length", "bad_row_step", "field_past_point_step", "overlapping_fields",
         "unsupported_type", "big_endian", "nan_inf", "huge_coords", "zero_points",
         "two_million", "duplicated_fields", "missing_field", "empty_frame_id", "absurd_stamp",
         "odd_layout")
#: kinds cheap enough (tiny clouds, rejected without running the network) for :func:`flood`
FLOOD_KINDS = ("bad_length", "bad_row_step", "field_past_point_step", "unsupported_type",
               "big_endian", "zero_points", "missing_field", "empty_frame_id")
#: at most one ``two_million`` case per this many cases (each is a 32-44 MB message)
TWO_MILLION_EVERY = 100
TWO_MILLION = 2_000_000
#: node parameters of a fuzzing run: reliable input QoS with a deep queue, so that no cloud is
#: lost between this process and the node; frequent diagnostics
FUZZ_PARAMS: dict[str, object] = {"node.qos_reliability": "reliable", "node.qos_depth": 1000,
                                  "node.diagnostics_period": 0.05}
#: rejection kind of the node's own failures (an exception other than a CloudError)
INTERNAL_ERROR = "internal_error"

_SIZE = {code: dt.itemsize for code, dt in DATATYPES.items()}
_COORDS = ("x", "y", "z", "intensity")
_EXTRA_NAMES = ("ring", "time", "t", "reflectivity", "ambient", "range", "tag", "rgb")


@dataclass(frozen=True)
class FuzzCase:
    """One generated PointCloud2 (a recipe: the bytes are made by :meth:`data`).

    ``bad_rows`` points get, in one of ``bad_cols`` (0..3 = x, y, z, intensity, per point
    drawn from the seed), one of ``specials`` (NaN, Inf, 1e30...); ``data_delta`` bytes are
    appended (> 0, random) to or cut (< 0) from the consistent ``row_step * height`` bytes.
    ``stamp`` is ``(sec, nanosec)``, or None for the sender's clock at send time."""
    kind: str
    expect: str  # "processed" | "rejected" | "any"
    fields: tuple[PointFieldSpec, ...]
    height: int
    width: int
    point_step: int
    row_step: int
    is_bigendian: bool = False
    is_dense: bool = True
    data_delta: int = 0
    bad_rows: int = 0
    bad_cols: tuple[int, ...] = ()
    specials: tuple[float, ...] = ()
    frame_id: str = "lidar"
    stamp: tuple[int, int] | None = None
    seed: int = 0
    note: str = ""

    @property
    def points(self) -> int:
        return self.height * self.width

    def values(self) -> np.ndarray:
        """``(points, 4)`` float64 x, y, z, intensity: a scan-like spread over the BEV grid,
        with the ``specials`` written in."""
        rng = np.random.default_rng(self.seed)
        n = self.points
        vals = np.empty((n, 4), np.float64)
        vals[:, :2] = rng.uniform(-45.0, 45.0, (n, 2))
        vals[:, 2] = rng.uniform(-2.0, 1.5, n)
        vals[:, 3] = rng.uniform(0.0, 100.0, n)
        k = min(self.bad_rows, n)
        if k and self.bad_cols and self.specials:
            rows = rng.permutation(n)[:k] if k < n else np.arange(n)
            cols = rng.choice(np.asarray(self.bad_cols), k)
            vals[rows, cols] = rng.choice(np.asarray(self.specials, np.float64), k)
        return vals

    def data(self) -> bytes:
        """The data bytes: random bytes (padding, unused fields) with the values written into
        every x/y/z/intensity field that has a known datatype and lies inside the point
        (big-endian when ``is_bigendian``); then ``data_delta`` applied."""
        rng = np.random.default_rng(self.seed + 1)
        size = self.row_step * self.height
        buf = bytearray(rng.bytes(size))
        n = self.points
        if n and size:
            vals = self.values().reshape(self.height, self.width, 4)
            for f in reversed(self.fields):  # the first of duplicated names is written last
                if f.name in _COORDS and f.datatype in DATATYPES:
                    self._write(buf, f, vals[..., _COORDS.index(f.name)])
        if self.data_delta > 0:
            buf += rng.bytes(self.data_delta)
        elif self.data_delta < 0:
            del buf[max(0, len(buf) + self.data_delta):]
        return bytes(buf)

    def _write(self, buf: bytearray, f: PointFieldSpec, values: np.ndarray) -> None:
        dt = DATATYPES[f.datatype]
        if self.is_bigendian:
            dt = dt.newbyteorder(">")
        last = ((self.height - 1) * self.row_step + (self.width - 1) * self.point_step
                + f.offset + dt.itemsize)
        if f.offset + dt.itemsize > self.point_step or last > len(buf):
            return  # past the point (or the buffer): leave the random bytes
        view = np.ndarray((self.height, self.width), dt, buffer=buf, offset=f.offset,
                          strides=(self.row_step, self.point_step))
        if dt.kind in "iu":
            info = np.iinfo(dt)
            values = np.clip(np.nan_to_num(values, posinf=info.max, neginf=info.min),
                             info.min, info.max)
        view[...] = values.astype(dt)

    def to_msg(self, now=None):
        """A raw rclpy ``sensor_msgs/PointCloud2`` (no checks); ``now``: the
        ``builtin_interfaces/Time`` to stamp it with when :attr:`stamp` is None."""
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import PointCloud2, PointField

        msg = PointCloud2()
        msg.header.frame_id = self.frame_id
        if self.stamp is not None:
            msg.header.stamp = Time(sec=self.stamp[0], nanosec=self.stamp[1])
        elif now is not None:
            msg.header.stamp = now
        msg.height, msg.width = self.height, self.width
        msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype,
                                 count=f.count) for f in self.fields]
        msg.is_bigendian = self.is_bigendian
        msg.point_step, msg.row_step = self.point_step, self.row_step
        msg.data = self.data()
        msg.is_dense = self.is_dense
        return msg

    def describe(self) -> dict:
        """The case as a JSON-able dict (the report's record of an unexpected outcome)."""
        d = asdict(self)
        d["fields"] = [[f.name, f.offset, f.datatype, f.count] for f in self.fields]
        d["specials"] = [repr(v) for v in self.specials]
        return d


# ------------------------------------------------------------------------------- strategies

def _pack(specs: list[tuple[str, int, int]], gaps: list[int]) -> tuple[list[PointFieldSpec],
                                                                      int]:
    fields, offset = [], 0
    for (name, dt, count), gap in zip(specs, gaps):
        offset += gap
        fields.append(PointFieldSpec(name, offset, dt, count))
        offset += _SIZE[dt] * count
    return fields, offset


@st.composite
def layouts(draw, coord_types=(FLOAT32, FLOAT64), intensity: bool | None = None
            ) -> tuple[tuple[PointFieldSpec, ...], int]:
    """A consistent field table and ``point_step``: x, y, z (each FLOAT32 or FLOAT64), maybe
    an intensity of any type, up to three other fields (count 1 to 3), in any order with gaps
    between them and padding at the end."""
    specs = [(c, draw(st.sampled_from(coord_types)), 1) for c in "xyz"]
    with_intensity = draw(st.booleans()) if intensity is None else intensity
    if with_intensity:
        specs.append(("intensity", draw(st.sampled_from(sorted(DATATYPES))), 1))
    extras = draw(st.lists(st.tuples(st.sampled_from(_EXTRA_NAMES),
                                     st.sampled_from(sorted(DATATYPES)), st.integers(1, 3)),
                           max_size=3, unique_by=lambda t: t[0]))
    specs += extras
    order = draw(st.permutations(specs))
    gaps = draw(st.lists(st.integers(0, 4), min_size=len(order), max_size=len(order)))
    fields, end = _pack(list(order), gaps)
    return tuple(fields), end + draw(st.integers(0, 8))


@st.composite
def shapes(draw, point_step: int, max_points: int = 2000, min_points: int = 1
           ) -> tuple[int, int, int]:
    """``(height, width, row_step)`` of a consistent cloud: unorganised or organised, rows
    possibly padded."""
    height = draw(st.sampled_from([h for h in (1, 1, 1, 2, 4, 16) if h <= max_points]))
    width = draw(st.integers(max(1, -(-min_points // height)), max(1, max_points // height)))
    row_pad = draw(st.integers(0, 16)) if draw(st.booleans()) else 0
    return height, width, width * point_step + row_pad


@st.composite
def _valid(draw, kind: str, expect: str = "processed", max_points: int = 2000,
           min_points: int = 1, **layout_kw) -> FuzzCase:
    fields, point_step = draw(layouts(**layout_kw))
    height, width, row_step = draw(shapes(point_step, max_points, min_points))
    return FuzzCase(kind=kind, expect=expect, fields=fields, height=height, width=width,
                    point_step=point_step, row_step=row_step,
                    is_dense=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


_FRAME_IDS = st.one_of(st.just("lidar"), st.text(
    st.one_of(st.characters(min_codepoint=0x21, max_codepoint=0x7E), st.sampled_from("äé中 ")),
    min_size=1, max_size=64))


@st.composite
def odd_layout(draw, max_points: int = 2000) -> FuzzCase:
    """Well-formed clouds in unusual layouts (field order, types, padding, organised, odd
    frame ids): the node must process them."""
    case = draw(_valid("odd_layout", max_points=max_points))
    return replace(case, frame_id=draw(_FRAME_IDS))


@st.composite
def bad_length(draw, max_points: int = 2000) -> FuzzCase:
    """Data bytes cut or appended: ``len(data) != row_step * height``."""
    case = draw(_valid("bad_length", "rejected", max_points))
    size = case.row_step * case.height
    delta = draw(st.one_of(st.integers(1, 4096), st.integers(-size, -1),
                           st.sampled_from((-1, 1, -case.point_step, case.point_step))))
    return replace(case, data_delta=max(delta, -size) or 1)


@st.composite
def bad_row_step(draw, max_points: int = 2000) -> FuzzCase:
    """``row_step < width * point_step`` (the data length agrees with the wrong row_step)."""
    case = draw(_valid("bad_row_step", "rejected", max_points))
    row_step = draw(st.integers(0, case.width * case.point_step - 1))
    return replace(case, row_step=row_step)


@st.composite
def field_past_point_step(draw, max_points: int = 2000) -> FuzzCase:
    """One field (used by the node or not) ends past ``point_step``."""
    case = draw(_valid("field_past_point_step", "rejected", max_points))
    i = draw(st.integers(0, len(case.fields) - 1))
    f = case.fields[i]
    size = _SIZE[f.datatype] * f.count
    offset = draw(st.integers(max(0, case.point_step - size + 1), case.point_step + 64))
    fields = case.fields[:i] + (replace(f, offset=offset),) + case.fields[i + 1:]
    return replace(case, fields=fields, note=f"field '{f.name}' at {offset}, {size} bytes")


@st.composite
def overlapping_fields(draw, max_points: int = 2000) -> FuzzCase:
    """A field starts inside another field's bytes (both inside the point). Aliased fields
    exist in practice (``rgb``/``rgba``), so the node may decode them (garbage coordinates that
    are NaN or far away are its business) or reject them: ``any``, never a crash."""
    case = draw(_valid("overlapping_fields", "any", max_points))
    a, b = draw(st.permutations(range(len(case.fields))))[:2]
    fa, fb = case.fields[a], case.fields[b]
    offset = fa.offset + draw(st.integers(0, _SIZE[fa.datatype] * fa.count - 1))
    point_step = max(case.point_step, offset + _SIZE[fb.datatype] * fb.count)
    fields = list(case.fields)
    fields[b] = replace(fb, offset=offset)
    return replace(case, fields=tuple(fields), point_step=point_step,
                   row_step=case.width * point_step, note=f"'{fb.name}' inside '{fa.name}'")


@st.composite
def unsupported_type(draw, max_points: int = 2000) -> FuzzCase:
    """A field with a datatype code outside 1..8, or an integer type for x/y/z."""
    case = draw(_valid("unsupported_type", "rejected", max_points))
    i = draw(st.integers(0, len(case.fields) - 1))
    f = case.fields[i]
    codes = st.one_of(st.just(0), st.integers(9, 255))
    if f.name in "xyz":
        codes = st.one_of(codes, st.sampled_from([c for c in sorted(DATATYPES)
                                                  if c not in (FLOAT32, FLOAT64)]))
    dt = draw(codes)
    fields = case.fields[:i] + (replace(f, datatype=dt),) + case.fields[i + 1:]
    return replace(case, fields=fields, note=f"field '{f.name}' datatype {dt}")


@st.composite
def big_endian(draw, max_points: int = 2000) -> FuzzCase:
    """``is_bigendian = true`` (values really written big-endian)."""
    case = draw(_valid("big_endian", "rejected", max_points))
    return replace(case, is_bigendian=True)


_NONFINITE = st.lists(st.sampled_from((math.nan, math.inf, -math.inf)), min_size=1,
                      max_size=3, unique=True)
_HUGE = st.lists(st.sampled_from((1e30, -1e30, 3.0e38, -3.0e38, 1e20, -1e10)), min_size=1,
                 max_size=4, unique=True)


@st.composite
def nan_inf(draw, max_points: int = 2000) -> FuzzCase:
    """NaN/Inf in some or all points, in coordinates or intensity, ``is_dense`` either way.
    Rejected (as having no valid point) only when every point has a non-finite coordinate."""
    case = draw(_valid("nan_inf", max_points=max_points))
    n = case.points
    cols = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)))
    every = draw(st.sampled_from((False, False, True)))
    rows = n if every else draw(st.integers(1, max(1, n - 1)))
    coords_hit = any(c < 3 for c in cols)
    has_intensity = any(f.name == "intensity" for f in case.fields)
    if not coords_hit and not has_intensity:
        cols = cols + (0,)
        coords_hit = True
    if coords_hit and not every and rows >= n:
        rows = n - 1  # n == 1: one clean point is impossible unless no point is hit
    if coords_hit:
        cols = tuple(c for c in cols if c < 3)  # every hit row gets a bad coordinate
    all_bad = coords_hit and rows >= n
    return replace(case, bad_rows=rows, bad_cols=cols, specials=tuple(draw(_NONFINITE)),
                   expect="rejected" if all_bad else "processed",
                   note="every point non-finite" if all_bad else f"{rows} of {n} points")


@st.composite
def huge_coords(draw, max_points: int = 2000) -> FuzzCase:
    """Finite but absurd coordinates (1e30, 3e38...) in some or all points: processed."""
    case = draw(_valid("huge_coords", max_points=max_points))
    cols = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)))
    rows = draw(st.one_of(st.just(case.points), st.integers(1, case.points)))
    return replace(case, bad_rows=rows, bad_cols=cols, specials=tuple(draw(_HUGE)))


@st.composite
def zero_points(draw, max_points: int = 2000) -> FuzzCase:
    """``width * height == 0`` with empty data."""
    case = draw(_valid("zero_points", "rejected", max_points))
    if draw(st.booleans()):
        return replace(case, width=0, row_step=draw(st.sampled_from((0, case.row_step))))
    return replace(case, height=0)


@st.composite
def two_million(draw) -> FuzzCase:
    """2 million points in the plain or the Velodyne layout (32 or 44 MB), unorganised or as
    64 rings: processed."""
    layout = LAYOUTS[draw(st.sampled_from(("xyzi", "velodyne")))]
    height = draw(st.sampled_from((1, 64)))
    width = TWO_MILLION // height
    return FuzzCase(kind="two_million", expect="processed", fields=layout.fields,
                    height=height, width=width, point_step=layout.point_step,
                    row_step=width * layout.point_step, is_dense=draw(st.booleans()),
                    seed=draw(st.integers(0, 2**32 - 1)))


@st.composite
def duplicated_fields(draw, max_points: int = 2000) -> FuzzCase:
    """A field name appears twice (at another offset, maybe with another type): the node may
    take the first (as sensor_msgs tools do) or reject the table: ``any``, never a crash."""
    case = draw(_valid("duplicated_fields", "any", max_points))
    f = draw(st.sampled_from(case.fields))
    dt = draw(st.sampled_from((f.datatype, FLOAT32, FLOAT64, UINT16)))
    offset = draw(st.integers(0, case.point_step))
    point_step = max(case.point_step, offset + _SIZE[dt])
    fields = list(case.fields)
    fields.insert(draw(st.integers(0, len(fields))), PointFieldSpec(f.name, offset, dt, 1))
    return replace(case, fields=tuple(fields), point_step=point_step,
                   row_step=case.width * point_step, note=f"'{f.name}' twice")


@st.composite
def missing_field(draw, max_points: int = 2000) -> FuzzCase:
    """x, y or z absent (dropped, or renamed: ``X``, ``x ``, empty name)."""
    case = draw(_valid("missing_field", "rejected", max_points))
    gone = draw(st.lists(st.sampled_from("xyz"), min_size=1, max_size=3, unique=True))
    rename = draw(st.sampled_from((None, "X", "x ", "", "xyz")))
    fields = tuple(replace(f, name=rename) if f.name in gone and rename is not None else f
                   for f in case.fields if rename is not None or f.name not in gone)
    return replace(case, fields=fields, note=f"{','.join(gone)} -> {rename!r}")


@st.composite
def empty_frame_id(draw, max_points: int = 2000) -> FuzzCase:
    """A well-formed cloud with ``header.frame_id == ""``."""
    case = draw(_valid("empty_frame_id", "rejected", max_points))
    return replace(case, frame_id="")


#: a fixed instant (2026-01-01 UTC) the drawn far stamps are spread around (+-116 days), so
#: that the cases do not depend on when they are drawn
_STAMP_REFERENCE = 1_767_225_600


@st.composite
def absurd_stamp(draw, max_points: int = 2000) -> FuzzCase:
    """Stamps far from any clock: negative seconds or ``nanosec >= 1e9`` (invalid: rejected),
    the epoch, 2038, months around 2026 (valid, far from the node's clock: processed)."""
    case = draw(_valid("absurd_stamp", max_points=max_points))
    sec = draw(st.one_of(st.integers(-2**31, -1), st.sampled_from((0, 1, 2**31 - 1)),
                         st.integers(_STAMP_REFERENCE - 10**7, _STAMP_REFERENCE + 10**7)))
    nanosec = draw(st.one_of(st.integers(0, 999_999_999),
                             st.integers(1_000_000_000, 2**32 - 1)))
    invalid = sec < 0 or nanosec >= 1_000_000_000
    return replace(case, stamp=(sec, nanosec), expect="rejected" if invalid else "processed")


#: kind -> strategy (a function of keyword ``max_points`` except ``two_million``)
STRATEGIES: dict[str, Callable[..., st.SearchStrategy[FuzzCase]]] = {
    "bad_length": bad_length, "bad_row_step": bad_row_step,
    "field_past_point_step": field_past_point_step, "overlapping_fields": overlapping_fields,
    "unsupported_type": unsupported_type, "big_endian": big_endian, "nan_inf": nan_inf,
    "huge_coords": huge_coords, "zero_points": zero_points, "two_million": two_million,
    "duplicated_fields": duplicated_fields, "missing_field": missing_field,
    "empty_frame_id": empty_frame_id, "absurd_stamp": absurd_stamp, "odd_layout": odd_layout,
}
assert set(STRATEGIES) == set(KINDS)


def _strategy(kind: str, max_points: int) -> st.SearchStrategy[FuzzCase]:
    return STRATEGIES[kind]() if kind == "two_million" else STRATEGIES[kind](
        max_points=max_points)


def draw_cases(strategy: st.SearchStrategy[FuzzCase], count: int, seed: int) -> list[FuzzCase]:
    """``count`` examples of ``strategy``, deterministic for ``seed`` (hypothesis generation
    only: no shrinking, no example database)."""
    out: list[FuzzCase] = []
    attempt = 0
    while len(out) < count:
        need = count - len(out)

        @hypothesis_seed(seed * 1000 + attempt)
        @settings(max_examples=need, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def collect(case: FuzzCase) -> None:
            if len(out) < count:
                out.append(case)

        before = len(out)
        collect()
        attempt += 1
        if len(out) == before:  # nothing new can be drawn: repeat what we have
            out += [out[i % len(out)] for i in range(need)] if out else []
            break
    return out[:count]


def allocate(count: int, kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Cases per kind for ``count`` cases: every kind at least once when ``count`` allows,
    ``two_million`` at most once per :data:`TWO_MILLION_EVERY` cases, the rest spread evenly."""
    kinds = tuple(kinds)
    if not kinds:
        return {}
    per = {k: 0 for k in kinds}
    limit = max(1, count // TWO_MILLION_EVERY)
    open_kinds = list(kinds)
    for i in range(count):
        if not open_kinds:
            break
        k = open_kinds[i % len(open_kinds)]
        per[k] += 1
        if k == "two_million" and per[k] >= limit:
            open_kinds.remove(k)
    left = count - sum(per.values())
    for i in range(left):  # only two_million was capped: spread the remainder over the rest
        per[[k for k in kinds if k != "two_million"][i % (len(kinds) - 1)]] += 1
    return per


def generate_cases(count: int, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                   max_points: int = 2000) -> list[FuzzCase]:
    """``count`` cases over ``kinds`` (:func:`allocate`), deterministic for ``seed``, in a
    seeded shuffled order (so good clouds follow bad ones of every kind)."""
    cases: list[FuzzCase] = []
    for i, (kind, n) in enumerate(allocate(count, kinds).items()):
        if n:
            cases += draw_cases(_strategy(kind, max_points), n, seed * len(KINDS) + i)
    random.Random(seed).shuffle(cases)
    return cases


# ----------------------------------------------------------------------------- the node side

@dataclass
class Counters:
    """The frame counters of one /diagnostics status of the node."""
    received: int = 0
    processed: int = 0
    dropped: int = 0
    rejected: int = 0
    lost: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    #: processed frames stamped too far from the node's clock (``frames_clock_skew``)
    clock_skew: int = 0

    @classmethod
    def of(cls, d: dict) -> Counters:
        return cls(int(d["frames_received"]), int(d["frames_processed"]),
                   int(d["frames_dropped"]), int(d["frames_rejected"]),
                   int(d.get("frames_lost", 0)),
                   {k[len("rejected."):]: int(v) for k, v in d.items()
                    if k.startswith("rejected.")}, int(d.get("frames_clock_skew", 0)))

    @property
    def settled(self) -> bool:
        """Every cloud the node received is processed, dropped or rejected (none in hand)."""
        return self.processed + self.dropped + self.rejected == self.received

    def minus(self, other: Counters) -> Counters:
        kinds = set(self.by_kind) | set(other.by_kind)
        return Counters(self.received - other.received, self.processed - other.processed,
                        self.dropped - other.dropped, self.rejected - other.rejected,
                        self.lost - other.lost,
                        {k: self.by_kind.get(k, 0) - other.by_kind.get(k, 0) for k in kinds
                         if self.by_kind.get(k, 0) != other.by_kind.get(k, 0)},
                        self.clock_skew - other.clock_skew)


def node_counters(d: dict) -> dict:
    """The counters of a diagnostics status worth reporting: every ``frames_*`` and
    ``rejected.*`` key, and any key about the clock or stamps (as ints where they are)."""
    out = {}
    for k, v in d.items():
        if k.startswith(("frames_", "rejected.")) or any(w in k for w in ("clock", "stamp",
                                                                          "skew")):
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
    return out


class Harness:
    """A node (started here with :data:`FUZZ_PARAMS` unless given) and a probe, with a
    reliable keep-all publisher on ``input/points`` (nothing is overwritten on this side) and
    the count of clouds sent, to wait until the node accounts for all of them."""

    def __init__(self, node=None, probe=None, params: dict | None = None):
        """``params``: the node's parameters when it is started here (default
        :data:`FUZZ_PARAMS`)."""
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from .node_client import NodeProcess, Probe

        self.own_node, self.own_probe = node is None, probe is None
        self.node = node if node is not None else NodeProcess(
            params=FUZZ_PARAMS if params is None else params)
        self.probe = probe if probe is not None else Probe()
        self.pub = self.probe.node.create_publisher(
            PointCloud2, "input/points",
            QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE))
        self.sent = 0
        self.last: dict | None = None
        self._seen = 0

    def ready(self, timeout: float = 120.0) -> bool:
        """Wait for the node's subscription and a settled diagnostics status; from then on
        :attr:`sent` counts from the clouds the node already saw."""
        if not self.probe.wait_for(lambda: self.pub.get_subscription_count() > 0
                                   or not self.node.alive(), timeout):
            return False
        d = self.wait(lambda c: c.settled, timeout)
        if d is None:
            return False
        c = Counters.of(d)
        self.sent = c.received + c.lost
        return True

    def publish(self, msg) -> None:
        self.pub.publish(msg)
        self.sent += 1

    def wait(self, predicate: Callable[[Counters], bool], timeout: float) -> dict | None:
        """The first new diagnostics status whose counters satisfy ``predicate`` (None on
        timeout or when the node process ends)."""
        diags = self.probe.diagnostics
        end = time.monotonic() + timeout
        while True:
            while self._seen < len(diags):
                d = diags[self._seen]
                self._seen += 1
                if predicate(Counters.of(d)):
                    self.last = d
                    return d
            if time.monotonic() > end or not self.node.alive():
                return None
            self.probe.executor.spin_once(timeout_sec=0.05)

    def wait_accounted(self, timeout: float) -> dict | None:
        """Wait until every cloud sent is received or lost, and every one received is
        processed, dropped or rejected."""
        return self.wait(lambda c: c.received + c.lost >= self.sent and c.settled, timeout)

    def good_scan(self, timeout: float = 120.0, seed: int | None = None) -> int | None:
        """Send one simulated hdl64e scan (velodyne layout) of a scene the shipped weights find
        objects in; the number of objects the node published for it (``output/objects``, or
        the diagnostics' ``detections`` without vision_msgs), None when nothing came."""
        msg = good_scan_msg(seed)
        stamp = self.probe.now()
        msg.header.stamp, msg.header.frame_id = stamp, "lidar"
        before = Counters.of(self.last).processed if self.last is not None else 0
        self.publish(msg)
        d = self.wait_accounted(timeout)
        if d is None or Counters.of(d).processed == before:
            return None
        if self.probe.has_objects:
            objects = self.probe.wait_for_output("objects", stamp, timeout)
            return None if objects is None else len(objects.detections)
        return int(d["detections"])

    def close(self) -> int | None:
        """SIGINT the node if it was started here (its exit code); close the probe if it was
        made here."""
        code = None
        if self.own_node:
            try:
                code = self.node.interrupt()
            finally:
                self.node.close()
        if self.own_probe:
            self.probe.close()
        return code


@functools.lru_cache(maxsize=4)
def good_scan_msg(seed: int | None = None):
    """A PointCloud2 of one simulated hdl64e scan (frame 0 of an evaluation scene the shipped
    model was tested on, unless ``seed`` is given), in the velodyne layout (cached: callers
    set its header)."""
    from ..ros_io import cloud_to_msg
    from ..sim import generate_scene, get_lidar, render_frame
    from ..sim.export import cloud_buffer
    from ..sim.splits import seeds

    scene_seed = seeds("eval", 1, offset=100)[0] if seed is None else seed
    frame = render_frame(generate_scene(scene_seed, duration=0.5), get_lidar("hdl64e"), 0)
    return cloud_to_msg(cloud_buffer(frame, "velodyne"))


def _outcome(delta: Counters) -> str:
    if delta.processed == 1 and delta.rejected == 0:
        return "processed"
    if delta.rejected == 1 and delta.processed == 0 and len(delta.by_kind) == 1:
        return "rejected." + next(iter(delta.by_kind))
    if delta.lost and not (delta.processed or delta.rejected):
        return "lost"
    if delta.dropped and not (delta.processed or delta.rejected):
        return "dropped"
    return (f"unclear(processed {delta.processed}, rejected {delta.rejected}, dropped "
            f"{delta.dropped}, lost {delta.lost})")


def _expected(case: FuzzCase, outcome: str) -> bool:
    if case.expect == "any":
        return outcome == "processed" or (outcome.startswith("rejected.")
                                          and outcome != "rejected." + INTERNAL_ERROR)
    if case.expect == "rejected":
        return outcome.startswith("rejected.") and outcome != "rejected." + INTERNAL_ERROR
    return outcome == "processed"


def send_cases(h: Harness, cases: list[FuzzCase], case_timeout: float = 120.0,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Send ``cases`` one at a time, each once the node accounted for the one before; the
    per-kind outcomes (see :func:`run_fuzz`)."""
    by_kind: dict[str, dict] = {}
    unexpected: list[dict] = []
    reasons: dict[str, str] = {}
    missing_reason = 0
    crashed = unaccounted = 0
    prev = Counters.of(h.last) if h.last is not None else None
    for i, case in enumerate(cases):
        if not h.node.alive():
            crashed = 1
            break
        msg = case.to_msg()
        if case.stamp is None:  # stamped once built (a 2-million-point cloud takes a while)
            msg.header.stamp = h.probe.now()
        h.publish(msg)
        d = h.wait_accounted(case_timeout)
        row = by_kind.setdefault(case.kind, {"sent": 0, "outcomes": {}, "clock_skew": 0})
        row["sent"] += 1
        if d is None:
            outcome = "crash" if not h.node.alive() else "unaccounted"
            crashed += outcome == "crash"
            unaccounted += outcome == "unaccounted"
        else:
            now = Counters.of(d)
            delta = now.minus(prev) if prev is not None else None
            outcome = _outcome(delta) if delta is not None else "unclear"
            row["clock_skew"] += delta.clock_skew if delta is not None else 0
            prev = now
            if outcome.startswith("rejected."):
                reason = d.get("last_rejection_reason", "")
                reasons.setdefault(outcome[len("rejected."):], reason)
                missing_reason += not reason
        row["outcomes"][outcome] = row["outcomes"].get(outcome, 0) + 1
        if not _expected(case, outcome) and len(unexpected) < 50:
            unexpected.append({"outcome": outcome, "case": case.describe()})
        if progress is not None:
            progress(i + 1, len(cases))
        if outcome in ("crash", "unaccounted"):
            break
    return {"by_kind": by_kind, "unexpected": unexpected, "reasons": reasons,
            "rejections_without_reason": missing_reason, "crashed": crashed,
            "unaccounted": unaccounted}


def flood(h: Harness, count: int = 500, seed: int = 0, timeout: float = 300.0) -> dict:
    """Publish ``count`` tiny malformed clouds (:data:`FLOOD_KINDS`, at most 8 points) as
    fast as possible, then wait until the node accounts for every one: the counter deltas,
    whether all were accounted for, and the seconds publishing and accounting took (report
    only)."""
    cases = generate_cases(count, seed, FLOOD_KINDS, max_points=8)
    now = h.probe.now()
    msgs = [c.to_msg(now) for c in cases]
    d0 = h.wait_accounted(60.0)
    if d0 is None:
        return {"sent": 0, "accounted": False, "error": "node not settled before the flood"}
    before = Counters.of(d0)
    t0 = time.monotonic()
    for msg in msgs:
        h.publish(msg)
    t_pub = time.monotonic() - t0
    d = h.wait_accounted(timeout)
    t_all = time.monotonic() - t0
    delta = Counters.of(d).minus(before) if d is not None else None
    expected_rejections = sum(c.expect == "rejected" for c in cases)
    return {
        "sent": len(msgs), "accounted": d is not None,
        "received": None if delta is None else delta.received,
        "processed": None if delta is None else delta.processed,
        "dropped": None if delta is None else delta.dropped,
        "rejected": None if delta is None else delta.rejected,
        "lost": None if delta is None else delta.lost,
        "rejected_by_kind": None if delta is None else delta.by_kind,
        "expected_rejections": expected_rejections,
        "publish_s": round(t_pub, 3), "accounted_after_s": round(t_all, 3),
        "clouds_per_s": round(len(msgs) / t_all, 1) if d is not None and t_all > 0 else None,
    }


def run_fuzz(cases: int = 1000, seed: int = 0, *, node=None, probe=None,
             kinds: tuple[str, ...] = KINDS, flood_count: int = 0, case_timeout: float = 120.0,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Send ``cases`` generated clouds (seeded), then a good scan, then (``flood_count`` > 0)
    a flood of tiny malformed clouds and another good scan, into a node (started here with
    :data:`FUZZ_PARAMS`, and stopped with SIGINT at the end, unless ``node`` is given).

    The report: ``cases`` and ``seed``; ``by_kind``: per generated kind the cases sent, their
    ``outcomes`` (``processed``, ``rejected.<node kind>``, ``lost``, ``dropped``, ``crash``,
    ``unaccounted``) and ``clock_skew`` (how many the node counted in ``frames_clock_skew``);
    ``unexpected``: cases whose outcome is not what the case expects (up to 50, described in
    full); ``reasons``: one rejection reason per node kind;
    ``rejections_without_reason``; ``crashes`` (the node process died, or a frame was
    rejected as ``internal_error``); ``node``: the node's counters after everything
    (:func:`node_counters`), ``accounted`` (all sent clouds received or lost, all received
    processed, dropped or rejected) and ``rejected_sum_matches`` (frames_rejected equals the
    sum of ``rejected.<kind>``); ``detections_after`` (objects found in the good scan after
    the fuzz; None: no output); ``flood`` (:func:`flood`) and ``detections_after_flood``;
    ``node_alive``, ``exit_code`` (after SIGINT, when started here) and ``seconds``.
    """
    t0 = time.monotonic()
    generated = generate_cases(cases, seed, kinds)
    h = Harness(node, probe)
    report: dict = {"cases": len(generated), "seed": seed}
    try:
        if not h.ready():
            raise RuntimeError("the node did not come up:\n" + h.node.log()[-4000:])
        report.update(send_cases(h, generated, case_timeout, progress))
        crashed = report.pop("crashed")
        report["detections_after"] = h.good_scan() if h.node.alive() else None
        if flood_count and h.node.alive():
            report["flood"] = flood(h, flood_count, seed)
            report["detections_after_flood"] = h.good_scan() if h.node.alive() else None
        d = h.wait_accounted(60.0) if h.node.alive() else None
        final = d if d is not None else (h.probe.latest() or {})
        c = Counters.of(final) if final else Counters()
        report["node"] = node_counters(final)
        report["accounted"] = d is not None and c.received + c.lost == h.sent
        report["clouds_sent"] = h.sent
        report["rejected_sum_matches"] = sum(c.by_kind.values()) == c.rejected
        report["crashes"] = int(bool(crashed) or not h.node.alive()) + c.by_kind.get(
            INTERNAL_ERROR, 0)
        report["node_alive"] = h.node.alive()
    finally:
        report["exit_code"] = h.close()
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report
