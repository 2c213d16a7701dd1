"""The pixel-level masked autoencoder: masking, the masked-only loss, encoder transfer, grids."""
import numpy as np
import pytest
import torch
from PIL import Image

from pixtok.errors import UserError
from pixtok.models import build_model
from pixtok.models.mae import MAE, MAEConfig, encoder_state_dict, mae_grid, random_masking
from pixtok.models.vit import ViT, patchify, vit_config

SIZE = (6, 8)   # 48 pixel tokens


def tiny_mae(pool="cls", channels=3, **kw) -> MAE:
    enc = vit_config("ViT-F/1", image_size=SIZE, in_channels=channels, pool=pool)
    return MAE(MAEConfig(enc, decoder_width=16, decoder_depth=1, decoder_heads=2, **kw))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_random_masking_keeps_exact_count_and_differs_per_sample(ratio):
    torch.manual_seed(0)
    x = torch.randn(4, 48, 5)
    visible, mask, ids_restore = random_masking(x, ratio)
    keep = round(48 * (1 - ratio))
    assert visible.shape == (4, keep, 5)
    assert mask.sum(dim=1).tolist() == [48 - keep] * 4
    assert len({tuple(m.tolist()) for m in mask}) == 4          # every sample its own mask
    for i in range(4):   # the visible tokens are exactly the unmasked ones, in some order
        kept = x[i][mask[i] == 0]
        assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, visible[i].tolist()))
    # ids_restore undoes the shuffle: the argsort of the mask order
    order = ids_restore.argsort(dim=1)
    assert torch.equal(mask.gather(1, order)[:, :keep], torch.zeros(4, keep))


def test_masking_is_reproducible_with_a_generator():
    x = torch.randn(2, 48, 3)
    a = random_masking(x, 0.75, torch.Generator().manual_seed(5))[1]
    b = random_masking(x, 0.75, torch.Generator().manual_seed(5))[1]
    c = random_masking(x, 0.75, torch.Generator().manual_seed(6))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("pool,pos", [("cls", "learned"), ("mean", "sincos")])
def test_forward_shapes(pool, pos):
    model = tiny_mae(pool, decoder_pos_embed=pos)
    imgs = torch.rand(3, 3, *SIZE)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    assert latent.shape == (3, 12 + (pool == "cls"), 32)    # only the visible 12 (+ [cls])
    loss, pred, mask = model(imgs)
    assert pred.shape == (3, 48, 3) and mask.shape == (3, 48) and loss.ndim == 0
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_loss_ignores_visible_pixels():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = torch.rand(2, 3, *SIZE)
    _, pred, mask = model(imgs)
    pred = pred.detach().requires_grad_()
    loss = model.forward_loss(imgs, pred, mask)
    loss.backward()
    visible = mask == 0
    assert torch.count_nonzero(pred.grad[visible]) == 0
    assert (pred.grad[~visible].abs().sum(dim=-1) > 0).all()
    changed = pred.detach().clone()
    changed[visible] += 10.0                                     # garbage where pixels are seen
    assert model.forward_loss(imgs, changed, mask).item() == pytest.approx(loss.item())
    target = patchify(imgs, 1)                                   # MSE over masked tokens, by hand
    expected = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    assert loss.item() == pytest.approx(expected.item())


def test_norm_pix_loss_for_pixels():
    model = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 3, *SIZE)
    target = model.target(imgs)                                  # per pixel over its 3 channels
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 48), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="norm_pix_loss"):
        tiny_mae(channels=1, norm_pix_loss=True)
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_encoder_weights_load_into_a_vit_classifier(pool):
    torch.manual_seed(0)
    mae = tiny_mae(pool)
    for p in mae.parameters():                    # make every weight distinct from any init
        p.data.normal_()
    vit = ViT(vit_config("ViT-F/1", image_size=SIZE, pool=pool, num_classes=10))
    result = vit.load_state_dict(encoder_state_dict(mae), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    vit_params = dict(vit.named_parameters())
    for name, p in mae.encoder.named_parameters():
        assert torch.equal(vit_params[name], p), name
    x = torch.rand(2, 3, *SIZE)
    torch.testing.assert_close(vit.forward_features(x), mae.encoder.forward_features(x))


def test_config_round_trip_through_build_model():
    mae = tiny_mae(decoder_pos_embed="sincos", mask_ratio=0.6)
    spec = {"arch": "mae", "name": "MAE-ViT-F/1", "args": mae.cfg.to_dict()}
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(mae.state_dict())
    imgs = torch.rand(2, 3, *SIZE)
    a = mae(imgs, generator=torch.Generator().manual_seed(1))
    b = rebuilt(imgs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a[1], b[1])
    assert rebuilt.cfg.mask_ratio == 0.6 and b[2].sum().item() == 2 * round(48 * 0.6)
    learned = tiny_mae()
    assert learned.no_weight_decay() <= dict(learned.named_parameters()).keys()


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = torch.rand(8, 3, *SIZE) * 0.2 + torch.linspace(0, 0.8, 8)[None, None, None, :]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _, _ = model(imgs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.parametrize("channels", [3, 1])
def test_mae_grid_rows(tmp_path, channels):
    model = tiny_mae(channels=channels)
    imgs = torch.rand(3, channels, *SIZE)
    path = mae_grid(model, imgs, tmp_path / "grid.png", seed=2, scale=2)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (3 * SIZE[0] * 2, 3 * SIZE[1] * 2, 3)
    cells = grid[::2, ::2].reshape(3, SIZE[0], 3, SIZE[1], 3)   # (row, H, column, W, RGB)
    expected = (imgs.expand(-1, 3, -1, -1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    model.eval()
    with torch.no_grad():   # the grid's own masking: same seed, same mask
        _, pred, mask = model(imgs, generator=torch.Generator().manual_seed(2))
    model.train()
    hidden = mask.view(3, *SIZE).bool().numpy()
    recon = (model.unpatchify(pred).clamp(0, 1).expand(-1, 3, -1, -1) * 255).round().byte()
    recon = recon.permute(0, 2, 3, 1).numpy()
    for col in range(3):
        np.testing.assert_array_equal(cells[0, :, col], expected[col])                  # input
        np.testing.assert_array_equal(cells[1, :, col][~hidden[col]], expected[col][~hidden[col]])
        assert (cells[1, :, col][hidden[col]] == 128).all()                         # grey holes
        np.testing.assert_array_equal(cells[2, :, col][~hidden[col]], expected[col][~hidden[col]])
        np.testing.assert_array_equal(cells[2, :, col][hidden[col]], recon[col][hidden[col]])
    again = mae_grid(model, imgs, tmp_path / "again.png", seed=2, scale=2)
    assert again.read_bytes() == path.read_bytes()
    assert model.training                                         # mode restored
