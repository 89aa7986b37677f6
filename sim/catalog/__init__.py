"""Model and GPU catalog: shapes from a Hugging Face ``config.json``, GPUs as spec records.

    model.py      ModelSpec, LinearShape, dtype sizes; TP sharding of every weight matrix
    hf_config.py  config.json -> ModelSpec; bundled models, aliases, load_model
    gpu.py        GpuSpec; bundled GPUs (sim/data/gpus.yaml), load_gpu

Bundled data stays in ``sim/data`` (package-data of ``sim``).
"""

from .gpu import GPUS_FILE, GpuSpec, bundled_gpus, gpu_from_dict, load_gpu
from .hf_config import (
    DATA_DIR,
    MODELS_DIR,
    bundled_models,
    load_model,
    model_from_config,
    resolve_model_name,
)
from .model import ACTIVATION_BYTES, DTYPE_BYTES, LinearShape, ModelSpec, dtype_bytes

__all__ = [
    "ACTIVATION_BYTES",
    "DATA_DIR",
    "DTYPE_BYTES",
    "GPUS_FILE",
    "MODELS_DIR",
    "GpuSpec",
    "LinearShape",
    "ModelSpec",
    "bundled_gpus",
    "bundled_models",
    "dtype_bytes",
    "gpu_from_dict",
    "load_gpu",
    "load_model",
    "model_from_config",
    "resolve_model_name",
]
