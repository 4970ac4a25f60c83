import dataclasses

import pytest

from sidecar import settings as s


def test_defaults_are_valid():
    cfg = s.load(environ={})
    assert cfg == s.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_toml_then_env_override(tmp_path):
    path = tmp_path / "heatcrop.toml"
    path.write_text('[engine]\nthreads = 3\nprofile = "generic"\n[kernel]\nmin_scale = 0.8\n')
    cfg = s.load(path, environ={"HEATCROP_ENGINE_THREADS": "1"})
    assert cfg.engine.threads == 1  # env wins over the file
    assert cfg.engine.profile == "generic"
    assert cfg.kernel.min_scale == 0.8


def test_config_path_from_env(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\n")
    assert s.load(environ={"HEATCROP_CONFIG": str(path)}).server.port == 9000


def test_tuple_from_env_and_toml(tmp_path):
    cfg = s.load(environ={"HEATCROP_SERVER_ALLOWED_SIZES": "400x300, 800x600"})
    assert cfg.server.allowed_sizes == ("400x300", "800x600")
    path = tmp_path / "c.toml"
    path.write_text('[server]\nallowed_sizes = ["1x1"]\n')
    assert s.load(path, environ={}).server.allowed_sizes == ("1x1",)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("HEATCROP_KERNEL_MIN_SCALE", "5"),
        ("HEATCROP_ENGINE_KIND", "cuda"),
        ("HEATCROP_SERVER_PORT", "70000"),
        ("HEATCROP_SERVER_WORKER_NICE", "20"),
        ("HEATCROP_LEGACY_FALLBACK_MAX_AGE_S", "3600"),
        ("HEATCROP_ENGINE_THREADS", "zero"),
        ("HEATCROP_CACHE_BACKEND", "memcached"),
    ],
)
def test_validate_names_the_variable(var, value):
    with pytest.raises(s.SettingsError, match=var):
        s.load(environ={var: value})


def test_toml_errors_name_the_variable(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[engine]\nthreads = "two"\n')
    with pytest.raises(s.SettingsError, match="HEATCROP_ENGINE_THREADS"):
        s.load(path, environ={})
    path.write_text("[engine]\nthredas = 2\n")
    with pytest.raises(s.SettingsError, match="HEATCROP_ENGINE_THREDAS"):
        s.load(path, environ={})
    path.write_text("[nope]\n")
    with pytest.raises(s.SettingsError, match="unknown section"):
        s.load(path, environ={})
    path.write_text("not toml [")
    with pytest.raises(s.SettingsError, match="HEATCROP_CONFIG"):
        s.load(path, environ={})


def test_bool_and_float_parsing():
    assert s._parse("X", "yes", bool) is True
    assert s._parse("X", "off", bool) is False
    with pytest.raises(s.SettingsError):
        s._parse("X", "maybe", bool)
    assert s.load(environ={"HEATCROP_SERVER_MAX_WAIT_MS": "1.5"}).server.max_wait_ms == 1.5


# Any spelling of reading the environment: os.environ, os.getenv, `from os import environ`.
_ENVIRON = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _environ_uses(text: str) -> list[int]:
    import ast

    lines = []
    for node in ast.walk(ast.parse(text)):
        names = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            names = [a.name for a in node.names]
        if _ENVIRON.intersection(names):
            lines.append(node.lineno)
    return lines


def test_only_settings_reads_environ():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for d in ("sidecar", "engines", "kernels"):
        for path in sorted(root.glob(f"{d}/**/*.py")):
            if path == root / "sidecar" / "settings.py":
                continue
            offenders += [f"{path.relative_to(root)}:{n}" for n in _environ_uses(path.read_text())]
    assert offenders == []


@pytest.mark.parametrize(
    "text",
    ["import os\nos.getenv('X')", "from os import environ", "import os\nos.environ.get('X')"],
)
def test_the_environ_check_sees_every_spelling(text):
    assert _environ_uses(text)
    assert not _environ_uses("import os\nos.path.join('a')")


def test_answer_margin_must_leave_time_for_work():
    env = {"HEATCROP_SERVER_DEADLINE_MS": "50", "HEATCROP_SERVER_ANSWER_MARGIN_MS": "50"}
    with pytest.raises(s.SettingsError, match="HEATCROP_SERVER_ANSWER_MARGIN_MS=50"):
        s.load(environ=env)
    env["HEATCROP_SERVER_ANSWER_MARGIN_MS"] = "10"
    assert s.load(environ=env).server.answer_margin_ms == 10


@pytest.mark.parametrize(
    "var",
    [
        "HEATCROP_SERVER_MAX_WAIT_MS",
        "HEATCROP_SERVER_DEADLINE_MS",
        "HEATCROP_KERNEL_ZOOM_WEIGHT",
        "HEATCROP_KERNEL_CUT_WEIGHT",
        "HEATCROP_KERNEL_CENTER_SIGMA",
        "HEATCROP_KERNEL_MIN_CONFIDENCE",
    ],
)
def test_infinite_values_are_refused(var):
    with pytest.raises(s.SettingsError, match=var):
        s.load(environ={var: "inf"})


def test_max_wait_must_leave_time_for_work():
    with pytest.raises(s.SettingsError, match="HEATCROP_SERVER_MAX_WAIT_MS"):
        s.load(environ={"HEATCROP_SERVER_MAX_WAIT_MS": "1e9"})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"HEATCROP_LEGACY_KEY": "my-secret-key"}, "HEATCROP_LEGACY_KEY: must be hex"),
        ({"HEATCROP_LEGACY_KEY": "abcd", "HEATCROP_LEGACY_SALT": "xyz"}, "HEATCROP_LEGACY_SALT"),
    ],
)
def test_imgproxy_key_and_salt_must_be_hex(env, match):
    with pytest.raises(s.SettingsError, match=match):
        s.load(environ={"HEATCROP_LEGACY_DIALECT": "imgproxy", **env})
    s.load(
        environ={
            "HEATCROP_LEGACY_DIALECT": "imgproxy",
            "HEATCROP_LEGACY_KEY": "ab12",
            "HEATCROP_LEGACY_SALT": "cd34",
        }
    )


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("", "CROP|PLAIN"),
        ("/c/{x0}/{path}", "CROP|PLAIN"),
        ("/c/{path}|/p/{path}|/q", "CROP|PLAIN"),
        ("/c/{wat}/{path}|/p/{path}", "uses \\['wat'\\]"),
        ("/c/{x0}/{path}|/p/{x0}/{path}", "plain template uses \\['x0'\\]"),
        ("c/{x0}/{path}|/p/{path}", "must start with '/'"),
        ("/c/{x0/{path}|/p/{path}", "does not parse"),
        ("/c/{x0:q}/{path}|/p/{path}", "does not format"),
        ("/c/{}/{path}|/p/{path}", "uses \\[''\\]"),
    ],
)
def test_legacy_templates_are_checked_at_start_up(template, match):
    env = {"HEATCROP_LEGACY_DIALECT": "template", "HEATCROP_LEGACY_TEMPLATE": template}
    with pytest.raises(s.SettingsError, match=f"HEATCROP_LEGACY_TEMPLATE.*{match}"):
        s.load(environ=env)


def test_a_good_legacy_template_loads():
    env = {
        "HEATCROP_LEGACY_DIALECT": "template",
        "HEATCROP_LEGACY_TEMPLATE": "/c/{x0},{y0},{x1},{y1}/{w}x{h}/{path}|/p/{w}x{h}/{path}",
    }
    assert s.load(environ=env).legacy.dialect == "template"


def test_kernel_defaults_are_the_window_search_defaults():
    from kernels.window import KNOB_BOUNDS, SearchParams

    kernel, search = s.KernelSettings(), SearchParams()
    for name in KNOB_BOUNDS:
        assert getattr(kernel, name) == getattr(search, name)


@pytest.mark.parametrize(
    ("var", "value", "ok"),
    [
        ("HEATCROP_KERNEL_MIN_SCALE", "0.05", True),  # the search's (0, 1]
        ("HEATCROP_KERNEL_MIN_SCALE", "0", False),
        ("HEATCROP_KERNEL_CUT_BAND", "0.5", True),  # the search's [0, 0.5]
        ("HEATCROP_KERNEL_CUT_BAND", "0.51", False),
        ("HEATCROP_KERNEL_SCALES", "65", False),
        ("HEATCROP_KERNEL_STEPS", "1", False),
        ("HEATCROP_KERNEL_CUT_WEIGHT", "inf", False),
        ("HEATCROP_KERNEL_ZOOM_WEIGHT", "-0.1", False),  # the service's own policy
    ],
)
def test_kernel_bounds_are_the_window_search_bounds(var, value, ok):
    from kernels.window import SearchParams

    if ok:
        kernel = s.load(environ={var: value}).kernel
        SearchParams(**{n: getattr(kernel, n) for n in ("min_scale", "cut_band")})
    else:
        with pytest.raises(s.SettingsError, match=var):
            s.load(environ={var: value})
