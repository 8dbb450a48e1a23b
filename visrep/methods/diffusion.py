"""Diffusion: a class-conditional DiT trained as a DDPM denoiser, sampled with DDPM or DDIM (PiT: 1x1 patches).

Ho et al. 2020 (DDPM), Song et al. 2021 (DDIM), Peebles & Xie 2023 (DiT); official code facebookresearch/DiT
(``train.py``, ``diffusion/gaussian_diffusion.py:training_losses``).

    x0 = 2 * image - 1 (or VAE latent * scale); t ~ U{0..T-1}; eps ~ N(0, I); y dropped to null w.p. class_dropout
    eps_hat, v = DiT(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y)
    loss = mean(mse(eps, eps_hat) + vb(v, eps_hat detached)); AdamW; ema <- EMA(DiT)
    sample: guided eps = eps(null) + w (eps(y) - eps(null)) through diffusers' DDPM / DDIM scheduler

As the official code: float64 schedule tables, ``learn_sigma`` with the vb term, float32 training
(``method.precision``), guidance on the first ``guided_channels`` = 3 channels. Differences: the linear
schedule takes beta_start / beta_end as given; sampling uses the epsilon channels (fixed variance).
Specification and notes: docs/methods/diffusion.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from visrep.data.transforms import batch_resize_center_crop
from visrep.errors import ConfigError
from visrep.formats import declare
from visrep.losses.precision import autocast_off
from visrep.models.dit import DiT
from visrep.optim.ema import ema_update_, make_target
from visrep.optim.groups import decay_groups

from .base import DataInfo, Export, Method, Step, check_vit_config, module_metadata


@dataclass
class DiffusionConfig:
    name: Literal["diffusion"] = "diffusion"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"   # DDPM / DiT: linear
    beta_start: float = 1.0e-4
    beta_end: float = 0.02
    learn_sigma: bool = True                # DiT: learned variance channels trained by the VLB term
    rescale_learned_sigmas: bool = False    # official RESCALED_MSE: the VLB term times T / 1000
    class_cond: bool = True                 # condition on labels when the dataset has classes
    class_dropout: float = 0.1              # label -> null class with this probability (CFG training)
    hflip: bool = False                     # random horizontal flips (DiT on ImageNet: true)
    ema: float = 0.9999                     # EMA momentum of the sampling model (DiT: 0.9999)
    ema_warmup: bool = True                 # momentum min(ema, (1 + step) / (10 + step)): short runs
    sampler: Literal["ddpm", "ddim"] = "ddim"
    sample_steps: int = 50
    guidance: float = 1.5                   # classifier-free guidance scale (1: conditional only)
    guided_channels: int | None = 3         # official forward_with_cfg: the first 3 channels; null: all
    precision: Literal["fp32", "autocast"] = "fp32"   # official: float32 training; autocast: train.precision
    ddim_eta: float = 0.0
    feature_timestep: int = 10              # timestep at which features() reads the DiT
    vae: str | None = None                  # local diffusers AutoencoderKL folder: latent diffusion
    vae_scale: float | None = None          # latent scaling (null: the VAE's scaling_factor)


def classifier_free_guidance(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """``eps_uncond + scale * (eps_cond - eps_uncond)`` (scale 1: the conditional prediction)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def beta_schedule(name: str, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """float64 betas: ``linear`` (DDPM), ``scaled_linear`` (linear in sqrt(beta)) or ``squaredcos_cap_v2``
    (Nichol & Dhariwal's cosine alpha-bar, each beta capped at 0.999)."""
    if name == "linear":
        return np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)])
    raise ValueError(f"unknown beta schedule {name!r}")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) (nats) of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), with the tanh
    approximation of the normal CDF; the edge bins extend to -inf / +inf (x < -0.999 / x > 0.999)."""
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=list(range(1, x.dim())))


class NoiseSchedule:
    """The forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0), tables in float64 (not module
    state: they follow the config, never a checkpoint). Betas are re-derived from the cumulative product of
    alphas, as the official ``create_diffusion`` does (``SpacedDiffusion`` keeping every step), and
    :meth:`take` rounds a coefficient to float32 before using it, as the official ``_extract_into_tensor``."""

    def __init__(self, betas: np.ndarray):
        abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "sqrt_abar": np.sqrt(abar), "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar), "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1),
            "posterior_log_variance": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_coef_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            "log_betas": np.log(betas),
        }
        self.num_timesteps = len(betas)
        self.tables = {k: torch.from_numpy(v) for k, v in tables.items()}

    def take(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table ``name`` at timesteps ``t`` [B], float32-rounded, shaped [B, 1, ...] for ``like``, in its dtype."""
        v = self.tables[name].to(t.device)[t].float().to(like.dtype)
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.take("sqrt_abar", t, x0) * x0 + self.take("sqrt_one_minus_abar", t, x0) * noise

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.take("posterior_coef_x0", t, x_t) * x0 + self.take("posterior_coef_xt", t, x_t) * x_t

    def vb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, var_values: Tensor) -> Tensor:
        """Per-sample variational-bound term in bits/dim (DiT / improved DDPM ``_vb_terms_bpd`` with the
        "learned range" variance): KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretised
        decoder NLL of x0 at t = 0. ``var_values`` in [-1, 1] interpolate the log variance between the
        clipped posterior variance and beta_t; the mean comes from ``eps`` (pass it detached)."""
        min_log = self.take("posterior_log_variance", t, x_t)
        max_log = self.take("log_betas", t, x_t)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self.take("sqrt_recip_abar", t, x_t) * x_t - self.take("sqrt_recipm1_abar", t, x_t) * eps
        mean = self.posterior_mean(pred_x0, x_t, t)
        kl = mean_flat(normal_kl(self.posterior_mean(x0, x_t, t), min_log, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("method.name=diffusion needs the diffusers package: "
                          "pip install 'visrep[diffusion]'") from None
    return diffusers


def load_vae(path: str | Path) -> nn.Module:
    """A frozen diffusers ``AutoencoderKL`` from a local folder (never downloaded)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"method.vae={str(path)!r}: no diffusers AutoencoderKL there (a folder with config.json "
                          "and the weights, written by AutoencoderKL.save_pretrained); latent diffusion needs a "
                          "local VAE, it is never downloaded; unset method.vae to diffuse pixels")
    vae = _require_diffusers().AutoencoderKL.from_pretrained(str(p), local_files_only=True).eval()
    vae.requires_grad_(False)
    return vae


class Diffusion(Method):
    feature_description = ("EMA DiT at timestep method.feature_timestep on the clean image, null class: "
                           "last-block tokens, layer-normed, mean-pooled")

    @classmethod
    def validate(cls, cfg) -> None:
        _require_diffusers()
        m, mc = cfg.method, cfg.model
        if mc.class_token or mc.num_registers:
            raise ConfigError("the DiT has no prefix tokens: model.class_token must be false and model.num_registers 0")
        if mc.drop_path_rate or mc.init_values is not None:
            raise ConfigError("the DiT has no drop-path or LayerScale: model.drop_path_rate must be 0 and "
                              "model.init_values null")
        if mc.pos_embed == "sincos" and mc.embed_dim % 4:
            raise ConfigError(f"model.embed_dim={mc.embed_dim} must be divisible by 4 for sin-cos position embeddings")
        size = cfg.data.image_size
        if m.vae is not None:
            vae_cfg = load_vae_config(m.vae)
            factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
            if size % factor:
                raise ConfigError(f"data.image_size={size} must be a multiple of the VAE's downsampling ({factor})")
            size //= factor
        check_vit_config(cfg, {f"the DiT's input size (data.image_size{' / VAE factor' if m.vae else ''})": size})
        if not 0 <= m.class_dropout < 1:
            raise ConfigError(f"method.class_dropout={m.class_dropout} must be in [0, 1)")
        if not 0 <= m.ema <= 1:
            raise ConfigError(f"method.ema={m.ema} must be in [0, 1]")
        if m.num_train_timesteps < 2:
            raise ConfigError(f"method.num_train_timesteps={m.num_train_timesteps} must be >= 2")
        if not 1 <= m.sample_steps <= m.num_train_timesteps:
            raise ConfigError(f"method.sample_steps={m.sample_steps} must be in [1, method.num_train_timesteps="
                              f"{m.num_train_timesteps}]")
        if not 0 <= m.feature_timestep < m.num_train_timesteps:
            raise ConfigError(f"method.feature_timestep={m.feature_timestep} must be in [0, "
                              f"{m.num_train_timesteps})")
        if not 0 < m.beta_start < m.beta_end < 1:
            raise ConfigError(f"method.beta_start={m.beta_start} and method.beta_end={m.beta_end} must satisfy "
                              "0 < beta_start < beta_end < 1")
        if m.guidance < 0:
            raise ConfigError(f"method.guidance={m.guidance} must be >= 0 (1: no guidance)")
        if m.guided_channels is not None and m.guided_channels < 1:
            raise ConfigError(f"method.guided_channels={m.guided_channels} must be >= 1 (null: every channel)")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        diffusers = _require_diffusers()
        m, mc = cfg.method, cfg.model
        self.vae = load_vae(m.vae) if m.vae is not None else None   # frozen, not in the state dict
        chans, size = self.data_info.in_chans, self.image_size
        if self.vae is not None:
            chans = self.vae.config.latent_channels
            size //= 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.vae_scale = m.vae_scale if m.vae_scale is not None else self.vae.config.scaling_factor
        num_classes = (self.data_info.num_classes or 0) if m.class_cond else 0
        self.dit = DiT(img_size=size, patch_size=mc.patch_size, in_chans=chans, embed_dim=mc.embed_dim,
                       depth=mc.depth, num_heads=mc.num_heads, mlp_ratio=mc.mlp_ratio, num_classes=num_classes,
                       pos_embed=mc.pos_embed, qkv_bias=mc.qkv_bias, learn_sigma=m.learn_sigma)
        self.dit.grad_checkpointing = mc.grad_checkpointing
        self.ema = make_target(self.dit)
        self.scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=m.num_train_timesteps, beta_schedule=m.beta_schedule, beta_start=m.beta_start,
            beta_end=m.beta_end, prediction_type="epsilon", clip_sample=self.vae is None)
        self.schedule = NoiseSchedule(beta_schedule(m.beta_schedule, m.num_train_timesteps, m.beta_start, m.beta_end))

    def __setattr__(self, name, value):
        if name == "vae" and isinstance(value, nn.Module):  # keep the frozen VAE out of the state dict
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def conditional(self) -> bool:
        return self.dit.num_classes > 0

    # -- data ------------------------------------------------------------------------------------
    def to_model_space(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (or float [0, 1]) images -> x0: pixels in [-1, 1] at ``image_size`` (with a VAE: its
        latents times the scale, sampled from the posterior with ``generator``, its mean without)."""
        device = self.dit.pos_embed.device
        images = images.to(device)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = batch_resize_center_crop(images, self.image_size)
        elif images.dtype == torch.uint8:
            images = images.float() / 255
        x = images.to(self.dit.pos_embed.dtype) * 2 - 1
        if self.vae is None:
            return x
        self.vae.to(device=device, dtype=x.dtype)
        with torch.no_grad():
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator=generator) if generator is not None else dist.mode()
        return z * self.vae_scale

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        x0 = self.to_model_space(batch["image"], generator)
        n, device = x0.size(0), x0.device
        if self.cfg.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(device).view(n, 1, 1, 1)
            x0 = torch.where(flip, x0.flip(-1), x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, x0.dtype)
        labels = None
        if self.conditional:
            labels = self.drop_labels(batch["label"].to(device), torch.rand(n, generator=generator).to(device))
        return {**batch, "x0": x0, "noise": noise, "timesteps": t, "labels": labels}

    def drop_labels(self, labels: Tensor, uniform: Tensor) -> Tensor:
        """Labels with classifier-free-guidance dropout: the null class where ``uniform`` [B] < class_dropout
        (the official ``LabelEmbedder.token_drop`` draw) and for unlabelled images (label -1)."""
        drop = (uniform < self.cfg.class_dropout) | (labels < 0)
        return torch.where(drop, torch.full_like(labels, self.dit.null_class), labels)

    # -- training --------------------------------------------------------------------------------
    def loss_terms(self, batch: dict) -> dict[str, Tensor]:
        """Per-sample terms [B] of the official ``training_losses``: ``mse`` (epsilon), ``vb`` (with
        learn_sigma) and ``loss`` (their sum); computed in at least float32 (autocast outputs are upcast)."""
        x0, noise, t = batch["x0"], batch["noise"], batch["timesteps"]
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.dit(x_t, t, batch["labels"])
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        c = x0.shape[1]
        eps = out[:, :c]
        terms = {"mse": mean_flat((noise.to(out.dtype) - eps) ** 2)}
        if self.dit.out_chans > c:  # learn_sigma: the VLB term trains the variance, not the mean
            vb = self.schedule.vb_terms(x0.to(out.dtype), x_t.to(out.dtype), t, eps.detach(), out[:, c:2 * c])
            if self.cfg.rescale_learned_sigmas:
                vb = vb * (self.schedule.num_timesteps / 1000.0)
            terms["vb"] = vb
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        if self.cfg.precision == "fp32":  # the official DiT trains in float32: the engine's autocast off
            with autocast_off():
                terms = self.loss_terms(batch)
        else:
            terms = self.loss_terms(batch)
        return {"loss": terms["loss"].mean(), **{k: v.detach().mean() for k, v in terms.items() if k != "loss"}}

    def param_groups(self) -> list[dict]:
        return decay_groups(self.dit)

    def ema_momentum(self, step: int) -> float:
        return min(self.cfg.ema, (1 + step) / (10 + step)) if self.cfg.ema_warmup else self.cfg.ema

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        ema_update_(self.ema, self.dit, self.ema_momentum(step.step))

    # -- sampling --------------------------------------------------------------------------------
    def sampling_scheduler(self):
        """A fresh diffusers scheduler (DDPM or DDIM) with the training noise schedule."""
        diffusers = _require_diffusers()
        cls = diffusers.DDIMScheduler if self.cfg.sampler == "ddim" else diffusers.DDPMScheduler
        return cls.from_config(self.scheduler.config)

    @torch.no_grad()
    def guided_eps(self, x: Tensor, t: Tensor, labels: Tensor | None, scale: float,
                   model: nn.Module | None = None) -> Tensor:
        """The noise prediction under classifier-free guidance: both branches in one batch (the
        unconditional one with the null class), combined by :func:`classifier_free_guidance`."""
        model = self.ema if model is None else model
        c = x.shape[1]
        if labels is None or not self.conditional or scale == 1.0:
            return model(x, t, labels)[:, :c]
        null = torch.full_like(labels, self.dit.null_class)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))[:, :c]
        eps_cond, eps_uncond = both.chunk(2)
        k = c if self.cfg.guided_channels is None else min(c, self.cfg.guided_channels)
        # official: guidance on the first 3 channels only; the others keep the conditional prediction
        return torch.cat([classifier_free_guidance(eps_cond[:, :k], eps_uncond[:, :k], scale), eps_cond[:, k:]], 1)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``uint8 [n, C, H, W]`` from the EMA DiT (``method.sampler`` over
        ``method.sample_steps`` steps, guidance ``method.guidance``); labels default to uniform draws
        over the classes. A pure function of ``generator``'s state (default: seeded by train.seed)."""
        g = generator if generator is not None else torch.Generator().manual_seed(self.run_cfg.train.seed)
        device, dtype = self.ema.pos_embed.device, self.ema.pos_embed.dtype
        if self.conditional:
            if labels is None:
                labels = torch.randint(0, self.dit.num_classes, (n,), generator=g)
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
            if labels.numel() != n:
                raise ValueError(f"sample: {labels.numel()} labels for {n} images")
            if (labels < 0).any() or (labels > self.dit.num_classes).any():
                raise ValueError(f"sample: labels must be in [0, {self.dit.num_classes}] ({self.dit.num_classes}: "
                                 "the null class)")
        else:
            labels = None
        d = self.ema
        x = torch.randn((n, d.in_chans, d.img_size, d.img_size), generator=g).to(device, dtype)
        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(self.cfg.sample_steps)
        extra = {"eta": self.cfg.ddim_eta} if self.cfg.sampler == "ddim" else {}
        for t in scheduler.timesteps:
            eps = self.guided_eps(x, t.to(device).expand(n), labels, self.cfg.guidance)
            x = scheduler.step(eps, t, x, generator=g, **extra).prev_sample
        return self.to_uint8(x)

    def to_uint8(self, x: Tensor) -> Tensor:
        """Model-space samples -> ``uint8`` images (decoding latents with the VAE)."""
        if self.vae is not None:
            self.vae.to(device=x.device, dtype=x.dtype)
            x = self.vae.decode(x / self.vae_scale).sample
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    # -- evaluation and export -------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        return self.ema

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        x = self.to_model_space(images)
        t = torch.full((x.size(0),), self.cfg.feature_timestep, device=x.device, dtype=torch.long)
        return self.ema.pooled(x, t)

    def export_modules(self) -> dict[str, Export]:
        # official: DiT's models.py keys are ours
        return {name: Export(getattr(self, name), {**module_metadata(getattr(self, name)), **declare(official="dit")})
                for name in ("ema", "dit")}


def load_vae_config(path: str | Path) -> dict:
    """The VAE's ``config.json`` (validation reads its geometry without loading the weights)."""
    import json

    p = Path(path).expanduser() / "config.json"
    if not p.is_file():
        load_vae(path)  # raises the full message
    try:
        cfg = json.loads(p.read_text())
        cfg["block_out_channels"]
    except (ValueError, KeyError):
        raise ConfigError(f"method.vae={str(path)!r}: {p} is not an AutoencoderKL config") from None
    return cfg


__all__ = ["Diffusion", "DiffusionConfig", "NoiseSchedule", "beta_schedule", "classifier_free_guidance",
           "discretized_gaussian_log_likelihood", "load_vae", "normal_kl"]
