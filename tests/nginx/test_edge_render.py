"""The nginx renderer: every mode passes ``nginx -t``; URL patterns; a custom pattern served."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nginx.render import NginxConfig, check, pattern_regexes, render
from nginx.stack import HOST, free_port, nginx_service, thumbor_service
from tests.support.edge_stack import fake_sidecar, fetch, pixels, require_tools
from tests.support.images import photo_like


def _py(regex: str) -> re.Pattern[str]:
    return re.compile(regex.replace("(?<", "(?P<"))


def _standin_image(tmp_path: Path) -> Path:
    path = tmp_path / "standin.jpg"
    photo_like(160, 120).jpegsave(str(path))
    return path


@pytest.mark.parametrize("mode", ["edge", "legacy", "standin"])
def test_every_mode_renders_a_config_nginx_accepts(tmp_path: Path, mode: str) -> None:
    require_tools()
    cfg = NginxConfig(
        out=tmp_path / mode,
        mode=mode,
        listen="127.0.0.1:18080",
        admin_listen="127.0.0.1:18090",
        sidecars=("127.0.0.1:18081", "127.0.0.1:18082"),
        legacy="127.0.0.1:18888",
        standin_image=_standin_image(tmp_path),
        access_log=True,
    )
    text = render(cfg).read_text()
    assert "{{" not in text
    assert "syntax is ok" in check(cfg.out)
    if mode == "edge":
        assert "hash $crop_source consistent;" in text
        assert text.count("server 127.0.0.1:1808") == 2
        odd = re.search(r"error_page ([0-9 ]+) = @legacy_plain;", text)
        assert odd is not None
        codes = {int(c) for c in odd.group(1).split()}
        # Down, slow or failing, and any status of no sidecar of ours; never its refusals.
        assert {429, 500, 501, 502, 503, 504} <= codes
        assert not codes & {200, 304, 400, 404, 413, 415, 422}
        assert "filters:max_age(30)" in text
        assert "internal;" in text


def test_a_thumbor_key_makes_nginx_sign_its_fallback(tmp_path: Path) -> None:
    require_tools()
    cfg = NginxConfig(
        out=tmp_path / "signed",
        listen="127.0.0.1:18080",
        admin_listen="127.0.0.1:18090",
        sidecars=("127.0.0.1:18081",),
        legacy="127.0.0.1:18888",
        legacy_key='k"ey\\',
    )
    text = render(cfg).read_text()
    assert "proxy_pass http://heatcrop_legacy$legacy_plain_path;" in text
    assert "/unsafe/" not in text
    sign = cfg.out / "thumbor_sign.js"
    assert sign.stat().st_mode & 0o077 == 0  # the key is readable by its owner only
    assert 'var KEY = "k\\"ey\\\\";' in sign.read_text()
    assert "syntax is ok" in check(cfg.out)


def test_pattern_regexes_split_the_raw_request_line() -> None:
    routed, raw = pattern_regexes("/img/{W}x{H}/{path}")
    assert _py(routed).match("/img/400x300/a/b.jpg")
    assert not _py(routed).match("/img/400000x300/a/b.jpg")
    assert not _py(routed).match("/imgs/400x300/a/b.jpg")
    match = _py(raw).match("/img/400x300/a/b%20c.jpg?x=1")
    assert match is not None
    assert match.group("crop_w", "crop_h", "crop_path") == ("400", "300", "a/b%20c.jpg")
    routed, raw = pattern_regexes("/p.x/{H}/{W}/{path}")
    match = _py(raw).match("/p.x/30/40/q.jpg")
    assert match is not None and match.group("crop_w", "crop_h") == ("40", "30")
    assert not _py(routed).match("/pax/30/40/q.jpg")  # the dot is literal


@pytest.mark.parametrize(
    "pattern", ["/img/{W}x{H}", "/img/{path}/{W}x{H}", "img/{W}x{H}/{path}", '/"{W}/{H}/{path}',
                "/img/{W}x{W}/{path}"]
)  # fmt: skip
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        pattern_regexes(pattern)


def test_fallback_max_age_over_30_s_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="30"):
        NginxConfig(
            out=tmp_path, listen="127.0.0.1:1", admin_listen="127.0.0.1:2",
            sidecars=("127.0.0.1:3",), legacy="127.0.0.1:4", fallback_max_age_s=31,
        )  # fmt: skip


def test_a_custom_pattern_is_served(tmp_path: Path) -> None:
    """`/photos/{H}/{W}/{path}` in front of a failing sidecar and real Thumbor: the fallback
    is Thumbor's W x H crop, so height and width reach it in the right order."""
    require_tools()
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    photo_like(640, 480).jpegsave(str(images / "a" / "b.jpg"))
    legacy = thumbor_service(tmp_path / "thumbor", images)
    port = free_port()
    sidecar = fake_sidecar(tmp_path, "error", port)
    edge = nginx_service(
        NginxConfig(
            out=tmp_path / "edge",
            listen=f"{HOST}:{free_port()}",
            admin_listen=f"{HOST}:{free_port()}",
            sidecars=(f"{HOST}:{port}",),
            legacy=legacy.address,
            pattern="/photos/{H}/{W}/{path}",
        )
    )
    try:
        for svc in (legacy, sidecar, edge):
            svc.start()
        resp = fetch(f"http://{edge.address}/photos/300/400/a/b.jpg")
        assert resp.status == 200
        assert resp.header("X-Heatcrop-Served") == "fallback"
        assert resp.max_age is not None and resp.max_age <= 30
        assert pixels(resp.body).shape == (300, 400, 3)
        assert fetch(f"http://{edge.address}/img/400x300/a/b.jpg").status == 404
    finally:
        for svc in (edge, sidecar, legacy):
            svc.stop()
