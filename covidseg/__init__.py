"""covidseg: segment COVID-19 infection in chest X-rays with Lightning + Hydra."""

from pathlib import Path

__version__ = "0.1.0"
# Hydra's config folder, as an absolute path: the entry points work the same as `python -m
# covidseg.<command>` and as installed `covidseg-<command>` scripts (an editable install).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
