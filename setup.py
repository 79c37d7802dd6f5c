"""gafh-fast: install with the torch build that fits the machine first (see README, "Install")."""
from setuptools import find_packages, setup

setup(
    name="gafh-fast",
    version="0.1.0",
    description="Distributed, high-throughput GAFH-RIDN face hallucination (x8) training and inference",
    python_requires=">=3.10",
    # The Triton code lives in the top-level kernels/ folder but installs as gafh_fast.kernels,
    # so nothing installs a top-level module named `kernels`.
    packages=find_packages(include=["gafh_fast", "gafh_fast.*"]) + ["gafh_fast.kernels"],
    package_dir={"gafh_fast": "gafh_fast", "gafh_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.17.6",  # bf16 without ZeRO needs it
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "dali-cu13": ["nvidia-dali-cuda130"],
        "dali-cu12": ["nvidia-dali-cuda120"],
        "dev": ["pytest", "scikit-image"],
    },
)
