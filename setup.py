"""sparsejax: sparse training in JAX whose memory and compute scale with the non-zeros."""

import pathlib
import re

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "sparsejax" / "__init__.py").read_text())[1]

# tensorflow-datasets without TensorFlow: array_record files read by tfds.data_source.
# tfds 4.9.x imports importlib_resources at build time on every Python but declares it
# only for Python < 3.9 (tensorflow/datasets#11212).
DATA = ["tensorflow-datasets>=4.9.7", "array-record>=0.5", "importlib_resources>=6"]

setup(
    name="sparsejax",
    version=VERSION,
    description="Really sparse training in JAX/Flax: fixed fan-in layers, SET, SμPar, N:M gradients",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The top-level kernels/ and experiments/ folders ship as the sub-packages
    # sparsejax.kernels and sparsejax.experiments (the launchers, for the console scripts).
    packages=[*find_packages(include=["sparsejax", "sparsejax.*"]), "sparsejax.kernels",
              *(f"sparsejax.{name}" for name in find_packages(include=["experiments",
                                                                     "experiments.*"]))],
    package_dir={"sparsejax": "sparsejax", "sparsejax.kernels": "kernels",
                 "sparsejax.experiments": "experiments"},
    entry_points={"console_scripts": [
        "sparsejax-xmc = sparsejax.experiments.xmc.train:run_script",
        "sparsejax-xmc-evaluate = sparsejax.experiments.xmc.evaluate:run_script",
        "sparsejax-xmc-wordnet = sparsejax.experiments.xmc.datasets.wordnet:run_script",
    ]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        # The suite executes the notebooks, so it needs their kernel too, and it builds
        # a tfds dataset (the data extra).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.9",
                 "ipykernel>=6.29", *DATA],
        "notebooks": ["jupyterlab>=4", "nbclient>=0.10", "ipykernel>=6", "matplotlib>=3.8"],
        "data": DATA,
        # The Pallas kernels were built and checked with jax 0.11.2 (CUDA 13) on an H100;
        # they need no jax-triton or triton package (Pallas brings its own lowering).
        "gpu": ["jax[cuda13]>=0.11.2,<0.12"],
    },
)
