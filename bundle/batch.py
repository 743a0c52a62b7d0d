"""Cohort-scale upsampling: many studies, sharded over torch.distributed ranks.

Each rank takes every ``world_size``-th study of the sorted list and runs the same
:func:`bundle.pipeline.upsample_file` as ``calid upsample``, one study at a time. Outputs are
written atomically, so a study whose output exists is complete and is skipped on a rerun; a
study that fails is recorded with its error and the run goes on. Every run writes a manifest
(JSON lines: input, output, shape, spacing, seconds, status) and a failures file.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path

from .errors import InputRefused
from .io import NIFTI_SUFFIXES
from .options import UpsampleOptions
from .studies import batch_inputs, study_name

logger = logging.getLogger(__name__)


def output_for(study, out_dir, factor) -> Path:
    return Path(out_dir) / f"{study_name(study)}_x{factor}.nii.gz"


def remove_partial_files(out_dir):
    """Delete what a killed run left half-written: temporary files of the atomic writes and
    memory maps (hidden names, never mistaken for outputs)."""
    import shutil

    removed = []
    for path in Path(out_dir).glob(".*"):
        if path.is_dir() and path.name.startswith(".calid-memmap-"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file() and ".part" in path.name and path.name.endswith(NIFTI_SUFFIXES):
            path.unlink()
            removed.append(path)
    return removed


def _append_json_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_batch(source, out_dir, options: UpsampleOptions, rank=0, world_size=1, run_id=None, progress=True):
    """Upsample this rank's share of ``source`` into ``out_dir``; returns (done, skipped, failed)."""
    from tqdm.auto import tqdm

    from .pipeline import upsample_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = batch_inputs(source)
    mine = studies[rank::world_size]
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
    manifest = out_dir / f"manifest-{run_id}.rank{rank}.jsonl"
    failures = out_dir / f"failures-{run_id}.rank{rank}.jsonl"
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for study in tqdm(mine, desc=f"rank {rank} studies", disable=not progress):
        output = output_for(study, out_dir, options.factor)
        record = {"input": str(study), "output": str(output), "rank": rank}
        start = time.perf_counter()
        if output.exists() and not options.overwrite:
            record.update(status="skipped", reason="output exists (outputs are written atomically)")
            counts["skipped"] += 1
        else:
            try:
                _, dense, _ = upsample_file(study, output, options, progress=False)
                record.update(status="done", shape=list(dense.shape), spacing=_spacing(dense))
                counts["done"] += 1
            except Exception as e:  # fault isolation: record and go on, whatever the error
                record.update(status="failed", error=f"{type(e).__name__}: {e}")
                _append_json_line(failures, {**record, "traceback": traceback.format_exc()})
                logger.error("%s failed: %s", study, record["error"])
                counts["failed"] += 1
        record["seconds"] = round(time.perf_counter() - start, 3)
        _append_json_line(manifest, record)
    return counts


def _spacing(stack):
    return [round(v, 4) for v in (*stack.pixel_spacing, stack.slice_spacing)]


def merge_rank_files(out_dir, run_id, world_size):
    """Concatenate the ranks' manifests and failures into ``manifest-RUN.jsonl`` and
    ``failures-RUN.jsonl`` (rank 0, after all ranks are done)."""
    out_dir = Path(out_dir)
    for kind in ("manifest", "failures"):
        lines = []
        for rank in range(world_size):
            part = out_dir / f"{kind}-{run_id}.rank{rank}.jsonl"
            if part.exists():
                lines.extend(part.read_text().splitlines())
                part.unlink()
        (out_dir / f"{kind}-{run_id}.jsonl").write_text("".join(line + "\n" for line in lines))
    return out_dir / f"manifest-{run_id}.jsonl"


def check_batch_folders(source, out_dir):
    """Refuse an output folder that is the source folder or inside it: a second run would take
    the first run's outputs (STUDY_x2.nii.gz) for studies and upsample them again."""
    source, out = Path(source).resolve(), Path(out_dir).resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise InputRefused(
            f"the output folder {out_dir} is (inside) the source folder {source}: its outputs would be read as "
            f"studies on the next run; choose a folder outside it"
        )


def distributed_batch(source, out_dir, options: UpsampleOptions | None = None, **values):
    """Entry point for one process or each ``torchrun`` rank: shard, run, merge, and return
    the number of failed studies over all ranks (the exit code's business). Options: an
    :class:`UpsampleOptions` or its values as keywords, checked before any study is touched."""
    import dataclasses

    import torch
    import torch.distributed as dist

    options = UpsampleOptions.of(options, **values)
    check_batch_folders(source, out_dir)
    if options.method == "calid":
        from .weights import check_weights

        check_weights(options.weights)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    if distributed and torch.cuda.is_available() and options.device in ("auto", "cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        options = dataclasses.replace(options, device=f"cuda:{local_rank}")
    run_id = [time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"]
    if distributed:
        dist.broadcast_object_list(run_id, src=0)
    if rank == 0:
        removed = remove_partial_files(out_dir) if Path(out_dir).is_dir() else []
        for path in removed:
            logger.warning("removed a partial file of an interrupted run: %s", path)
    if distributed:
        dist.barrier()
    counts = run_batch(source, out_dir, options, rank=rank, world_size=world_size, run_id=run_id[0])
    failed = counts["failed"]
    if distributed:
        on_gpu = dist.get_backend() == "nccl"
        total = torch.tensor([failed], device="cuda" if on_gpu else "cpu")
        dist.all_reduce(total)
        failed = int(total.item())
        dist.barrier()
    if rank == 0:
        manifest = merge_rank_files(out_dir, run_id[0], world_size)
        logger.info("manifest: %s", manifest)
    if distributed:
        dist.destroy_process_group()
    return failed, counts


def exit_if_failed(result):
    """For the bundle workflow: exit code 1 when any study failed, as ``calid upsample-batch``."""
    failed, counts = result
    if failed:
        raise SystemExit(f"{failed} stud{'y' if failed == 1 else 'ies'} failed; see failures-*.jsonl")
    return counts
