"""Options as users give them: one list of upsampling options, with one set of names, defaults,
descriptions and checks, for `calid upsample`, `calid upsample-batch`, the bundle's inference
configs and the MONAI Label task; and the yes/no values of the command line and bundle overrides.
"""

from __future__ import annotations

import dataclasses

from .devices import PRECISIONS
from .errors import InputRefused
from .sampling import MAX_STEPS
from .temporal import DEFAULT_FRACTION, FUSE_FROM_MM

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

METHODS = ("flow", "calid", "linear")
# the learned model where it was measured to beat flow (gaps of its fallback_below_mm or more:
# since 0.8.0, docs/README.md "The decision"), flow midpoints between closer neighbours
DEFAULT_METHOD = "calid"
MODEL_OPTIONS = ("steps", "refine", "samples", "weights", "adapt")  # only the learned model reads them


def as_flag(value, name) -> bool:
    """A yes/no option from Python, the command line or a bundle override (which arrive as
    strings, where "false" would be truthy): true/false, 1/0, yes/no, on/off in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InputRefused(f"{name} must be true or false (or 1/0, yes/no), got {value!r}")


def _option(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class UpsampleOptions:
    """How to upsample a stack. Built from Python, the command line (``--chunk-size`` for
    ``chunk_size``), a bundle config or override, or a MONAI Label request; every value is
    checked here, once, before any work starts."""

    factor: int = _option(4, "a power of two: 2 halves the slice step, 4 quarters it")
    method: str = _option(
        DEFAULT_METHOD,
        "calid (the learned model; flow between neighbours closer than its fallback_below_mm, 16 mm for the "
        "shipped weights), flow (motion-compensated midpoints, no weights) or linear",
    )
    phase_fusion: float = _option(
        DEFAULT_FRACTION,
        "flow and calid: average each new slice with its motion-compensated copies at the phases within this "
        f"fraction of the cardiac cycle before and after it, between neighbours {FUSE_FROM_MM:g} mm apart or more "
        "(the cine taken as one cycle; 0: off)",
    )
    steps: int | None = _option(None, "calid only: DDIM steps, 1 to 1000 (default: the model's setting in model.json)")
    refine: bool = _option(False, "calid only: CaLID+, start from the slerp of the neighbours' inverted latents")
    samples: int = _option(1, "calid only: the mean of N draws, and their standard deviation as OUTPUT_std.nii.gz")
    seed: int = _option(0, "the seed of the generated slices' starting noise (calid)")
    weights: str | None = _option(None, "calid only: a folder with model.pt and model.json (default: models/)")
    adapt: int = _option(
        0,
        "calid only, experimental: first fine-tune a copy of the model (its flow-correction head, else its denoiser) "
        "for N steps on the input's own slices, each from its two neighbours (a model over flow; 0: off; skipped where "
        "flow fills every gap; measured to lower quality so far, see docs/README.md)",
    )
    device: str = _option("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    precision: str = _option("auto", "auto, fp32, bf16 or fp16 (autocast on CUDA; the CPU runs fp32 unless bf16)")
    chunk_size: int | None = _option(None, "calid only: slices generated per batch (default 8 on CPU, 64 on CUDA)")
    memory_budget_mb: float | None = _option(
        None, "bound the working memory: phases in groups that fit, output arrays memory-mapped beyond it"
    )
    overwrite: bool = _option(False, "replace existing outputs (never the input)")

    def __post_init__(self):
        try:
            self.factor = _whole(self.factor, "factor", 1)
            if self.factor & (self.factor - 1):
                raise InputRefused("")
        except InputRefused:
            raise InputRefused(
                f"factor must be a power of two (1, 2, 4, 8, ...), got {self.factor!r}; other factors are not supported"
            ) from None
        if self.method not in METHODS:
            raise InputRefused(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        self.refine, self.overwrite = as_flag(self.refine, "refine"), as_flag(self.overwrite, "overwrite")
        self.samples, self.seed = _whole(self.samples, "samples", 1), _whole(self.seed, "seed", 0)
        self.adapt = _whole(self.adapt, "adapt", 0)
        self.phase_fusion = _fraction(self.phase_fusion, "phase fusion")
        if self.method == "linear" and self.phase_fusion not in (0, DEFAULT_FRACTION):
            raise InputRefused("phase fusion is for methods flow and calid; linear interpolation does not fuse phases")
        if self.steps is not None:
            self.steps = _whole(self.steps, "steps", 1, MAX_STEPS)
        if self.chunk_size is not None:
            self.chunk_size = _whole(self.chunk_size, "chunk size", 1)
        if self.precision not in PRECISIONS:
            raise InputRefused(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.memory_budget_mb is not None and not _number(self.memory_budget_mb) > 0:
            raise InputRefused(f"memory budget must be a positive number of MB, got {self.memory_budget_mb!r}")
        given = [name for name in MODEL_OPTIONS if getattr(self, name) != getattr(UpsampleOptions, name)]
        if self.method != "calid" and given:
            raise InputRefused(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for method calid; method {self.method} "
                f"does not use a model (they would be ignored)"
            )

    @classmethod
    def of(cls, options=None, **values) -> UpsampleOptions:
        """``options`` as they are, or built from ``values`` (not both); unknown names refused."""
        if options is not None:
            if values:
                raise TypeError("give an UpsampleOptions or option values, not both")
            return options if isinstance(options, cls) else cls.of(**dict(options))
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise InputRefused(f"unknown option(s) {', '.join(unknown)}; options: {', '.join(cls.names())}")
        return cls(**values)

    @classmethod
    def names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls, indent="    ") -> str:
        """One line per option, as the CLI's help shows them (Google-style ``Args``)."""
        return "\n".join(f"{indent}{f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def levels(self) -> int:
        """Bisection levels: log2(factor)."""
        return self.factor.bit_length() - 1


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _as_number(value):
    """A number from a number or a numeric string (a bundle override); nan for anything else."""
    try:
        return float(value) if isinstance(value, str) else _number(value)
    except ValueError:
        return float("nan")


def _fraction(value, name):
    """A number in [0, 0.5) from a number or a numeric string (a bundle override)."""
    number = _as_number(value)
    if not 0 <= number < 0.5:
        raise InputRefused(f"{name} must be a fraction of the cycle from 0 to below 0.5, got {value!r}")
    return number


def _whole(value, name, low, high=float("inf")):
    """An int from an int or a whole-number string (a bundle override), within [low, high]."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        bounds = f"from {low} to {high}" if high != float("inf") else f"of at least {low}"
        raise InputRefused(f"{name} must be a whole number {bounds}, got {value!r}")
    return value
