"""Packaging. ``kernels/`` (Triton) ships inside the package as ``ct_fast.kernels`` — a top-level
``kernels`` package would clash with an existing PyPI distribution."""

from setuptools import find_packages, setup

packages = find_packages(include=["ct_fast", "ct_fast.*"]) + ["ct_fast.kernels"]

setup(
    packages=packages,
    package_dir={"ct_fast.kernels": "kernels"},
)
