"""VQGAN: the taming converter matches taming's own modules; the training-side pieces work."""
import pytest
import torch
import yaml
from safetensors.torch import save_file

from export.taming import load_taming_checkpoint
from pixtok.errors import UserError
from pixtok.models.vqgan import (
    CodebookUsage,
    PatchDiscriminator,
    PerceptualLoss,
    build_vqgan,
    hinge_d_loss,
    hinge_g_loss,
    perplexity,
    psnr,
    restart_dead_codes,
    vqgan_config,
    vqgan_losses,
)

# small, but with in-level attention (at 16x16, the second level) as LDM's VQ-f8 has at 32x32
DDCONFIG = dict(double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
EMBED_DIM, N_EMBED = 4, 64
# taming-transformers declares torchvision and Lightning as dependencies, which the modules used
# here never import, and torchvision's wheels for this torch are CUDA builds: `make install`
# installs it with --no-deps, so no extra in pyproject.toml can name it
TAMING_MISSING = ("taming-transformers is not installed: `make install` adds it "
                  "(pip install --no-deps taming-transformers-rom1504==0.0.6)")


def taming_autoencoder():
    """taming's own Encoder/Decoder/VectorQuantizer2, random weights -> (modules, state dict)."""
    pytest.importorskip("taming", reason=TAMING_MISSING)
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    torch.manual_seed(0)
    parts = torch.nn.ModuleDict({
        "encoder": Encoder(**DDCONFIG), "decoder": Decoder(**DDCONFIG),
        "quantize": VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25),
        "quant_conv": torch.nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1),
        "post_quant_conv": torch.nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1),
    }).eval()
    with torch.no_grad():   # random norms and codebook too, so every mapped tensor matters
        for name, p in parts.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
        parts["quantize"].embedding.weight.normal_(0, 0.5)
    return parts, parts.state_dict()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    parts, sd = taming_autoencoder()
    tmp = tmp_path_factory.mktemp("taming")
    # an LDM-style file: wrapped in state_dict, with loss.* entries to drop, a YAML config
    ckpt = {"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.zeros(1)},
            "global_step": 10}
    torch.save(ckpt, tmp / "last.ckpt")
    params = {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DDCONFIG}
    (tmp / "config.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))
    vq = load_taming_checkpoint(tmp / "last.ckpt", tmp / "config.yaml")
    return parts, vq, tmp


def test_taming_conversion_matches_taming(converted):
    parts, vq, _ = converted
    assert "AttnDownEncoderBlock2D" in vq.config.down_block_types
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h_ref = parts["quant_conv"](parts["encoder"](x))
        zq_ref, _, (_, _, idx_ref) = parts["quantize"](h_ref)
        x_ref = parts["decoder"](parts["post_quant_conv"](zq_ref))
        h = vq.encode(x).latents
        zq, _, (_, _, idx) = vq.quantize(h)
        x_rec = vq.decode(h).sample                  # quantises first, as LDM's decode
    assert h.shape == (2, EMBED_DIM, 16, 16)
    assert (h - h_ref).abs().max() < 1e-4
    assert torch.equal(idx.flatten(), idx_ref.flatten())
    assert len(idx.unique()) > 5                     # the comparison covers many codes
    assert (zq - zq_ref).abs().max() < 1e-4
    assert (x_rec - x_ref).abs().max() < 1e-4
    assert x_ref.abs().max() > 0.1                   # not a trivially zero output


def test_taming_loader_rejects_bad_input(converted, tmp_path):
    _, _, tmp = converted
    with pytest.raises(UserError, match="not found"):
        load_taming_checkpoint(tmp_path / "missing.ckpt", tmp / "config.yaml")
    with pytest.raises(UserError, match="embed_dim"):
        load_taming_checkpoint(tmp / "last.ckpt", {"model": {"params": {}}})
    # a checkpoint with an object that is not a tensor needs trust=True
    torch.save({"state_dict": {}, "callback": UserError("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="trust=True"):
        load_taming_checkpoint(tmp_path / "pickled.ckpt", tmp / "config.yaml")
    # a wrong architecture names the mismatching keys
    bad = {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": {**DDCONFIG, "ch_mult": [1]}}
    with pytest.raises(UserError):
        load_taming_checkpoint(tmp / "last.ckpt", bad)


def test_vqgan_sizes():
    f8 = vqgan_config("f8")
    assert f8["block_out_channels"] == [128, 256, 256, 512] and f8["num_vq_embeddings"] == 16384
    assert f8["down_block_types"][3] == "AttnDownEncoderBlock2D"   # attention at 32x32
    vq = build_vqgan("f4-small")
    with torch.no_grad():
        z = vq.encode(torch.zeros(1, 1, 32, 32)).latents
    assert z.shape == (1, 4, 8, 8)
    with pytest.raises(UserError):
        vqgan_config("f16")


def tiny_vqgan():
    return build_vqgan("f4-small", block_out_channels=[8, 16, 16], norm_num_groups=8,
                       num_vq_embeddings=32)


def test_vqgan_trains():
    torch.manual_seed(0)
    vq = tiny_vqgan()
    x = (torch.rand(8, 1, 32, 32) > 0.5).float() * 2 - 1
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)            # smooth blobs, learnable fast
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = vqgan_losses(vq, x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert out["psnr"] > vqgan_losses(tiny_vqgan(), x)["psnr"]
    # VQ-VAE convention: both terms have the same value, the codebook term trains the codebook
    assert torch.isclose(out["codebook"], out["commit"])


def test_codebook_loss_convention():
    torch.manual_seed(0)
    vq = tiny_vqgan()
    out = vqgan_losses(vq, torch.rand(2, 1, 32, 32) * 2 - 1, beta=0.25)
    codebook_grad = torch.autograd.grad(out["codebook"], vq.quantize.embedding.weight,
                                        retain_graph=True)[0]
    assert codebook_grad.abs().sum() > 0
    commit_grads = torch.autograd.grad(out["commit"], [vq.quantize.embedding.weight,
                                                       vq.encoder.conv_in.weight],
                                       allow_unused=True)
    assert commit_grads[0] is None or commit_grads[0].abs().sum() == 0
    assert commit_grads[1].abs().sum() > 0


def test_dead_code_restart():
    torch.manual_seed(0)
    vq = tiny_vqgan()
    latents = torch.randn(4, 4, 8, 8) * 3
    with torch.no_grad():      # a collapsed codebook: everything maps to code 0
        vq.quantize.embedding.weight.zero_()
        vq.quantize.embedding.weight[1:] += 100
    _, _, (_, _, before) = vq.quantize(latents)
    usage = CodebookUsage(32, window=2)
    usage.update(before)
    assert not usage.ready
    usage.update(before)
    assert usage.ready and usage.used() == 1 and len(usage.dead_codes()) == 31
    assert usage.perplexity() == pytest.approx(1.0)
    n = restart_dead_codes(vq, latents, usage.dead_codes(),
                           generator=torch.Generator().manual_seed(0))
    assert n == 31
    _, _, (_, _, after) = vq.quantize(latents)
    assert len(after.unique()) > 20
    # re-seeded codes are encoder outputs (up to the small jitter)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    dist = torch.cdist(vq.quantize.embedding.weight[1:].detach(), flat).min(1).values
    assert dist.max() < 0.05
    assert restart_dead_codes(vq, vq.quantize.embedding.weight.detach().T.reshape(1, 4, 1, 32)) == 0


def test_metrics_helpers():
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x + 0.2, x).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item())
    assert perplexity(torch.arange(8), 16) == pytest.approx(8.0)
    assert perplexity(torch.zeros(10, dtype=torch.long), 16) == pytest.approx(1.0)


def test_patch_discriminator_and_hinge():
    d = PatchDiscriminator(in_channels=1, channels=8, n_layers=2)
    assert d(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert hinge_g_loss(torch.full((4,), 3.0)).item() == -3.0


def test_perceptual_loss_loads_only_local_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        PerceptualLoss(tmp_path / "vgg_lpips.safetensors")
    torch.manual_seed(0)
    shapes = {"features.0": (64, 3), "features.2": (64, 64), "features.5": (128, 64),
              "features.7": (128, 128), "features.10": (256, 128), "features.12": (256, 256),
              "features.14": (256, 256), "features.17": (512, 256), "features.19": (512, 512),
              "features.21": (512, 512), "features.24": (512, 512), "features.26": (512, 512),
              "features.28": (512, 512)}
    state = {}
    for name, (c_out, c_in) in shapes.items():
        state[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
        state[f"{name}.bias"] = torch.zeros(c_out)
    save_file(state, tmp_path / "vgg16.safetensors")
    with pytest.raises(UserError, match="lin0"):
        PerceptualLoss(tmp_path / "vgg16.safetensors")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
            for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "lpips_vgg.pth")
    lpips = PerceptualLoss([tmp_path / "vgg16.safetensors", tmp_path / "lpips_vgg.pth"])
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = torch.rand(2, 1, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max() < 1e-6
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(lpips(x, y), lpips(y, x), atol=1e-6)
