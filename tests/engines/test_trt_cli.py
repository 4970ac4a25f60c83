"""`heatcrop engines list`: plans and whether each fits this machine, with or without TensorRT."""

from __future__ import annotations

import argparse
import json

import pytest

from engines.model import read_manifest
from engines.plans import Machine, detect_machine
from sidecar import cli
from tests.support.plan_files import H100, L4, OLD_MODEL_SHA, write_plan


@pytest.fixture
def plans(model_dir, tmp_path):
    digest = str(read_manifest(model_dir)["sha256"])
    current = write_plan(tmp_path, H100, digest)
    other = write_plan(tmp_path, L4, digest)
    stale = write_plan(tmp_path, H100, OLD_MODEL_SHA)
    (tmp_path / "zz-broken.json").write_text("{}")
    return {"current": current, "other": other, "stale": stale}


def _args(model_dir, plan_dir, as_json=False):
    return argparse.Namespace(config=None, plan_dir=plan_dir, model_dir=model_dir, json=as_json)


def test_list_without_tensorrt(model_dir, tmp_path, plans, capsys):
    if isinstance(detect_machine(), Machine):
        pytest.skip("TensorRT and a GPU are present here")
    code = cli.main(["engines", "list", "--plan-dir", str(tmp_path), "--model-dir", str(model_dir)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("this machine: no TensorRT (TensorRT not importable")
    assert lines[1] == f"model: {str(read_manifest(model_dir)['sha256'])[:12]}"
    assert lines[2] == f"plans in {tmp_path}: 4"
    assert out.count("unknown: no TensorRT") == 2  # current model: cannot tell here
    assert "stale: built from model 0123456789ab" in out
    assert "broken: " in out and "zz-broken.json" in out
    assert plans["current"].plan_file in out


def test_list_on_a_matching_machine(model_dir, tmp_path, plans, capsys):
    assert cli._engines_list(_args(model_dir, tmp_path, as_json=True), probe=lambda: H100) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["machine"] == H100.describe()
    status = {row.get("plan", row.get("manifest")): row["status"] for row in doc["plans"]}
    assert status == {
        plans["current"].plan_file: "match",
        plans["other"].plan_file: "other GPU",
        plans["stale"].plan_file: "stale",
        "zz-broken.json": "broken",
    }


def test_list_empty_folder_says_how_to_build(model_dir, tmp_path, capsys):
    assert cli._engines_list(_args(model_dir, tmp_path / "none"), probe=lambda: H100) == 0
    assert f"plans in {tmp_path / 'none'}: 0 (build with `make engines`)" in capsys.readouterr().out


def test_list_without_a_model(tmp_path, capsys):
    write_plan(tmp_path / "plans")
    args = _args(tmp_path / "no-model", tmp_path / "plans")
    assert cli._engines_list(args, probe=lambda: H100) == 0
    out = capsys.readouterr().out
    assert f"model: not built in {tmp_path / 'no-model'}" in out
    assert "match: fp16, batch 1..64" in out
