"""Depth regression: metrics, losses, DepthViT, the NYU/folder/scenes readers, a short training."""
import math

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pixtok.errors import UserError
from pixtok.models import build_model
from pixtok.models.depth import DepthHeadConfig, DepthViT, depth_loss
from pixtok.models.vit import patchify, shuffle_tokens, vit_config
from training.data.depth import DepthDataset, build_depth_dataset
from training.metrics.depth import DepthMetrics, depth_metrics, mean_depth_baseline

NAN = float("nan")


# ---- metrics ----------------------------------------------------------------------------------

def test_metrics_by_hand_with_invalid_pixels():
    pred = torch.tensor([1.2, 1.5, 1.9, 7.0, 3.0, 9.0]).view(1, 1, 2, 3)
    target = torch.tensor([1.0, 1.0, 1.0, 0.0, NAN, 2.0]).view(1, 1, 2, 3)
    valid = torch.tensor([True, True, True, True, True, False]).view(1, 1, 2, 3)
    m = depth_metrics(pred, target, valid)   # valid: the first three only
    assert m["n"] == 3
    assert m["rmse"] == pytest.approx(math.sqrt((0.04 + 0.25 + 0.81) / 3))
    assert m["rel"] == pytest.approx((0.2 + 0.5 + 0.9) / 3)
    assert m["delta1"] == pytest.approx(1 / 3)     # ratios 1.2, 1.5, 1.9 vs 1.25, 1.5625, 1.953
    assert m["delta2"] == pytest.approx(2 / 3)
    assert m["delta3"] == pytest.approx(1.0)
    assert m["log10"] == pytest.approx((math.log10(1.2) + math.log10(1.5) + math.log10(1.9)) / 3)
    without_mask = depth_metrics(pred, target)    # the 9.0 vs 2.0 pixel now counts
    assert without_mask["n"] == 4 and without_mask["delta3"] == pytest.approx(3 / 4)


def test_accumulator_pools_pixels_not_batch_means():
    a_pred, a_true = torch.tensor([[4.0, 5.0]]), torch.tensor([[1.0, 0.0]])        # 1 valid, err 3
    b_pred, b_true = torch.tensor([[2.0, 3.0, 4.0]]), torch.tensor([[1.0, 2.0, 3.0]])  # err 1 x3
    acc = DepthMetrics().update(a_pred, a_true).update(b_pred, b_true).compute()
    assert acc["n"] == 4
    assert acc["rmse"] == pytest.approx(math.sqrt((9 + 3) / 4))   # not (3 + 1) / 2 = 2
    both = depth_metrics(torch.cat([a_pred, b_pred], 1), torch.cat([a_true, b_true], 1))
    for key in ("rmse", "rel", "delta1", "delta2", "delta3", "log10", "n"):   # pixel-pooled
        assert acc[key] == pytest.approx(both[key])
    assert DepthMetrics().compute()["n"] == 0


def test_scale_metrics_split_global_scale_from_layout():
    truth = torch.tensor([[1.0, 2.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).view(2, 1, 2, 2)
    pred = torch.tensor([[2.0, 4.0, 8.0, 5.0], [1.0, 1.0, 1.0, 3.0]]).view(2, 1, 2, 2)
    m = depth_metrics(pred, truth)     # image 0: twice too far, pixel 4 unmeasured
    assert (m["n"], m["images"]) == (7, 2)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 4 + 16 + 4) / 7))
    # image 0 is right up to its scale: median scaling leaves no error there; image 1's medians
    # are 1 and 1 (numpy's median of 1, 1, 1, 3), so its error stays
    assert m["rmse_scaled"] == pytest.approx(math.sqrt(4 / 7))
    d1 = torch.tensor([0.0, 0.0, 0.0, math.log(3)])
    silog1 = 100 * math.sqrt((d1 ** 2).mean() - d1.mean() ** 2)
    assert m["silog"] == pytest.approx((0 + silog1) / 2)
    halves = DepthMetrics().update(pred[:1], truth[:1]).update(pred[1:], truth[1:]).compute()
    for key, value in m.items():                # images split over batches: the same sums
        assert halves[key] == pytest.approx(value)
    assert DepthMetrics().compute()["images"] == 0


def test_mean_depth_baseline_ignores_invalid():
    assert mean_depth_baseline(torch.tensor([[2.0, 0.0, NAN, 4.0, -1.0]])) == pytest.approx(3.0)
    # summed a few maps at a time: the mean over every valid pixel, not a mean of chunk means
    depths = torch.tensor([[1.0, 0.0], [2.0, 3.0], [NAN, 0.0], [6.0, 0.0], [4.0, 5.0]])
    for chunk in (1, 2, 3, 4096):
        assert mean_depth_baseline(depths, chunk) == pytest.approx(21 / 6)
    with pytest.raises(ValueError, match="no valid"):
        mean_depth_baseline(torch.zeros(3, 2), chunk=2)


# ---- losses -----------------------------------------------------------------------------------

def test_l1_loss_only_on_valid_pixels():
    pred = torch.tensor([2.0, 3.0, 5.0, 1.0]).view(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([1.0, 0.0, NAN, 4.0]).view(1, 1, 2, 2)
    loss = depth_loss(pred, target, kind="l1")
    assert loss.item() == pytest.approx((1 + 3) / 2)
    loss.backward()
    assert pred.grad.flatten().tolist() == [0.5, 0.0, 0.0, -0.5]


def test_silog_by_hand_per_image():
    target = torch.tensor([[1.0, 2.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    pred = torch.tensor([[2.0, 4.0], [1.0, 3.0]]).view(2, 1, 1, 2).requires_grad_()
    lam = 0.85
    loss_a = math.log(2) ** 2 * (1 - lam)                           # d = log 2 everywhere
    loss_b = math.log(3) ** 2 / 2 - lam * (math.log(3) / 2) ** 2    # d = (0, log 3)
    loss = depth_loss(pred, target, kind="silog", silog_lambda=lam)
    assert loss.item() == pytest.approx((loss_a + loss_b) / 2)
    # an image without valid pixels does not count in the mean over images
    empty = torch.zeros(1, 1, 1, 2)
    loss3 = depth_loss(torch.cat([pred, empty + 1]), torch.cat([target, empty]), kind="silog",
                       silog_lambda=lam)
    assert loss3.item() == pytest.approx((loss_a + loss_b) / 2)
    # lambda = 1: a global scale per image costs nothing
    assert depth_loss(3 * target, target, kind="silog", silog_lambda=1.0).item() == pytest.approx(
        0.0, abs=1e-6)


def test_silog_ignores_nan_and_zero_targets():
    target = torch.tensor([1.0, NAN, 0.0, 2.0]).view(1, 1, 2, 2)
    pred = torch.tensor([1.5, 1.0, 1.0, 3.0]).view(1, 1, 2, 2).requires_grad_()
    loss = depth_loss(pred, target, kind="silog")
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(1.5) ** 2 * (1 - 0.85))
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad.flatten()[1:3].tolist() == [0.0, 0.0]


# ---- model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch,pool", [(1, "cls"), (1, "mean"), (2, "cls")])
def test_depth_vit_shapes_and_initial_depth(patch, pool):
    cfg = vit_config(f"ViT-F/{patch}", image_size=(8, 12), pool=pool)
    model = DepthViT(cfg, DepthHeadConfig(hidden=16 if patch == 2 else 0, init_depth=2.5))
    x = torch.rand(2, 3, 8, 12)
    depth = model(x)
    assert depth.shape == (2, 1, 8, 12)
    torch.testing.assert_close(depth, torch.full_like(depth, 2.5))   # zero-initialised last layer
    for p in model.head.mlp[-1].parameters():                          # a step makes it dense
        p.data.normal_(0, 0.1)
    depth = model(x)
    assert (depth > 0).all() and depth.std() > 0


@pytest.mark.parametrize("patch", [1, 2])
def test_each_pixel_depth_comes_from_its_own_token(patch):
    # with no Transformer blocks tokens do not mix: a pixel's change must stay in its own patch
    torch.manual_seed(0)
    model = DepthViT(vit_config(f"ViT-F/{patch}", image_size=(4, 6), depth=0, pool="cls"))
    torch.nn.init.normal_(model.head.mlp[-1].weight)
    x = torch.rand(1, 3, 4, 6)
    y = x.clone()
    y[0, :, 2, 3] = 1 - y[0, :, 2, 3]
    changed = (model(x) - model(y)).abs()[0, 0] > 1e-6
    top, left = 2 // patch * patch, 3 // patch * patch          # the patch holding pixel (2, 3)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[top:top + patch, left:left + patch] = True
    assert torch.equal(changed, expected)


def test_token_dropout_predicts_the_kept_pixels():
    """With keep_ids a DepthViT returns the depths of the kept tokens, (N, K, p*p), in the
    layout of patchify: keeping every token is the full map, patchified."""
    torch.manual_seed(0)
    model = DepthViT(vit_config("ViT-F/2", image_size=(8, 12), in_channels=3)).eval()
    with torch.no_grad():                       # a non-constant head, so positions matter
        model.head.mlp[-1].weight.normal_(0, 0.1)
    x = torch.rand(2, 3, 8, 12)
    every = torch.arange(24).expand(2, -1)
    full = model(x)
    torch.testing.assert_close(model(x, keep_ids=every), patchify(full, 2), atol=1e-5, rtol=1e-5)
    ids, keep = shuffle_tokens(2, 24, 0.5, torch.Generator().manual_seed(0))
    part = model(x, keep_ids=ids[:, :keep])
    assert part.shape == (2, 12, 4) and (part > 0).all()
    same_pixels = patchify(full, 2).gather(1, ids[:, :keep, None].expand(-1, -1, 4))
    assert not torch.allclose(part, same_pixels)     # the dropped tokens were its context


def test_depth_vit_config_round_trip_and_optimizer_hooks():
    cfg = vit_config("ViT-F/1", image_size=(6, 8))
    model = DepthViT(cfg, DepthHeadConfig(hidden=8, init_depth=4.0))
    spec = {"arch": "vit-depth", "name": "ViT-F/1", "args": model.args()}
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 6, 8)
    torch.testing.assert_close(rebuilt(x), model(x))
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys() and "encoder.pos_embed" in names
    assert model.layer_id("encoder.pos_embed") == 0
    assert model.layer_id("encoder.blocks.1.attn.qkv.weight") == 2
    assert model.layer_id("head.mlp.0.weight") == cfg.depth + 1
    assert model.cfg.depth == cfg.depth


# ---- data -------------------------------------------------------------------------------------

def write_nyu(path, images, depths):
    """A labeled-set .mat as MATLAB -v7.3 writes it: column-major, so (N, 3, W, H) and (N, W, H)."""
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)   # (N, H, W, 3) -> (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)      # (N, H, W) -> (N, W, H)


@pytest.fixture
def nyu(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (5, 20, 30)).astype(np.float32)
    depths[1, 3, 4] = 0.0
    write_nyu(tmp_path / "nyu_depth_v2_labeled.mat", images, depths)
    with h5py.File(tmp_path / "splits.mat", "w") as f:   # v7.3: a column vector is (1, n)
        f["trainNdxs"] = np.array([[1.0, 2.0, 4.0]])
        f["testNdxs"] = np.array([[3.0, 5.0]])
    return tmp_path, images, depths


def test_nyu_mat_reads_transposed_layout_and_splits(nyu):
    root, images, depths = nyu
    train = build_depth_dataset("nyu", root, "train", image_size=(20, 30))
    assert len(train) == 3 and train.image_size == (20, 30) and train.in_channels == 3
    np.testing.assert_array_equal(train.images.numpy(), images[[0, 1, 3]].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(train.depths[:, 0].numpy(), depths[[0, 1, 3]])
    image, depth = train[1]
    assert image.shape == (3, 20, 30) and depth.shape == (1, 20, 30) and depth[0, 3, 4] == 0
    test = build_depth_dataset("nyu", root / "nyu_depth_v2_labeled.mat", "test", (20, 30))
    np.testing.assert_array_equal(test.depths[:, 0].numpy(), depths[[2, 4]])


def test_nyu_resize_is_bicubic_rgb_and_nearest_depth(nyu):
    root, images, depths = nyu
    ds = build_depth_dataset("nyu", root, "test", image_size=(10, 15))
    assert ds.images.shape == (2, 3, 10, 15) and ds.depths.shape == (2, 1, 10, 15)
    # nearest: the pixel at each 2x2 footprint's centre, no new depth values
    np.testing.assert_array_equal(ds.depths[:, 0].numpy(), depths[[2, 4]][:, 1::2, 1::2])
    small = np.asarray(Image.fromarray(images[2][..., 0]).resize((15, 10), Image.BICUBIC))
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), small)


@pytest.mark.parametrize("form", ["scipy-mat", "txt", "npy", "list"])
def test_nyu_split_formats(nyu, form):
    root, _, depths = nyu
    if form == "scipy-mat":
        savemat = pytest.importorskip("scipy.io").savemat   # scipy is optional for users
        savemat(root / "v5.mat", {"trainNdxs": np.array([[5], [1]]), "testNdxs": np.array([[2]])})
        splits = root / "v5.mat"
    elif form == "txt":
        (root / "train.txt").write_text("5\n1\n")
        splits = root / "train.txt"
    elif form == "npy":
        np.save(root / "train.npy", np.array([5, 1]))
        splits = root / "train.npy"
    else:
        splits = [5, 1]
    ds = build_depth_dataset("nyu", root, "train", (20, 30), splits=splits)
    np.testing.assert_array_equal(ds.depths[:, 0].numpy(), depths[[4, 0]])


def test_nyu_errors_name_the_path(nyu, tmp_path):
    root, _, _ = nyu
    with pytest.raises(UserError, match="nyu_depth_v2_labeled.mat"):
        build_depth_dataset("nyu", tmp_path / "nowhere")
    with pytest.raises(UserError, match="past the 5 samples"):
        build_depth_dataset("nyu", root, splits=[1, 6])
    with pytest.raises(UserError, match="1-based"):
        build_depth_dataset("nyu", root, splits=[0, 1])
    (root / "splits.mat").unlink()
    with pytest.raises(UserError, match="splits.mat"):
        build_depth_dataset("nyu", root)
    with h5py.File(root / "bad.mat", "w") as f:
        f["images"] = np.zeros((2, 3, 4, 5), np.uint8)
    with pytest.raises(UserError, match="'depths'"):
        build_depth_dataset("nyu", root / "bad.mat", splits=[1])


def write_folder_pair(root, split, stem, rgb, mm):
    (root / split / "rgb").mkdir(parents=True, exist_ok=True)
    (root / split / "depth").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / split / "rgb" / f"{stem}.png")
    Image.fromarray(mm).save(root / split / "depth" / f"{stem}.png")


def test_folder_reader_millimetres_and_stems(tmp_path):
    rng = np.random.default_rng(1)
    pairs = {}
    for stem in ("b", "a", "c"):
        rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        mm = rng.integers(300, 10000, (6, 8)).astype(np.uint16)
        mm[0, 0] = 0
        pairs[stem] = rgb, mm
        write_folder_pair(tmp_path, "test", stem, rgb, mm)
    ds = build_depth_dataset("folder", tmp_path, "test", image_size=(6, 8))
    assert len(ds) == 3
    for k, stem in enumerate(("a", "b", "c")):     # sorted by stem, rgb matched to its depth
        rgb, mm = pairs[stem]
        np.testing.assert_array_equal(ds.images[k].numpy(), rgb.transpose(2, 0, 1))
        np.testing.assert_allclose(ds.depths[k, 0].numpy(), mm / 1000.0, rtol=1e-6)
        assert ds.depths[k, 0, 0, 0] == 0


def test_folder_reader_errors(tmp_path):
    with pytest.raises(UserError, match="train/rgb"):
        build_depth_dataset("folder", tmp_path)
    rgb = np.zeros((4, 4, 3), np.uint8)
    write_folder_pair(tmp_path, "train", "x", rgb, np.ones((4, 4), np.uint16))
    Image.fromarray(rgb).save(tmp_path / "train" / "rgb" / "lonely.png")
    with pytest.raises(UserError, match="lonely"):
        build_depth_dataset("folder", tmp_path)
    (tmp_path / "train" / "rgb" / "lonely.png").unlink()
    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "train" / "depth" / "x.png")
    with pytest.raises(UserError, match="16-bit"):
        build_depth_dataset("folder", tmp_path)


def test_build_depth_dataset_scenes_and_bad_names():
    train = build_depth_dataset("scenes", split="train", image_size=(12, 16), n=4, seed=3)
    test = build_depth_dataset("scenes", split="test", image_size=(12, 16), n=4, seed=3)
    assert train.images.shape == (4, 3, 12, 16) and (train.depths > 0).all()
    assert not torch.equal(train.images, test.images)
    with pytest.raises(UserError, match="nyu, scenes, folder"):
        build_depth_dataset("kitti")
    with pytest.raises(UserError, match="no option"):
        build_depth_dataset("scenes", n=2, splits=[1])


# ---- training ---------------------------------------------------------------------------------

def test_tiny_depth_vit_beats_mean_depth_baseline():
    torch.manual_seed(0)
    size = (12, 16)
    train = build_depth_dataset("scenes", split="train", image_size=size, n=256)
    test = build_depth_dataset("scenes", split="test", image_size=size, n=64)
    baseline = mean_depth_baseline(train.depths)
    baseline_rmse = depth_metrics(torch.full_like(test.depths, baseline), test.depths)["rmse"]
    model = DepthViT(vit_config("ViT-F/1", image_size=size, pool="mean"),
                     DepthHeadConfig(init_depth=baseline))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    images, depths = train.images.float() / 255, train.depths
    batches = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(images), (32,), generator=batches)
        loss = depth_loss(model(images[idx]), depths[idx], kind="l1")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        metrics = depth_metrics(model(test.images.float() / 255), test.depths)
    assert metrics["rmse"] < 0.93 * baseline_rmse, (metrics, baseline_rmse)


def test_depth_dataset_marks_invalid_depths_in_a_copy_or_in_place():
    images = torch.zeros(2, 3, 1, 3, dtype=torch.uint8)
    raw = torch.tensor([1.5, NAN, -2.0, math.inf, 0.0, 3.0]).reshape(2, 1, 1, 3)
    expected = torch.tensor([1.5, 0, 0, 0, 0, 3.0]).reshape(2, 1, 1, 3)
    given = raw.clone()
    copied = DepthDataset(images, given)                 # the caller's tensor stays as it was
    assert torch.equal(copied.depths, expected) and torch.equal(given.isnan(), raw.isnan())
    owned = DepthDataset(images, given, own=True)        # handed over: cleaned where it lies
    assert torch.equal(owned.depths, expected) and owned.depths.data_ptr() == given.data_ptr()
    wide = DepthDataset(images, raw.double(), own=True)      # another dtype: one float32 copy
    assert wide.depths.dtype == torch.float32 and torch.equal(wide.depths, expected)
