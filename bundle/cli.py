"""The ``calid`` command line (python-fire). Every command refuses bad input with a message
on stderr and exit code 2, writing nothing."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import InputRefused
from .io import check_output_path, read_sax, write_nifti
from .options import UpsampleOptions, as_flag

logger = logging.getLogger("calid")


def _describe(stack, label):
    x, y, z, t = stack.shape
    sx, sy = stack.pixel_spacing
    affine = np.array2string(stack.affine, precision=4, suppress_small=True, max_line_width=120)
    return (
        f"{label}: {x} x {y} pixels, {z} slices, {t} phase(s); pixel {sx:.4f} x {sy:.4f} mm, "
        f"slice step {stack.slice_spacing:.4f} mm\naffine (RAS):\n{affine}"
    )


class Commands:
    """CaLID: dense short-axis cine volumes from sparse stacks."""

    def convert(self, dicom_dir, output, series_uid=None, overwrite=False):
        """Convert a DICOM SAX cine folder to NIfTI with the exact geometry.

        Args:
            dicom_dir: a folder of DICOM files (searched recursively) with one SAX cine series.
            output: the NIfTI file to write (.nii or .nii.gz).
            series_uid: the series to use when the folder holds several.
            overwrite: replace an existing OUTPUT.
        """
        if not Path(dicom_dir).is_dir():
            raise InputRefused(f"{dicom_dir} is not a DICOM folder")
        overwrite = as_flag(overwrite, "--overwrite")
        check_output_path(output, inputs=[dicom_dir], overwrite=overwrite)
        stack = read_sax(dicom_dir, series_uid=series_uid)
        write_nifti(stack, output, overwrite=overwrite, inputs=[dicom_dir])
        print(_describe(stack, f"wrote {output}"))

    def upsample(self, input, output, preview=None, series_uid=None, phase=0, **options):
        """Upsample one stack: INPUT (NIfTI or DICOM folder) by --factor (a power of two) along the slices.

        Writes OUTPUT (NIfTI): (Z - 1) * FACTOR + 1 slices, same in-plane grid, acquired slices
        unchanged. Refuses bad input with exit code 2 before any work, writing nothing.

        Args:
            input: a NIfTI stack (3D or 4D cine) or a DICOM folder.
            output: the dense stack to write (.nii or .nii.gz); never overwritten without --overwrite.
            preview: a PNG of acquired and generated slices and long-axis reslices.
            series_uid: the DICOM series to use when a folder holds several.
            phase: the cine phase shown in the preview.
        {options}
        """
        from .pipeline import std_map_path, upsample_file

        opts = UpsampleOptions.of(**options)
        stack, dense, seconds = upsample_file(
            input, output, opts, preview_path=preview, series_uid=series_uid, phase=phase
        )
        label = dense.meta["method"] + (f", {dense.meta['steps']} steps" if "steps" in dense.meta else "")
        print(_describe(stack, f"input {input}"))
        print(_describe(dense, f"wrote {output} ({label}, x{opts.factor})"))
        print(f"runtime: {seconds:.2f} s")
        if opts.samples > 1:
            print(f"per-voxel standard deviation of {opts.samples} samples: {std_map_path(output)}")
        if preview is not None:
            print(f"preview: {preview}")

    def upsample_batch(self, source, out_dir, **options):
        """Upsample a whole cohort, resumably, optionally over several processes.

        Upsamples every study of SOURCE (a folder of NIfTI files and DICOM folders, e.g. one
        written by `calid phantom`, or a datalist JSON) into OUT_DIR as STUDY_xF.nii.gz.

        Run it as is, or under `torchrun --nproc_per_node=N` to shard the studies over N
        processes (one device each). Studies whose output exists are skipped (outputs are
        written atomically); a study that fails is recorded in failures-RUN.jsonl and the run
        goes on; manifest-RUN.jsonl lists every study. Exit code 1 if any study failed.

        Args:
            source: a folder of studies (NIfTI files, DICOM folders) or a Decathlon-style datalist JSON.
            out_dir: the folder for the outputs, manifests and failure records (not inside SOURCE).
        {options}
        """
        from .batch import distributed_batch

        failed, counts = distributed_batch(source, out_dir, UpsampleOptions.of(**options))
        print(f"this process: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
        if failed:
            print(f"calid: {failed} stud{'y' if failed == 1 else 'ies'} failed; see failures-*.jsonl in {out_dir}")
            sys.exit(1)

    def evaluate(self, out_dir, **options):
        """Evaluate every method against the truth: real studies, labelled stacks, phantoms."""
        from .evaluate import evaluate

        evaluate(out_dir, **options)
        print((Path(out_dir) / "report.md").read_text())

    def attach_flow_correction(self, model_dir, head, out_dir, record=None):
        """Add a trained flow-correction head to a model over flow, as a new model folder.

        The head (bundle.networks.FlowCorrection, trained by docs/experiments/regression_over_flow.py
        --head flow) moves and blends the flow midpoint's pixels before the denoiser corrects it.

        Args:
            model_dir: a model folder over flow (model.pt, model.json), e.g. models.
            head: the head's weights, a plain state dict (that script's OUT/best.pt).
            out_dir: the new model folder (refused if it already holds weights).
            record: a JSON file on how the head was trained and chosen (that script's
                OUT/report.json), kept in model.json as flow_correction_record.
        """
        import json

        from .weights import attach_flow_correction

        data = None
        if record is not None:
            try:
                data = json.loads(Path(record).read_text())
            except (OSError, ValueError) as e:
                raise InputRefused(f"--record {record} cannot be read as JSON ({e})") from None
            if not isinstance(data, dict):
                raise InputRefused(f"--record {record} does not hold a JSON object")
            data.pop("history", None)  # the validation curve stays in the run's folder
        if not Path(head).is_file():
            raise InputRefused(f"no head weights at {head}")
        print(f"wrote {attach_flow_correction(model_dir, head, out_dir, record=data)}")

    def package(self, out_dir, overwrite=False, update_hashes=False):
        """Build the model-zoo zip after the zoo's offline checks.

        Writes OUT_DIR/calid_cmr_interpolation_vVERSION.zip once the checks pass (required files,
        version in changelog, file sizes, large_files.yml hashes).

        Args:
            out_dir: the folder for the zip.
            overwrite: replace an existing zip of this version.
            update_hashes: rewrite large_files.yml from the current weights first.
        """
        import json

        from .package import package, write_large_files

        if as_flag(update_hashes, "--update-hashes"):
            print(f"wrote {write_large_files()}")
        _, report = package(out_dir, overwrite=as_flag(overwrite, "--overwrite"))
        print(json.dumps(report, indent=2))

    def plot_training(self, output, *run_dirs, title=""):
        """Plot training runs (loss and validation gain) as a PNG.

        Each RUN_DIR's loss (train_log.csv) and validation PSNR against linear (validation.csv),
        side by side.

        Args:
            output: the PNG to write (refused if it exists).
            run_dirs: training output folders.
            title: the figure's title.
        """
        from .preview import plot_training_logs

        if Path(output).exists():
            raise InputRefused(f"{output} exists; choose another name")
        print(plot_training_logs(run_dirs, output, title=title))

    def phantom(
        self,
        out_dir,
        subjects=4,
        seed=0,
        size=128,
        slices=11,
        phases=10,
        slice_spacing=8.0,
        dense_factor=8,
        pixel_spacing=1.25,
        overwrite=False,
    ):
        """Write phantom subjects: sparse stack, dense truth and labels for each.

        Args:
            out_dir: the folder to write (NAME.nii.gz, NAME_truth.nii.gz, NAME_labels.nii.gz).
            subjects: how many subjects.
            seed: the seed of the set (subject k is drawn from seed and k).
            size: in-plane size (pixels).
            slices: slices of the sparse stack.
            phases: cine phases.
            slice_spacing: distance between the sparse slices (mm).
            dense_factor: the truth has this many times more slices.
            pixel_spacing: in-plane pixel size (mm).
            overwrite: replace existing files.
        """
        from .phantom import write_phantom_dataset

        out = write_phantom_dataset(
            out_dir,
            subjects=subjects,
            seed=seed,
            overwrite=as_flag(overwrite, "--overwrite"),
            size=size,
            num_slices=slices,
            num_phases=phases,
            sparse_spacing=slice_spacing,
            dense_factor=dense_factor,
            pixel_spacing=pixel_spacing,
        )
        print(f"wrote {subjects} phantom subject(s) to {out}")

    def train_speed(self, **options):
        """Benchmark training: parameter counts and seconds per iteration of both stages."""
        import json

        from .benchmark import training_speed

        print(json.dumps(training_speed(**options), indent=2))

    def benchmark(self, **options):
        """Benchmark upsampling: wall time and peak memory on a phantom cine, batched vs a per-slice loop."""
        import json

        from .benchmark import inference_speed

        print(json.dumps(inference_speed(**options), indent=2))


def _with_upsample_options(command):
    """A command taking ``**options`` gets the fields of :class:`UpsampleOptions` as its flags:
    in its signature (fire's parsing and help, the misspelling check) and its ``Args``."""
    import dataclasses
    import inspect

    signature = inspect.signature(command)
    fixed = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    options = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(UpsampleOptions)
    ]
    command.__signature__ = signature.replace(parameters=fixed + options)
    command.__doc__ = command.__doc__.replace("        {options}", UpsampleOptions.help(indent=" " * 12))


_with_upsample_options(Commands.upsample)
_with_upsample_options(Commands.upsample_batch)


def _as_function(command, function):
    """A command that only calls ``function`` takes its signature and description from it."""
    import inspect

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p in inspect.signature(function).parameters.values():  # options by name: the command takes **options
        parameters.append(p if p.default is inspect.Parameter.empty else p.replace(kind=p.KEYWORD_ONLY))
    command.__signature__ = inspect.signature(function).replace(parameters=parameters)
    command.__doc__ = function.__doc__


def _bind_functions():  # these commands' options are described once, in the functions they call
    from .benchmark import inference_speed, training_speed
    from .evaluate import evaluate

    _as_function(Commands.evaluate, evaluate)
    _as_function(Commands.benchmark, inference_speed)
    _as_function(Commands.train_speed, training_speed)


_bind_functions()


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_flags(argv):
    """Refuse an option the command does not have before anything runs (fire would run the
    command with the options it knows, then complain about the rest)."""
    import inspect

    if not argv or argv[0].startswith("-"):
        return
    command = getattr(Commands, argv[0].replace("-", "_"), None)
    if command is None:
        return  # fire lists the commands
    params = inspect.signature(command).parameters
    names = [name for name in params if name != "self"]
    for token in argv[1:]:
        if token == "--":
            break
        if token.startswith("-") and not token.startswith("--") and not _is_number(token):
            raise InputRefused(f"short options such as {token} are not supported; write the option out (--factor, ...)")
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in names or (name.startswith("no") and name[2:] in names) or name == "help":
            continue
        valid = ", ".join("--" + n.replace("_", "-") for n in names)
        raise InputRefused(f"calid {argv[0]} has no option {token.split('=', 1)[0]}; its options: {valid}")


def command_list() -> str:
    """``calid --help``: every command with the first line of its description."""
    import inspect

    lines = [f"calid: {Commands.__doc__.strip()}", "", "usage: calid COMMAND [ARGS] [--OPTIONS]", "", "commands:"]
    for name, function in inspect.getmembers(Commands, inspect.isfunction):
        if not name.startswith("_"):
            summary = inspect.getdoc(function).splitlines()[0]
            lines.append(f"  {name.replace('_', '-'):<16}{summary}")
    lines += ["", "calid COMMAND --help describes a command and its options."]
    return "\n".join(lines)


def _help_as_documented():
    """fire's help as the README writes options: --chunk-size, and no short flags (refused)."""
    import fire.helptext as helptext

    if getattr(helptext, "_calid", False):
        return
    create = helptext._CreateFlagItem

    def dashed(flag, *args, **kwargs):
        dashes = flag.replace("_", "-")
        kwargs["flag_string"] = kwargs.get("flag_string") or f"--{dashes}={dashes.upper()}"
        return create(flag, *args, **kwargs)

    helptext._CreateFlagItem, helptext._GetShortFlags, helptext._calid = dashed, lambda flags: [], True


def main(argv=None):
    import fire

    _help_as_documented()
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(command_list())
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # header warnings (invalid UIDs and the like) as one log line each, without source lines
    warnings.showwarning = lambda message, *args, **kwargs: logger.warning("%s", message)
    try:
        check_flags(args)
        fire.Fire(Commands, command=args, name="calid")
    except InputRefused as e:
        print(f"calid: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
