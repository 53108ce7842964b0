"""hf_csr: Confusional Spectral Regularization for the Hugging Face ecosystem."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="hf_csr",
    version="0.1.0",
    description="Confusional Spectral Regularization: robust fairness for adversarially trained image classifiers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_csr", "hf_csr.*", "hf_csr_paper", "hf_csr_paper.*"]),
    include_package_data=True,
    package_data={"hf_csr": ["metrics/*/*.py", "metrics/*/README.md", "hub/templates/*.md"]},
    # Every requirement is capped below its next major version (for 0.x packages: below 1.0), so that a
    # future breaking release is never picked up silently; RELIABILITY.md explains the checks.
    install_requires=[
        # torchvision >= 0.29 needs the matching torch; older torch/torchvision pairs also work.
        "torch>=2.4,<3",
        "torchvision>=0.19,<1",
        # transformers 5 (dataclass configs, compute_loss during evaluation) is required.
        "transformers>=5.0,<6",
        "datasets>=3.0,<6",
        "accelerate>=1.0,<2",
        "timm>=1.0.15,<2",
        "evaluate>=0.4.3,<1",
        "huggingface_hub>=1.0,<3",
        "safetensors>=0.4.3,<1",
        "pyautoattack>=0.2.0,<1",
        "matplotlib>=3.7,<4",
        "numpy>=1.24,<3",
        "pyyaml>=6.0,<7",
        # model cards are rendered with huggingface_hub.ModelCard.from_template (Jinja)
        "jinja2>=3.1,<4",
        "tqdm>=4.66,<5",
    ],
    extras_require={
        # scipy: tests cross-check Kendall tau and other statistics against scipy.stats
        "dev": ["pytest>=8.0,<10", "hypothesis>=6.100,<7", "scipy>=1.10,<2"],
    },
    entry_points={"console_scripts": ["hf-csr=hf_csr.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
