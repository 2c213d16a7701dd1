"""ViT/p: shapes, the locality-free property of ViT/1, embeddings, and that it learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixtok.models.sizes import SIZES
from pixtok.models.vit import (
    VIT_MODELS,
    ViT,
    ViTConfig,
    gather_tokens,
    parse_name,
    patchify,
    shuffle_tokens,
    sincos_pos_embed,
    unpatchify,
    vit_config,
)
from training.flops import count_forward_flops


def tiny(p=1, **kw):
    args = {"image_size": (8, 12), "in_channels": 3, "num_classes": 5, **kw}
    return vit_config(f"ViT-F/{p}", **args)


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("embed", ["linear", "dictionary"])
def test_shapes_for_every_patch_size(p, embed):
    cfg = tiny(p, embed=embed)
    model = ViT(cfg)
    assert cfg.num_tokens == (8 // p) * (12 // p)
    x = torch.rand(3, 3, 8, 12)
    assert model(x).shape == (3, 5)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, cfg.num_tokens + 1, cfg.width)   # + [cls]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_token_dropout_runs_the_model_on_the_kept_tokens_only(pool):
    """keep_ids = every token is the plain forward; a subset is the same model on those
    position-embedded tokens alone, and the dropped pixels then change nothing."""
    torch.manual_seed(0)
    model = ViT(tiny(1, pool=pool)).eval()
    x = torch.rand(2, 3, 8, 12)
    every = torch.arange(96).expand(2, -1)
    torch.testing.assert_close(model(x, keep_ids=every), model(x), atol=1e-6, rtol=1e-6)
    ids, keep = shuffle_tokens(2, 96, 0.75, torch.Generator().manual_seed(1))
    assert keep == 24 and not torch.equal(ids[0], ids[1])      # a draw per image
    kept = ids[:, :keep]
    out = model(x, keep_ids=kept)
    by_hand = gather_tokens(model.tokens(x), kept)
    if pool == "cls":
        by_hand = torch.cat([model.cls_token.expand(2, -1, -1), by_hand], dim=1)
    for block in model.blocks:
        by_hand = block(by_hand)
    torch.testing.assert_close(out, model.head(model.pool(model.norm(by_hand))))
    y = x.clone().flatten(2)
    for i in range(2):
        dropped = ids[i, keep:]
        y[i, :, dropped] = torch.rand(3, len(dropped))
    torch.testing.assert_close(model(y.view_as(x), keep_ids=kept), out)
    again, _ = shuffle_tokens(2, 96, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(again, ids)
    with pytest.raises(ValueError, match="keeps 0"):
        shuffle_tokens(2, 96, 0.999)


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(x, 2)
    assert patches.shape == (2, 6, 12)
    # first patch: pixels (0,0),(0,1),(1,0),(1,1), channels innermost
    expected = torch.stack([x[0, :, i, j] for i in (0, 1) for j in (0, 1)]).flatten()
    assert torch.equal(patches[0, 0], expected)
    assert torch.equal(unpatchify(patches, 2, (2, 3)), x)


def test_vit1_without_position_is_permutation_invariant():
    """No position embedding + mean pooling: ViT/1 sees a set of pixels (no locality at all)."""
    torch.manual_seed(0)
    cfg = tiny(1, pos_embed="none", pool="mean", num_classes=0)   # compare pooled features
    model = ViT(cfg).eval()
    x = torch.rand(2, 3, 8, 12)
    perm = torch.randperm(96)
    shuffled = x.flatten(2)[:, :, perm].reshape(x.shape)
    assert not torch.equal(x, shuffled)
    torch.testing.assert_close(model(shuffled), model(x), atol=1e-5, rtol=1e-5)
    # with a learned position embedding the same shuffle changes the output
    model = ViT(tiny(1, pool="mean", num_classes=0)).eval()
    assert (model(shuffled) - model(x)).abs().max() > 1e-2


def test_dictionary_embedding_looks_up_intensities():
    cfg = tiny(1, embed="dictionary", in_channels=2, image_size=(2, 2))
    model = ViT(cfg)
    assert model.embed.tables.shape == (2, 256, cfg.width // 2)
    assert isinstance(model.embed.proj, torch.nn.Identity)      # 2 x width/2 = width
    x = torch.tensor([0, 17, 255, 128], dtype=torch.float32).reshape(1, 1, 2, 2) / 255
    x = torch.cat([x, x.flip(-1)], dim=1)                         # (1, 2, 2, 2)
    emb = model.embed(patchify(x, 1))                             # (1, 4, width)
    tables = model.embed.tables
    for i, (a, b) in enumerate([(0, 17), (17, 0), (255, 128), (128, 255)]):
        torch.testing.assert_close(emb[0, i], torch.cat([tables[0, a], tables[1, b]]))
    # between two intensities (e.g. after MixUp) the embedding interpolates
    half = torch.full((1, 2, 1, 1), 16.5 / 255)
    mid = model.embed(patchify(half, 1))[0, 0, : cfg.width // 2]
    torch.testing.assert_close(mid, (tables[0, 16] + tables[0, 17]) / 2)


def test_sincos_position_embedding_is_fixed_and_distinct():
    pe = sincos_pos_embed(32, (4, 4))
    assert pe.shape == (16, 32)
    assert torch.cdist(pe, pe).add(torch.eye(16) * 10).min() > 0.1   # every position distinct
    model = ViT(tiny(1, pos_embed="sincos"))
    assert "pos_embed" not in dict(model.named_parameters())


def test_grayscale_and_any_size():
    model = ViT(vit_config("ViT-F/1", image_size=(7, 5), in_channels=1, num_classes=3))
    assert model(torch.rand(2, 1, 7, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match="patch size 2 must divide"):
        vit_config("ViT-F/2", image_size=(7, 5))


def test_named_sizes_match_the_paper():
    assert SIZES["T"] == (12, 192, 3) and SIZES["S"] == (12, 384, 6)
    assert SIZES["B"] == (12, 768, 12) and SIZES["L"] == (24, 1024, 16)
    assert parse_name("ViT-S/2") == (12, 384, 6, 2) == VIT_MODELS["ViT-S/2"]
    for bad in ("ViT-Q/1", "vit-t/1", "ViT-T", "ViT-T/3", "ViT-XL/1"):
        with pytest.raises(ValueError, match="unknown model"):
            parse_name(bad)


def test_flops_count_matches_a_by_hand_count():
    cfg = ViTConfig(image_size=(4, 4), in_channels=1, patch_size=1, width=8, depth=1, heads=2,
                    pool="mean", num_classes=0)
    n, d = 16, 8
    embed, qkv, attn = 2 * n * d, 6 * n * d * d, 4 * n * n * d      # QK^T and AV: 2 each
    proj, mlp = 2 * n * d * d, 16 * n * d * d
    by_hand = embed + qkv + attn + proj + mlp
    assert count_forward_flops(lambda: ViT(cfg), (lambda: torch.rand(1, 1, 4, 4),)) == by_hand


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = ViT(tiny(1, drop_path=0.9))
    x = torch.rand(4, 3, 8, 12)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_a_tiny_vit1_learns():
    """The loss of a 2-layer ViT/1 falls on a task that needs position (which row is bright)."""
    torch.manual_seed(0)
    model = ViT(vit_config("ViT-F/1", image_size=(6, 6), in_channels=1, num_classes=3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    y = torch.randint(0, 3, (64,))
    x = torch.rand(64, 1, 6, 6) * 0.2
    x[torch.arange(64), 0, 2 * y] = 1.0
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert (model(x).argmax(1) == y).float().mean() > 0.9
