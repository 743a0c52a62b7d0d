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
from .options import as_flag

logger = logging.getLogger("calid")


def _describe(stack, label):
    x, y, z, t = stack.shape
    sx, sy = stack.pixel_spacing
    affine = np.array2string(stack.affine, precision=4, suppress_small=True, max_line_width=120)
    return (
        f"{label}: {x} x {y} pixels, {z} slices, {t} phase(s); pixel {sx:.4f} x {sy:.4f} mm, "
        f"slice step {stack.slice_spacing:.4f} mm\naffine (RAS):\n{affine}"
    )


def _refuse_model_options(method, weights=None, steps=None, refine=False, **_):
    """Options of the learned model given with another method would be silently ignored."""
    if method != "calid" and (weights is not None or steps is not None or as_flag(refine, "--refine")):
        raise InputRefused(
            f"--weights, --steps and --refine are for --method calid; --method {method} does not use a model"
        )


class Commands:
    """CaLID: dense short-axis cine volumes from sparse stacks."""

    def convert(self, dicom_dir, output, series_uid=None, overwrite=False):
        """Convert a DICOM SAX cine folder to NIfTI with the exact geometry."""
        if not Path(dicom_dir).is_dir():
            raise InputRefused(f"{dicom_dir} is not a DICOM folder")
        overwrite = as_flag(overwrite, "--overwrite")
        check_output_path(output, inputs=[dicom_dir], overwrite=overwrite)
        stack = read_sax(dicom_dir, series_uid=series_uid)
        write_nifti(stack, output, overwrite=overwrite, inputs=[dicom_dir])
        print(_describe(stack, f"wrote {output}"))

    def upsample(
        self,
        input,
        output,
        factor=2,
        method="flow",
        steps=None,
        refine=False,
        samples=1,
        seed=0,
        device="auto",
        weights=None,
        preview=None,
        overwrite=False,
        series_uid=None,
        phase=0,
        chunk_size=None,
        precision="auto",
    ):
        """Upsample one stack: INPUT (NIfTI or DICOM folder) by FACTOR (a power of two) along the slices.

        Writes OUTPUT (NIfTI): (Z - 1) * FACTOR + 1 slices, same in-plane grid, acquired slices
        unchanged. Refuses bad input with exit code 2 before any work, writing nothing.

        Args:
            input: a NIfTI stack (3D or 4D cine) or a DICOM folder.
            output: the dense stack to write (.nii or .nii.gz); never overwritten without --overwrite.
            factor: a power of two: 2 halves the slice step, 4 quarters it.
            method: flow (motion-compensated midpoints, the default, no weights), calid (the learned
                model; flow between neighbours closer than its fallback_below_mm) or linear.
            steps: calid only: DDIM steps (default: the model's setting in model.json).
            refine: calid only: CaLID+, start from the slerp of the neighbours' inverted latents.
            samples: calid only: write the mean of N draws, and their standard deviation as OUTPUT_std.nii.gz.
            seed: calid only: the seed of the generated slices' starting noise.
            device: auto (CUDA if present), cpu, cuda or cuda:N.
            weights: calid only: a folder with model.pt and model.json (default: the bundle's models/).
            preview: a PNG of acquired and generated slices and long-axis reslices.
            overwrite: replace an existing OUTPUT (and preview).
            series_uid: the DICOM series to use when a folder holds several.
            phase: the cine phase shown in the preview.
            chunk_size: calid only: slices generated per batch (default 8 on CPU, 64 on CUDA).
            precision: auto, fp32, bf16 or fp16 (autocast on CUDA; CPU runs fp32 unless bf16).
        """
        from .upsample import upsample_file

        _refuse_model_options(method, weights=weights, steps=steps, refine=refine)
        stack, dense, seconds = upsample_file(
            input,
            output,
            factor,
            method,
            num_inference_steps=steps,
            refine=refine,
            samples=samples,
            seed=seed,
            device=device,
            weights_dir=weights,
            preview_path=preview,
            overwrite=overwrite,
            series_uid=series_uid,
            phase=phase,
            chunk_size=chunk_size,
            precision=precision,
        )
        label = dense.meta["method"] + (f", {dense.meta['steps']} steps" if "steps" in dense.meta else "")
        print(_describe(stack, f"input {input}"))
        print(_describe(dense, f"wrote {output} ({label}, x{factor})"))
        print(f"runtime: {seconds:.2f} s")
        if int(samples) > 1:
            from .upsample import std_map_path

            print(f"per-voxel standard deviation of {samples} samples: {std_map_path(output)}")
        if preview is not None:
            print(f"preview: {preview}")

    def upsample_batch(self, source, out_dir, factor=2, memory_budget_mb=None, **options):
        """Upsample a whole cohort, resumably, optionally over several processes.

        Upsamples every study of SOURCE (a folder of NIfTI files and DICOM folders, e.g. one
        written by `calid phantom`, or a datalist JSON) into OUT_DIR as STUDY_xF.nii.gz.

        Run it as is, or under `torchrun --nproc_per_node=N` to shard the studies over N
        processes (one device each). Studies whose output exists are skipped (outputs are
        written atomically); a study that fails is recorded in failures-RUN.jsonl and the run
        goes on; manifest-RUN.jsonl lists every study. Exit code 1 if any study failed.
        --memory-budget-mb bounds each study's working memory. Every option of `calid upsample`
        (--method, --steps, --refine, --samples, --seed, --device, --weights, ...) applies.
        """
        from .batch import distributed_batch

        if "preview" in options:
            raise InputRefused("--preview is for one study: use calid upsample")
        _refuse_model_options(**{"method": "flow", **options})
        renamed = {"steps": "num_inference_steps", "weights": "weights_dir"}
        options = {renamed.get(k, k): v for k, v in options.items()}
        failed, counts = distributed_batch(source, out_dir, factor, memory_budget_mb=memory_budget_mb, **options)
        print(f"this process: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
        if failed:
            print(f"calid: {failed} stud{'y' if failed == 1 else 'ies'} failed; see failures-*.jsonl in {out_dir}")
            sys.exit(1)

    def evaluate(
        self,
        out_dir,
        studies=(),
        phantom=None,
        weights=None,
        steps=1,
        seed=0,
        device="cpu",
        sweep_steps=(1, 2, 4, 8, 16, 32),
        sweep_phases=4,
        segment_train=(),
        segment_iterations=600,
        alexnet_weights=None,
        overwrite=False,
        fallback=True,
        perceptual=True,
        reference=True,
        labelled_stacks=None,
        heart_mm=80.0,
    ):
        """Evaluate every method against the truth: real studies, labelled stacks, phantoms.

        Compares linear interpolation, flow midpoints and the TV-L1 reference (scikit-image, slow;
        --noreference skips it), and with --weights linear and slerp in the VAE's latent space,
        CaLID and CaLID+, with the truth: leave-one-out on real STUDIES (folders
        with dicom/ and, for the heart region, Sunnybrook contours/), every phase; a DDIM steps
        sweep on --sweep-phases phases; with --segment-train STUDIES a U-Net trained on their
        contours segments every contoured leave-one-out slice (Dice, ASD); x4 per bisection level
        on a `calid phantom` folder. --nofallback uses the model at every gap, ignoring the
        narrowest gap it is shipped for; --noperceptual skips LPIPS and rFID (slow on a CPU);
        --labelled-stacks DIR adds leave-one-out on every NAME.nii.gz there with NAME_labels.nii.gz
        for the heart region, each slice normalised on its own (the Sunnybrook ED/ES stacks);
        --heart-mm sets the side of the heart-region square (default 80 mm).
        Writes OUT_DIR/report.json, report.md and figures/."""
        from .evaluate import evaluate

        def as_list(value):
            return [value] if isinstance(value, (str, int)) else list(value or ())

        evaluate(
            out_dir,
            as_list(studies),
            phantom,
            weights,
            steps=steps,
            seed=seed,
            device=device,
            sweep_steps=as_list(sweep_steps),
            sweep_phases=sweep_phases,
            segment_train=as_list(segment_train),
            segment_iterations=segment_iterations,
            alexnet_weights=alexnet_weights,
            overwrite=overwrite,
            fallback=fallback,
            perceptual=perceptual,
            reference=reference,
            labelled_stacks=labelled_stacks,
            heart_mm=float(heart_mm),
        )
        print((Path(out_dir) / "report.md").read_text())

    def package(self, out_dir, overwrite=False, update_hashes=False):
        """Build the model-zoo zip after the zoo's offline checks.

        Writes OUT_DIR/calid_cmr_interpolation_vVERSION.zip once the checks pass (required files,
        version in changelog, file sizes, large_files.yml hashes). --update-hashes rewrites
        large_files.yml from the current weights first."""
        import json

        from .package import package, write_large_files

        if as_flag(update_hashes, "--update-hashes"):
            print(f"wrote {write_large_files()}")
        _, report = package(out_dir, overwrite=as_flag(overwrite, "--overwrite"))
        print(json.dumps(report, indent=2))

    def plot_training(self, output, *run_dirs, title=""):
        """Plot training runs (loss and validation gain) as a PNG.

        Each RUN_DIR's loss (train_log.csv) and validation PSNR
        against linear (validation.csv), side by side."""
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
        """Write SUBJECTS phantom subjects to OUT_DIR: sparse stack, dense truth, labels."""
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

    def train_speed(self, preset="cpu", iterations=3, device="auto", temporal=False, batch_size=None):
        """Benchmark training: parameter counts and seconds per iteration of both stages."""
        import json

        from .benchmark import training_speed

        temporal = as_flag(temporal, "--temporal")
        result = training_speed(preset, iterations=iterations, device=device, temporal=temporal, batch_size=batch_size)
        print(json.dumps(result, indent=2))

    def benchmark(self, **options):
        """Benchmark upsampling: wall time and peak memory, batched vs a per-slice loop.

        Upsamples a phantom cine (default 12 slices x
        20 phases x 256x256, x4, 8 steps), batched vs a per-slice loop. Options (defaults):
        --method calid (the learned model) or flow (flow midpoints; no model options),
        --preset cpu (random weights of a preset) or --weights DIR, --temporal False,
        --slices 12, --phases 20, --size 256, --factor 4, --steps 8, --device auto,
        --chunk-size (64 on CUDA, 8 on CPU), --loop True, --precision auto."""
        import json

        from .benchmark import inference_speed

        options["preset_name"] = options.pop("preset", "cpu")
        for name in ("temporal", "loop"):
            if name in options:
                options[name] = as_flag(options[name], f"--{name}")
        print(json.dumps(inference_speed(**options), indent=2))


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_flags(argv):
    """Refuse an option the command does not have before anything runs (fire would run the
    command with the options it knows, then complain about the rest). Commands that pass
    options on (upsample-batch, benchmark) check them themselves, also before any work."""
    import inspect

    if not argv or argv[0].startswith("-"):
        return
    command = getattr(Commands, argv[0].replace("-", "_"), None)
    if command is None:
        return  # fire lists the commands
    params = inspect.signature(command).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
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


def main(argv=None):
    import fire

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
