"""Directions as a llama.cpp control vector (`llama-cli --control-vector FILE`).

The format is llama.cpp's own (cvector-generator writes it): GGUF with
`general.architecture = controlvector`, `controlvector.model_hint` (the model's
architecture) and `controlvector.layer_count`, and one float32 tensor `direction.<il>` [d]
per layer. llama.cpp adds `direction.<il>` to the output of block il (0-based, after the MLP
residual add); layer 0 cannot be set. Adding a constant to a block's MLP output is the same as
adding it to the block's output, so a vector for `model.layers.<il>.mlp` is `direction.<il>`.

A control vector is a constant: it cannot hold the projection edit, which depends on each
token's state. What is exported is the mean edit that an evaluation run applied at each
layer (its average over every edited token), the best constant stand-in for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from newllm.core.artifacts import atomic_path
from newllm.core.errors import NewllmError

ARCH = "controlvector"


def write_control_vector(path: str | Path, vectors: dict[int, np.ndarray], model_hint: str
                         ) -> None:
    """Write {block index: vector [d]} as a control-vector GGUF, atomically."""
    import gguf

    if any(layer < 1 for layer in vectors):
        raise NewllmError("a llama.cpp control vector cannot set layer 0; leave layer 0 out "
                          "of the exported layers.")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", len(vectors))
        for layer in sorted(vectors):
            writer.add_tensor(f"direction.{layer}", np.asarray(vectors[layer], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_control_vector(path: str | Path) -> tuple[dict[str, object], dict[int, np.ndarray]]:
    """The metadata (architecture, model hint, layer count) and {layer: vector} of a file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, object] = {}
    for name in ("general.architecture", f"{ARCH}.model_hint", f"{ARCH}.layer_count"):
        field = reader.get_field(name)
        if field is not None:
            meta[name] = field.contents()
    vectors = {int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32)
               for t in reader.tensors if t.name.startswith("direction.")}
    return meta, vectors
