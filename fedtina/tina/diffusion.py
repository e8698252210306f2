"""Gaussian diffusion over parameter tokens: noise schedule, training loss, DDIM and DDPM samplers.

These are small objects separate from the network (as in diffusers): the network is any callable
``model(x_t [B,N,T], t [B] long, cond [B,N,E], mask [B,N] bool) -> [B,N,T]`` returning the prediction target.

Prediction target. Tina predicts **x0** by default. With the cosine schedule alpha_bar(T) is ~0, so an
eps-predicting network must recover x0 as (x_t - sqrt(1 - a) eps) / sqrt(a) and divides its error by ~0 in the first
(most important) steps of a short DDIM run; an x0 prediction is bounded there (at high noise it is the conditional
mean of the head given the class names, which is already a good head) and a 10-20 step DDIM run refines it. v behaves
similarly to x0 and is available (``prediction="v"``), as is ``"eps"``; on the fake zoo of the tests x0 sampled as well
as or better than v in few steps, so it is the default.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

PREDICTIONS = ("x0", "eps", "v")
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseSchedule:
    """Discrete variance schedule over ``timesteps`` steps (t = 0 .. timesteps-1)."""

    def __init__(self, timesteps: int = 1000, kind: str = "cosine") -> None:
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        self.timesteps, self.kind = int(timesteps), kind
        if kind == "cosine":  # Nichol & Dhariwal 2021
            s = 0.008
            steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        elif kind == "linear":  # Ho et al. 2020, scaled to the number of steps
            scale = 1000.0 / timesteps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown noise schedule {kind!r}; use 'cosine' or 'linear'")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)        # float64 [timesteps], decreasing

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer steps ``t`` (t = -1 means "no noise": 1.0), float32 on t's device."""
        ab = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)
        return ab[t.long() + 1].float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse ``x0`` [B, ...] to step ``t`` [B]: sqrt(a) x0 + sqrt(1 - a) noise."""
        a = _expand(self.alpha_bar(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        if prediction == "x0":
            return x0
        if prediction == "eps":
            return noise
        if prediction == "v":
            a = _expand(self.alpha_bar(t), x0)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output at step ``t`` -> (x0 estimate, eps estimate)."""
        a = _expand(self.alpha_bar(t), x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if prediction == "x0":
            x0 = out
            eps = (x_t - sa * x0) / s1a.clamp_min(1e-8)
        elif prediction == "eps":
            eps = out
            x0 = (x_t - s1a * eps) / sa.clamp_min(1e-8)
        elif prediction == "v":
            x0 = sa * x_t - s1a * out
            eps = s1a * x_t + sa * out
        else:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
        return x0, eps


def training_loss(
    model: Model,
    x0: torch.Tensor,
    cond: torch.Tensor,
    mask: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "x0",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked MSE between the network output and the prediction target at uniform random ``t``.

    ``x0`` [B,N,T] normalised tokens, ``cond`` [B,N,E], ``mask`` [B,N] bool (True = real token). Padded tokens get
    zero input and are excluded from the mean.
    """
    B = x0.shape[0]
    m = mask[..., None].to(x0.dtype)
    x0 = x0 * m
    if t is None:
        t = torch.randint(0, schedule.timesteps, (B,), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    noise = noise * m
    x_t = schedule.q_sample(x0, t, noise)
    out = model(x_t, t, cond, mask)
    err = (out - schedule.target(x0, noise, t, prediction)) ** 2 * m
    return err.sum() / (m.sum() * x0.shape[-1]).clamp_min(1.0)


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM over ``steps`` evenly spaced timesteps (Song et al. 2021)."""

    def __init__(self, schedule: NoiseSchedule, steps: int = 20, eta: float = 0.0, prediction: str = "x0") -> None:
        if not 1 <= steps <= schedule.timesteps:
            raise ValueError(f"DDIM steps must be in [1, {schedule.timesteps}], got {steps}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
        self.schedule, self.steps, self.eta, self.prediction = schedule, int(steps), float(eta), prediction
        ts = torch.linspace(schedule.timesteps - 1, 0, self.steps).round().long()
        self.timesteps = torch.unique_consecutive(ts)           # descending, e.g. [999, 946, ..., 0]

    @property
    def num_noise_draws(self) -> int:
        """How many step-noise tensors a stochastic run consumes (0 when eta = 0)."""
        return len(self.timesteps) - 1 if self.eta > 0 else 0

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        cond: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        step_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise ``noise`` (x_T, [B,N,T]) -> x0 estimate [B,N,T] (padded tokens set to 0).

        ``step_noise`` [num_noise_draws, B, N, T] fixes the fresh noise of a stochastic (eta > 0) run; without it the
        noise is drawn from ``generator``.
        """
        m = mask[..., None].to(noise.dtype)
        x = noise * m
        B = x.shape[0]
        ts = self.timesteps.tolist()
        x0 = x
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            tt = torch.full((B,), t, dtype=torch.long, device=x.device)
            out = model(x, tt, cond, mask)
            x0, eps = self.schedule.split(out, x, tt, self.prediction)
            x0 = x0 * m
            if t_prev < 0:
                break
            a = self.schedule.alpha_bar(tt[:1])
            a_prev = self.schedule.alpha_bar(torch.full((1,), t_prev, dtype=torch.long, device=x.device))
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if self.eta > 0:
                z = step_noise[i] if step_noise is not None else torch.randn(x.shape, device=x.device, generator=generator)
                x = x + sigma * z
            x = x * m
        return x0


class DDPMSampler:
    """Ancestral sampling through every training step (slow; for completeness and checks)."""

    def __init__(self, schedule: NoiseSchedule, prediction: str = "x0") -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
        self.schedule, self.prediction = schedule, prediction

    @property
    def num_noise_draws(self) -> int:
        return self.schedule.timesteps - 1

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        cond: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        step_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        m = mask[..., None].to(noise.dtype)
        x = noise * m
        B = x.shape[0]
        x0 = x
        sched = self.schedule
        for i, t in enumerate(range(sched.timesteps - 1, -1, -1)):
            tt = torch.full((B,), t, dtype=torch.long, device=x.device)
            x0, _ = sched.split(model(x, tt, cond, mask), x, tt, self.prediction)
            x0 = x0 * m
            if t == 0:
                break
            a, a_prev = sched.alpha_bar(tt[:1]), sched.alpha_bar(tt[:1] - 1)
            beta = 1 - a / a_prev
            # posterior q(x_{t-1} | x_t, x0)
            mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * x
            var = beta * (1 - a_prev) / (1 - a)
            z = step_noise[i] if step_noise is not None else torch.randn(x.shape, device=x.device, generator=generator)
            x = (mean + var.sqrt() * z) * m
        return x0


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))
