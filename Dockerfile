# megatron-kd on the NGC PyTorch container (CUDA torch, Transformer Engine, apex, NCCL preinstalled).
#   docker build -t megatron-kd .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v $PWD/data:/data -v $PWD/runs:/runs megatron-kd \
#       torchrun --nproc-per-node 8 -m megatron_kd pretrain --config examples/gpu/pretrain_qwen2.5_0.5b.yaml
# See docs/launch.md (multi-node, Slurm).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /workspace/megatron-kd
COPY setup.py pyproject.toml README.md ./
COPY megatron_kd ./megatron_kd
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY docs ./docs

# The container's torch is a CUDA pre-release build (e.g. 2.x.0a0+nv): pip would "upgrade" it to a
# PyPI wheel if it resolved torch itself. So the package and megatron-core go in without dependency
# resolution, and the remaining runtime dependencies of setup.py (everything except torch) explicitly.
RUN pip install --no-deps "megatron-core==0.16.1" -e . \
 && pip install pyyaml sentencepiece nltk tqdm psutil safetensors tokenizers "transformers>=4.45" \
        matplotlib numpy packaging tensorboard pytest pytest-timeout \
 && python -c "import megatron.core, megatron_kd, torch; print('megatron-kd ready; torch', torch.__version__)"

CMD ["megatron-kd", "--help"]
