"""Ignite handlers the two training stages share: resumable checkpoints, the CSV log, the
interpolation validator that keeps the best weights, NaN stop and progress bar."""

from __future__ import annotations

import csv
import logging
import re
import time
from pathlib import Path

import torch
from ignite.engine import Events

from .devices import as_device_tensor
from .errors import InputRefused
from .metrics import psnr, ssim
from .options import _as_number
from .sampling import DEFAULT_PREDICTION, SliceSampler
from .transforms import central_square

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)\.pt$")


def latest_checkpoint(checkpoint_dir):
    """The checkpoint with the highest iteration in ``checkpoint_dir``, or None."""
    folder = Path(checkpoint_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return max(found)[1] if found else None


def attach_checkpointing(trainer, checkpoint_dir, objects: dict, every_iterations=50, n_saved=2):
    """Save ``objects`` (models, EMA, optimisers, schedulers, engine, RNG...) every N
    iterations and at the end, atomically, keeping the last ``n_saved``."""
    from ignite.handlers import Checkpoint, DiskSaver

    saver = Checkpoint(
        objects,
        DiskSaver(str(checkpoint_dir), require_empty=False, atomic=True),
        filename_prefix="",
        filename_pattern="checkpoint_{global_step}.pt",
        global_step_transform=lambda engine, _: engine.state.iteration,
        n_saved=n_saved,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, int(every_iterations))), saver)
    trainer.add_event_handler(Events.COMPLETED, saver)
    return saver


def resume_latest(checkpoint_dir, objects: dict, max_epochs=None):
    """Load the newest checkpoint into ``objects`` if there is one (before ``trainer.run()``).
    ``max_epochs`` (the run's setting) replaces the one saved in the checkpoint, so that a
    resumed run can be given more, or fewer, epochs."""
    from ignite.handlers import Checkpoint

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        logger.info("no checkpoint in %s: starting from scratch", checkpoint_dir)
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    Checkpoint.load_objects(to_load=objects, checkpoint=state)
    if max_epochs is not None and "trainer" in objects:
        objects["trainer"].state.max_epochs = int(max_epochs)
    logger.info("resumed from %s", path)
    return path


# ----------------------------------------------------------------------------- logging and validation


class CSVLogger:
    """Append the trainer's scalar outputs to ``path`` every ``every`` iterations."""

    def __init__(self, path, every=10):
        self.path = Path(path)
        self.every = max(1, int(every))

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def __call__(self, engine):
        row = {"iteration": engine.state.iteration, "epoch": engine.state.epoch}
        row.update({k: v for k, v in engine.state.output.items() if isinstance(v, (int, float))})
        row["lr"] = engine.optimizer.param_groups[0]["lr"] if hasattr(engine, "optimizer") else None
        _append_csv(self.path, row)


def _append_csv(path, row):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


class InterpolationValidator:
    """Every ``every_epochs`` epochs, predict the middle slice of fixed validation triplets and
    report PSNR/SSIM against the baseline the model must beat (the flow midpoint, where items
    carry it as ``base``; else linear interpolation) and the gain over it, in
    ``engine.state.metrics``, the log and ``validation.csv``. The predictor is a callable taking
    a batch dict (``image``, ``neighbours`` and, over flow, ``base`` and ``gap_mm``; network
    scale) and returning the prediction. Keeps the weights of the best gain.

    ``score_px``: score only the central square of that side of each item (items centred on the
    LV: the heart region `calid evaluate` scores), else the whole item."""

    def __init__(
        self, dataset, predictor, output_dir, every_epochs=1, batch_size=8, save_best=None, device="cpu", score_px=None
    ):
        self.dataset = dataset
        self.predictor = predictor
        self.output_dir = Path(output_dir)
        self.every = max(1, int(every_epochs))
        self.batch_size = batch_size
        self.save_best = save_best  # callable(path) writing the weights worth keeping
        self.device = torch.device(device)
        self.best_gain = -float("inf")
        self.score_px = None if score_px is None else int(score_px)

    @property
    def baseline(self):
        return "flow" if len(self.dataset) and "base" in self.dataset[0] else "linear"

    def state_dict(self):
        return {"best_gain": self.best_gain}

    def load_state_dict(self, state):
        self.best_gain = state["best_gain"]

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        # score the starting weights too (linear interpolation for a fresh residual model, the
        # warm-start weights otherwise), so that "best" can never be worse than the start
        engine.add_event_handler(Events.STARTED, lambda e: self(e) if e.state.iteration == 0 else None)

    @torch.no_grad()
    def evaluate(self):
        scores = {"psnr": [], "ssim": [], "psnr_baseline": [], "ssim_baseline": []}
        for start in range(0, len(self.dataset), self.batch_size):
            items = [self.dataset[i] for i in range(start, min(start + self.batch_size, len(self.dataset)))]
            batch = {
                key: as_device_tensor(torch.stack([torch.as_tensor(it[key]) for it in items]), self.device)
                for key in ("image", "neighbours", "base", "gap_mm")
                if key in items[0]
            }
            middle = self._scored(batch["image"])
            pred = self._scored(self.predictor(batch).float().clamp(-0.5, 1.5))
            baseline = self._scored(
                batch["base"] if "base" in batch else batch["neighbours"][:, :2].mean(1, keepdim=True)
            )
            scores["psnr"].append(psnr(pred, middle))
            scores["ssim"].append(ssim(pred, middle))
            scores["psnr_baseline"].append(psnr(baseline, middle))
            scores["ssim_baseline"].append(ssim(baseline, middle))
        result = {f"val_{k}": float(torch.cat(v).mean()) for k, v in scores.items()}
        result["val_gain_db"] = result["val_psnr"] - result["val_psnr_baseline"]
        result["val_gain_ssim"] = result["val_ssim"] - result["val_ssim_baseline"]
        return result

    def _scored(self, images):
        return central_square(images, self.score_px)

    def __call__(self, engine):
        if len(self.dataset) == 0:
            logger.warning("validation skipped: no validation studies (set val_studies or val_fraction)")
            return
        result = self.evaluate()
        engine.state.metrics.update(result)
        logger.info(
            "validation epoch %d: PSNR %.2f dB (%s %.2f, gain %+.2f), SSIM %.4f (%s %.4f)",
            engine.state.epoch,
            result["val_psnr"],
            self.baseline,
            result["val_psnr_baseline"],
            result["val_gain_db"],
            result["val_ssim"],
            self.baseline,
            result["val_ssim_baseline"],
        )
        _append_csv(
            self.output_dir / "validation.csv",
            {"epoch": engine.state.epoch, "iteration": engine.state.iteration, **result},
        )
        if self.save_best is not None and result["val_gain_db"] > self.best_gain:
            self.best_gain = result["val_gain_db"]
            self.save_best(self.output_dir / "best.pt")


def reconstruction_predictor(autoencoder):
    """Stage 1 validation: the VAE's reconstruction of the true middle slice (its ceiling)."""

    def predict(batch):
        autoencoder.eval()
        return autoencoder.reconstruct(batch["image"])

    return predict


def sampler_predictor(
    autoencoder,
    ema,
    latent_scale,
    num_steps=8,
    seed=0,
    prediction=DEFAULT_PREDICTION,
    noise_scheduler=None,
    start="noise",
):
    """Stage 2 validation: DDIM with the EMA denoiser from seeded noise (or from zero, ``start``
    ``"mean"``, as the model will sample), neighbours only, on the training noise schedule
    (``noise_scheduler``; None: the default one). ``latent_scale``: the trainer's
    :class:`bundle.engines.LatentScale` (set by its first batch)."""

    def predict(batch):
        generator = torch.Generator().manual_seed(seed)
        denoiser = ema.module.eval()
        scale = latent_scale.value if latent_scale.value is not None else 1.0
        alphas_cumprod = None if noise_scheduler is None else noise_scheduler.alphas_cumprod
        sampler = SliceSampler(
            autoencoder.eval(),
            denoiser,
            scale,
            num_steps=num_steps,
            alphas_cumprod=alphas_cumprod,
            prediction=prediction,
        )
        cond = batch["neighbours"]
        z_start = torch.zeros(sampler.latent_shape(cond), device=cond.device) if start == "mean" else None
        return sampler(cond, generator=generator, z_start=z_start, base=batch.get("base"), gap_mm=batch.get("gap_mm"))

    return predict


class TimeBox:
    """Stop training cleanly once ``minutes`` have passed since this run started (None: no
    limit), so that a run fits the time a machine is lent for: the iteration in progress ends,
    the trainer terminates, the checkpoint handler saves at COMPLETED and the config's last steps
    (weights, export of the best validated ones) follow; the next run resumes from that
    checkpoint with a fresh box. Every process of a distributed run stops at the same iteration
    (rank 0's clock decides)."""

    def __init__(self, minutes=None):
        minutes = _minutes(minutes)
        self.seconds = None if minutes is None else minutes * 60.0
        self.start = None

    def attach(self, engine):
        if self.seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine):
        self.start = time.monotonic()

    def _check(self, engine):
        stop = torch.tensor([float(time.monotonic() - self.start >= self.seconds)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stop = stop.to(getattr(engine.state, "device", None) or "cpu")
            torch.distributed.broadcast(stop, src=0)
        if stop.item():
            logger.info("time box of %.4g minutes reached at iteration %d", self.seconds / 60, engine.state.iteration)
            engine.terminate()


def _minutes(value):
    """None (no limit) or a positive number of minutes; bundle overrides arrive as strings."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    minutes = _as_number(value)
    if not minutes > 0:
        raise InputRefused(f"max_minutes must be a positive number of minutes (or None: no limit), got {value!r}")
    return minutes


class StopOnNan:
    """Ignite's ``TerminateOnNan`` on the loss, as a handler with ``attach``."""

    def attach(self, engine):
        from ignite.handlers import TerminateOnNan

        engine.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda output: output["loss"]))


class ProgressBar:
    """An Ignite progress bar showing the running loss."""

    def attach(self, engine):
        from ignite.handlers import ProgressBar as IgniteBar

        IgniteBar(persist=True).attach(engine, output_transform=lambda output: {"loss": output["loss"]})
