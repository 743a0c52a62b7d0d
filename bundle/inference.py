"""The learned midpoint predictor: trained weights -> a function the bisection engine calls.

Each level's gaps (every gap of every phase) are generated in batched, memory-bounded chunks.
Every generated slice draws its starting noise from its own seed (study seed, sample, level,
gap, phase), so results do not depend on the chunk size: a batched run equals a slice-by-slice
loop up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from .data import cyclic_frames
from .io import InputRefused, atomic_write
from .sampling import SliceSampler
from .transforms import SlicePreprocessor

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models"
WEIGHT_FILES = ("model.pt", "model.json")


@dataclasses.dataclass
class CaLIDModel:
    autoencoder: torch.nn.Module
    denoiser: torch.nn.Module
    latent_scale: float
    spatial_dims: int
    net: dict
    model_spacing: float | None
    source: str
    prediction: str = "epsilon"
    trained_on: list | None = None  # the studies the weights were trained on, as recorded
    # below this distance between neighbours (mm) the model does not beat linear interpolation
    # (measured per bisection level, docs/README.md), so those gaps are interpolated linearly
    fallback_below_mm: float | None = None
    default_steps: int = 8  # DDIM steps when none are asked for: the shipped setting
    alphas_cumprod: torch.Tensor | None = None  # the training noise schedule (None: the default)

    @property
    def temporal(self):
        return self.spatial_dims == 3

    @property
    def size_multiple(self):
        """Input sizes must divide by the VAE factor times the U-Net's downsampling."""
        return self.denoiser.vae_factor * 2 ** (len(self.net["unet_channels"]) - 1)


def check_weights(weights_dir=None) -> Path:
    """The weights folder (default: the bundle's ``models/``), refusing one that lacks a file."""
    folder = Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise InputRefused(
            f"no CaLID weights in {folder}: missing {', '.join(missing)}. Train them (README: Training; the "
            f"diffusion stage writes OUTPUT_DIR/model) or pass --weights DIR with {' and '.join(WEIGHT_FILES)}; "
            f"--method linear needs no weights"
        )
    return folder


def export_model(autoencoder_path, diffusion_path, out_dir, half=True) -> Path:
    """Combine a training run's ``autoencoder.pt`` and diffusion weights (``best.pt`` or
    ``diffusion.pt``), each with its JSON sidecar, into ``OUT_DIR/model.pt`` + ``model.json``
    (fp16 by default: half the size, and inference runs in float32 anyway)."""
    autoencoder_path, diffusion_path, out_dir = Path(autoencoder_path), Path(diffusion_path), Path(out_dir)
    ae_info = json.loads(autoencoder_path.with_suffix(".json").read_text())
    info = json.loads(diffusion_path.with_suffix(".json").read_text())
    last = diffusion_path.with_name("diffusion.json")
    if not info.get("latent_scale") and last.is_file():
        # best.pt saved by the validation of the starting weights, before the first batch set the
        # scale: the scale is the frozen VAE's statistic, the same for the final weights
        info["latent_scale"] = json.loads(last.read_text()).get("latent_scale")
    if ae_info.get("net", {}).get("vae_channels") != info.get("net", {}).get("vae_channels"):
        raise InputRefused(f"{autoencoder_path} and {diffusion_path} describe different VAEs")
    state = {}
    for prefix, path in (("autoencoder", autoencoder_path), ("denoiser", diffusion_path)):
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            state[f"{prefix}.{key}"] = value.half() if half and value.is_floating_point() else value
    info = {**info, "stage": "model", "autoencoder_trained_on": ae_info.get("trained_on")}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
    atomic_write(out_dir / "model.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=4)))
    return out_dir


def load_model(weights_dir=None, device="cpu") -> CaLIDModel:
    """Load ``model.pt`` + ``model.json`` from ``weights_dir`` (default: the bundle's
    ``models/``). Errors name the file that is missing or does not fit."""
    from .networks import PRESETS, CaLIDNetwork

    folder = check_weights(weights_dir)
    try:
        info = json.loads((folder / "model.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputRefused(f"{folder / 'model.json'} is not valid JSON ({e}); export the weights again") from None
    if not isinstance(info, dict) or not info.get("latent_scale"):
        raise InputRefused(f"{folder / 'model.json'} has no latent_scale")
    missing = [key for key in ("spatial_dims", "net") if key not in info]
    if missing:
        raise InputRefused(f"{folder / 'model.json'} lacks {', '.join(missing)}; export the weights again")
    if info.get("preset") is not None and info["preset"] not in PRESETS:
        raise InputRefused(
            f"{folder / 'model.json'} names preset {info['preset']!r}, which does not exist; "
            f"presets: {', '.join(PRESETS)}"
        )
    try:
        network = CaLIDNetwork.from_info(info)
    except (KeyError, TypeError, ValueError) as e:
        raise InputRefused(f"{folder / 'model.json'} does not describe a network this bundle builds: {e}") from None
    try:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding more than tensors
        raise InputRefused(
            f"{folder / 'model.pt'} cannot be read as weights ({type(e).__name__}); the file is damaged or not "
            f"a state dict of tensors: download or export it again"
        ) from None
    try:
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise InputRefused(
            f"{folder / 'model.pt'} does not fit the network described in model.json "
            f"(preset {info.get('preset')}, spatial_dims {network.spatial_dims}): {str(e).splitlines()[0]}"
        ) from e
    network = network.to(device).eval()
    return CaLIDModel(
        autoencoder=network.autoencoder,
        denoiser=network.denoiser,
        latent_scale=network.latent_scale,
        spatial_dims=network.spatial_dims,
        net=info["net"],
        model_spacing=info.get("model_spacing"),
        source=str(folder),
        prediction=network.prediction,
        trained_on=info.get("trained_on"),
        fallback_below_mm=info.get("fallback_below_mm"),
        default_steps=int(info.get("steps", 8)),
        alphas_cumprod=network.alphas_cumprod,
    )


def resolve_device(device="auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputRefused(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputRefused(f"device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputRefused("--device cuda requested but CUDA is not available here; use --device cpu or auto")
    return device


def precision_context(device: torch.device, precision="auto"):
    """CUDA: bf16 autocast where supported, else fp16. CPU: float32 unless precision='bf16'."""
    if device.type == "cuda" and precision in ("auto", "bf16", "fp16"):
        dtype = torch.bfloat16 if precision != "fp16" and torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def item_generator(*key) -> torch.Generator:
    """A generator seeded from a tuple of integers (study seed, sample, level, gap, phase)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class LearnedMidpoints:
    """Midpoint predictor for :func:`bundle.upsample.bisect` backed by a :class:`CaLIDModel`.

    ``left``/``right`` arrive as (gaps, phases, X, Y) in scanner intensities; the 2D model
    generates every (gap, phase) slice, the 2D+T model every gap's whole cine at once.
    """

    def __init__(
        self,
        model: CaLIDModel,
        preprocessor: SlicePreprocessor,
        num_steps=8,
        refine=False,
        seed=0,
        sample=0,
        chunk_size=16,
        device="cpu",
        precision="auto",
        progress=None,
        latent_blend=None,
        fallback=True,
        spacing_mm=None,
    ):
        """``spacing_mm``: the distance between the neighbours of level 0 (default: the slice
        spacing the preprocessor was made for; leave-one-out evaluation passes twice that)."""
        from .motion import FlowMidpoints

        if latent_blend not in (None, "linear", "slerp"):
            raise ValueError(f"latent_blend must be None, 'linear' or 'slerp', got {latent_blend!r}")
        self.latent_blend = latent_blend  # a baseline: the VAE alone, no denoiser
        # where the model's fallback_below_mm says it cannot help: flow midpoints (True), the
        # given predictor, or the model anyway (False)
        self.fallback = FlowMidpoints(device=device) if fallback is True else fallback or None
        self.fell_back = set()  # the levels filled by the fallback, to tell the user
        self.model = model
        self.pre = preprocessor
        self.spacing_mm = preprocessor.slice_spacing if spacing_mm is None else float(spacing_mm)
        self.sampler = SliceSampler(
            model.autoencoder,
            model.denoiser,
            model.latent_scale,
            num_steps=num_steps,
            alphas_cumprod=model.alphas_cumprod,
            prediction=model.prediction,
        )
        self.refine = refine
        self.num_steps = num_steps
        self.seed, self.sample = seed, sample
        self.chunk_size = max(1, int(chunk_size))
        self.device = torch.device(device)
        self.precision = precision
        self.progress = progress

    def _to_network(self, slices):  # (B, X, Y[, T]) scanner -> (B, 1, H, W[, T']) network
        if not self.model.temporal:
            return self.pre.forward(slices[:, None])
        b, x, y, t = slices.shape
        frames = self.pre.forward(slices.permute(0, 3, 1, 2).reshape(b * t, 1, x, y))
        cine = frames.reshape(b, t, *frames.shape[-2:]).permute(0, 2, 3, 1)
        padded_t = math.ceil(t / self.model.size_multiple) * self.model.size_multiple
        return cyclic_frames(cine, padded_t)[:, None]

    def _from_network(self, pred, t=None):  # inverse of _to_network
        if not self.model.temporal:
            return self.pre.inverse(pred)[:, 0]
        cine = pred[:, 0, ..., :t]  # (B, H, W, T)
        b, h, w, _ = cine.shape
        frames = self.pre.inverse(cine.permute(0, 3, 1, 2).reshape(b * t, 1, h, w))
        return frames.reshape(b, t, *frames.shape[-2:]).permute(0, 2, 3, 1)

    @property
    def needs_all_phases(self):
        """The 2D+T model generates whole cines: the bisection must not split the phases."""
        return self.model.temporal

    def neighbour_gap_mm(self, level):
        """Distance between the neighbours at bisection ``level`` (0: the slice spacing of the
        stack being bisected); None if the spacing is unknown."""
        return None if self.spacing_mm is None else self.spacing_mm * 2.0**-level

    def falls_back(self, level):
        from .upsample import GAP_TOLERANCE

        gap, limit = self.neighbour_gap_mm(level), self.model.fallback_below_mm
        if self.fallback is None or self.latent_blend or not limit or gap is None:
            return False
        return gap < limit * (1 - GAP_TOLERANCE)

    @property
    def method(self):
        if self.latent_blend:
            return f"latent-{self.latent_blend}"
        return "calid+" if self.refine else "calid"

    def describe(self):
        notes = []
        if self.fell_back:
            gaps = ", ".join(f"{self.neighbour_gap_mm(level):.4g} mm" for level in sorted(self.fell_back))
            notes.append(
                f"{self.fallback.name} midpoints between neighbours {gaps} apart: the model was not measured to beat "
                f"them below {self.model.fallback_below_mm:g} mm (fallback_below_mm in {self.model.source}/model.json)"
            )
        return {
            "method": self.method,
            "steps": self.num_steps,
            "fallback_levels": sorted(self.fell_back),
            "notes": notes,
        }

    def close(self):
        if self.progress is not None:
            self.progress.close()

    @torch.inference_mode()
    def __call__(self, left, right, level, phase_offset=0):
        gaps, phases, x, y = left.shape
        if self.falls_back(level):
            self.fell_back.add(level)
            return self.fallback(left, right, level, phase_offset=phase_offset)
        if self.model.temporal:  # items: gaps, each a cine (X, Y, T)
            items_left, items_right = left.permute(0, 2, 3, 1), right.permute(0, 2, 3, 1)
            keys = [(k,) for k in range(gaps)]
        else:  # items: every (gap, phase) slice
            items_left, items_right = left.reshape(-1, x, y), right.reshape(-1, x, y)
            keys = [(k, phase_offset + p) for k in range(gaps) for p in range(phases)]
        outputs = []
        for start in range(0, len(keys), self.chunk_size):
            stop = min(start + self.chunk_size, len(keys))
            a = self._to_network(items_left[start:stop].float())
            b = self._to_network(items_right[start:stop].float())
            neighbours = torch.cat([a, b], 1).to(self.device)
            z_start = None
            if not (self.refine or self.latent_blend):
                shape = self.sampler.latent_shape(neighbours)[1:]
                z_start = torch.stack(
                    [
                        torch.randn(shape, generator=item_generator(self.seed, self.sample, level, *key))
                        for key in keys[start:stop]
                    ]
                )
            with precision_context(self.device, self.precision):
                if self.latent_blend:
                    pred = self.sampler.latent_blend(neighbours, self.latent_blend)
                else:
                    pred = self.sampler(neighbours, refine=self.refine, z_start=z_start)
            outputs.append(self._from_network(pred.float().cpu(), t=phases))
            if self.progress is not None:
                self.progress.update(stop - start)
        out = torch.cat(outputs)
        out = out.permute(0, 3, 1, 2) if self.model.temporal else out.reshape(gaps, phases, x, y)
        # a new slice stays within the intensity range of its two neighbours (a generative model
        # can overshoot, most visibly on constant or tiny inputs)
        pair = torch.stack([left, right]).flatten(3)
        low, high = pair.amin(dim=(0, 3))[..., None, None], pair.amax(dim=(0, 3))[..., None, None]
        return torch.maximum(torch.minimum(out.to(left.dtype), high), low)
