"""Procedural RGB-D scenes: a textured room with spheres and boxes, ray cast in numpy.

World frame: metres, y up, the floor is y = 0, the camera looks roughly along +z. The camera is
an ideal pinhole with square pixels; `fov` is the horizontal field of view. Depth is z-depth: the
distance along the optical axis (not along the ray), the convention of Kinect/NYU depth maps.
Rays are built with a unit component along the optical axis, so the ray parameter t of a hit *is*
its z-depth. Pixels whose ray hits nothing get depth 0 (invalid); random scenes are closed rooms,
so every pixel is valid there.

Depth has to be read from image cues: perspective of the textures (checker, stripes, noise in
metric units), Lambert shading from one point or directional light, and cast shadows (one shadow
ray per pixel). Everything is vectorised over pixels; a 48x64 scene renders in a few ms.
"""
from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pixtok.checkpoint import atomic_write
from training.data.base import DataError
from training.data.rgbd import DepthDataset

EPS = 1e-6          # smallest ray parameter that counts as a hit
SHADOW_BIAS = 1e-4  # shadow rays start this far off the surface, against self-shadowing
PATTERNS = ("plain", "checker", "stripes", "noise")
SPLIT_STREAMS = {"train": 0, "test": 1, "val": 2}


@dataclass
class Camera:
    """Pinhole camera: position (m), yaw about +y and pitch (degrees, > 0 looks down), h-fov."""
    position: tuple[float, float, float] = (0.0, 1.5, 0.0)
    yaw: float = 0.0
    pitch: float = 0.0
    fov: float = 60.0

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit (right, up, forward) vectors in the world frame."""
        yaw, pitch = math.radians(self.yaw), math.radians(self.pitch)
        cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
        forward = np.array([sy * cp, -sp, cy * cp])
        right = np.array([cy, 0.0, -sy])
        up = np.array([sy * sp, cp, cy * sp])
        return right, up, forward


def camera_rays(camera: Camera, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Origin (3,) and ray directions (H, W, 3) through pixel centres, forward component 1."""
    h, w = size
    focal = (w / 2) / math.tan(math.radians(camera.fov) / 2)       # pixels
    u = (np.arange(w) + 0.5 - w / 2) / focal                          # (W,) right
    v = -(np.arange(h) + 0.5 - h / 2) / focal                         # (H,) up; row 0 is the top
    right, up, forward = camera.axes()
    dirs = forward + u[None, :, None] * right + v[:, None, None] * up  # (H, W, 3)
    return np.asarray(camera.position, dtype=np.float64), dirs


def value_noise(uv: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 2D value noise in [0, 1] on a unit lattice: hashed corners, smoothstep blend."""
    cell = np.floor(uv)
    f = uv - cell
    f = f * f * (3 - 2 * f)
    i, j = cell[:, 0].astype(np.int64), cell[:, 1].astype(np.int64)

    def corner(di, dj):
        h = (i + di) * 374761393 + (j + dj) * 668265263 + seed * 2147483647
        h = (h ^ (h >> 13)) * 1274126177
        return ((h ^ (h >> 16)) & 0xFFFF) / 0xFFFF

    top = corner(0, 0) * (1 - f[:, 0]) + corner(1, 0) * f[:, 0]
    bottom = corner(0, 1) * (1 - f[:, 0]) + corner(1, 1) * f[:, 0]
    return top * (1 - f[:, 1]) + bottom * f[:, 1]


@dataclass
class Material:
    """Albedo: a two-colour pattern in surface coordinates (metres), `scale` metres per cell."""
    colour: tuple[float, float, float] = (0.7, 0.7, 0.7)
    colour2: tuple[float, float, float] = (0.3, 0.3, 0.3)
    pattern: str = "plain"
    scale: float = 0.5
    seed: int = 0

    def albedo(self, uv: np.ndarray) -> np.ndarray:
        """Surface coordinates (P, 2) -> albedo (P, 3) in [0, 1]."""
        cells = uv / self.scale
        if self.pattern == "plain":
            mix = np.zeros(len(uv))
        elif self.pattern == "checker":
            mix = (np.floor(cells).sum(axis=1) % 2).astype(np.float64)
        elif self.pattern == "stripes":
            mix = (np.floor(cells[:, 0]) % 2).astype(np.float64)
        elif self.pattern == "noise":
            mix = value_noise(cells, self.seed)
        else:
            raise ValueError(f"pattern {self.pattern!r}: expected one of {PATTERNS}")
        a, b = np.asarray(self.colour), np.asarray(self.colour2)
        return a + mix[:, None] * (b - a)


def facing(normals: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Flip normals (P, 3) to face against the rays (P, 3): we see the side the ray came from."""
    flip = (normals * dirs).sum(axis=1) > 0
    return np.where(flip[:, None], -normals, normals)


@dataclass
class Plane:
    """The infinite plane x[axis] == offset (seen from either side)."""
    axis: int
    offset: float
    material: Material = field(default_factory=Material)
    casts_shadow: bool = True

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameters (P,) of the first hit beyond EPS, inf on a miss."""
        d = dirs[:, self.axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.offset - origins[..., self.axis]) / d
        return np.where(np.isfinite(t) & (t > EPS), t, np.inf)

    def surface(self, points: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hit points (P, 3) -> (normals (P, 3) facing the rays, surface coordinates (P, 2))."""
        normals = np.zeros_like(points)
        normals[:, self.axis] = 1.0
        others = [a for a in range(3) if a != self.axis]   # the normal axis never enters uv
        return facing(normals, dirs), points[:, others]


@dataclass
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    material: Material = field(default_factory=Material)
    casts_shadow: bool = True

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origins - np.asarray(self.centre)
        a = (dirs * dirs).sum(axis=1)
        b = (oc * dirs).sum(axis=-1)                     # half of the usual b
        c = (oc * oc).sum(axis=-1) - self.radius ** 2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        near, far = (-b - root) / a, (-b + root) / a
        t = np.where(near > EPS, near, np.where(far > EPS, far, np.inf))
        return np.where(disc >= 0, t, np.inf)

    def surface(self, points, dirs):
        n = (points - np.asarray(self.centre)) / self.radius
        # longitude/latitude arc lengths, so pattern cells are about `scale` metres wide
        uv = np.stack([np.arctan2(n[:, 2], n[:, 0]), np.arcsin(np.clip(n[:, 1], -1, 1))], axis=1)
        return facing(n, dirs), uv * self.radius


@dataclass
class Box:
    """A box with half extents `half`, turned by `yaw` degrees about the vertical through centre."""
    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float = 0.0
    material: Material = field(default_factory=Material)
    casts_shadow: bool = True

    def rotation(self) -> np.ndarray:
        """Local -> world rotation (3, 3); world -> local is its transpose."""
        c, s = math.cos(math.radians(self.yaw)), math.sin(math.radians(self.yaw))
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def intersect(self, origins, dirs):
        rot = self.rotation()
        o = (origins - np.asarray(self.centre)) @ rot   # world -> local (row vectors)
        d = dirs @ rot
        half = np.asarray(self.half)
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (-half - o) / d, (half - o) / d      # (P, 3) slab entries and exits
        near = np.fmin(t0, t1).max(axis=1)
        far = np.fmax(t0, t1).min(axis=1)
        t = np.where(near > EPS, near, np.where(far > EPS, far, np.inf))
        return np.where(near <= far, t, np.inf)

    def surface(self, points, dirs):
        rot = self.rotation()
        local = (points - np.asarray(self.centre)) @ rot   # (P, 3)
        half = np.asarray(self.half)
        axis = np.abs(local / half).argmax(axis=1)          # the face each hit lies on
        rows = np.arange(len(points))
        n_local = np.zeros_like(local)
        n_local[rows, axis] = np.sign(local[rows, axis])
        others = np.array([[1, 2], [0, 2], [0, 1]])[axis]   # the two in-face axes
        uv = np.take_along_axis(local, others, axis=1)
        return facing(n_local @ rot.T, dirs), uv


@dataclass
class Light:
    """A point light at `vector`, or a directional light shining along `vector`."""
    kind: str = "point"
    vector: tuple[float, float, float] = (0.0, 2.5, 2.0)
    intensity: float = 1.0
    falloff: float = 6.0   # point light: distance (m) at which irradiance halves; 0 = none


@dataclass
class Scene:
    camera: Camera
    surfaces: list
    light: Light
    ambient: float = 0.25


def render(scene: Scene, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ray cast `scene` at (H, W) -> (rgb uint8 (H, W, 3), z-depth float32 (H, W), 0 = miss)."""
    h, w = size
    origin, dirs = camera_rays(scene.camera, size)
    dirs = dirs.reshape(-1, 3)                                        # (P, 3)
    ts = np.stack([s.intersect(origin, dirs) for s in scene.surfaces])  # (S, P)
    which, t = ts.argmin(axis=0), ts.min(axis=0)
    hit = np.isfinite(t)
    points = origin + np.where(hit, t, 0.0)[:, None] * dirs           # (P, 3)
    normals, albedo = np.zeros_like(points), np.zeros_like(points)
    for k, surface in enumerate(scene.surfaces):
        sel = hit & (which == k)
        if sel.any():
            normals[sel], uv = surface.surface(points[sel], dirs[sel])
            albedo[sel] = surface.material.albedo(uv)
    light = shade(scene, points[hit], normals[hit])
    rgb = np.zeros_like(points)
    rgb[hit] = albedo[hit] * (scene.ambient + (1 - scene.ambient) * light[:, None])
    rgb = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(h, w, 3)
    depth = np.where(hit, t, 0.0).astype(np.float32).reshape(h, w)
    return rgb, depth


def shade(scene: Scene, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Direct light (P,) at surface points: Lambert's cosine, falloff, and a shadow ray each."""
    light = scene.light
    if light.kind == "point":
        to_light = np.asarray(light.vector) - points                  # (P, 3); t = 1 at the light
        dist = np.linalg.norm(to_light, axis=1)
        reach = 1.0 - EPS
        falloff = 1 / (1 + (dist / light.falloff) ** 2) if light.falloff else 1.0
    elif light.kind == "directional":
        to_light = -np.asarray(light.vector, dtype=np.float64) * np.ones_like(points)
        dist = np.linalg.norm(to_light, axis=1)
        reach, falloff = np.inf, 1.0
    else:
        raise ValueError(f"light kind {light.kind!r}: expected 'point' or 'directional'")
    cosine = np.maximum((normals * to_light).sum(axis=1) / dist, 0.0)
    starts = points + SHADOW_BIAS * normals
    lit = cosine > 0
    for surface in scene.surfaces:
        if surface.casts_shadow and lit.any():
            lit[lit] = surface.intersect(starts[lit], to_light[lit]) >= reach
    return light.intensity * cosine * falloff * lit


def random_material(rng: np.random.Generator) -> Material:
    colour = rng.uniform(0.15, 0.95, 3)
    colour2 = colour * rng.uniform(0.2, 0.6) if rng.random() < 0.5 else rng.uniform(0.1, 0.9, 3)
    return Material(tuple(colour), tuple(colour2), PATTERNS[rng.integers(len(PATTERNS))],
                    float(rng.uniform(0.15, 0.8)), int(rng.integers(2 ** 31)))


def random_scene(rng: np.random.Generator) -> Scene:
    """A closed room (floor, ceiling, four walls), 2-6 objects, one light, a random camera."""
    width, length, height = rng.uniform(3, 6), rng.uniform(4, 8), rng.uniform(2.4, 3.2)
    x0, x1, z0, z1 = -width / 2, width / 2, -1.0, length - 1.0
    camera = Camera((float(rng.uniform(0.3 * x0, 0.3 * x1)), float(rng.uniform(0.8, 1.8)), 0.0),
                    yaw=float(rng.uniform(-20, 20)), pitch=float(rng.uniform(0, 30)),
                    fov=float(rng.uniform(50, 70)))
    if rng.random() < 0.7:   # a lamp under the ceiling
        light = Light("point", (float(rng.uniform(x0 / 2, x1 / 2)), height - 0.2,
                                float(rng.uniform(1, z1 - 1))), float(rng.uniform(0.9, 1.3)))
    else:                    # sunlight through a glass roof: the ceiling casts no shadow
        azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(np.pi / 5, np.pi / 2.4)
        direction = (math.cos(azimuth) * math.cos(elevation), -math.sin(elevation),
                     math.sin(azimuth) * math.cos(elevation))
        light = Light("directional", direction, float(rng.uniform(0.7, 1.0)))
    floor_and_walls = [Plane(1, 0.0, random_material(rng)),
                       Plane(1, height, random_material(rng), light.kind == "point")]
    wall = random_material(rng)
    if rng.random() < 0.5:   # all walls alike, as in most rooms
        floor_and_walls += [Plane(a, o, wall) for a, o in ((0, x0), (0, x1), (2, z0), (2, z1))]
    else:
        floor_and_walls += [Plane(a, o, random_material(rng))
                            for a, o in ((0, x0), (0, x1), (2, z0), (2, z1))]
    objects = []
    for _ in range(rng.integers(2, 7)):
        size = rng.uniform(0.15, 0.6)
        x = float(rng.uniform(x0 + size, x1 - size))
        z = float(rng.uniform(1.0, z1 - size))
        if rng.random() < 0.5:
            lift = rng.uniform(0, height - 2 * size - 0.1) if rng.random() < 0.2 else 0.0
            objects.append(Sphere((x, float(size + lift), z), float(size), random_material(rng)))
        else:
            half = (float(size), float(rng.uniform(0.15, 0.6)), float(rng.uniform(0.15, 0.6)))
            yaw = float(rng.uniform(0, 90)) if rng.random() < 0.5 else 0.0
            objects.append(Box((x, half[1], z), half, yaw, random_material(rng)))
    return Scene(camera, floor_and_walls + objects, light, float(rng.uniform(0.15, 0.35)))


def render_scene(seed: int | Sequence[int],
                 size: tuple[int, int] = (48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """The random scene of `seed` -> (rgb uint8 (H, W, 3), z-depth float32 (H, W) in metres)."""
    return render(random_scene(np.random.default_rng(seed)), size)


def render_range(seed: int, stream: int, start: int, stop: int, size: tuple[int, int],
                 out: tuple[np.ndarray, np.ndarray] | None = None):
    """Scenes start..stop-1 of a seed stream -> (images uint8 (n, 3, H, W), depths (n, 1, H, W)),
    written into `out`, a pair of arrays of those shapes, where given."""
    h, w = size
    images, depths = out if out is not None else (np.empty((stop - start, 3, h, w), np.uint8),
                                                  np.empty((stop - start, 1, h, w), np.float32))
    for k, i in enumerate(range(start, stop)):
        rgb, depth = render_scene((seed, stream, i), size)
        images[k], depths[k, 0] = rgb.transpose(2, 0, 1), depth
    return images, depths


def shared_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array in anonymous shared memory: processes forked after it is made write into it in
    place (no copy back through a pipe, no concatenation, and no /dev/shm size limit)."""
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))   # MAP_SHARED | ANONYMOUS
    return np.frombuffer(buffer, dtype, count).reshape(shape)


def render_parallel(seed: int, stream: int, start: int, stop: int, size: tuple[int, int],
                    workers: int):
    """render_range(seed, stream, start, stop, size) split over `workers` forked processes, each
    filling its own slice of shared arrays: the peak memory is the data set's size once."""
    n = stop - start
    images = shared_empty((n, 3, *size), np.uint8)
    depths = shared_empty((n, 1, *size), np.float32)
    bounds = np.linspace(0, n, workers + 1).round().astype(int)
    # fork, not spawn: spawn re-runs a user's script that lacks a __main__ guard, and a forked
    # child writes into the parent's shared pages
    fork = mp.get_context("fork")
    procs = [fork.Process(target=render_range,
                          args=(seed, stream, start + a, start + b, size,
                                (images[a:b], depths[a:b])))
             for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"rendering {n} scenes: {len(failed)} of {len(procs)} worker "
                           f"processes failed (exit codes {failed})")
    return images, depths


PARALLEL_FROM = 1000     # below this, starting worker processes costs more than it saves


def render_workers(n: int, alone: bool = False) -> int:
    """Processes to render n scenes with, for large sets: this process's share of the cores
    (under torchrun every local rank renders its own copy), or all of them when it renders
    `alone` (for a cache, which each node's first rank fills while the others wait); at most 16."""
    if n < PARALLEL_FROM:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = 1 if alone else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, (cores or 1) // share))


def cache_name(seed: int, split: str, size: tuple[int, int]) -> str:
    return f"scenes-{split}-seed{seed}-{size[0]}x{size[1]}.npz"


def read_cache(path: Path, seed: int, stream: int, size: tuple[int, int]):
    """The scenes cached in `path` -> (images, depths), or None where there is no usable cache:
    missing, unreadable, of other shapes, or stale (its first or last scene no longer renders
    to what it holds, because the generator changed since)."""
    try:
        with np.load(path) as cached:
            images, depths = cached["images"], cached["depths"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = len(images)
    if (n == 0 or images.shape != (n, 3, *size) or images.dtype != np.uint8
            or depths.shape != (n, 1, *size) or depths.dtype != np.float32):
        return None
    for i in {0, n - 1}:
        rgb, depth = render_scene((seed, stream, i), size)
        if not (np.array_equal(images[i], rgb.transpose(2, 0, 1))
                and np.array_equal(depths[i, 0], depth)):
            return None
    return images, depths


def write_cache(path: Path, images: np.ndarray, depths: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:        # a file object: np.savez appends no ".npz" to it
            np.savez(f, images=images, depths=depths)
    try:
        atomic_write(path, write)
    except OSError as e:
        raise DataError(f"{path}: cannot write the scene cache ({e})") from e


class SceneDataset(DepthDataset):
    """n random scenes rendered once, at construction (in parallel over the cores for large n).

    Scene i of split s is render_scene((seed, stream[s], i)): the splits draw from separate seed
    streams, so train and test never share a scene, and growing n keeps the first scenes. Each
    scene depends on its seed alone, so any number of worker processes renders the same set.

    With a cache_dir the rendered scenes are kept there (one .npz per split, seed and size) and
    read back by later runs and resumes: a cache of more scenes serves its first n, a cache of
    fewer has the rest rendered and is replaced by the larger set.
    """

    def __init__(self, n: int, seed: int = 0, size: tuple[int, int] = (48, 64),
                 split: str = "train", workers: int | None = None, cache_dir=None):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLIT_STREAMS)}")
        stream = SPLIT_STREAMS[split]
        path = Path(cache_dir) / cache_name(seed, split, size) if cache_dir else None
        cached = read_cache(path, seed, stream, size) if path else None
        have = 0 if cached is None else len(cached[0])
        if have >= n:
            images, depths = (a[:n].copy() if have > n else a for a in cached)
        else:
            if workers is None:     # a cache is filled by one process per node (local_first)
                workers = render_workers(n - have, alone=path is not None)
            if torch.cuda.is_initialized():     # a forked child must not inherit a CUDA context
                workers = 1
            if workers <= 1:
                images, depths = render_range(seed, stream, have, n, size)
            else:
                images, depths = render_parallel(seed, stream, have, n, size, workers)
            if cached is not None:
                images, depths = (np.concatenate(pair) for pair in zip(cached, (images, depths)))
                del cached
            if path:
                write_cache(path, images, depths)
        super().__init__(torch.from_numpy(images), torch.from_numpy(depths), own=True)


if __name__ == "__main__":   # rate: python -m training.data.scenes
    import time

    start = time.perf_counter()
    SceneDataset(500)
    rate = 500 / (time.perf_counter() - start)
    print(f"{rate:.0f} scenes/s = {rate * 60:.0f} scenes/min at 48x64 on one core")
