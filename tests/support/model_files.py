"""Model folders with one graph broken the way a build can break it: bytes that ONNX Runtime
cannot load or run, under a manifest rewritten to agree with them (name and sha256), so that
every check before ONNX Runtime passes.

The graphs are made here, not mocked: ``truncated`` is half of a real graph (a build cut
short), ``unknown_op`` a valid ONNX graph with an operator this onnxruntime does not have
(a graph from another onnxruntime), ``fails_to_run`` one that loads but raises on its first
inference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engines.artifacts import (
    INT8_MANIFEST_NAME,
    MANIFEST_NAME,
    int8_file_name,
    model_file_name,
    sha256_hex,
)
from engines.base import INPUT_NAME, OUTPUT_NAMES

UNKNOWN_OP = "HeatcropNoSuchOp"


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def graph_bytes(folder: Path, *, int8: bool) -> bytes:
    manifest = json.loads((folder / (INT8_MANIFEST_NAME if int8 else MANIFEST_NAME)).read_text())
    return (folder / manifest["file"]).read_bytes()


def replace_graph(folder: Path, data: bytes, *, int8: bool) -> str:
    """Put ``data`` in place of the folder's INT8 (or FP32) graph; its new file name."""
    manifest_path = folder / (INT8_MANIFEST_NAME if int8 else MANIFEST_NAME)
    manifest = json.loads(manifest_path.read_text())
    (folder / manifest["file"]).unlink()
    digest = sha256_hex(data)
    name = (int8_file_name if int8 else model_file_name)(digest)
    (folder / name).write_bytes(data)
    manifest |= {"file": name, "sha256": digest}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return name


def truncated(folder: Path, *, int8: bool) -> bytes:
    data = graph_bytes(folder, int8=int8)
    return data[: len(data) // 2]


def _graph(middle: list[object]) -> bytes:
    from onnx import TensorProto, helper

    first, *rest = OUTPUT_NAMES
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
        *middle,
        *(helper.make_node("Identity", [first], [name]) for name in rest),
    ]
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in OUTPUT_NAMES],
        initializer=[helper.make_tensor("seven", TensorProto.INT64, [1], [7])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def unknown_op() -> bytes:
    from onnx import helper

    return _graph([helper.make_node(UNKNOWN_OP, ["pixels"], [OUTPUT_NAMES[0]])])


def fails_to_run() -> bytes:
    """Loads (the input's dims are not known before a run), then no image has 7 values."""
    from onnx import helper

    return _graph([helper.make_node("Reshape", ["pixels", "seven"], [OUTPUT_NAMES[0]])])
