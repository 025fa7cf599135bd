"""GPU parity: only where CUDA is available (the suite never needs a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.inference import predict_proba
from app.main import create_app
from app.registry import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_predictions_match_cpu(bundled_checkpoint: Path) -> None:
    x = np.random.default_rng(0).random((512, 784), dtype=np.float32)
    cpu_model, _ = load_model(bundled_checkpoint, "cpu")
    gpu_model, _ = load_model(bundled_checkpoint, "cuda")
    cpu = predict_proba(cpu_model, x, torch.device("cpu"))
    gpu = predict_proba(gpu_model, x, torch.device("cuda"))
    assert np.abs(cpu - gpu).max() <= 1e-5


def test_service_runs_on_cuda(models_dir: Path) -> None:
    png = (Path(__file__).parent / "fixtures" / "seven.png").read_bytes()
    with TestClient(create_app(Settings(model_dir=models_dir, device="cuda", reload_interval=0))) as client:
        assert client.get("/model").json()["device"].startswith("cuda")
        response = client.post("/predict", content=png, headers={"content-type": "image/png"})
        assert response.status_code == 200
        assert response.json()["label"] == 7
