"""The package list for setuptools (metadata and dependencies are in pyproject.toml).

The Triton code lives in the top-level kernels/ folder but installs as gafh_fast.kernels, so nothing
installs a top-level module named `kernels`; gafh_fast/__init__.py maps the same folder when gafh_fast is
imported from the source tree, so the tree and an installed copy are the same package.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["gafh_fast", "gafh_fast.*"]) + ["gafh_fast.kernels"],
    package_dir={"gafh_fast": "gafh_fast", "gafh_fast.kernels": "kernels"},
)
