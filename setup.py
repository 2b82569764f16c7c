"""megatron-kd: knowledge distillation for LLM pre- and post-training on Megatron-core."""
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds the optional C kernels; without a compiler the package installs without them (the
    code falls back to its torch paths, see megatron_kd/logits/native.py)."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler / headers: not an install error
            print(f"megatron-kd: optional C kernels not built ({e}); the torch paths will be used", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"megatron-kd: optional C kernel {ext.name} not built ({e})", file=sys.stderr)


# x86-64 only (AVX2/FMA intrinsics chosen per function; the module checks the CPU at run time).
NATIVE = [Extension("megatron_kd.logits._topk_native", ["megatron_kd/logits/_topk_native.c"],
                    extra_compile_args=["-O3", "-std=c11"])]

setup(
    name="megatron-kd",
    version="0.1.0",
    description="Knowledge distillation (logit KD, MiniPLM, MiniLLM) for LLMs on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_kd", "megatron_kd.*"]),
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "nltk",
        "tqdm",
        "psutil",  # hidden dependency of megatron-core dist_checkpointing
        "safetensors",
        "tokenizers",
        "transformers>=4.45",
        "matplotlib",
    ],
    extras_require={
        # ruff: .ci/run lints with this pin; tensorboard + wandb (~15 s to install) so CI runs the tracker tests
        "test": ["pytest>=8", "pytest-timeout", "ruff==0.17.6", "tensorboard", "wandb"],
        # experiment tracking (megatron_kd/training/trackers.py): logging.tensorboard_dir / logging.wandb_project
        "tb": ["tensorboard"],
        "wandb": ["wandb"],
        # lm-evaluation-harness adapter (megatron_kd.evaluation.lm_eval_adapter); brings rouge-score.
        "eval": ["lm_eval>=0.4.13,<0.5", "rouge-score"],
    },
    ext_modules=NATIVE,
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["megatron-kd=megatron_kd.cli:main"]},
)
