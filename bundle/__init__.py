"""CaLID bundle package: the Python code that this bundle's configs import."""

from pathlib import Path

# The bundle folder (configs/, models/, docs/ beside this package): configs default their
# bundle_root to it, so that they work from any working directory and after a zoo download.
BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
