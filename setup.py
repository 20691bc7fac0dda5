"""vpt_jax: visual prompt tuning (VPT, E2VPT) of frozen pretrained ViTs in JAX/Flax."""

import setuptools

setuptools.setup(
    name="vpt_jax",
    version="0.1.0",
    description="Visual prompt tuning (VPT, E2VPT) of frozen, pretrained Vision Transformers "
                "in JAX/Flax, loading the original vision_transformer and big_vision checkpoints.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vpt_jax", "vpt_jax.*"]),
    package_data={"vpt_jax": ["assets/*.npz"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.10",
        "ml-collections>=0.1.1",
        "absl-py",
        "numpy>=1.26",
        "ml_dtypes",
        # tf.data / tf.io.gfile for the input pipelines and gs:// downloads; the CPU build is enough.
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.4",
        "importlib_resources",  # tensorflow-datasets' resource lookups when offline
        "pillow",
        "tensorboard",  # event files for tf.summary (tensorflow-cpu does not pull it in)
        "scikit-learn",  # the offline demo dataset (digits), t-SNE
        "matplotlib",  # PNG pictures (t-SNE, training curves, attention maps)
    ],
    extras_require={
        # zstandard: JAX then compresses its compilation-cache entries with zstd instead of zlib
        # (the suite writes ~3800 of them: half the CPU of each write).
        "test": ["pytest>=8", "pytest-xdist", "scipy", "nbclient", "nbformat", "ipykernel",
                 "zstandard"],
    },
)
