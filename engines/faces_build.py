"""Write the face detector's graph from the vendored YuNet file: ``python -m engines.faces_build``.

    python -m engines.faces_build --out build/model

Input: ``engines/yunet/yunet_n_dynamic.onnx`` (committed, Apache-2.0, origin and licence in
engines/yunet/), refused unless its bytes match the pin ``engines.faces.SOURCE_SHA256``.
Output, in ``--out``:

* ``heatcrop-faces-yunet-n-<sha256[:12]>.onnx``: YuNet with the engines' conventions
  (engines/base.py): input ``image`` uint8 [N, H, W, 3] RGB, H and W multiples of 32, turned
  into float NCHW inside the graph (YuNet's BGR order folded into its first convolution), so
  the detector reads the very array the heatmap model reads and a TensorRT plan could be built
  from it alike; outputs ``scores`` [N, K, 1]
  (sqrt(cls x obj), the strides 8, 16 and 32 one after the other) and ``boxes`` [N, K, 4] (the
  raw box regression, decoded against each stride's prior grid by engines/faces.py). The
  landmark heads, which nothing reads, are left out.
* ``faces.json``: the file, its sha256 and where it came from; the runtime refuses a file that
  does not match it.

Deterministic and idempotent, like engines/export.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.artifacts import HASH_CHARS, sha256_hex, write_atomic
from engines.faces import FACES_MANIFEST_NAME, INPUT, OUTPUTS, SOURCE_SHA256, STRIDES

SOURCE = Path(__file__).resolve().parent / "yunet" / "yunet_n_dynamic.onnx"
SOURCE_ORIGIN = "github.com/ShiqiYu/libfacedetection.train@0047ac24a onnx/yunet_n_dynamic.onnx"
VARIANT = "yunet-n"
MANIFEST_FORMAT = 1


def file_name(digest: str) -> str:
    return f"heatcrop-faces-{VARIANT}-{digest[:HASH_CHARS]}.onnx"


def source_bytes(path: Path = SOURCE, *, pinned: bool = True) -> bytes:
    """The vendored graph; ValueError when it is not the pinned file (``pinned=False``: any
    YuNet graph of the same interface, for training/faces.py's comparisons only)."""
    data = path.read_bytes()
    if pinned and sha256_hex(data) != SOURCE_SHA256:
        raise ValueError(f"{path} does not match its pinned sha256 {SOURCE_SHA256[:HASH_CHARS]}")
    return data


def _prune(graph: onnx.GraphProto, wanted: set[str]) -> None:
    """Drop the nodes none of ``wanted`` depends on (the landmark heads), keeping the order."""
    needed = set(wanted)
    keep = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = {name for node in graph.node for name in node.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _rgb_first_layer(graph: onnx.GraphProto, name: str) -> None:
    """Make the convolutions that read ``name`` take RGB: their weights' input channels
    reversed, so the graph needs no channel shuffle of its own (a Gather on the input cost
    ~1.5 ms a photo, a third of the detector)."""
    weights = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if name in node.input:
            if node.op_type != "Conv" or node.input[0] != name:
                raise ValueError(f"{node.op_type} {node.name!r} reads the input: not a YuNet graph")
            w = weights[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[:, ::-1].copy(), w.name))


def model_bytes(source: bytes) -> bytes:
    """The built graph's bytes from the vendored graph's."""
    model = onnx.load_from_string(source)
    graph = model.graph
    (old_input,) = graph.input
    heads = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox") for s in STRIDES]
    _prune(graph, set(heads))
    _rgb_first_layer(graph, old_input.name)
    # 0-255 floats, no normalisation, NCHW: YuNet's input, the channel order folded in above.
    pre = [
        helper.make_node("Cast", [INPUT], ["hc_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["hc_float"], [old_input.name], perm=[0, 3, 1, 2]),
    ]
    # cls and obj come out of sigmoids: their product is in [0, 1] already.
    post = [
        helper.make_node("Concat", [f"cls_{s}" for s in STRIDES], ["hc_cls"], axis=1),
        helper.make_node("Concat", [f"obj_{s}" for s in STRIDES], ["hc_obj"], axis=1),
        helper.make_node("Mul", ["hc_cls", "hc_obj"], ["hc_product"]),
        helper.make_node("Sqrt", ["hc_product"], [OUTPUTS[0]]),
        helper.make_node("Concat", [f"bbox_{s}" for s in STRIDES], [OUTPUTS[1]], axis=1),
    ]
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", "H", "W", 3]))
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, ["N", "K", 1]),
            helper.make_tensor_value_info(OUTPUTS[1], TensorProto.FLOAT, ["N", "K", 4]),
        ]
    )
    del graph.value_info[:]
    model.doc_string = (
        f"YuNet-n face detector ({SOURCE_ORIGIN}, sha256 {SOURCE_SHA256}, Apache-2.0) with "
        "uint8 RGB NHWC input and joined stride outputs; written by engines/faces_build.py"
    )
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def manifest(name: str, digest: str) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "file": name,
        "sha256": digest,
        "detector": VARIANT,
        "source": {
            "origin": SOURCE_ORIGIN,
            "sha256": SOURCE_SHA256,
            "licence": "Apache-2.0 (engines/yunet/LICENSE)",
        },
        "input": {"name": INPUT, "dtype": "uint8", "shape": ["N", "H", "W", 3]},
        "outputs": {OUTPUTS[0]: ["N", "K", 1], OUTPUTS[1]: ["N", "K", 4]},
        "strides": list(STRIDES),
    }


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    write_atomic(path, data)


def build(out_dir: str | Path, source: Path = SOURCE, *, pinned: bool = True) -> Path:
    """Write the graph and faces.json into ``out_dir``; the graph's path. An unpinned
    ``source``'s manifest names the pin anyway, so that engines/faces.py loads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = model_bytes(source_bytes(source, pinned=pinned))
    digest = sha256_hex(data)
    path = out / file_name(digest)
    _write_if_changed(path, data)
    text = json.dumps(manifest(path.name, digest), indent=1, sort_keys=True) + "\n"
    _write_if_changed(out / FACES_MANIFEST_NAME, text.encode())
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/model", help="model folder (default build/model)")
    args = ap.parse_args(argv)
    try:
        path = build(args.out)
    except (OSError, ValueError) as exc:
        print(f"faces_build: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
