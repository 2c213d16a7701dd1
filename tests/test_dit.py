"""DiT/p and the diffusion training objective on tiny models."""
import math

import pytest
import torch

from pixtok.models import build_model
from pixtok.models.dit import DIT_MODELS, PixelDiT, dit_config
from pixtok.models.vit import VIT_MODELS
from training.diffusion import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    normal_kl,
    posterior_terms,
    training_scheduler,
    variational_bound,
)
from training.flops import count_forward_flops


def tiny_dit(**kw) -> PixelDiT:
    torch.manual_seed(0)
    return PixelDiT(**dit_config("DiT-F/1", sample_size=8, in_channels=4, num_classes=10, **kw))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere (a fresh DiT is zero-initialised at its outputs)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def test_named_sizes_and_flops():
    assert dit_config("DiT-XL/2")["depth"] == 28 and dit_config("DiT-XL/2")["width"] == 1152
    assert DIT_MODELS["DiT-L/1"] == (24, 1024, 16, 1)
    # one size table: a letter means the same (depth, width, heads) in both families
    for name, (depth, width, heads, p) in DIT_MODELS.items():
        vit = VIT_MODELS.get(name.replace("DiT", "ViT"))
        assert vit is None or vit == (depth, width, heads, p), name
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_config("DiT-Q/2")
    # DiT paper, Table 4, on 256x256 images (32x32x4 latents), in multiply-adds, as our FLOP
    # counter counts them
    y = torch.zeros(1, dtype=torch.long)
    for name, gmacs in (("DiT-XL/2", 118.6), ("DiT-L/2", 80.7), ("DiT-S/2", 6.06),
                        ("DiT-B/4", 5.56)):
        cfg = dit_config(name, sample_size=32, in_channels=4)
        flops = count_forward_flops(lambda cfg=cfg: build_model({"arch": "dit", "args": cfg}),
                                    (lambda: torch.rand(1, 4, 32, 32), lambda: y, lambda: y))
        assert flops / 2e9 == pytest.approx(gmacs, rel=2e-3)


def test_fresh_model_outputs_zeros_and_blocks_are_identity():
    model = tiny_dit().eval()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 8, 8, 8)                       # learn_sigma: 2C channels
    assert out.abs().max() == 0
    tokens, c = torch.randn(3, 64, 32), torch.randn(3, 32)
    for block in model.blocks:                             # adaLN-Zero: gates start at 0
        assert torch.equal(block(tokens, c), tokens)
    assert model.y_embedder.table.num_embeddings == 11     # 10 classes + the null class


def test_label_dropout_uses_null_class():
    model = randomize(tiny_dit(class_dropout_prob=1.0))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 7])
    null = torch.full_like(y, 10)
    model.eval()
    cond, uncond = model(x, t, y), model(x, t, null)
    assert (cond - uncond).abs().max() > 1e-3
    model.train()                                          # p = 1: every label dropped
    assert torch.allclose(model(x, t, y), uncond, atol=1e-6)
    model.eval()                                           # forced drops, eval mode
    mixed = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    assert torch.allclose(mixed[0], uncond[0], atol=1e-6)
    assert torch.allclose(mixed[1], cond[1], atol=1e-6)


def test_shapes_patch_sizes_and_roundtrip(tmp_path):
    model = randomize(PixelDiT(sample_size=(4, 8), in_channels=3, patch_size=2, width=32,
                               depth=1, heads=2, num_classes=5, learn_sigma=False,
                               pos_embed="sincos")).eval()
    x, t, y = torch.randn(2, 3, 4, 8), torch.tensor([1, 2]), torch.tensor([0, 4])
    out = model(x, t, y)
    assert out.shape == (2, 3, 4, 8)
    model.save_pretrained(tmp_path / "dit")
    again = PixelDiT.from_pretrained(tmp_path / "dit").eval()
    assert torch.equal(again(x, t, y), out)
    with pytest.raises(ValueError, match="patch size"):
        PixelDiT(sample_size=7, patch_size=2)
    spec = {"arch": "dit", "args": dict(model.config)}
    assert isinstance(build_model(spec), PixelDiT)


def test_dit_trains_with_falling_loss():
    model = tiny_dit()
    scheduler = training_scheduler()
    torch.manual_seed(0)
    x0 = torch.randn(16, 4, 8, 8) * 0.5 + torch.linspace(-1, 1, 8)   # a fixed toy latent set
    y = torch.arange(16) % 10

    def eval_loss():
        with torch.no_grad():
            return diffusion_loss(model.eval(), x0, y, scheduler,
                                  generator=torch.Generator().manual_seed(123))

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        out = diffusion_loss(model.train(), x0, y, scheduler, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = eval_loss()
    assert before["mse"] == pytest.approx(1.0, abs=0.1)        # zero prediction: MSE = Var(eps)
    assert after["loss"] < 0.6 * before["loss"]
    assert after["mse"] < 0.6 * before["mse"]


def test_vb_is_finite_nonnegative_and_trains_only_the_variance():
    model = randomize(tiny_dit()).eval()
    scheduler = training_scheduler()
    x0 = torch.randn(6, 4, 8, 8).clamp(-1, 1)
    t = torch.tensor([0, 0, 1, 10, 500, 999])
    x_t = scheduler.add_noise(x0, torch.randn_like(x0), t)
    out = model(x_t, t, torch.arange(6)).detach().requires_grad_(True)
    eps, var_values = out.split(4, dim=1)
    vb = variational_bound(scheduler, x0, x_t, t, eps, var_values)
    assert vb.shape == (6,) and torch.isfinite(vb).all() and (vb >= 0).all()
    vb.sum().backward()
    assert out.grad[:, :4].abs().max() == 0                    # no gradient into the mean
    assert out.grad[:, 4:].abs().max() > 0
    # through the whole loss, the eps channels get gradients only from the MSE
    captured = {}
    model.register_forward_hook(lambda m, i, o: captured.update(out=o) or o.retain_grad())
    result = diffusion_loss(model, x0, torch.arange(6), scheduler,
                            generator=torch.Generator().manual_seed(0))
    result["vb"].backward()
    assert captured["out"].grad[:, :4].abs().max() == 0
    assert torch.isfinite(result["loss"]) and result["vb"] >= 0


def test_eps_only_loss():
    model = tiny_dit(learn_sigma=False)
    out = diffusion_loss(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]),
                         training_scheduler(), learn_sigma=False)
    assert out["vb"] == 0 and out["loss"] == out["mse"]
    with pytest.raises(ValueError, match="output channels"):
        diffusion_loss(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), training_scheduler())


def test_gaussian_pieces_against_references():
    m1, m2 = torch.randn(50), torch.randn(50)
    lv1, lv2 = torch.randn(50), torch.randn(50)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, atol=1e-5)
    # the 256 bins' probabilities sum to one, for a sharp and a wide Gaussian
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.3, math.log(0.01)), (-0.2, math.log(0.7))):
        logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                   torch.tensor(log_scale, dtype=torch.float64))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # the posterior variance matches diffusers' own (fixed_small) for t >= 1
    scheduler = training_scheduler()
    t = torch.tensor([1, 2, 50, 999])
    ours = posterior_terms(scheduler, t, torch.zeros(4, 1, 1, 1))["post_logvar"].flatten().exp()
    theirs = torch.stack([scheduler._get_variance(int(s), variance_type="fixed_small")
                          for s in t])
    assert torch.allclose(ours, theirs.float(), rtol=1e-4)
