"""Rotations and the mount transform between the cloud's frame and the detection frame (numpy).

Conventions (REP-103): right-handed frames, x forward, y left, z up, metres, radians.

* Roll, pitch, yaw are rotations about the *fixed* axes x, y, z, applied in that order::

      R = Rz(yaw) @ Ry(pitch) @ Rx(roll)

  so a positive pitch turns +x towards -z (nose down) and a positive yaw turns +x towards +y.
* Quaternions are ``(x, y, z, w)`` arrays (the field order of ``geometry_msgs/Quaternion``),
  unit length, ``w >= 0`` where this module makes one.
* A rotation matrix ``R`` maps a vector's coordinates in the rotated frame into the parent
  frame: ``v_parent = R @ v_child``.

The detector runs on a BEV grid in a *detection frame* (the frame the model was trained in:
level, origin at the trained mounting height). A sensor that is tilted or mounted elsewhere
publishes clouds in its own frame; :class:`MountTransform` holds the pose of that cloud frame
in the detection frame, moves points into the detection frame before rasterising, and moves
detected boxes (and any other pose, such as the origin of the computation mask) back into the
cloud frame, where every output is published.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["rpy_to_matrix", "matrix_to_quaternion", "quaternion_to_matrix", "yaw_quaternion",
           "quaternion_to_yaw", "MountTransform"]

# |R^T R - I| and |det R - 1| above this: not a rotation matrix (loose enough for float32 input)
_ORTHO_TOL = 1e-5


def _finite_vector(value, n: int, name: str) -> np.ndarray:
    """``value`` as an (n,) float64 array of finite numbers, or ValueError naming ``name``."""
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if v.shape != (n,):
        raise ValueError(f"{name} must be {n} numbers, got shape {v.shape}: {value!r}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    return v


def _rotation(R, name: str = "R") -> np.ndarray:
    """``R`` as a (..., 3, 3) float64 array of rotation matrices, or ValueError naming ``name``."""
    m = np.asarray(R, dtype=np.float64)
    if m.ndim < 2 or m.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (..., 3, 3), got {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} must be finite")
    err = np.abs(np.swapaxes(m, -1, -2) @ m - np.eye(3)).max(initial=0.0)
    det_err = np.abs(np.linalg.det(m) - 1.0).max(initial=0.0) if m.size else 0.0
    if err > _ORTHO_TOL or det_err > _ORTHO_TOL:
        raise ValueError(f"{name} is not a rotation matrix (orthonormal, det +1): "
                         f"max |R^T R - I| = {err:.3g}, max |det R - 1| = {det_err:.3g}")
    return m


def rpy_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """(3, 3) float64 rotation ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (fixed axes, REP-103)."""
    r, p, y = _finite_vector((roll, pitch, yaw), 3, "roll, pitch, yaw")
    cr, sr, cp, sp, cy, sy = math.cos(r), math.sin(r), math.cos(p), math.sin(p), \
        math.cos(y), math.sin(y)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def matrix_to_quaternion(R) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) float64 unit quaternions ``(x, y, z, w)``,
    ``w >= 0``. Numerically stable for every rotation (180 degrees included): each quaternion
    is computed from its largest component (Shepperd's method), vectorised over ``...``.
    Raises ValueError when ``R`` is not a stack of rotation matrices."""
    m = _rotation(R)
    r00, r11, r22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    tr = r00 + r11 + r22
    # 4 * (w^2, x^2, y^2, z^2); the largest one is >= 1, so its square root is well conditioned
    sq = np.stack([1 + tr, 1 + 2 * r00 - tr, 1 + 2 * r11 - tr, 1 + 2 * r22 - tr], -1)
    pick = sq.argmax(-1)
    s = 2.0 * np.sqrt(np.take_along_axis(sq, pick[..., None], -1)[..., 0])     # 4 * |largest|
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], \
        m[..., 1, 0] - m[..., 0, 1]
    s01, s02, s12 = m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0], \
        m[..., 1, 2] + m[..., 2, 1]
    q4 = s * s / 4.0                  # 4 * largest^2 / ... : numerators of the picked component
    cand = np.stack([                                     # (..., 4 cases, 4 = x, y, z, w) * s
        np.stack([d21, d02, d10, q4], -1),                # w largest
        np.stack([q4, s01, s02, d21], -1),                # x largest
        np.stack([s01, q4, s12, d02], -1),                # y largest
        np.stack([s02, s12, q4, d10], -1),                # z largest
    ], -2)
    q = np.take_along_axis(cand, pick[..., None, None], -2)[..., 0, :] / s[..., None]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., 3:4] < 0, -q, q)


def quaternion_to_matrix(q) -> np.ndarray:
    """(..., 4) quaternions ``(x, y, z, w)`` (normalised here) -> (..., 3, 3) float64 rotation
    matrices. Raises ValueError for a zero or non-finite quaternion."""
    v = np.asarray(q, dtype=np.float64)
    if v.ndim < 1 or v.shape[-1] != 4:
        raise ValueError(f"quaternion must have shape (..., 4) = (x, y, z, w), got {v.shape}")
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    if not np.isfinite(v).all() or (n < 1e-12).any():
        raise ValueError(f"quaternion must be finite and non-zero, got {v.tolist()}")
    x, y, z, w = np.moveaxis(v / n, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def yaw_quaternion(yaw) -> np.ndarray:
    """(...,) yaw angles -> (..., 4) float64 quaternions ``(0, 0, sin(yaw/2), cos(yaw/2))`` of
    the rotations about +z, sign chosen so that ``w >= 0``."""
    y = np.asarray(yaw, dtype=np.float64)
    q = np.zeros(y.shape + (4,))
    q[..., 2] = np.sin(y / 2)
    q[..., 3] = np.cos(y / 2)
    return np.where(q[..., 3:4] < 0, -q, q)


def quaternion_to_yaw(x: float, y: float, z: float, w: float) -> float:
    """Yaw (heading about +z, in (-pi, pi]) of the rotation ``(x, y, z, w)``: the yaw of its
    ``Rz(yaw) Ry(pitch) Rx(roll)`` decomposition, i.e. the direction of the rotated +x axis
    seen from above. Scale-invariant (the quaternion need not be normalised)."""
    x, y, z, w = (float(v) for v in (x, y, z, w))
    if not all(math.isfinite(v) for v in (x, y, z, w)) or x * x + y * y + z * z + w * w == 0:
        raise ValueError(f"quaternion must be finite and non-zero, got {(x, y, z, w)}")
    return math.atan2(2 * (w * z + x * y), w * w + x * x - y * y - z * z)


class MountTransform:
    """Pose of the cloud's frame in the detection frame: a point p of the cloud is detected
    at ``R p + t``. Identity = detect in the cloud's frame.

    ``translation`` (3,) metres and ``rpy`` (roll, pitch, yaw) radians are the parameters
    ``transform.translation`` and ``transform.rpy`` of the node; ``R = rpy_to_matrix(*rpy)``.
    """

    def __init__(self, translation=(0.0, 0.0, 0.0), rpy=(0.0, 0.0, 0.0)):
        t = _finite_vector(translation, 3, "translation")
        angles = _finite_vector(rpy, 3, "rpy (roll, pitch, yaw)")
        self._set(rpy_to_matrix(*angles), t)

    def _set(self, R: np.ndarray, t: np.ndarray) -> None:
        self.rotation = R
        self.translation = t
        self._r32 = R.T.astype(np.float32)            # points @ R^T, float32 like the points
        self._t32 = t.astype(np.float32)
        self._identity = bool(np.array_equal(R, np.eye(3)) and not t.any())

    @classmethod
    def from_matrix(cls, R, t) -> "MountTransform":
        """From a (3, 3) rotation matrix and a (3,) translation (ValueError when ``R`` is not a
        rotation)."""
        out = cls.__new__(cls)
        out._set(_rotation(R, "rotation").copy(), _finite_vector(t, 3, "translation"))
        return out

    @property
    def is_identity(self) -> bool:
        """True when the transform is exactly the identity (no rotation, no translation)."""
        return self._identity

    def __repr__(self) -> str:
        return (f"MountTransform(translation={self.translation.tolist()}, "
                f"rotation={self.rotation.round(6).tolist()})")

    def points_to_detection(self, points: np.ndarray) -> np.ndarray:
        """(N, >=3) points (x, y, z first) of the cloud frame -> a new (N, same columns) float32
        array in the detection frame; columns 3.. (intensity, ...) are copied unchanged.
        The identity returns ``points`` itself (no copy)."""
        if not isinstance(points, np.ndarray) or points.ndim != 2 or points.shape[1] < 3:
            raise ValueError(f"points must be a numpy array of shape (N, >=3) with x, y, z "
                             f"first, got {getattr(points, 'shape', type(points).__name__)}")
        if self._identity:
            return points
        out = np.empty(points.shape, np.float32)
        out[:, 3:] = points[:, 3:]
        np.matmul(points[:, :3].astype(np.float32, copy=False), self._r32, out=out[:, :3])
        out[:, :3] += self._t32
        return out

    def _to_cloud(self, p: np.ndarray) -> np.ndarray:
        """(..., 3) positions of the detection frame -> the cloud frame, ``R^T (p - t)``."""
        return (p - self.translation) @ self.rotation

    def boxes_to_cloud(self, boxes) -> tuple[np.ndarray, np.ndarray]:
        """(K, 7) boxes ``(x, y, z, l, w, h, yaw)`` of the detection frame -> ``(centres (K, 3)
        float64, orientations (K, 4) float64 quaternions (x, y, z, w))`` in the cloud frame;
        the orientation is the rotation ``R^T Rz(yaw)`` (for the identity: the yaw quaternion).
        """
        b = np.asarray(boxes, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] != 7:
            raise ValueError(f"boxes must have shape (K, 7) = (x, y, z, l, w, h, yaw) per row, "
                             f"got {b.shape}")
        if self._identity:
            return b[:, :3].copy(), yaw_quaternion(b[:, 6])
        c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
        rz = np.zeros((len(b), 3, 3))
        rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1], rz[:, 2, 2] = c, -s, s, c, 1.0
        return self._to_cloud(b[:, :3]), matrix_to_quaternion(self.rotation.T @ rz)

    def pose_to_cloud(self, position, quaternion) -> tuple[np.ndarray, np.ndarray]:
        """One pose of the detection frame (position (3,), quaternion (4,) ``x, y, z, w``) ->
        the same pose in the cloud frame: ``(position (3,) float64, quaternion (4,) float64,
        w >= 0)``."""
        p = _finite_vector(position, 3, "position")
        q = _finite_vector(quaternion, 4, "quaternion")
        if self._identity:
            n = float(np.linalg.norm(q))
            if n < 1e-12:
                raise ValueError(f"quaternion must be non-zero, got {q.tolist()}")
            return p, (q / n if q[3] >= 0 else -q / n)
        return (self._to_cloud(p),
                matrix_to_quaternion(self.rotation.T @ quaternion_to_matrix(q)))
