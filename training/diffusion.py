"""The Gaussian diffusion training objective of DDPM / improved DDPM / DiT, over a diffusers
DDPMScheduler (which owns the noise schedule and add_noise; sampling is left to the schedulers).

With a learned variance the loss is DiT's hybrid: the simple MSE on the noise plus the variational
bound term L_t that trains only the variance (the mean's gradient is stopped). The variance is the
improved-DDPM interpolation, in log space, between the posterior variance and beta_t, which is
what DDPMScheduler's variance_type="learned_range" samples with. With T = 1000 steps the uniform
draw of t makes L_t an unbiased estimate of L_vlb / T, so L_simple + L_t is improved DDPM's
L_simple + 0.001 L_vlb.
"""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor


def training_scheduler(**overrides) -> DDPMScheduler:
    """DiT's schedule: 1000 steps, linear betas 1e-4..0.02, learned-range variance, no clipping."""
    args = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                variance_type="learned_range", clip_sample=False, prediction_type="epsilon")
    return DDPMScheduler(**{**args, **overrides})


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log P(x) elementwise for x in [-1, 1] on 256 levels under N(mean, e^(2 log_scale)):
    the Gaussian's mass on x's bin of width 2/255; the edge bins reach out to -inf and +inf."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1 / 255)
    lower = inv_std * (centered - 1 / 255)
    ndtr = torch.special.ndtr
    # take the bin's mass from the nearer tail, where the two cdf values are not both near 1
    mass = torch.where(centered > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_mass = torch.log(mass.clamp(min=1e-12))
    log_first = torch.special.log_ndtr(upper)      # bin 0: (-inf, -1 + 1/255]
    log_last = torch.special.log_ndtr(-lower)      # bin 255: [1 - 1/255, inf)
    return torch.where(x < -0.999, log_first, torch.where(x > 0.999, log_last, log_mass))


def posterior_terms(scheduler: DDPMScheduler, t: torch.Tensor, like: torch.Tensor) -> dict:
    """Schedule quantities at timesteps t (N,), shaped (N, 1, 1, 1) like `like`: the coefficients
    of the posterior mean q(x_{t-1} | x_t, x_0), its clipped log variance, log beta_t, alpha-bar."""
    betas = scheduler.betas.double()
    abar = scheduler.alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    # the posterior variance is 0 at t = 0: clip its log to the t = 1 value, as improved DDPM
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    terms = {
        "coef_x0": betas * abar_prev.sqrt() / (1 - abar),
        "coef_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        "post_logvar": post_logvar,
        "log_beta": torch.log(betas),
        "abar": abar,
    }
    shape = (-1,) + (1,) * (like.ndim - 1)
    idx = t.to(betas.device).long()
    return {k: v[idx].reshape(shape).to(like.device, like.dtype) for k, v in terms.items()}


def variational_bound(scheduler, x0, x_t, t, eps, var_values) -> torch.Tensor:
    """Per-sample L_t in bits per dimension (N,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
    t > 0, the discretised decoder NLL at t = 0. Only the variance gets gradients (eps is
    detached)."""
    s = posterior_terms(scheduler, t, x_t)
    true_mean = s["coef_x0"] * x0 + s["coef_xt"] * x_t
    x0_pred = (x_t - (1 - s["abar"]).sqrt() * eps.detach()) / s["abar"].sqrt()
    model_mean = s["coef_x0"] * x0_pred + s["coef_xt"] * x_t
    frac = (var_values + 1) / 2                     # model output in [-1, 1] -> [0, 1]
    model_logvar = frac * s["log_beta"] + (1 - frac) * s["post_logvar"]
    dims = tuple(range(1, x0.ndim))
    kl = normal_kl(true_mean, s["post_logvar"], model_mean, model_logvar).mean(dims)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dims)
    return torch.where(t.to(x0.device) == 0, nll, kl) / math.log(2.0)


def diffusion_loss(model, x0, y, scheduler: DDPMScheduler, generator=None, learn_sigma=True,
                   timesteps: torch.Tensor | None = None) -> dict:
    """One batch of the training objective -> {"loss", "mse", "vb"} (scalars; loss = mse + vb).

    model(x_t, t, y) predicts eps, and with learn_sigma also the variance interpolation value, as
    (N, 2C, H, W). Timesteps are drawn uniformly unless given; noise comes from `generator`."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"diffusion_loss trains eps-prediction, not "
                         f"{scheduler.config.prediction_type!r}")
    n, c = x0.shape[:2]
    if timesteps is None:
        where = generator.device if generator is not None else x0.device
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,),
                                  generator=generator, device=where)
    t = timesteps.to(x0.device).long()
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t, y)                                   # (N, C or 2C, H, W)
    if learn_sigma:
        if out.shape[1] != 2 * c:
            raise ValueError(f"learn_sigma needs {2 * c} output channels, the model gave "
                             f"{out.shape[1]}")
        eps, var_values = out.split(c, dim=1)
        vb = variational_bound(scheduler, x0, x_t, t, eps, var_values).mean()
    else:
        eps, vb = out, out.new_zeros(())
    mse = ((noise - eps) ** 2).mean()
    return {"loss": mse + vb, "mse": mse, "vb": vb}
