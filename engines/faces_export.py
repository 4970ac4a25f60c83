"""The face detector (MTCNN) as ONNX, from the weights in a PyPI wheel:

``python -m engines.faces_export [--out build/model]``.

The weights are the three MTCNN networks (P-Net, R-Net, O-Net; Zhang et al. 2016, converted
from the authors' Caffe models) inside ``facenet-pytorch`` 2.6.0's wheel
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``; MIT licence, Copyright (c) 2019 Timothy
Esler). The wheel cannot be a dependency of this environment (it requires numpy < 2,
Pillow < 10.3 and torch), so the build fetches it with ``pip download --no-deps`` (a PyPI
package, through the ordinary client, at build time only), checks its sha256 against the pin
below, and reads the three ``.pt`` files out of the zip with the torch-free unpickler of
engines/weights.py. Nothing of facenet-pytorch is installed or imported, and the service only
ever reads the ``.onnx`` files written here.

Output, in ``--out`` (default build/model):

* ``heatcrop-faces-{pnet,rnet,onet}-<sha256[:12]>.onnx``, content-addressed like the main model;
* ``faces.json``: the manifest engines/faces.py reads (files, hashes, the wheel's hash, the
  licence, the detector version that goes into cache keys).

Graphs (opset 17), all float32 pixels 0..255 in NHWC, ``(x - 127.5) / 128`` in-graph:

* P-Net ``image`` [1, H, W, 3] -> ``prob`` [1, H', W'] (face probability per 12x12 cell at
  stride 2), ``reg`` [1, 4, H', W'];
* R-Net ``image`` [N, 24, 24, 3] and O-Net ``image`` [N, 48, 48, 3] -> ``prob`` [N], ``reg``
  [N, 4] (O-Net's landmark head is left out: nothing here uses landmarks).

The dense layers read the last feature map transposed to (N, W, H, C) before flattening, as the
Caffe originals did (facenet-pytorch's ``permute(0, 3, 2, 1)``).

Deterministic and idempotent like engines/export.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.artifacts import HASH_CHARS, sha256_hex, write_atomic
from engines.weights import Weights, load_state_dict

OPSET = 17
IR_VERSION = 8
FACES_MANIFEST_NAME = "faces.json"
FACES_STEM = "heatcrop-faces"
NETS = ("pnet", "rnet", "onet")
MANIFEST_FORMAT = 1

# The wheel the weights come from: pinned by version and by the sha256 of its bytes (PyPI's
# own digest of facenet_pytorch-2.6.0-py3-none-any.whl), so a changed upload cannot slip in.
WHEEL_REQUIREMENT = "facenet-pytorch==2.6.0"
WHEEL_NAME = "facenet_pytorch-2.6.0-py3-none-any.whl"
WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
WHEEL_LICENCE = "MIT (facenet-pytorch 2.6.0, Copyright (c) 2019 Timothy Esler)"
DEFAULT_WHEEL_DIR = Path("build/wheels")

INPUT_MEAN = 127.5
INPUT_SCALE = 0.0078125
# Crop sides the refinement nets take.
RNET_SIDE = 24
ONET_SIDE = 48


class FaceWeightsError(RuntimeError):
    """The wheel could not be fetched, or it is not the pinned one."""


def file_name(net: str, digest: str) -> str:
    return f"{FACES_STEM}-{net}-{digest[:HASH_CHARS]}.onnx"


def fetch_wheel(wheel_dir: Path = DEFAULT_WHEEL_DIR) -> Path:
    """The pinned wheel in ``wheel_dir``, downloaded by pip (without its dependencies) if absent."""
    path = wheel_dir / WHEEL_NAME
    if not path.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary", ":all:", "--dest", str(wheel_dir), WHEEL_REQUIREMENT,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.is_file():
            raise FaceWeightsError(
                f"could not fetch {WHEEL_REQUIREMENT} into {wheel_dir}: {done.stderr.strip()}"
            )
    digest = sha256_hex(path.read_bytes())
    if digest != WHEEL_SHA256:
        raise FaceWeightsError(
            f"{path} has sha256 {digest[:HASH_CHARS]}, not the pinned {WHEEL_SHA256[:HASH_CHARS]}"
        )
    return path


def wheel_weights(wheel: Path) -> dict[str, Weights]:
    """The three state dicts inside the wheel, read without torch."""
    out: dict[str, Weights] = {}
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        for net in NETS:
            target = Path(tmp) / f"{net}.pt"
            target.write_bytes(archive.read(f"facenet_pytorch/data/{net}.pt"))
            out[net] = load_state_dict(target)
    return out


class _Graph:
    """Nodes and initializers with deterministic names (cf. engines.graph._Graph)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: npt.ArrayLike) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def conv_prelu(self, x: str, w: Weights, conv: str, prelu: str) -> str:
        weight = w[f"{conv}.weight"]
        k = int(weight.shape[-1])
        y = self.op(
            "Conv",
            [x, self.const(f"{conv}.w", weight), self.const(f"{conv}.b", w[f"{conv}.bias"])],
            conv,
            kernel_shape=[k, k],
        )
        slope = w[f"{prelu}.weight"].reshape(-1, 1, 1)
        return self.op("PRelu", [y, self.const(f"{prelu}.slope", slope)], prelu)

    def pool(self, x: str, name: str, kernel: int, stride: int) -> str:
        # ceil_mode as in facenet-pytorch: a partial window at the far edge still counts.
        return self.op(
            "MaxPool", [x], name, kernel_shape=[kernel, kernel], strides=[stride, stride],
            ceil_mode=1,
        )  # fmt: skip

    def dense(self, x: str, w: Weights, layer: str) -> str:
        return self.op(
            "Gemm",
            [x, self.const(f"{layer}.w", w[f"{layer}.weight"]),
             self.const(f"{layer}.b", w[f"{layer}.bias"])],
            layer,
            transB=1,
        )  # fmt: skip

    def dense_prelu(self, x: str, w: Weights, layer: str, prelu: str) -> str:
        y = self.dense(x, w, layer)
        return self.op("PRelu", [y, self.const(f"{prelu}.slope", w[f"{prelu}.weight"])], prelu)

    def face_prob(self, logits: str, axis: int) -> str:
        soft = self.op("Softmax", [logits], "softmax", axis=axis)
        index = self.const_int("face_index", [1])
        picked = self.op("Gather", [soft, index], "face_channel", axis=axis)
        axes = self.const_int("squeeze_axes", [axis])
        return self.op("Squeeze", [picked, axes], "prob")

    def const_int(self, name: str, value: Sequence[int]) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name


def _preprocess(g: _Graph) -> str:
    x = g.op("Sub", ["image", g.const("mean", [INPUT_MEAN])], "centred")
    x = g.op("Mul", [x, g.const("scale", [INPUT_SCALE])], "scaled")
    return g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])


def _model(
    g: _Graph, name: str, side: int | None, outputs: Sequence[tuple[str, list[Any]]], doc: str
) -> onnx.ModelProto:
    n: str | int = "N" if side is not None else 1
    h: str | int = side if side is not None else "H"
    w: str | int = side if side is not None else "W"
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [n, h, w, 3])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs]
    graph = helper.make_graph(g.nodes, name, inputs, outs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="heatcrop",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def pnet(w: Weights, doc: str) -> onnx.ModelProto:
    g = _Graph()
    x = _preprocess(g)
    x = g.conv_prelu(x, w, "conv1", "prelu1")
    x = g.pool(x, "pool1", 2, 2)
    x = g.conv_prelu(x, w, "conv2", "prelu2")
    x = g.conv_prelu(x, w, "conv3", "prelu3")
    logits = g.op(
        "Conv",
        [x, g.const("conv4_1.w", w["conv4_1.weight"]), g.const("conv4_1.b", w["conv4_1.bias"])],
        "conv4_1",
        kernel_shape=[1, 1],
    )
    g.face_prob(logits, axis=1)
    g.op(
        "Conv",
        [x, g.const("conv4_2.w", w["conv4_2.weight"]), g.const("conv4_2.b", w["conv4_2.bias"])],
        "reg",
        kernel_shape=[1, 1],
    )
    return _model(g, "pnet", None, [("prob", [1, "Hp", "Wp"]), ("reg", [1, 4, "Hp", "Wp"])], doc)


def _flatten_caffe(g: _Graph, x: str) -> str:
    x = g.op("Transpose", [x], "nwhc", perm=[0, 3, 2, 1])
    return g.op("Flatten", [x], "flat", axis=1)


def rnet(w: Weights, doc: str) -> onnx.ModelProto:
    g = _Graph()
    x = _preprocess(g)
    x = g.conv_prelu(x, w, "conv1", "prelu1")
    x = g.pool(x, "pool1", 3, 2)
    x = g.conv_prelu(x, w, "conv2", "prelu2")
    x = g.pool(x, "pool2", 3, 2)
    x = g.conv_prelu(x, w, "conv3", "prelu3")
    x = g.dense_prelu(_flatten_caffe(g, x), w, "dense4", "prelu4")
    g.face_prob(g.dense(x, w, "dense5_1"), axis=1)
    reg = g.dense(x, w, "dense5_2")
    g.op("Identity", [reg], "reg")
    return _model(g, "rnet", RNET_SIDE, [("prob", ["N"]), ("reg", ["N", 4])], doc)


def onet(w: Weights, doc: str) -> onnx.ModelProto:
    g = _Graph()
    x = _preprocess(g)
    x = g.conv_prelu(x, w, "conv1", "prelu1")
    x = g.pool(x, "pool1", 3, 2)
    x = g.conv_prelu(x, w, "conv2", "prelu2")
    x = g.pool(x, "pool2", 3, 2)
    x = g.conv_prelu(x, w, "conv3", "prelu3")
    x = g.pool(x, "pool3", 2, 2)
    x = g.conv_prelu(x, w, "conv4", "prelu4")
    x = g.dense_prelu(_flatten_caffe(g, x), w, "dense5", "prelu5")
    g.face_prob(g.dense(x, w, "dense6_1"), axis=1)
    reg = g.dense(x, w, "dense6_2")
    g.op("Identity", [reg], "reg")
    return _model(g, "onet", ONET_SIDE, [("prob", ["N"]), ("reg", ["N", 4])], doc)


def model_bytes(wheel: Path) -> dict[str, bytes]:
    """The three serialized graphs, by net."""
    weights = wheel_weights(wheel)
    builders = {"pnet": pnet, "rnet": rnet, "onet": onet}
    out: dict[str, bytes] = {}
    for net in NETS:
        doc = (
            f"MTCNN {net} from {WHEEL_NAME} (sha256 {WHEEL_SHA256}, {WHEEL_LICENCE}); "
            "written by engines/faces_export.py"
        )
        out[net] = builders[net](weights[net], doc).SerializeToString(deterministic=True)
    return out


def detector_version(digests: dict[str, str]) -> str:
    """One hash for the three graphs together: what cache keys carry."""
    joined = ",".join(f"{net}:{digests[net]}" for net in NETS)
    return sha256_hex(joined.encode())[:HASH_CHARS]


def manifest(digests: dict[str, str]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "detector": "mtcnn",
        "version": detector_version(digests),
        "nets": {net: {"file": file_name(net, d), "sha256": d} for net, d in digests.items()},
        "source": {
            "wheel": WHEEL_NAME,
            "requirement": WHEEL_REQUIREMENT,
            "sha256": WHEEL_SHA256,
            "licence": WHEEL_LICENCE,
        },
        "opset": OPSET,
        "input": "float32 NHWC RGB 0..255; P-Net any H, W >= 12; R-Net 24x24; O-Net 48x48",
    }


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    write_atomic(path, data)


def export(out_dir: str | Path, wheel: Path) -> Path:
    """Write (or keep) the three graphs and ``faces.json`` in ``out_dir``; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs = model_bytes(wheel)
    digests = {net: sha256_hex(data) for net, data in graphs.items()}
    for net, data in graphs.items():
        _write_if_changed(out / file_name(net, digests[net]), data)
    text = json.dumps(manifest(digests), indent=2) + "\n"
    path = out / FACES_MANIFEST_NAME
    _write_if_changed(path, text.encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/model", help="output folder (build/model)")
    parser.add_argument(
        "--wheel-dir", type=Path, default=DEFAULT_WHEEL_DIR,
        help="where the facenet-pytorch wheel is kept (fetched by pip when absent)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        wheel = fetch_wheel(args.wheel_dir)
    except FaceWeightsError as exc:
        print(f"faces: {exc}", file=sys.stderr)
        return 1
    path = export(args.out, wheel)
    info = json.loads(path.read_text(encoding="utf-8"))
    print(f"faces: {path} (MTCNN, version {info['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
