"""The procedural RGB-D scenes: deterministic by seed, and depth that obeys camera geometry."""
import math

import numpy as np
import pytest
import torch

from training.data import scenes
from training.data.scenes import (
    Box,
    Camera,
    Light,
    Material,
    Plane,
    Scene,
    SceneDataset,
    Sphere,
    camera_rays,
    render,
    render_scene,
)

SIZE = (24, 32)


def focal(fov: float, width: int) -> float:
    return (width / 2) / math.tan(math.radians(fov) / 2)


def test_same_seed_same_bytes_other_seed_differs():
    rgb, depth = render_scene(7, SIZE)
    rgb2, depth2 = render_scene(7, SIZE)
    assert rgb.dtype == np.uint8 and rgb.shape == (*SIZE, 3)
    assert depth.dtype == np.float32 and depth.shape == SIZE
    assert rgb.tobytes() == rgb2.tobytes() and depth.tobytes() == depth2.tobytes()
    other_rgb, other_depth = render_scene(8, SIZE)
    assert other_rgb.tobytes() != rgb.tobytes() and other_depth.tobytes() != depth.tobytes()


def test_random_rooms_are_closed_and_vary():
    for seed in range(10):
        rgb, depth = render_scene(seed, SIZE)
        assert np.all(depth > 0.1) and np.all(depth < 20), seed   # every ray hits the room
        assert rgb.std() > 5, seed                                # not a flat colour


@pytest.mark.parametrize("yaw,plane_axis,sign", [(0, 2, 1), (90, 0, 1), (180, 2, -1)])
def test_fronto_parallel_plane_has_constant_depth(yaw, plane_axis, sign):
    d = 2.75
    pos = (0.3, 1.2, -0.5)
    plane = Plane(plane_axis, pos[plane_axis] + sign * d)
    scene = Scene(Camera(pos, yaw=yaw, pitch=0, fov=70), [plane], Light())
    _, depth = render(scene, SIZE)
    np.testing.assert_allclose(depth, d, rtol=1e-6)   # z-depth, not distance along the ray


def test_camera_looking_straight_down_sees_the_floor_at_its_height():
    scene = Scene(Camera((1.0, 1.7, 2.0), pitch=90, fov=50), [Plane(1, 0.0)], Light())
    _, depth = render(scene, SIZE)
    np.testing.assert_allclose(depth, 1.7, rtol=1e-6)


def test_tilted_floor_depth_per_row_is_closed_form():
    h, w = SIZE
    height, pitch, fov = 1.4, 20.0, 60.0
    scene = Scene(Camera((0.0, height, 0.0), pitch=pitch, fov=fov), [Plane(1, 0.0)], Light())
    _, depth = render(scene, SIZE)
    theta = math.radians(pitch)
    v = -(np.arange(h) + 0.5 - h / 2) / focal(fov, w)            # image-plane height of each row
    denom = math.sin(theta) - v * math.cos(theta)                 # rays below the horizon: > 0
    expected = np.where(denom > 0, height / np.where(denom > 0, denom, 1), 0.0)
    np.testing.assert_allclose(depth, np.repeat(expected[:, None], w, axis=1), rtol=1e-5)
    assert (expected == 0).any() and (expected > 0).any()         # horizon inside the image


def test_box_face_depth_and_rotation():
    camera = Camera((0.0, 0.5, 0.0), fov=60)
    back = Plane(2, 10.0)
    box = Box((0.1, 0.5, 4.0), (0.6, 0.4, 0.3))
    _, depth = render(Scene(camera, [back, box], Light()), SIZE)
    on_box = depth < 9
    assert 20 < on_box.sum() < depth.size
    np.testing.assert_allclose(depth[on_box], 4.0 - 0.3, rtol=1e-6)   # the near face z = 3.7
    turned = Box((0.1, 0.5, 4.0), (0.3, 0.4, 0.6), yaw=90)            # same box, turned 90 deg
    _, depth_turned = render(Scene(camera, [back, turned], Light()), SIZE)
    np.testing.assert_allclose(depth_turned, depth, rtol=1e-6)


def test_box_turned_45_degrees_shows_its_edge_nearest():
    half = 0.5
    box = Box((0.0, 0.0, 4.0), (half, 1.0, half), yaw=45)
    scene = Scene(Camera((0.0, 0.0, 0.0), fov=40), [Plane(2, 10.0), box], Light())
    _, depth = render(scene, (16, 64))
    on_box = depth < 9
    nearest = 4.0 - half * math.sqrt(2)          # the vertical edge at x = 0 faces the camera
    assert depth[on_box].min() >= nearest - 1e-6
    assert depth[on_box].min() < nearest + 0.02
    # the two visible faces slope away symmetrically on either side of the edge
    row = depth[8]
    np.testing.assert_allclose(row[on_box[8]], row[on_box[8]][::-1], rtol=1e-5)


def test_sphere_silhouette_and_surface():
    centre, radius = np.array([0.2, 0.1, 3.0]), 0.8
    camera = Camera((0.0, 0.0, 0.0), fov=60)
    scene = Scene(camera, [Plane(2, 10.0), Sphere(tuple(centre), radius)], Light())
    _, depth = render(scene, SIZE)
    origin, dirs = camera_rays(camera, SIZE)
    # distance from the centre to each ray's line decides the silhouette
    miss = np.linalg.norm(np.cross(dirs, centre - origin), axis=-1) / np.linalg.norm(dirs, axis=-1)
    clear = np.abs(miss - radius) > 0.02
    on_sphere = depth < 9
    np.testing.assert_array_equal(on_sphere[clear], (miss < radius)[clear])
    points = origin + depth[..., None] * dirs                       # z-depth times forward-1 ray
    np.testing.assert_allclose(np.linalg.norm(points[on_sphere] - centre, axis=-1), radius,
                               rtol=1e-5)


def test_cast_shadow_matches_geometry():
    ambient, albedo = 0.25, 0.8
    centre, radius, lamp = np.array([0.0, 1.0, 3.0]), 0.4, np.array([0.3, 3.0, 3.0])
    camera = Camera((0.0, 2.0, 0.0), pitch=35, fov=60)
    floor = Plane(1, 0.0, Material((albedo,) * 3))
    scene = Scene(camera, [floor, Sphere(tuple(centre), radius)], Light("point", tuple(lamp)),
                  ambient)
    rgb, depth = render(scene, (48, 64))
    origin, dirs = camera_rays(camera, (48, 64))
    points = origin + depth[..., None] * dirs
    on_floor = (depth > 0) & (np.abs(points[..., 1]) < 1e-6)
    # distance from the sphere's centre to the segment floor point -> lamp
    seg = lamp - points
    s = np.clip(((centre - points) * seg).sum(-1) / (seg * seg).sum(-1), 0, 1)
    gap = np.linalg.norm(points + s[..., None] * seg - centre, axis=-1)
    shadow_value = round(albedo * ambient * 255)
    dark = rgb[..., 0] <= shadow_value
    clear = on_floor & (np.abs(gap - radius) > 0.02)
    assert (clear & (gap < radius)).sum() > 10                     # the shadow is in view
    np.testing.assert_array_equal(dark[clear], (gap < radius)[clear])


def test_scene_dataset_splits_are_disjoint_and_prefix_stable():
    train = SceneDataset(3, seed=5, size=SIZE)
    test = SceneDataset(3, seed=5, size=SIZE, split="test")
    assert train.images.shape == (3, 3, *SIZE) and train.images.dtype == torch.uint8
    assert train.depths.shape == (3, 1, *SIZE) and train.depths.dtype == torch.float32
    assert train.image_size == SIZE and train.in_channels == 3 and len(train) == 3
    for i in range(3):
        assert not any(torch.equal(train.images[i], test.images[j]) for j in range(3))
    first = SceneDataset(2, seed=5, size=SIZE)
    assert torch.equal(first.images, train.images[:2]) and torch.equal(first.depths,
                                                                      train.depths[:2])
    image, depth = train[1]
    rgb, z = render_scene((5, 0, 1), SIZE)
    assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(depth[0], torch.from_numpy(z))


def test_worker_processes_render_the_same_scenes():
    one = SceneDataset(13, seed=2, size=SIZE, workers=1)
    three = SceneDataset(13, seed=2, size=SIZE, workers=3)
    assert torch.equal(one.images, three.images) and torch.equal(one.depths, three.depths)
    many = SceneDataset(2, seed=2, size=SIZE, workers=5)       # more workers than scenes
    assert torch.equal(many.images, one.images[:2]) and torch.equal(many.depths, one.depths[:2])


def test_a_failing_render_worker_is_an_error(monkeypatch):
    """A worker that dies must not leave its slice of the shared arrays unrendered in silence."""
    def fail_on_scene_7(seed, size):
        if seed[2] == 7:
            raise RuntimeError("scene 7")
        return render_scene(seed, size)

    monkeypatch.setattr(scenes, "render_scene", fail_on_scene_7)   # forked workers inherit it
    with pytest.raises(RuntimeError, match=r"rendering 13 scenes: 1 of 3 worker processes"):
        SceneDataset(13, seed=2, size=SIZE, workers=3)


def test_the_scene_cache_serves_grows_and_survives_damage(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fresh = SceneDataset(7, seed=3, size=SIZE, workers=2)
    first = SceneDataset(4, seed=3, size=SIZE, workers=2, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == ["scenes-train-seed3-24x32.npz"]  # no temp files
    assert torch.equal(first.images, fresh.images[:4]) and torch.equal(first.depths,
                                                                       fresh.depths[:4])
    rendered = []

    def counting(seed, size):
        rendered.append(seed[2])
        return render_scene(seed, size)

    monkeypatch.setattr(scenes, "render_scene", counting)
    grown = SceneDataset(7, seed=3, size=SIZE, workers=1, cache_dir=cache)   # renders 4..6 only
    assert sorted(set(rendered) - {0, 3}) == [4, 5, 6]   # 0 and 3: the freshness check
    assert torch.equal(grown.images, fresh.images) and torch.equal(grown.depths, fresh.depths)
    rendered.clear()
    fewer = SceneDataset(5, seed=3, size=SIZE, workers=1, cache_dir=cache)   # a prefix, read
    assert sorted(rendered) == [0, 6] and torch.equal(fewer.images, fresh.images[:5])
    other = SceneDataset(2, seed=3, size=SIZE, split="test", workers=1, cache_dir=cache)
    assert not torch.equal(other.images, fresh.images[:2]) and len(list(cache.iterdir())) == 2

    # a cache cut short (a kill while copying it) or left by an older scene generator is
    # rendered again and replaced, never served
    path = cache / "scenes-train-seed3-24x32.npz"
    path.write_bytes(path.read_bytes()[:300])
    again = SceneDataset(7, seed=3, size=SIZE, workers=1, cache_dir=cache)
    assert torch.equal(again.images, fresh.images)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["depths"], fresh.depths.numpy())
        stale = {"images": z["images"].copy(), "depths": z["depths"].copy()}
    stale["depths"][6] += 0.5
    with open(path, "wb") as f:
        np.savez(f, **stale)
    rendered.clear()
    fixed = SceneDataset(7, seed=3, size=SIZE, workers=1, cache_dir=cache)
    assert torch.equal(fixed.depths, fresh.depths) and len(set(rendered)) == 7


def test_depth_recipes_pass_cache_dir_to_the_scenes(tmp_path):
    from training.data.depth import build_depth_dataset
    ds = build_depth_dataset("scenes", split="test", image_size=SIZE, n=3,
                             cache_dir=str(tmp_path))
    assert len(ds) == 3 and [p.name for p in tmp_path.iterdir()] == ["scenes-test-seed0-24x32.npz"]
