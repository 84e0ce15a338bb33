"""Settings of serving (environment ``CONVEYOR_...``; its own are ``CONVEYOR_SERVING_...``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import Field

from services.runtime.config import Settings
from services.serving.tritonconfig import Backend, TritonOptions

__all__ = ["ServingSettings"]


class ServingSettings(Settings):
    service: str = "serving"
    serving_model_repository: Path | None = Field(
        None,
        description="Triton's model repository; unset: <state dir>/triton/models (the embedded Triton's)",
    )
    serving_backend: Backend = Field(
        "python", description="python (embedded), pytorch_libtorch or onnxruntime"
    )
    serving_gpu: Literal["auto", "true", "false"] = Field(
        "auto", description="GPU instances in Triton; auto: when nvidia-smi lists a GPU"
    )
    serving_instances: int = Field(1, ge=1, le=16, description="Triton model instances per version")
    serving_dynamic_batching: bool = True
    serving_max_queue_delay_us: int = Field(500, ge=0, description="dynamic batching: wait for more requests")
    serving_max_batch_size: int = Field(64, ge=1)
    serving_gpu_precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="python backend on a GPU: fp16 runs the model in half precision, channels-last"
    )
    serving_load_timeout_s: float = Field(120.0, gt=0, description="a version must load within this")
    serving_keep_versions: int = Field(5, ge=1, description="version folders kept on disk for fast rollbacks")
    serving_reconcile_interval_s: float = Field(
        3.0, gt=0, description="how often routed versions are checked to be loaded (hand-set routes)"
    )

    @property
    def model_repository(self) -> Path:
        return self.serving_model_repository or self.state_dir / "triton" / "models"

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "serving"

    def triton_options(self) -> TritonOptions:
        return TritonOptions(
            backend=self.serving_backend,
            gpu=self.serving_gpu == "true" or (self.serving_gpu == "auto" and _has_gpu()),
            instances=self.serving_instances,
            dynamic_batching=self.serving_dynamic_batching,
            max_queue_delay_us=self.serving_max_queue_delay_us,
            max_batch_size=self.serving_max_batch_size,
            gpu_precision=self.serving_gpu_precision,
        )


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout
