"""ONNX export of the Hugging Face model, checked against onnxruntime before it is kept.

torch 2.13's TorchScript exporter cannot trace transformers 5's mask code (``aten::diff``), so
this uses the dynamo exporter (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``). The
graph takes ``input_ids`` (batch, sequence) and returns ``logits``; no KV cache, which keeps the
graph to one input and is what scoring and simple serving need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ONNX_ATOL = 1e-3


class _LogitsOnly(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def export_onnx(hf_model, out_path: Path, example: torch.Tensor, opset: int = 18) -> Path:
    """Write ``out_path`` (weights in ``out_path.data`` next to it) with dynamic batch and length."""
    from torch.export import Dim

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # GPT2Config aliases max_position_embeddings to n_positions, so this reads both families.
    max_len = hf_model.config.max_position_embeddings
    shapes = {"input_ids": {0: Dim("batch", max=4096), 1: Dim("sequence", max=max_len)}}
    program = torch.onnx.export(
        _LogitsOnly(hf_model).eval(), (example,), dynamo=True, input_names=["input_ids"], output_names=["logits"],
        dynamic_shapes=shapes, opset_version=opset, external_data=True,
    )
    program.save(str(out_path), external_data=True)
    return out_path


@torch.no_grad()
def check_onnx(onnx_path: Path, hf_model, sample: torch.Tensor, atol: float = ONNX_ATOL) -> float:
    """Max |logit diff| between onnxruntime and the HF model on ``sample``; raises above ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (theirs,) = session.run(["logits"], {"input_ids": sample.numpy().astype(np.int64)})
    ours = hf_model(input_ids=sample, use_cache=False).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    if not diff <= atol:
        raise RuntimeError(f"ONNX model disagrees with the HF model: max |logit diff| {diff:.3e} > {atol}")
    return diff
