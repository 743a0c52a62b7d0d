"""Weight files and what they record: ``model.json`` (and the training stages' sidecars) has one
owner, :class:`ModelInfo`; saving, warm-starting, freezing, exporting and loading weights live
here too.

A weights file is a plain state dict (``torch.load(weights_only=True)`` reads it) beside a JSON
file of the same stem: ``autoencoder.pt``/``.json`` and ``diffusion.pt``/``best.pt`` from
training, ``model.pt``/``model.json`` (both networks, fp16) for inference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .devices import unwrap
from .errors import InputRefused
from .io import atomic_write
from .networks import FLOW_CORRECTION_FEATURES, PRESETS, CaLIDNetwork, FlowCorrection
from .sampling import (
    DEFAULT_NOISE_SCHEDULE,
    DEFAULT_PREDICTION,
    MAX_STEPS,
    PREDICTIONS,
    STARTS,
    make_noise_scheduler,
)
from .transforms import SlicePreprocessor
from .upsample import narrower_than

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models"
WEIGHT_FILES = ("model.pt", "model.json")
STAGES = ("autoencoder", "diffusion", "model")
BASES = ("linear", "flow")
CONDITIONING_CHANNELS = {"linear": 2, "flow": 4}  # the neighbours; or warped neighbours, midpoint, weight


@dataclasses.dataclass
class ModelInfo:
    """What a weights file is: the networks it fits, how it was trained, how it samples.

    One set of defaults for training, export and inference. Keys this class does not interpret
    (``validation``, ``recipe``...) are kept in ``extra`` and written back unchanged.
    """

    stage: str  # "autoencoder", "diffusion" or "model" (both networks, exported)
    spatial_dims: int  # 2: slices, 3: 2D+T cines
    net: dict  # the preset-style sizes of the networks
    preset: str | None = None
    latent_scale: float | None = None  # 1 / std of the training latents (diffusion and model)
    prediction: str = DEFAULT_PREDICTION
    # the slice a residual model corrects: "linear" (the neighbours' mean) or "flow" (the flow
    # midpoint; the model then sees the neighbours warped half way, the midpoint and its weight)
    base: str = "linear"
    start: str = "noise"  # where DDIM starts: seeded noise, or zero ("mean": deterministic)
    noise_schedule: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_NOISE_SCHEDULE))
    model_spacing: float | None = None  # in-plane mm the networks were trained at (None: native)
    trained_on: list | None = None
    autoencoder_trained_on: list | None = None
    trained_gaps_mm: list | None = None  # [narrowest, widest] distance between training neighbours
    steps: int = 8  # DDIM steps when none are asked for
    # below this distance between neighbours (mm) the model was not measured to beat the fallback
    fallback_below_mm: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data, source="model.json") -> ModelInfo:
        """Validate a decoded JSON record; anything wrong is refused naming ``source``."""
        if not isinstance(data, dict):
            raise InputRefused(f"{source} does not hold a JSON object")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [key for key in ("spatial_dims", "net") if key not in data]
        if missing:
            raise InputRefused(f"{source} lacks {', '.join(missing)}; export the weights again")
        info = cls(
            **{"stage": "model", **{k: v for k, v in data.items() if k in names}},
            extra={k: v for k, v in data.items() if k not in names},
        )
        info.noise_schedule = {**DEFAULT_NOISE_SCHEDULE, **(info.noise_schedule or {})}
        info._check(source)
        return info

    def _check(self, source):
        def refuse(what):
            raise InputRefused(f"{source}: {what}")

        if self.stage not in STAGES:
            refuse(f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.spatial_dims not in (2, 3):
            refuse(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if not isinstance(self.net, dict):
            refuse("net must be a JSON object of network sizes")
        if self.preset is not None and self.preset not in PRESETS:
            refuse(f"names preset {self.preset!r}, which does not exist; presets: {', '.join(PRESETS)}")
        if self.prediction not in PREDICTIONS:
            refuse(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.start not in STARTS:
            refuse(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.base not in BASES:
            refuse(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.base == "flow" and (self.prediction != "residual" or self.spatial_dims != 2):
            refuse("base flow needs prediction residual and spatial_dims 2 (2D+T over flow is not built)")
        channels = self.net.get("conditioning_channels", 2)
        if channels != CONDITIONING_CHANNELS[self.base]:
            refuse(f"base {self.base} conditions on {CONDITIONING_CHANNELS[self.base]} channels, net says {channels}")
        head = self.net.get("flow_correction")
        if head and self.base != "flow":
            refuse(f"a flow_correction head needs base flow, not {self.base}")
        if head and not (isinstance(head, list) and len(head) == 6 and all(isinstance(f, int) and f > 0 for f in head)):
            refuse(f"net.flow_correction must list six positive widths (BasicUNet's), got {head!r}")
        if self.net.get("latent_inputs") and self.prediction != "residual":
            refuse("latent_inputs needs prediction residual (the base's latent is one of the inputs)")
        if self.latent_scale is not None and not _positive(self.latent_scale):
            refuse(f"latent_scale must be a positive number, got {self.latent_scale!r}")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS):
            refuse(f"steps must be a whole number from 1 to {MAX_STEPS}, got {self.steps!r}")
        if self.fallback_below_mm is not None and not _positive(self.fallback_below_mm):
            refuse(f"fallback_below_mm must be a positive number, got {self.fallback_below_mm!r}")
        try:
            make_noise_scheduler(**self.noise_schedule)
        except (TypeError, ValueError, NotImplementedError) as e:
            refuse(f"noise_schedule {self.noise_schedule} cannot be built: {e}")

    @classmethod
    def read(cls, path) -> ModelInfo:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputRefused(f"{path} is not valid JSON ({e}); export the weights again") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def beside(cls, weights_path) -> ModelInfo:
        """The record of a weights file: ``X.json`` beside ``X.pt``."""
        return cls.read(Path(weights_path).with_suffix(".json"))

    def updated(self, **changes) -> ModelInfo:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**data, **self.extra}

    def write(self, path) -> Path:
        text = json.dumps(self.to_dict(), indent=4)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def falls_back(self, gap_mm) -> bool:
        """Is the distance between two neighbours below the range the model was measured to help in?"""
        return narrower_than(gap_mm, self.fallback_below_mm)


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class CaLIDModel:
    """Trained weights ready for inference: the :class:`CaLIDNetwork`, its :class:`ModelInfo`
    and where they were read from."""

    def __init__(self, network: CaLIDNetwork, info: ModelInfo, source: str):
        self.network, self.info, self.source = network, info, source
        self.adaptation = None  # set by bundle.adapt: steps, triplets and seconds spent on the input

    @property
    def temporal(self):
        return self.info.spatial_dims == 3

    @property
    def size_multiple(self):
        """Input sizes must divide by the VAE factor times the U-Net's downsampling."""
        return self.network.denoiser.vae_factor * 2 ** (len(self.info.net["unet_channels"]) - 1)

    def sampler(self, num_steps):
        return self.network.sampler(num_steps)

    def preprocessor(self, stack) -> SlicePreprocessor:
        """Scanner slices of ``stack`` to network inputs and back (scaling, model grid, padding)."""
        return SlicePreprocessor.for_stack(stack, self.info.model_spacing, self.size_multiple)


# ----------------------------------------------------------------------------- training stages


def save_weights(module, path, info: ModelInfo) -> Path:
    """A plain state dict plus its :class:`ModelInfo` beside it (``X.pt`` and ``X.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    info.write(path.with_suffix(".json"))
    return path


def part_of(state, name):
    """The ``name.*`` tensors of an exported ``model.pt`` state dict, without the prefix; a
    state dict with no such keys (one network's own file) is returned as it is."""
    prefix = name + "."
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def init_weights(network, path=None):
    """Warm start: load a plain state dict (fp16 shipped weights too) into ``network``; no-op for None."""
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(part_of(state, "denoiser"))  # an exported model.pt: its denoiser
    return network


def warm_start_over_flow(network, path):
    """Warm-start a denoiser over flow from one trained over linear interpolation (``model.pt``
    or a diffusion state dict): every tensor that fits is copied; tau1's first convolution gets
    the old neighbour filters for the warped neighbours and zeros for the midpoint and its
    weight; the gap embeddings stay zero; the U-Net's output convolution is zeroed, so the
    warm-started model returns the flow midpoint exactly until it learns a correction.
    Weights already trained over flow are loaded as they are; where the new denoiser takes more
    inputs (``latent_inputs``), their filters start at zero, so it still returns what they did."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = part_of(state, "denoiser")
    own = network.state_dict()
    if own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items()):
        network.load_state_dict({k: v.float() for k, v in state.items()})
        return network
    tau1_in = "control.controlnet_cond_embedding.conv_in.conv.weight"
    over_linear = state[tau1_in].shape != own[tau1_in].shape  # its correction is to another base
    for key, value in state.items():
        target = own.get(key)
        if target is None:
            continue
        if target.shape == value.shape:
            target.copy_(value.float())
        elif target.dim() == value.dim() and target.shape[:1] + target.shape[2:] == value.shape[:1] + value.shape[2:]:
            target.zero_()[:, : value.shape[1]] = value.float()  # more input channels: the new ones start at zero
    for key in own:
        if over_linear and key.startswith("unet.out.") and "conv" in key:
            own[key].zero_()
    network.load_state_dict(own)
    return network


def extract_autoencoder(model_dir, out_path) -> Path:
    """The VAE of an exported model folder as a training stage's ``autoencoder.pt`` + record,
    so that a new diffusion stage can be trained on (and exported with) that frozen VAE."""
    folder = check_weights(model_dir)
    info = ModelInfo.read(folder / "model.json")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    vae = {k: v.float() for k, v in part_of(state, "autoencoder").items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: torch.save(vae, tmp))
    trained_on = info.autoencoder_trained_on or info.trained_on
    # the model's net and base together: a net over flow (4 conditioning channels) read with the
    # default base would be refused by the export that reads this record
    ModelInfo(
        "autoencoder",
        info.spatial_dims,
        info.net,
        preset=info.preset,
        trained_on=trained_on,
        prediction=info.prediction,
        base=info.base,
    ).write(out_path.with_suffix(".json"))
    return out_path


def warm_start_latent_scale(weights_path=None, base=None):
    """The latent scale recorded beside warm-start weights (they keep their latent units), else
    None; with ``base``, only if they correct that base (a residual to another base is scaled
    anew from the first batch)."""
    if weights_path is None:
        return None
    info = ModelInfo.beside(weights_path)
    return info.latent_scale if base is None or info.base == base else None


def load_frozen(network, path, device="cpu"):
    """Load trained weights (a plain state dict) into ``network`` and freeze it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights at {path}: run the autoencoder stage first (configs/train_autoencoder.json) "
            f"or point autoencoder_dir at its output folder"
        )
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.to(device).eval().requires_grad_(False)


def best_or_last(output_dir):
    """The diffusion weights to export: ``best.pt`` (best validation gain) if validation ran, else ``diffusion.pt``."""
    best = Path(output_dir) / "best.pt"
    return best if best.is_file() else Path(output_dir) / "diffusion.pt"


def export_model(autoencoder_path, diffusion_path, out_dir, half=True, flow_correction=None) -> Path:
    """Combine a training run's ``autoencoder.pt`` and diffusion weights (``best.pt`` or
    ``diffusion.pt``), each with its record, into ``OUT_DIR/model.pt`` + ``model.json``
    (fp16 by default: half the size, and inference runs in float32 anyway). A denoiser trained
    over a flow-correction head (its record's ``net.flow_correction``) is exported with that
    head (``flow_correction``: the run's copy, :func:`keep_flow_correction`), and only with it."""
    autoencoder_path, diffusion_path, out_dir = Path(autoencoder_path), Path(diffusion_path), Path(out_dir)
    ae_info, info = ModelInfo.beside(autoencoder_path), ModelInfo.beside(diffusion_path)
    last = diffusion_path.with_name("diffusion.json")
    if not info.latent_scale and last.is_file():
        # best.pt saved by the validation of the starting weights, before the first batch set the
        # scale: the scale is the frozen VAE's statistic, the same for the final weights
        info.latent_scale = ModelInfo.read(last).latent_scale
    if ae_info.net.get("vae_channels") != info.net.get("vae_channels"):
        raise InputRefused(f"{autoencoder_path} and {diffusion_path} describe different VAEs")
    if bool(info.net.get("flow_correction")) != (flow_correction is not None):
        raise InputRefused(
            f"{diffusion_path} was trained "
            + ("over a flow-correction head: export it with that head" if flow_correction is None else "without a head")
        )
    state = {}
    for prefix, path in (("autoencoder", autoencoder_path), ("denoiser", diffusion_path)):
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            state[f"{prefix}.{key}"] = value.half() if half and value.is_floating_point() else value
    if flow_correction is not None:
        state, info = _with_head(state, info, read_flow_correction(flow_correction))
    return write_model_folder(out_dir, state, info.updated(stage="model", autoencoder_trained_on=ae_info.trained_on))


def write_model_folder(out_dir, state, info: ModelInfo) -> Path:
    """``OUT_DIR/model.pt`` (the state dict) and ``model.json`` (``info``), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "model.pt", lambda tmp: torch.save(state, tmp))
    info.write(out_dir / "model.json")
    return out_dir


def export_run(run_dir, out_dir, weights=None) -> Path:
    """A diffusion run's folder as a model folder: its VAE (``RUN/autoencoder/autoencoder.pt``),
    ``weights`` (default: :func:`best_or_last`) and its head's copy (``RUN/flow_correction.pt``),
    if it trained over one; the layout ``configs/train_diffusion.json`` writes by default."""
    run = Path(run_dir)
    head = run / "flow_correction.pt"
    return export_model(
        run / "autoencoder" / "autoencoder.pt",
        weights or best_or_last(run),
        out_dir,
        flow_correction=head if head.is_file() else None,
    )


def read_flow_correction(path) -> FlowCorrection:
    """A trained :class:`bundle.networks.FlowCorrection` from ``path``: its plain state dict, or
    a ``model.pt`` holding one (keys ``flow_correction.*``). Refuses anything else."""
    head = FlowCorrection()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head.load_state_dict({k: v.float() for k, v in part_of(state, "flow_correction").items()})
    except Exception as e:  # missing, not a torch file, or a state dict of another network
        detail = (str(e).splitlines() or [""])[0]
        raise InputRefused(f"{path} holds no flow-correction head ({type(e).__name__}: {detail})") from None
    return head


def keep_flow_correction(source, out_path) -> Path:
    """The head in ``source`` (see :func:`read_flow_correction`) as a training run's own plain
    state dict ``out_path``: the run's export and its checkpoints' exports take it from there."""
    head = read_flow_correction(source)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: torch.save(head.state_dict(), tmp))
    return out_path


def _with_head(state, info, head, record=None):
    """``state`` and ``info`` of a model folder with ``head``'s weights (fp16) in place of any older head."""
    state = {k: v for k, v in state.items() if not k.startswith("flow_correction.")}
    state.update({f"flow_correction.{k}": v.half() for k, v in head.state_dict().items()})
    extra = {**info.extra, "flow_correction_record": record} if record else info.extra
    return state, info.updated(net={**info.net, "flow_correction": list(FLOW_CORRECTION_FEATURES)}, extra=extra)


def attach_flow_correction(model_dir, head_path, out_dir, record=None) -> Path:
    """A model folder over flow plus a trained :class:`bundle.networks.FlowCorrection` (a plain
    state dict, ``head_path``) as a new folder ``out_dir``: the same weights with the head's
    (keys ``flow_correction.*``, fp16) and ``net.flow_correction`` set, ``record`` (a dict:
    how the head was trained and chosen) kept as ``flow_correction_record``. Refuses a head
    that does not fit, a model not over flow, and an ``out_dir`` that already holds weights."""
    folder, out_dir = check_weights(model_dir), Path(out_dir)
    taken = [name for name in WEIGHT_FILES if (out_dir / name).exists()]
    if taken:
        raise InputRefused(f"{out_dir} already holds {', '.join(taken)}: choose a new folder")
    info = ModelInfo.read(folder / "model.json")
    if info.base != "flow":
        raise InputRefused(f"{folder}: a flow-correction head needs a model over flow, this one is base {info.base}")
    head = read_flow_correction(head_path)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    state, info = _with_head(state, info, head, record)
    return write_model_folder(out_dir, state, info)


# ----------------------------------------------------------------------------- inference


def check_weights(weights_dir=None) -> Path:
    """The weights folder (default: the bundle's ``models/``), refusing one that lacks a file or
    whose ``model.json`` this bundle refuses: callers check before any work or any folder is made."""
    return _checked(weights_dir)[0]


def _checked(weights_dir):
    """:func:`check_weights`' folder and the :class:`ModelInfo` it read there."""
    folder = Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise InputRefused(
            f"no CaLID weights in {folder}: missing {', '.join(missing)}. Train them (README: Training; the "
            f"diffusion stage writes OUTPUT_DIR/model) or pass --weights DIR with {' and '.join(WEIGHT_FILES)}; "
            f"--method flow or linear needs no weights"
        )
    return folder, ModelInfo.read(folder / "model.json")


def load_state(network: CaLIDNetwork, weights_dir=None) -> CaLIDNetwork:
    """Load ``model.pt`` into ``network`` (built from the folder's ``model.json``); a damaged or
    unfitting file is refused naming it."""
    return _load_state(network, check_weights(weights_dir))


def _load_state(network: CaLIDNetwork, folder: Path) -> CaLIDNetwork:
    """:func:`load_state` from a folder already checked."""
    try:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding more than tensors
        raise InputRefused(
            f"{folder / 'model.pt'} cannot be read as weights ({type(e).__name__}); the file is damaged or not "
            f"a state dict of tensors: download or export it again"
        ) from None
    try:
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as e:
        raise InputRefused(
            f"{folder / 'model.pt'} does not fit the network described in model.json: {str(e).splitlines()[0]}"
        ) from None
    return network


def load_model(weights_dir=None, device="cpu") -> CaLIDModel:
    """Load ``model.pt`` + ``model.json`` from ``weights_dir`` (default: the bundle's
    ``models/``). Errors name the file that is missing or does not fit."""
    folder, info = _checked(weights_dir)
    if not info.latent_scale:
        raise InputRefused(f"{folder / 'model.json'} has no latent_scale")
    try:
        network = CaLIDNetwork.from_info(info)
    except (KeyError, TypeError, ValueError) as e:
        raise InputRefused(f"{folder / 'model.json'} does not describe a network this bundle builds: {e}") from None
    return CaLIDModel(_load_state(network, folder).to(device).eval(), info, str(folder))
