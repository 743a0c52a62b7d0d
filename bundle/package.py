"""Model-zoo packaging: the zoo's own checks, and the zip it distributes.

The zoo (``ci/verify_bundle.py`` in the model-zoo repository) expects ``configs/metadata.json``,
``configs/inference.json``, ``LICENSE`` and ``models/model.pt``; ``version`` as a key of
``changelog``; no file over 25 MB; and every file of ``large_files.yml`` with its hash. The zip
is ``<name>_v<version>.zip`` with the bundle folder ``<name>/`` inside, weights included.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

from . import BUNDLE_ROOT
from .errors import InputRefused
from .io import atomic_write

BUNDLE_NAME = "calid_cmr_interpolation"
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "LICENSE", "models/model.pt")
MAX_FILE_MB = 25
# What a user of the zoo copy needs: the code the configs import, the configs, the weights, the
# docs with the example, and the MONAI Label app. Tests, CI and training runs stay in the repository.
PACKAGED = ("bundle", "configs", "models", "docs", "monailabel", "LICENSE", "README.md", "large_files.yml", "setup.cfg")
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", "logs"}  # logs: what a local MONAI Label server wrote


def md5(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_large_files(root=BUNDLE_ROOT) -> list[dict]:
    import yaml

    path = Path(root) / "large_files.yml"
    return yaml.safe_load(path.read_text())["large_files"] if path.is_file() else []


def write_large_files(root=BUNDLE_ROOT, paths=("models/model.pt",), url_base="https://example.invalid/calid"):
    """(Re)write ``large_files.yml`` with the md5 of ``paths``; the URL is a placeholder until
    the weights are uploaded somewhere public."""
    root = Path(root)
    lines = ["# Files the model zoo downloads separately; url is a placeholder until they are hosted.", "large_files:"]
    for rel in paths:
        lines += [
            f'  - path: "{rel}"',
            f'    url: "{url_base}/{BUNDLE_NAME}/{rel}"',
            f'    hash_val: "{md5(root / rel)}"',
            '    hash_type: "md5"',
        ]
    (root / "large_files.yml").write_text("\n".join(lines) + "\n")
    return root / "large_files.yml"


def zoo_checks(root=BUNDLE_ROOT) -> dict:
    """The zoo's checks that need no network: name -> "ok" or what is wrong."""
    root = Path(root)
    results = {}
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    results["required files"] = "ok" if not missing else f"missing {', '.join(missing)}"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    ok = meta.get("version") in meta.get("changelog", {})
    results["version in changelog"] = "ok" if ok else f"version {meta.get('version')} is not a changelog key"
    big = [str(p.relative_to(root)) for p in _packaged_files(root) if p.stat().st_size > MAX_FILE_MB * 1024 * 1024]
    results[f"no file over {MAX_FILE_MB} MB"] = "ok" if not big else f"too large: {', '.join(big)}"
    wrong = []
    for entry in read_large_files(root):
        path = root / entry["path"]
        if not path.is_file() or entry.get("hash_type", "md5") != "md5" or md5(path) != entry["hash_val"]:
            wrong.append(entry["path"])
    results["large_files.yml hashes"] = "ok" if not wrong else f"missing or changed: {', '.join(wrong)}"
    return results


def _packaged_files(root):
    for name in PACKAGED:
        path = Path(root) / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for p in candidates:
            if p.is_file() and not SKIPPED_PARTS & set(p.relative_to(root).parts) and p.suffix != ".pyc":
                yield p


def package(out_dir, root=BUNDLE_ROOT, overwrite=False):
    """Run :func:`zoo_checks`, then write ``OUT_DIR/<name>_v<version>.zip``; returns (path, report)."""
    root = Path(root)
    start = time.perf_counter()
    checks = zoo_checks(root)
    failed = {k: v for k, v in checks.items() if v != "ok"}
    if failed:
        raise InputRefused("bundle fails the zoo's checks: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    version = json.loads((root / "configs" / "metadata.json").read_text())["version"]
    out = Path(out_dir) / f"{BUNDLE_NAME}_v{version}.zip"
    if out.exists() and not overwrite:
        raise InputRefused(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    files = list(_packaged_files(root))

    def write_zip(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                zf.write(path, f"{BUNDLE_NAME}/{path.relative_to(root)}")

    atomic_write(out, write_zip)
    report = {
        "zip": str(out),
        "files": len(files),
        "size_mb": round(out.stat().st_size / 2**20, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "checks": checks,
    }
    return out, report
