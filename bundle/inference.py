"""The learned midpoint predictor: trained weights -> a function the bisection engine calls.

Each level's gaps (every gap of every phase) are generated in batched, memory-bounded chunks.
Every generated slice draws its starting noise from its own seed (study seed, sample, gap
width, gap, phase), so results do not depend on the chunk size: a batched run equals a slice-by-slice
loop up to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .devices import precision_context
from .motion import FlowMidpoints
from .transforms import SlicePreprocessor, cyclic_frames
from .weights import CaLIDModel


def item_generator(*key) -> torch.Generator:
    """A generator seeded from a tuple of integers (study seed, sample, gap width, gap, phase)."""
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
    ):
        if latent_blend not in (None, "linear", "slerp"):
            raise ValueError(f"latent_blend must be None, 'linear' or 'slerp', got {latent_blend!r}")
        self.latent_blend = latent_blend  # a baseline: the VAE alone, no denoiser
        # where the model's fallback_below_mm says it cannot help: flow midpoints (True), the
        # given predictor, or the model anyway (False)
        self.fallback = FlowMidpoints(device=device) if fallback is True else fallback or None
        self.fell_back = set()  # the gaps (mm) filled by the fallback, to tell the user
        self.model = model
        self.pre = preprocessor
        self.sampler = model.sampler(num_steps)
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

    def falls_back(self, gap_mm):
        if self.fallback is None or self.latent_blend:
            return False
        return self.model.info.falls_back(gap_mm)

    @property
    def method(self):
        if self.latent_blend:
            return f"latent-{self.latent_blend}"
        return "calid+" if self.refine else "calid"

    def describe(self):
        notes = []
        if self.fell_back:
            gaps = ", ".join(f"{gap:.4g} mm" for gap in sorted(self.fell_back, reverse=True))
            notes.append(
                f"{self.fallback.name} midpoints between neighbours {gaps} apart: the model was not measured to beat "
                f"them below {self.model.info.fallback_below_mm:g} mm "
                f"(fallback_below_mm in {self.model.source}/model.json)"
            )
        report = {
            "method": self.method,
            "steps": self.num_steps,
            "fallback_gaps_mm": sorted(self.fell_back, reverse=True),
            "notes": notes,
        }
        if self.model.adaptation:
            report["adaptation"] = self.model.adaptation
        return report

    def close(self):
        if self.progress is not None:
            self.progress.close()

    @torch.inference_mode()
    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        gaps, phases, x, y = left.shape
        if self.falls_back(gap_mm):
            self.fell_back.add(gap_mm)
            return self.fallback(left, right, gap_mm, phase_offset=phase_offset)
        if self.model.temporal:  # items: gaps, each a cine (X, Y, T)
            items_left, items_right = left.permute(0, 2, 3, 1), right.permute(0, 2, 3, 1)
            keys = [(k,) for k in range(gaps)]
        else:  # items: every (gap, phase) slice
            items_left, items_right = left.reshape(-1, x, y), right.reshape(-1, x, y)
            keys = [(k, phase_offset + p) for k in range(gaps) for p in range(phases)]
        gap_key = 0 if gap_mm is None else int(round(gap_mm * 1000))  # micrometres: one seed stream per gap width
        outputs = []
        for start in range(0, len(keys), self.chunk_size):
            stop = min(start + self.chunk_size, len(keys))
            a = self._to_network(items_left[start:stop].float())
            b = self._to_network(items_right[start:stop].float())
            neighbours, base = torch.cat([a, b], 1).to(self.device), None
            if self.model.info.base == "flow" and not self.latent_blend:
                # the model corrects the flow midpoint, seeing the neighbours warped half way
                neighbours = self.model.network.over_flow(neighbours[:, :1], neighbours[:, 1:], gap_mm)
                base = neighbours[:, 2:3]
            z_start = None
            if self.model.info.start == "mean" and not (self.refine or self.latent_blend):
                z_start = torch.zeros(self.sampler.latent_shape(neighbours))  # the model's mean estimate
            elif not (self.refine or self.latent_blend):
                shape = self.sampler.latent_shape(neighbours)[1:]
                z_start = torch.stack(
                    [
                        torch.randn(shape, generator=item_generator(self.seed, self.sample, gap_key, *key))
                        for key in keys[start:stop]
                    ]
                )
            with precision_context(self.device, self.precision):
                if self.latent_blend:
                    pred = self.sampler.latent_blend(neighbours, self.latent_blend)
                else:
                    pred = self.sampler(neighbours, refine=self.refine, z_start=z_start, base=base, gap_mm=gap_mm)
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
