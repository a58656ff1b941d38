"""Bird's-eye picture of a frame: points, ground-truth boxes and the road map (matplotlib)."""
from __future__ import annotations

import numpy as np

from ..boxes import corners_bev
from .frames import Frame
from .roadmap import ROAD_VALUE, WALKABLE_VALUE
from .world import Scene

CLASS_COLORS = {"car": "#d62728", "pedestrian": "#1f77b4", "cyclist": "#2ca02c"}


def _to_world(frame: Frame, xy):
    ex, ey, _, eyaw = frame.ego_pose
    c, s = np.cos(eyaw), np.sin(eyaw)
    return ex + c * xy[:, 0] - s * xy[:, 1], ey + s * xy[:, 0] + c * xy[:, 1]


def render_preview(scene: Scene, frame: Frame, path, half_extent: float = 60.0,
                   zoom: float = 28.0, dpi: int = 140) -> None:
    """Save a two-panel BEV (whole neighbourhood, close-up) of ``frame`` to ``path``, in the
    ``map`` frame around the ego: road map (road dark grey, sidewalks light), ground returns
    grey, scenery returns coloured by height, object returns black, ground-truth boxes by
    class (dotted: no points)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    rm = scene.roadmap()
    img = rm.occupancy_image()
    colour = np.zeros(img.shape + (3,), np.float32)
    colour[:] = (0.97, 0.97, 0.94)
    colour[img == WALKABLE_VALUE] = (0.88, 0.88, 0.93)
    colour[img == ROAD_VALUE] = (0.78, 0.78, 0.82)
    # the raster is (x, y) (bev.py convention); imshow wants rows along y
    colour = colour.transpose(1, 0, 2)
    extent = (rm.origin[0], rm.origin[0] + img.shape[0] * rm.resolution,
              rm.origin[1], rm.origin[1] + img.shape[1] * rm.resolution)
    wx, wy = _to_world(frame, frame.points[:, :2])
    z = frame.points[:, 2]
    ground = frame.owner == -2
    actor = frame.owner >= 0          # returns from cars, pedestrians, cyclists: black
    corners = corners_bev(frame.boxes)      # front corners first
    ex, ey, _, eyaw = frame.ego_pose

    fig, axes = plt.subplots(1, 2, figsize=(16, 8.4))
    for ax, half, size in ((axes[0], half_extent, 0.4), (axes[1], zoom, 2.2)):
        ax.imshow(colour, origin="lower", extent=extent, interpolation="nearest")
        ax.scatter(wx[ground], wy[ground], s=size * 0.35, c="#4a4a55", linewidths=0,
                   rasterized=True)
        scenery = ~ground & ~actor
        sc = ax.scatter(wx[scenery], wy[scenery], s=size, c=z[scenery], cmap="turbo",
                        vmin=-frame.lidar.mount_height, vmax=3.0, linewidths=0,
                        rasterized=True)
        ax.scatter(wx[actor], wy[actor], s=size * 1.3, c="k", linewidths=0, rasterized=True)
        for k in range(len(frame.boxes)):
            cw = np.stack(_to_world(frame, corners[k]), axis=1)
            col = CLASS_COLORS.get(str(frame.labels[k]), "k")
            ax.add_patch(Polygon(cw, closed=True, fill=False, ec=col,
                                 lw=1.4 if frame.num_points[k] > 0 else 0.6,
                                 ls="-" if frame.num_points[k] > 0 else ":"))
            front = cw[:2].mean(0)
            centre = cw.mean(0)
            ax.plot([centre[0], front[0]], [centre[1], front[1]], color=col, lw=0.8)
        ax.plot([ex], [ey], marker=(3, 0, np.rad2deg(eyaw) - 90), ms=12, color="k")
        ax.set_xlim(ex - half, ex + half)
        ax.set_ylim(ey - half, ey + half)
        ax.set_aspect("equal")
        ax.set_xlabel("x [m] (map)")
        ax.set_ylabel("y [m] (map)")
    cars = int(np.sum(frame.labels == "car"))
    axes[0].set_title(f"scene {scene.seed} frame {frame.index}: {len(frame.points)} points,\n"
                      f"{len(frame.boxes)} objects ({cars} cars), {frame.lidar.name}", fontsize=10)
    axes[1].set_title("close-up, object returns in black:\nnear faces only, shadows behind",
                      fontsize=10)
    fig.colorbar(sc, ax=axes, shrink=0.7, label="z in sensor frame [m]")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in CLASS_COLORS.items()]
    axes[0].legend(handles=handles, loc="upper right", fontsize=8)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
