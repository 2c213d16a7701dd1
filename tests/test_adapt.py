"""init_from= adapts what differs (training/adapt.py): the head for other classes, the position
embedding for another size, the pixel embedding for other channels; what cannot adapt is a
one-line error. Also freeze=encoder and layer-wise lr decay. In process, on tiny ViTs."""
from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch

from pixtok.checkpoint import save_weights, write_json
from pixtok.errors import UserError
from pixtok.models.depth import DepthHeadConfig, DepthViT
from pixtok.models.vit import (
    ViT,
    adapt_embed_channels,
    resample_pos_embed,
    sincos_pos_embed,
    vit_config,
)
from training.adapt import STORE, freeze_encoder, init_depth_head, init_encoder, resolve
from training.recipe import Recipe
from training.train import param_groups

LABELS = ["a", "b", "c"]


def vit(name="ViT-F/1", size=8, channels=1, classes=3, **kw) -> ViT:
    torch.manual_seed(kw.pop("seed", 0))
    return ViT(vit_config(name, image_size=(size, size), in_channels=channels,
                          num_classes=classes, mean=(0.5,) * channels, std=(0.25,) * channels,
                          **kw))


def save(folder, model, task="classify", labels=LABELS):
    if isinstance(model, DepthViT):
        spec = {"arch": "vit-depth", "name": "ViT-F/1", "args": model.args()}
    else:
        spec = {"arch": "vit", "name": "ViT-F/1", "args": model.cfg.to_dict()}
    write_json(folder / "config.json", {"format": "pixtok-checkpoint/1", "task": task,
                                        "model": spec, "labels": labels})
    save_weights(folder / "model.safetensors", model.state_dict())
    return folder


def trained(model):
    """Weights no initialisation would give, so a copied weight cannot pass for a fresh one."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def adapt(folder, model, labels=LABELS):
    lines = []
    head = init_encoder(str(folder), model, labels, lines.append)
    return lines, head


def blocks(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("blocks.")}


# ---------------------------------------------------------------- position embedding

@pytest.mark.parametrize("kind", ["learned", "sincos"])
def test_a_table_resampled_to_its_own_grid_is_unchanged_and_cls_is_kept(kind):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(1, 6 * 4, 32, generator=g) if kind == "learned" else \
        sincos_pos_embed(32, (6, 4))[None]
    cls = torch.randn(1, 1, 32, generator=g)
    table = torch.cat([cls, grid], dim=1)
    same = resample_pos_embed(table, (6, 4), (6, 4), prefix=1)
    torch.testing.assert_close(same, table, atol=1e-6, rtol=0)
    for new in ((3, 2), (9, 10)):              # smaller (antialiased) and larger
        out = resample_pos_embed(table, (6, 4), new, prefix=1)
        assert out.shape == (1, 1 + new[0] * new[1], 32)
        assert torch.equal(out[:, :1], cls)
    # a smooth table stays smooth: a linear ramp is resampled to (nearly) the ramp
    ramp = torch.arange(6.0)[:, None].expand(6, 4).reshape(1, 24, 1)
    up = resample_pos_embed(ramp, (6, 4), (12, 8)).reshape(12, 8)
    assert (up[1:-1, 0].diff() > 0).all()


@pytest.mark.parametrize("p", [1, 2, 4])
def test_a_model_takes_another_size_for_any_patch_dividing_it(tmp_path, p):
    src_state = trained(vit(f"ViT-F/{p}", size=8))
    source = save(tmp_path / "src", src_state)
    model = vit(f"ViT-F/{p}", size=12, seed=1)
    lines, _ = adapt(source, model)
    gh = 12 // p
    assert model.pos_embed.shape == (1, gh * gh, 32)
    expected = resample_pos_embed(src_state.pos_embed.detach(), (8 // p,) * 2, (gh, gh))
    assert torch.equal(model.pos_embed.detach(), expected)
    for k, v in blocks(src_state).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.cls_token, src_state.cls_token)      # [cls] kept
    assert any(f"resampled to {gh}x{gh}" in line for line in lines), lines
    assert model(torch.rand(2, 1, 12, 12)).shape == (2, 3)
    # the same size: every weight, the head too (same labels), unchanged
    again = vit(f"ViT-F/{p}", size=8, seed=2)
    adapt(source, again)
    for k, v in src_state.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_a_sincos_model_rebuilds_its_table(tmp_path):
    source = save(tmp_path / "src", trained(vit(size=8, pos_embed="sincos")))
    model = vit(size=12, pos_embed="sincos")
    lines, _ = adapt(source, model)
    assert "position embedding: sincos, rebuilt for 8x8 -> 12x12 pixels" in lines
    torch.testing.assert_close(model.pos_embed, sincos_pos_embed(32, (12, 12))[None])


# ---------------------------------------------------------------- head

def test_other_classes_get_a_new_head_the_same_keep_theirs(tmp_path):
    src = trained(vit())
    source = save(tmp_path / "src", src)
    fresh = vit(classes=5, seed=3)
    head_before = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    model = vit(classes=5, seed=3)
    lines, _ = adapt(source, model, labels=list("vwxyz"))
    for k, v in head_before.items():                       # reset: its own initialisation
        assert torch.equal(model.head.state_dict()[k], v)
    assert "head: new for 5 classes (reset, not copied: the checkpoint's 3 classes are " \
           "others)" in lines
    # the same number of classes but other names is another label set too
    model = vit(seed=4)
    lines, _ = adapt(source, model, labels=["x", "y", "z"])
    assert not torch.equal(model.head.weight, src.head.weight)
    assert any(line.startswith("head: new for 3 classes") for line in lines)
    model = vit(seed=4)
    lines, _ = adapt(source, model)
    assert torch.equal(model.head.weight, src.head.weight) and "head: kept" in lines[-1]


# ---------------------------------------------------------------- channels

@pytest.mark.parametrize("c_from, c_to", [(1, 3), (3, 1)])
def test_channels_adapt_so_a_grey_image_gives_the_same_tokens(tmp_path, c_from, c_to):
    src = trained(vit(channels=c_from))
    source = save(tmp_path / "src", src)
    model = vit(channels=c_to, seed=5)
    lines, _ = adapt(source, model)
    how = "summed" if c_to == 1 else "repeated and divided by 3"
    assert f"pixel embedding: {c_from} -> {c_to} channels ({how})" in lines
    grey = torch.rand(2, 1, 8, 8)
    # the same grey image, as the source and as the adapted model see it (r = g = b); the
    # normalisation (0.5, 0.25) is the same on every channel, so the tokens must agree
    src_x, new_x = grey.expand(-1, c_from, -1, -1), grey.expand(-1, c_to, -1, -1)
    torch.testing.assert_close(model.tokens(new_x), src.tokens(src_x), atol=1e-4, rtol=1e-4)


def test_adapt_embed_channels_layout_with_patches():
    w = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 12)    # p=2, C=3: (p, p, C)
    grey = adapt_embed_channels(w, 2, 3, 1)
    assert grey.tolist() == [[3, 12, 21, 30], [39, 48, 57, 66]]
    back = adapt_embed_channels(grey, 2, 1, 3)
    assert back.shape == (2, 12) and back[0, :3].tolist() == [1, 1, 1]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("kw, message", [
    ({"name": "ViT-P/1"}, "width 32 vs 64; depth 2 vs 4; heads 2 vs 2"),
    ({"name": "ViT-F/2"}, "patch_size 1 vs 2"),
    ({"pos_embed": "none"}, "pos_embed learned vs none"),
    ({"embed": "dictionary"}, "embed linear vs dictionary"),
])
def test_what_cannot_adapt_is_one_line_naming_it(tmp_path, kw, message):
    source = save(tmp_path / "src", vit())
    with pytest.raises(UserError) as error:
        adapt(source, vit(**kw))
    text = str(error.value)
    assert "\n" not in text and str(tmp_path / "src") in text
    assert re.sub(r"; heads 2 vs 2", "", message) in text, text
    assert "holds another model" in text


def test_channels_of_a_dictionary_embedding_do_not_adapt(tmp_path):
    source = save(tmp_path / "src", vit(embed="dictionary"))
    with pytest.raises(UserError, match=r"in_channels 1 vs 3 \(only a linear embedding adapts"):
        adapt(source, vit(embed="dictionary", channels=3))


def test_no_checkpoint_and_a_non_vit_checkpoint_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint folder .* nor a shipped model "
                                        r"\(.*fashion-vit1"):
        adapt(tmp_path / "nowhere", vit())
    write_json(tmp_path / "dit" / "config.json", {"format": "pixtok-checkpoint/1",
                                                  "task": "vqgan", "model": {"arch": "vqgan"}})
    with pytest.raises(UserError, match="has no ViT encoder"):
        adapt(tmp_path / "dit", vit())


def test_a_shipped_model_is_found_by_name():
    assert resolve("fashion-vit1") == STORE / "fashion-vit1"
    model = vit("ViT-N/1", size=14, classes=2)
    lines, _ = adapt("fashion-vit1", model, labels=["x", "y"])
    assert "resampled to 14x14" in lines[1] and lines[-1].startswith("head: new for 2 classes")


# ---------------------------------------------------------------- depth <-> classify

def depth_model(seed=0, size=8):
    torch.manual_seed(seed)
    cfg = vit_config("ViT-F/1", image_size=(size, size), in_channels=1, mean=(0.5,),
                     std=(0.25,))
    return DepthViT(cfg, DepthHeadConfig(init_depth=2.0))


def test_a_depth_model_starts_from_a_classifier_and_the_reverse(tmp_path):
    clf = trained(vit())
    depth = depth_model(seed=1, size=12)
    lines = []
    head = init_encoder(str(save(tmp_path / "clf", clf)), depth.encoder, None, lines.append)
    init_depth_head(str(tmp_path / "clf"), depth, head, lines.append)
    for k, v in blocks(clf).items():
        assert torch.equal(depth.encoder.state_dict()[k], v), k
    assert lines[-1].startswith("depth head: new") and depth(torch.rand(1, 1, 12, 12)).min() > 0

    src = trained(depth_model(seed=2))
    save(tmp_path / "depth", src, task="depth", labels=None)
    model = vit(classes=3, seed=6)
    lines, _ = adapt(tmp_path / "depth", model)
    for k, v in blocks(src.encoder).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "head: new for 3 classes (reset, not copied: a depth checkpoint has no classifier " \
           "head)" in lines
    again = depth_model(seed=3, size=12)                  # depth -> depth: its head is kept
    head = init_encoder(str(tmp_path / "depth"), again.encoder, None, lines.append)
    init_depth_head(str(tmp_path / "depth"), again, head, lines.append)
    assert torch.equal(again.head.mlp[-1].weight, src.head.mlp[-1].weight)
    assert lines[-1] == "depth head: kept"
    assert asdict(again.head_cfg)["init_depth"] == 2.0


# ---------------------------------------------------------------- freeze, layer decay

def test_freeze_encoder_leaves_the_head_alone_to_learn():
    model = vit()
    learning = freeze_encoder(model)
    assert learning == model.head.weight.numel() + model.head.bias.numel()
    groups = param_groups(model, Recipe())
    assert sum(p.numel() for g in groups for p in g["params"]) == learning
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    assert model.head.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is None


def test_layer_decay_scales_each_block_lr():
    model = vit("ViT-P/1")                                # 4 blocks
    groups = param_groups(model, Recipe(layer_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[3].mlp[0].weight)] == 0.5
    assert scale[id(model.blocks[0].mlp[0].weight)] == 0.5 ** 4
    assert scale[id(model.pos_embed)] == 0.5 ** 5


@pytest.mark.parametrize("overrides, message", [
    (["freeze=decoder"], "freeze='decoder': expected encoder"),
    (["channels=2", "dataset=imagefolder"], "channels=2: expected 1 or 3"),
    (["channels=3"], "channels=3: only an imagefolder data set is converted"),
])
def test_new_recipe_keys_refuse_bad_values_in_one_line(overrides, message):
    from training.recipe import load_recipe

    with pytest.raises(UserError, match=re.escape(message)) as error:
        load_recipe("vit1-fashion", overrides)
    assert "\n" not in str(error.value)


# --- a DiT from another DiT ---------------------------------------------------------------------

def dit_folder(folder, size=4, classes=LABELS, width=None, seed=0):
    """A generator checkpoint folder as the dit task writes it (config.json + transformer/)."""
    from pixtok.models.dit import PixelDiT, dit_config

    torch.manual_seed(seed)
    args = dit_config("DiT-F/1", sample_size=size, in_channels=4, num_classes=len(classes),
                      **({"width": width} if width else {}))
    model = PixelDiT(**args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder / "transformer")
    write_json(folder / "config.json", {"format": "pixtok-checkpoint/1", "task": "dit",
                                        "model": {"arch": "dit", "args": args},
                                        "labels": list(classes)})
    return folder, model


def fresh_dit(size=4, classes=LABELS, width=None):
    from pixtok.models.dit import PixelDiT, dit_config
    torch.manual_seed(1)
    return PixelDiT(**dit_config("DiT-F/1", sample_size=size, in_channels=4,
                                 num_classes=len(classes), **({"width": width} if width else {})))


def test_a_dit_from_a_dit_of_the_same_labels_and_grid_takes_every_weight(tmp_path):
    from training.adapt import init_dit
    folder, source = dit_folder(tmp_path / "gen")
    model, said = fresh_dit(), []
    init_dit(str(folder), model, LABELS, None, said.append)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert said == [f"transformer of {folder} loaded"]


def test_a_dit_for_other_classes_and_grid_gets_a_new_label_table_and_a_resampled_grid(tmp_path):
    from training.adapt import init_dit
    folder, source = dit_folder(tmp_path / "gen", size=4)
    model = fresh_dit(size=6, classes=["x", "y"])
    before, said = model.state_dict()["y_embedder.table.weight"].clone(), []
    init_dit(str(folder), model, ["x", "y"], None, said.append)
    state, theirs = model.state_dict(), source.state_dict()
    table = state["y_embedder.table.weight"]
    assert torch.equal(table[:2], before[:2])                       # reset, not copied
    assert torch.equal(table[-1], theirs["y_embedder.table.weight"][-1])    # the null class
    assert state["position_embedding"].shape[1] == 36
    assert torch.equal(state["position_embedding"],
                       resample_pos_embed(theirs["position_embedding"], (4, 4), (6, 6)))
    for k in ("blocks.0.attn.qkv.weight", "final.linear.weight"):
        if k in theirs:
            assert torch.equal(state[k], theirs[k])
    assert any(line.startswith("labels: 2 classes") for line in said)
    assert any(line.startswith("latent grid: 4x4 -> 6x6") for line in said)


def test_a_dit_of_another_width_is_a_one_line_refusal(tmp_path):
    from training.adapt import init_dit
    folder, _ = dit_folder(tmp_path / "gen", width=64)
    with pytest.raises(UserError, match=r"another model \(width 64 vs \d+\)"):
        init_dit(str(folder), fresh_dit(), LABELS, None, print)
