"""The package list, which pyproject.toml cannot compute: every folder of covidseg/, and conf/ from
the top of the repository shipped inside the package as ``covidseg.conf`` with its groups. An
installed covidseg finds its configs there; a checkout or an editable install at conf/
(``covidseg.core.config``). Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

CODE = find_namespace_packages(include=["covidseg", "covidseg.*"], exclude=["*.__pycache__"])
CONFIGS = ["covidseg.conf", *(f"covidseg.conf.{group}" for group in find_namespace_packages("conf"))]

setup(packages=CODE + CONFIGS, package_dir={"covidseg.conf": "conf"})
