"""engines.weights: the torch-free, code-free .pth reader.

Test files are written opcode by opcode (``_Pickle``) so that they carry exactly the globals
and persistent ids torch writes, without torch being installed.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engines import weights as W  # noqa: N812
from engines.graph import lite0_blocks

MARK, TUPLE, REDUCE, BINPERSID, SETITEMS, BUILD = b"(", b"t", b"R", b"Q", b"u", b"b"
EMPTY_TUPLE, EMPTY_DICT, NONE, NEWFALSE, STOP = b")", b"}", b"N", b"\x89", b"."
PROTO2 = b"\x80\x02"
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4, "long": 4}}


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if -(1 << 31) <= value < (1 << 31):
        return b"J" + struct.pack("<i", value)  # BININT
    raw = value.to_bytes(8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _ints(values: tuple[int, ...]) -> bytes:
    return MARK + b"".join(_int(v) for v in values) + TUPLE


def _pid(stype: str, key: str, numel: int, *, legacy: bool, view: bytes = NONE) -> bytes:
    tail = view if legacy else b""
    return (
        MARK + _str("storage") + _global("torch", stype) + _str(key) + _str("cpu") + _int(numel)
        + tail + TUPLE
    )  # fmt: skip


def _tensor(pid: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    hooks = _global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    args = MARK + pid + BINPERSID + _int(offset) + _ints(size) + _ints(stride) + NEWFALSE + hooks
    return _global("torch._utils", "_rebuild_tensor_v2") + args + TUPLE + REDUCE


def _state_dict(entries: list[tuple[str, bytes]], extra: bytes = b"") -> bytes:
    body = b"".join(_str(name) + tensor for name, tensor in entries)
    head = _global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    return PROTO2 + head + MARK + body + SETITEMS + extra + STOP


def _legacy_file(main: bytes, storages: list[tuple[str, np.ndarray]]) -> bytes:
    out = io.BytesIO()
    for header in (W.LEGACY_MAGIC, W.LEGACY_PROTOCOL, SYS_INFO):
        pickle.dump(header, out, protocol=2)
    out.write(main)
    pickle.dump([key for key, _ in storages], out, protocol=2)
    for _, data in storages:
        out.write(struct.pack("<q", data.size))
        out.write(data.astype(data.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def _zip_file(main: bytes, storages: list[tuple[str, np.ndarray]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", main)
        for key, data in storages:
            archive.writestr(f"archive/data/{key}", data.tobytes())
    return out.getvalue()


def _write(tmp_path: Path, data: bytes, name: str = "w.pth") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _sample(*, legacy: bool) -> tuple[bytes, list[tuple[str, np.ndarray]], dict[str, np.ndarray]]:
    """Two tensors sharing one storage (one transposed, one at an offset) and an int64 scalar."""
    floats = np.arange(20, dtype=np.float32) * 0.5 - 3.0
    longs = np.array([7], dtype=np.int64)
    f_pid = _pid("FloatStorage", "0", 20, legacy=legacy)
    main = _state_dict(
        [
            ("a.weight", _tensor(f_pid, 0, (3, 4), (1, 3))),  # a transposed 4x3 view
            ("a.bias", _tensor(f_pid, 12, (2, 2), (2, 1))),
            ("bn.num_batches_tracked", _tensor(_pid("LongStorage", "1", 1, legacy=legacy), 0, (),
                                               ())),
        ]
    )  # fmt: skip
    expected = {
        "a.weight": floats[:12].reshape(4, 3).T,
        "a.bias": floats[12:16].reshape(2, 2),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    return main, [("0", floats), ("1", longs)], expected


def _check_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert got[name].flags.c_contiguous and got[name].flags.owndata


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_hand_made_file_round_trips(tmp_path, legacy):
    main, storages, expected = _sample(legacy=legacy)
    data = _legacy_file(main, storages) if legacy else _zip_file(main, storages)
    _check_same(W.load_state_dict(_write(tmp_path, data)), expected)


def test_legacy_storage_view(tmp_path):
    floats = np.arange(10, dtype=np.float32)
    view = MARK + _str("v") + _int(4) + _int(3) + TUPLE
    pid = _pid("FloatStorage", "0", 10, legacy=True, view=view)
    main = _state_dict([("t", _tensor(pid, 1, (2,), (1,)))])
    got = W.load_state_dict(_write(tmp_path, _legacy_file(main, [("0", floats)])))
    np.testing.assert_array_equal(got["t"], [5.0, 6.0])


def test_shipped_checkpoint_reads_completely():
    got = W.load_state_dict(W.shipped_weights_path())
    blocks = lite0_blocks()
    assert len(got) == 6 * 2 + 2 + sum(6 * (3 if b.expand != 1 else 2) for b in blocks)
    assert got["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert got["_fc.weight"].shape == (1000, 1280)
    assert got["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert got["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [v for v in got.values() if v.dtype != np.int64]
    assert all(v.dtype == np.float32 for v in floats)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(v.size for k, v in got.items() if not k.endswith(buffers)) == 4_652_008
    # First values exactly as torch.load reads them (torch 2.13): decoding order and endianness.
    first = ["-0x1.1c3efcp+0", "-0x1.4f0b94p+0", "-0x1.4cd26p-7"]
    assert got["_conv_stem.weight"].ravel()[:3].tolist() == [float.fromhex(x) for x in first]
    assert np.isfinite(np.concatenate([v.ravel() for v in floats])).all()


@pytest.mark.reference
def test_shipped_checkpoint_matches_torch_load():
    torch = pytest.importorskip("torch", reason="torch is only in the `reference` extra")
    path = W.shipped_weights_path()
    ours = W.load_state_dict(path)
    theirs = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


@pytest.mark.reference
def test_torch_zip_file_matches(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is only in the `reference` extra")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"w": base.t(), "b": base[1, 2:5], "n": torch.tensor(3), "d": base.double()}
    torch.save(state, tmp_path / "z.pth")
    ours = W.load_state_dict(tmp_path / "z.pth")
    for name, tensor in state.items():
        want = tensor.numpy().astype(np.float32) if tensor.is_floating_point() else tensor.numpy()
        np.testing.assert_array_equal(ours[name], want, err_msg=name)
    assert ours["d"].dtype == np.float32


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["main", "header", "zip"])
def test_malicious_global_is_refused_not_run(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"x": _Evil(marker)}, protocol=2)
    assert b"system" in evil  # the payload really names os.system / posix.system
    if where == "main":
        data = _legacy_file(evil, [])
    elif where == "header":
        data = evil + _legacy_file(_state_dict([]), [])
    else:
        data = _zip_file(evil, [])
    with pytest.raises(W.WeightsError, match=r"refusing global .*system"):
        W.load_state_dict(_write(tmp_path, data))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("builtins", "eval"), ("torch", "load"), ("numpy", "frombuffer"), ("collections", "deque")],
)
def test_any_other_global_is_refused(tmp_path, module, name):
    main = PROTO2 + _global(module, name) + STOP
    with pytest.raises(W.WeightsError, match=f"refusing global {module}.{name}"):
        W.load_state_dict(_write(tmp_path, _legacy_file(main, [])))


def test_build_cannot_rewrite_storage_type(tmp_path):
    # BUILD writes straight into __dict__; on the shared FloatStorage marker it would
    # change how every later file is decoded.
    state = EMPTY_DICT + _str("name") + _str("x") + b"s"
    main = PROTO2 + _global("torch", "FloatStorage") + state + BUILD + STOP
    with pytest.raises(W.WeightsError, match="refusing to set state"):
        W.load_state_dict(_write(tmp_path, _legacy_file(main, [])))
    assert W.STORAGE_TYPES["FloatStorage"].name == "FloatStorage"


@pytest.mark.parametrize("target", ["_rebuild_tensor_v2", "tensor", "storage"])
def test_build_on_our_objects_is_refused(tmp_path, target):
    state = EMPTY_DICT + _str("x") + _int(1) + b"s"
    pid = _pid("FloatStorage", "0", 4, legacy=True)
    obj = {
        "_rebuild_tensor_v2": _global("torch._utils", "_rebuild_tensor_v2"),
        "tensor": _tensor(pid, 0, (4,), (1,)),
        "storage": pid + BINPERSID,
    }[target]
    main = PROTO2 + obj + state + BUILD + STOP
    with pytest.raises(W.WeightsError, match="refusing to set state"):
        W.load_state_dict(_write(tmp_path, _legacy_file(main, [])))


def test_build_on_state_dict_only_accepts_metadata(tmp_path):
    ok = EMPTY_DICT + _str("_metadata") + _global("collections", "OrderedDict") + EMPTY_TUPLE
    ok += REDUCE + b"s" + BUILD
    main, storages, expected = _sample(legacy=True)
    patched = main[:-1] + ok + STOP
    _check_same(W.load_state_dict(_write(tmp_path, _legacy_file(patched, storages))), expected)
    bad = EMPTY_DICT + _str("update") + _int(1) + b"s" + BUILD
    with pytest.raises(W.WeightsError, match="unexpected state"):
        W.load_state_dict(_write(tmp_path, _legacy_file(main[:-1] + bad + STOP, storages)))


def test_storage_type_is_not_callable(tmp_path):
    main = PROTO2 + _global("torch", "FloatStorage") + EMPTY_TUPLE + REDUCE + STOP
    with pytest.raises(W.WeightsError):
        W.load_state_dict(_write(tmp_path, _legacy_file(main, [])))


def test_truncated_storage_is_refused(tmp_path):
    main, storages, _ = _sample(legacy=True)
    data = _legacy_file(main, storages)
    with pytest.raises(W.WeightsError, match="ends inside storage"):
        W.load_state_dict(_write(tmp_path, data[:-1]))
    with pytest.raises(W.WeightsError, match="ends before storage"):
        W.load_state_dict(_write(tmp_path, data[:-12]))
    with pytest.raises(W.WeightsError):
        W.load_state_dict(_write(tmp_path, data[: len(data) // 3]))


def test_huge_declared_storage_is_refused_before_allocating(tmp_path):
    numel = 1 << 40  # 4 TiB of float32 if anyone believed it
    main = _state_dict([("t", _tensor(_pid("FloatStorage", "0", numel, legacy=True), 0, (4,),
                                      (1,)))])  # fmt: skip
    data = _legacy_file(main, [("0", np.zeros(4, np.float32))])
    with pytest.raises(W.WeightsError, match="elements on disk"):
        W.load_state_dict(_write(tmp_path, data))
    count_lie = data[: -(8 + 16)] + struct.pack("<q", numel) + bytes(16)
    with pytest.raises(W.WeightsError, match="ends inside storage"):
        W.load_state_dict(_write(tmp_path, count_lie))


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (5, 5), (5, 1)), (18, (3,), (1,)), (0, (2, 2), (19, 1))],
)
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride):
    main = _state_dict([("t", _tensor(_pid("FloatStorage", "0", 20, legacy=True), offset, size,
                                      stride))])  # fmt: skip
    data = _legacy_file(main, [("0", np.zeros(20, np.float32))])
    with pytest.raises(W.WeightsError, match="reaches element"):
        W.load_state_dict(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("size", "stride"), [((1 << 20, 1 << 20), (0, 0)), ((30,), (0,)), ((4, 6), (1, 1))]
)
def test_a_tensor_with_more_elements_than_its_storage_is_refused(tmp_path, size, stride):
    # Zero or overlapping strides stay inside a 20-element storage, but materialising would
    # copy every element: 4 TiB for the first one.
    main = _state_dict([("t", _tensor(_pid("FloatStorage", "0", 20, legacy=True), 0, size,
                                      stride))])  # fmt: skip
    data = _legacy_file(main, [("0", np.zeros(20, np.float32))])
    with pytest.raises(W.WeightsError, match="elements over a 20-element storage"):
        W.load_state_dict(_write(tmp_path, data))


def test_zip_storage_size_mismatch_is_refused(tmp_path):
    main, storages, _ = _sample(legacy=False)
    storages[0] = ("0", storages[0][1][:-1])
    with pytest.raises(W.WeightsError, match="declared"):
        W.load_state_dict(_write(tmp_path, _zip_file(main, storages)))


def test_not_a_weights_file(tmp_path):
    with pytest.raises(W.WeightsError):
        W.load_state_dict(_write(tmp_path, b"GIF89a not a pickle at all"))
    with pytest.raises(W.WeightsError, match="magic"):
        W.load_state_dict(_write(tmp_path, pickle.dumps(1234, protocol=2)))
    list_file = _legacy_file(PROTO2 + b"]" + STOP, [])  # a pickled list, not a state_dict
    with pytest.raises(W.WeightsError, match="expected a state_dict"):
        W.load_state_dict(_write(tmp_path, list_file))
