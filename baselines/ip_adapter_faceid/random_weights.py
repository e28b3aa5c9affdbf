"""Seeded random stand-ins for IP-Adapter-FaceID's files, for offline runs (``adapter: random``,
``model_root: random``) and the tests: an adapter ``.bin`` in the official layout at the base UNet's
widths, and an ONNX recognizer with buffalo_l ``w600k_r50.onnx``'s interface. Both go through the same
loaders as the released files (diffusers' ``load_ip_adapter``, insightface's ``model_zoo.get_model``);
images made with them are not meaningful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from f2d_bench.files import atomic_write_bytes
from f2d_bench.paths import cache_root

#: LoRA rank of the random adapter (the released files: 128).
RANDOM_LORA_RANK = 4
RANDOM_SEED = 0
#: Bump when the stand-ins change, so cached files are rebuilt.
_VERSION = "v1"


def random_adapter_state(layout: dict, seed: int = RANDOM_SEED) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` with every tensor of ``layout`` (part -> key ->
    shape) drawn from N(0, 0.3^2), in the layout's order."""
    g = torch.Generator().manual_seed(seed)
    return {part: {k: torch.randn(shape, generator=g) * 0.3 for k, shape in keys.items()}
            for part, keys in layout.items()}


def random_recognizer_onnx(path: Path, seed: int = RANDOM_SEED) -> Path:
    """Write an ONNX face recognizer with w600k_r50's interface: input ``input.1`` (N, 3, 112, 112) float,
    output (N, 512), so insightface's loader takes it for a recognizer. A strided convolution, ReLU and a
    linear layer with seeded weights. Needs the ``onnx`` package (the ``faceid`` extra)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 8, 8)).astype(np.float32), "conv_w")
    fc = numpy_helper.from_array(rng.normal(0, 0.05, (8 * 14 * 14, 512)).astype(np.float32), "fc_w")
    nodes = [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[8, 8], name="conv0"),
             helper.make_node("Relu", ["c"], ["r"], name="relu0"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flat0"),
             helper.make_node("MatMul", ["f", "fc_w"], ["683"], name="fc0")]
    graph = helper.make_graph(nodes, "w600k_r50_random",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])], [conv, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def cached_random_pack(pack: str, recognizer_file: str) -> Path:
    """A model root (``<root>/models/<pack>/<recognizer_file>``) holding the random recognizer, built once
    in f2d-bench's cache."""
    root = cache_root() / "ip-adapter-faceid" / f"random-pack-{_VERSION}"
    file = root / "models" / pack / recognizer_file
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        random_recognizer_onnx(file)
    return root


def cached_random_adapter(layout: dict, name: str) -> Path:
    """The random adapter for ``layout`` saved with ``torch.save`` as the released ``.bin`` files are,
    built once per layout in f2d-bench's cache."""
    import hashlib
    import io
    import json

    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:12]
    file = cache_root() / "ip-adapter-faceid" / f"random-adapter-{_VERSION}-{digest}" / name
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(random_adapter_state(layout), buffer)
        atomic_write_bytes(file, buffer.getvalue())
    return file
