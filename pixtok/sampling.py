"""The samplers a generator offers, and the settings it uses when a request leaves them out.

One list, one set of defaults and one rule for the steps a sampler runs when none are given
(default_steps) for `pixtok sample`, `pixtok eval`, `pixtok study`, `pixtok bench sample`, the
REST API and the Gradio page. It imports nothing, so the page can read it without loading torch.
DPM-Solver++ (2M) at 20 steps is close to DDPM-250 in quality at 1/12 of the model calls, and
guidance 4 gives clearly class-typical samples (DiT's best FID is at a lower scale, 1.5).
A cancelled run raises SamplingCancelled (pixtok/pipeline_pixel_dit.py).
"""

SAMPLING_DEFAULTS = {"sampler": "dpm", "steps": 20, "guidance": 4.0}

SAMPLERS = ("ddpm", "ddim", "dpm", "euler")    # diffusers schedulers, see pixtok/pipeline.py
# steps that give good samples for each sampler at interactive speed
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm": 20, "euler": 50}


def default_steps(sampler: str) -> int:
    """The steps a sampler runs when a request or a command gives none: the default sampler's
    SAMPLING_DEFAULTS steps, another sampler's DEFAULT_STEPS. KeyError for an unknown sampler
    (each caller says so in its own words)."""
    if sampler == SAMPLING_DEFAULTS["sampler"]:
        return SAMPLING_DEFAULTS["steps"]
    return DEFAULT_STEPS[sampler]
