"""covidseg: segment COVID-19 infection in chest X-rays with Lightning + Hydra."""

__version__ = "0.1.0"
