#!/usr/bin/env python3
# Writes the safetensors fixtures of tests/test_safetensors.cpp with the Python `safetensors`
# package (pip install safetensors numpy): one file with every dtype kiln reads and a 2-shard
# checkpoint with its index. The values are spelled out here and again in the C++ test.
import json
import os
import sys

import numpy as np
from safetensors import TensorSpec, serialize_file
from safetensors.numpy import save_file


def save_with_bf16(tensors, bf16_bits, path, metadata):
    """save_file cannot express bf16 (numpy has none): pass raw uint16 bits as a 'bfloat16' spec."""
    keep = []
    specs = {}
    for name, arr in tensors.items():
        arr = np.array(arr, order="C")  # ascontiguousarray would turn 0-d into 1-d
        keep.append(arr)
        specs[name] = TensorSpec(dtype=arr.dtype.name, shape=list(arr.shape), data_ptr=arr.ctypes.data, data_len=arr.nbytes)
    for name, bits in bf16_bits.items():
        bits = np.array(bits, dtype="<u2", order="C")
        keep.append(bits)
        specs[name] = TensorSpec(dtype="bfloat16", shape=list(bits.shape), data_ptr=bits.ctypes.data, data_len=bits.nbytes)
    serialize_file(specs, path, metadata=metadata)
    del keep


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tensors = {
        "f64": (np.arange(6, dtype=np.float64) * 0.25 - 1.5).reshape(2, 3),
        "f32": (np.arange(12, dtype=np.float32) * 0.5 - 3.0).reshape(3, 4),
        # 1, -2.5, ~1/3, 65504 (largest), smallest subnormal
        "f16": np.array([0x3C00, 0xC100, 0x3555, 0x7BFF, 0x0001], dtype="<u2").view("<f2"),
        "i64": np.array([-(2**40), -1, 0, 7, 2**62], dtype=np.int64),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 2, 2),
        "u8": np.array([0, 1, 127, 200, 255], dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(42.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    # 1, -2.5, 0.15625, 3.140625, -0, +inf
    bf16 = {"bf16": np.array([0x3F80, 0xC020, 0x3E20, 0x4049, 0x8000, 0x7F80], dtype=np.uint16).reshape(2, 3)}
    save_with_bf16(tensors, bf16, os.path.join(out_dir, "dtypes.safetensors"),
                   metadata={"format": "np", "note": "kiln fixture"})

    shard_dir = os.path.join(out_dir, "sharded")
    os.makedirs(shard_dir, exist_ok=True)
    shards = {
        "model-00001-of-00002.safetensors": {
            "layer.0.weight": (np.arange(12, dtype=np.float32) * 0.25).reshape(4, 3),
            "layer.0.bias": np.array([1.5, -1.5, 0.0, 2.0], dtype=np.float32),
        },
        "model-00002-of-00002.safetensors": {
            "layer.1.weight": (np.arange(6, dtype=np.float64) - 2.0).reshape(2, 3),
            "step": np.array([123456789], dtype=np.int64),
        },
    }
    weight_map, total = {}, 0
    for name, ts in shards.items():
        save_file(ts, os.path.join(shard_dir, name), metadata={"format": "np"})
        for k, v in ts.items():
            weight_map[k] = name
            total += v.nbytes
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data", "safetensors"))
