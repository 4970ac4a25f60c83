import base64
import hashlib
import hmac

from sidecar.legacy import Imgproxy, Template, Thumbor, make_dialect
from sidecar.settings import LegacySettings
from sidecar.sizes import Size


def test_thumbor_unsafe_crop_and_fallback():
    t = Thumbor()
    assert t.crop_url("recipes/a b.jpg", (10, 20, 410, 320), Size(400, 300)) == (
        "/unsafe/10x20:410x320/400x300/recipes/a%20b.jpg"
    )
    assert t.plain_url("/recipes/a.jpg", Size(400, 300)) == (
        "/unsafe/400x300/filters:max_age(30)/recipes/a.jpg"
    )


def test_thumbor_signature_is_hmac_sha1_of_path_without_slash():
    t = Thumbor(key="MY_SECURE_KEY")
    url = t.crop_url("a.jpg", (0, 0, 100, 50), Size(200, 100))
    sig, path = url[1:].split("/", 1)
    assert path == "0x0:100x50/200x100/a.jpg"
    assert len(sig) == 28 and sig.endswith("=")  # thumbor keeps the padding
    assert (
        base64.urlsafe_b64decode(sig)
        == hmac.new(b"MY_SECURE_KEY", path.encode(), hashlib.sha1).digest()
    )
    assert Thumbor(key="other").crop_url("a.jpg", (0, 0, 100, 50), Size(200, 100)) != url


def test_imgproxy_documented_vector():
    # docs.imgproxy.net "signing the URL": key "secret", salt "hello" (hex-encoded).
    ip = Imgproxy(key="736563726574", salt="68656C6C6F")
    path = "/rs:fill:300:400:0/g:sm/aHR0cDovL2V4YW1w/bGUuY29tL2ltYWdl/cy9jdXJpb3NpdHku/anBn.png"
    assert ip._sign(path) == "/oKfUtW34Dvo2BGQehJFR4Nr0_rIjOtdtzJ3QFsUcXH8" + path


def test_imgproxy_crop_uses_absolute_pixels():
    ip = Imgproxy()
    url = ip.crop_url("r/a.jpg", (0, 5, 1, 6), Size(10, 10))
    # a 1-pixel crop stays "1" (absolute), never "0" which imgproxy would treat as "full"
    assert url == "/insecure/c:1:1:nowe:0:5/rs:fill:10:10/plain/local:///r/a.jpg"
    assert "cc:max-age=30" in ip.plain_url("r/a.jpg", Size(10, 10))


def test_template_and_factory():
    tpl = Template(crop="/crop/{x0},{y0},{cw},{ch}/{w}x{h}/{path}", plain="/fit/{w}x{h}/{path}")
    assert tpl.crop_url("a.jpg", (1, 2, 11, 22), Size(5, 10)) == "/crop/1,2,10,20/5x10/a.jpg"
    assert tpl.plain_url("a.jpg", Size(5, 10)) == "/fit/5x10/a.jpg"
    d = make_dialect(LegacySettings(dialect="template", template="/c/{x0}/{path}|/p/{path}"))
    assert d.crop_url("x.jpg", (3, 0, 4, 1), Size(1, 1)) == "/c/3/x.jpg"
    assert make_dialect(LegacySettings(dialect="imgproxy")).name == "imgproxy"
    assert make_dialect(LegacySettings()).name == "thumbor"
