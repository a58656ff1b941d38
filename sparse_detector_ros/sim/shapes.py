"""Actor and scenery geometry built from primitives, in the object's own frame
(x forward, y left, z up from the ground contact plane)."""
from __future__ import annotations

import numpy as np

from .raycast import SURFACE, STATIC, Primitives


def _primitives(kind: str, geometry, refl, surf, owner, poro) -> Primitives:
    """A :class:`Primitives` holding one kind (``box``, ``cyl`` or ``sph``): the geometry rows
    plus per-primitive reflectivity, surface code, owner and porosity (scalars broadcast)."""
    n = len(geometry)
    p = Primitives()
    setattr(p, kind, geometry)
    setattr(p, f"{kind}_refl", np.broadcast_to(np.asarray(refl, float), (n,)).copy())
    setattr(p, f"{kind}_owner", np.full(n, owner, np.int32))
    setattr(p, f"{kind}_surf", np.broadcast_to(np.asarray(surf, np.int8), (n,)).copy())
    setattr(p, f"{kind}_poro", np.broadcast_to(np.asarray(poro, float), (n,)).copy())
    return p


def boxes(specs, refl, surf, owner=STATIC, poro=None) -> Primitives:
    """Axis-aligned boxes in the local frame from ``(x0, x1, y0, y1, z0, z1)`` extents."""
    specs = np.asarray(specs, dtype=np.float64).reshape(-1, 6)
    n = len(specs)
    box = np.stack([(specs[:, 0] + specs[:, 1]) / 2, (specs[:, 2] + specs[:, 3]) / 2,
                    (specs[:, 4] + specs[:, 5]) / 2, (specs[:, 1] - specs[:, 0]) / 2,
                    (specs[:, 3] - specs[:, 2]) / 2, (specs[:, 5] - specs[:, 4]) / 2,
                    np.zeros(n)], axis=1)
    return _primitives("box", box, refl, surf, owner, 0.0 if poro is None else poro)


def cylinders(specs, refl, surf, owner=STATIC, poro=0.0) -> Primitives:
    """Vertical cylinders ``(cx, cy, z_bottom, z_top, radius)``."""
    specs = np.asarray(specs, dtype=np.float64).reshape(-1, 5)
    return _primitives("cyl", specs, refl, surf, owner, poro)


def spheres(specs, refl, surf, owner=STATIC, poro=0.0) -> Primitives:
    """Spheres ``(cx, cy, cz, radius)``."""
    specs = np.asarray(specs, dtype=np.float64).reshape(-1, 4)
    return _primitives("sph", specs, refl, surf, owner, poro)


def vehicle(L, W, H, subtype, paint, owner) -> Primitives:
    """Car: body + narrower glass cabin; van: body + tall box; truck: cab + cargo box + chassis.
    Glass is dark and lets some rays through, as real windows do."""
    v = SURFACE["vehicle"]
    hl, hw = L / 2, W / 2
    if subtype == "truck":
        return Primitives.concat([
            boxes([(hl - 2.2, hl, -hw, hw, 0.45, 0.82 * H)], paint, v, owner),
            boxes([(-hl, hl - 2.45, -hw, hw, 0.95, H)], min(paint + 0.2, 0.8), v, owner),
            boxes([(-hl + 0.3, hl - 0.3, -0.85 * hw, 0.85 * hw, 0.4, 0.95)], 0.06, v, owner),
        ])
    if subtype == "van":
        return Primitives.concat([
            boxes([(-hl, hl, -hw, hw, 0.22, 0.5 * H)], paint, v, owner),
            boxes([(-hl, hl - 0.16 * L, -0.96 * hw, 0.96 * hw, 0.5 * H, H)], paint, v, owner),
        ])
    belt = 0.6 * H
    return Primitives.concat([
        boxes([(-hl, hl, -hw, hw, 0.2, belt)], paint, v, owner),
        boxes([(-0.32 * L, 0.17 * L, -0.84 * hw, 0.84 * hw, belt, H)], 0.07, v, owner, poro=0.2),
    ])


def pedestrian(L, W, H, cloth, owner) -> Primitives:
    p = SURFACE["pedestrian"]
    hw = min(0.23, W / 2 - 0.04)
    hd = min(0.14, L / 2 - 0.04)
    return Primitives.concat([
        cylinders([(0.0, 0.0, 0.0, 0.47 * H, min(0.16, hw))], cloth, p, owner),
        boxes([(-hd, hd, -hw, hw, 0.47 * H, 0.83 * H)], cloth, p, owner),
        spheres([(0.0, 0.0, H - 0.11, 0.11)], 0.15, p, owner),
    ])


def cyclist(L, W, H, cloth, owner) -> Primitives:
    c = SURFACE["cyclist"]
    hl = L / 2
    hw = min(0.21, W / 2 - 0.03)
    return Primitives.concat([
        boxes([(-0.97 * hl, 0.97 * hl, -0.05, 0.05, 0.05, 0.75)], 0.35, c, owner, poro=0.45),
        boxes([(-0.15, 0.25, -0.16, 0.16, 0.45, 1.0)], cloth, c, owner),
        boxes([(-0.3, 0.15, -hw, hw, 1.0, H - 0.25)], cloth, c, owner),
        spheres([(0.05, 0.0, H - 0.12, 0.12)], 0.2, c, owner),
    ])
