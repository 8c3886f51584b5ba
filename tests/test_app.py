"""``python -m pipeline app``: uploads over real HTTP, the models' probabilities, downloads, refusals, a browser."""

from __future__ import annotations

import http.client
import io
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import SHARED_DATA
from rasterio.crs import CRS

from pipeline.core.channels import L4S_CHANNELS, physical_factors

L4S_TRAIN = SHARED_DATA / "l4s" / "train" / "img"
CRS_UTM = CRS.from_epsg(32645)
TRANSFORM = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 3100000.0)


# -- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    """The app with the shipped models on a free port, CPU only, in a thread; its base URL."""
    from pipeline.app import build_catalogue, make_app_server
    from pipeline.inference.options import InferenceOptions

    server = make_app_server(build_catalogue(), InferenceOptions(device="cpu", block_size=1024), keep=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.shutdown()
        server.server_close()


def multipart(fields: dict[str, str], filename: str | None, data: bytes) -> tuple[str, bytes]:
    """(Content-Type, body) of a form with ``fields`` and the file ``data`` (no file part when
    ``filename`` is None)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if filename is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def post(base: str, filename: str | None, data: bytes, **fields: str) -> tuple[int, str, str]:
    """POST an upload; (status, final URL after redirects, page text)."""
    content_type, body = multipart(fields, filename, data)
    request = urllib.request.Request(base + "/upload", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.url, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.url, exc.read().decode()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
        return response.read()


def model_ids(page: str) -> list[str]:
    return re.findall(r'<section class="model" id="model-[^"]+" data-model="([^"]+)"', page)


def assert_alive(base: str) -> None:
    assert b'id="upload"' in get(base + "/")


# -- inputs --------------------------------------------------------------------------------------
def l4s_patch(tmp: Path, shape: tuple[int, ...] = (128, 128, 14), seed: int = 0) -> Path:
    """A synthetic Landslide4Sense patch: smooth fields around the dataset's typical scaled values."""
    import h5py

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape[0], 1)
    base = 0.8 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)
    img = base[..., None] * rng.uniform(0.8, 1.2, shape[-1]) + rng.normal(0, 0.03, shape)
    path = tmp / f"synthetic_{seed}_{'x'.join(map(str, shape))}.h5"
    with h5py.File(path, "w") as h5:
        h5["img"] = img.astype(np.float64)
    return path


def h5_physical(path: Path) -> np.ndarray:
    """(14, H, W) float32 physical values of a patch, computed here from the published divisors."""
    import h5py

    with h5py.File(path, "r") as h5:
        img = np.moveaxis(h5["img"][()], -1, 0).astype(np.float32)
    factors = physical_factors(L4S_CHANNELS, "l4s")
    return np.stack([band * np.float32(f) for band, f in zip(img, factors, strict=True)])


def chip(tmp: Path, bands: tuple[str, ...] = L4S_CHANNELS, rows: int = 260, cols: int = 300,
         scale: float = 1.0, name: str = "chip.tif") -> tuple[Path, np.ndarray]:
    """A georeferenced GeoTIFF chip in physical units (named bands); its (C, rows, cols) values."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:rows, 0:cols] / 100.0
    field = 0.5 + 0.5 * np.sin(2 * xx + 1) * np.cos(3 * yy)
    values = []
    for b in bands:
        if b == "SLOPE":
            values.append(5 + 30 * field)
        elif b == "DEM":
            values.append(400 + 900 * field)
        else:
            values.append((0.05 + 0.2 * field) * rng.uniform(0.8, 1.2) * scale)
    arr = (np.stack(values) + rng.normal(0, 0.002, (len(bands), rows, cols))).astype(np.float32)
    path = tmp / name
    with rasterio.open(path, "w", driver="GTiff", width=cols, height=rows, count=len(bands), dtype="float32",
                       crs=CRS_UTM, transform=TRANSFORM) as dst:
        dst.write(arr)
        for i, b in enumerate(bands, start=1):
            dst.set_band_description(i, b)
    return path, arr


def direct(image: np.ndarray, channels: tuple[str, ...], model_path: Path, level: str = "L1C") -> np.ndarray:
    """The model on the whole image at once through the pipeline's normalization: (H, W) probability."""
    import torch

    from pipeline.model.artefact import load_artefact
    from pipeline.model.normalization import level_spec, normalize

    art = load_artefact(model_path)
    x = image[[channels.index(c) for c in art.channels]][None]
    xn = normalize(x, np.ones((1, *x.shape[2:]), bool), level_spec(art.normalization, level))
    with torch.no_grad():
        return torch.sigmoid(art.module(torch.from_numpy(xn)))[0, 0].numpy()


def shipped() -> dict[str, tuple[Path, float]]:
    """Catalogue id -> (artefact path, threshold) of the shipped models."""
    from pipeline.app import build_catalogue

    return {e.id: (Path(e.artefact.path), e.threshold) for e in build_catalogue().entries}


def check_against_direct(base: str, page_url: str, page: str, image: np.ndarray) -> None:
    """Every model on the page: its .npy equals the direct computation (1e-5) and its mask the threshold."""
    models = shipped()
    ids = model_ids(page)
    assert sorted(ids) == sorted(models)
    for mid in ids:
        prob = np.load(io.BytesIO(get(f"{page_url}/{mid}-probability.npy")))
        assert prob.dtype == np.float32 and prob.shape == image.shape[1:]
        path, threshold = models[mid]
        np.testing.assert_allclose(prob, direct(image, L4S_CHANNELS, path), rtol=0, atol=1e-5)
        mask = np.load(io.BytesIO(get(f"{page_url}/{mid}-mask.npy")))
        np.testing.assert_array_equal(mask, (prob >= threshold).astype(np.uint8))
    a, b = (np.load(io.BytesIO(get(f"{page_url}/{m}-mask.npy"))) == 1 for m in ids)
    union = (a | b).sum()
    iou = "-" if union == 0 else f"{(a & b).sum() / union:.3f}"
    assert f"<td>{iou}</td>" in page  # the pairwise IoU of the two masks (- when neither flags a pixel)


# -- tests ---------------------------------------------------------------------------------------
def test_a_synthetic_patch_gives_each_model_s_own_probability(app: str, tmp_path: Path) -> None:
    path = l4s_patch(tmp_path)
    status, url, page = post(app, path.name, path.read_bytes(), model="all", level="L1C")
    assert status == 200 and re.search(r"/result/[0-9a-f]+$", url), page[:2000]
    check_against_direct(app, url, page, h5_physical(path))
    assert 'id="agreement"' in page and "intersection over union" in page
    for name in ("rgb.png", "agreement.png", *(f"{m}-{k}.png" for m in model_ids(page)
                                               for k in ("probability", "mask", "overlay"))):
        assert get(f"{url}/{name}").startswith(b"\x89PNG\r\n\x1a\n"), name


def test_a_real_landslide4sense_patch(app: str, tmp_path: Path) -> None:
    if not L4S_TRAIN.is_dir():
        pytest.skip(f"no Landslide4Sense patches at {L4S_TRAIN} (the shared data is absent; set LANDSLIDE_SHARED_DATA)")
    path = L4S_TRAIN / "image_512.h5"  # about 30 % landslide pixels
    path = path if path.is_file() else sorted(L4S_TRAIN.glob("*.h5"))[0]
    status, url, page = post(app, path.name, path.read_bytes(), model="all")
    assert status == 200, page[:2000]
    assert "Landslide4Sense HDF5 patch" in page and "128 x 128 px" in page
    check_against_direct(app, url, page, h5_physical(path))


def test_one_model_only(app: str, tmp_path: Path) -> None:
    path = l4s_patch(tmp_path, seed=1)
    mid = sorted(shipped())[-1]
    status, url, page = post(app, path.name, path.read_bytes(), model=mid)
    assert status == 200 and model_ids(page) == [mid]
    assert 'id="agreement"' not in page


def test_a_georeferenced_chip_goes_through_the_tiled_inference(app: str, tmp_path: Path) -> None:
    path, values = chip(tmp_path)
    status, url, page = post(app, path.name, path.read_bytes(), model="all", units="")
    assert status == 200, page[:3000]
    assert "260 x 300 px" in page and "EPSG:32645" in page
    models = shipped()
    for mid in model_ids(page):
        prob = np.load(io.BytesIO(get(f"{url}/{mid}-probability.npy")))
        assert prob.shape == (260, 300) and np.isfinite(prob).all()
        with rasterio.open(io.BytesIO(get(f"{url}/{mid}-probability.tif"))) as src:
            assert src.crs == CRS_UTM and src.transform == TRANSFORM and src.dtypes[0] == "float32"
            np.testing.assert_array_equal(src.read(1), prob)
        with rasterio.open(io.BytesIO(get(f"{url}/{mid}-mask.tif"))) as src:
            assert src.crs == CRS_UTM and src.transform == TRANSFORM
            np.testing.assert_array_equal(src.read(1), (prob >= models[mid][1]).astype(np.uint8))
        # windows of 128 px every 96 px: the top-left 88 px (short of the blend margin) see one window only
        window = direct(values[:, :128, :128], L4S_CHANNELS, models[mid][0])
        np.testing.assert_allclose(prob[:88, :88], window[:88, :88], rtol=0, atol=1e-5)
        assert not np.allclose(prob[:128, :128], window, atol=1e-3)  # where windows overlap, they are blended


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_an_h5_download_has_no_georeference(app: str, tmp_path: Path) -> None:
    path = l4s_patch(tmp_path, seed=2)
    _, url, page = post(app, path.name, path.read_bytes(), model="all")
    mid = model_ids(page)[0]
    with rasterio.open(io.BytesIO(get(f"{url}/{mid}-probability.tif"))) as src:
        assert src.crs is None and src.shape == (128, 128)
        np.testing.assert_array_equal(src.read(1), np.load(io.BytesIO(get(f"{url}/{mid}-probability.npy"))))
    assert "downloads are not georeferenced" in page


def test_a_model_the_upload_cannot_feed_is_named_and_the_others_run(app: str, tmp_path: Path) -> None:
    path, _ = chip(tmp_path, ("B02", "B03", "B04", "SLOPE", "DEM"), rows=128, cols=128)
    status, url, page = post(app, path.name, path.read_bytes(), model="all")
    assert status == 200 and model_ids(page) == ["landslide-plainunet-rgb-terrain"]
    assert "was not run" in page and "needs channel(s) B01, B05, B06, B07, B08, B09, B11, B12" in page


BAD = {
    "not hdf5 or geotiff": ("notes.h5", b"just some text, not a patch", {},
                            "is neither an HDF5 file nor a GeoTIFF"),
    "empty file": ("empty.h5", b"", {}, "empty.h5 is empty (0 bytes)"),
    "no file": (None, b"", {}, "no file was uploaded"),
    "no file chosen": ("", b"", {}, "no file was uploaded"),
    "unknown model": ("x.h5", b"\x89HDF\r\n\x1a\n", {"model": "nope"}, "unknown model &#x27;nope&#x27;"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_get_a_message(app: str, case: str) -> None:
    filename, data, fields, message = BAD[case]
    status, _, page = post(app, filename, data, **fields)
    assert status == 400 and message in page, page[-3000:]
    assert 'class="error" id="error" role="alert"' in page
    assert_alive(app)


def test_a_patch_of_the_wrong_shape(app: str, tmp_path: Path) -> None:
    path = l4s_patch(tmp_path, shape=(128, 128, 12))
    status, _, page = post(app, path.name, path.read_bytes())
    assert status == 400 and "has shape (128, 128, 12), but a Landslide4Sense patch is (128, 128, 14)" in page
    assert_alive(app)


def test_missing_channels_for_the_chosen_model(app: str, tmp_path: Path) -> None:
    path, _ = chip(tmp_path, ("B02", "B03", "B04"), rows=64, cols=64)
    status, _, page = post(app, path.name, path.read_bytes(), model="landslide-plainunet-rgb-terrain")
    assert status == 400 and "needs channel(s) SLOPE, DEM which the upload lacks" in page
    status, _, page = post(app, path.name, path.read_bytes(), model="all")
    assert status == 400 and "B01" in page and "SLOPE, DEM" in page
    assert_alive(app)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_unnamed_bands_and_digital_numbers_are_refused(app: str, tmp_path: Path) -> None:
    path = tmp_path / "three.tif"
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=3, dtype="float32") as dst:
        dst.write(np.ones((3, 16, 16), np.float32))
    status, _, page = post(app, path.name, path.read_bytes())
    assert status == 400 and "3 band(s) without names" in page
    dn, _ = chip(tmp_path, rows=64, cols=64, scale=10000.0, name="dn.tif")
    status, _, page = post(app, dn.name, dn.read_bytes(), units="physical")
    assert status == 400 and "far above any reflectance" in page and "choose the units" in page
    assert str(tmp_path) not in page and "landslide-app-" not in page  # the temporary copy is not named
    status, _, page = post(app, dn.name, dn.read_bytes(), units="dn", model="landslide-plainunet-rgb-terrain")
    assert status == 200 and "stored units</td><td>dn" in page
    assert_alive(app)


def test_an_upload_over_the_limit_is_refused_before_its_body_is_read(app: str) -> None:
    host, port = app.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/upload")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(600 * 1024 * 1024))
    conn.endheaders()  # no body is sent: the answer comes from the declared length alone
    response = conn.getresponse()
    page = response.read().decode()
    conn.close()
    assert response.status == 413 and "more than this server takes (512 MB" in page
    assert_alive(app)


def test_a_form_that_is_not_multipart(app: str) -> None:
    request = urllib.request.Request(app + "/upload", data=b"model=all",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400 and "multipart/form-data" in err.value.read().decode()
    assert_alive(app)


def test_unknown_pages_and_results(app: str) -> None:
    for path in ("/nope", "/result/0123abcd", "/result/0123abcd/rgb.png"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(app + path, timeout=30)
        assert err.value.code == 404
    assert_alive(app)


def test_results_are_kept_for_the_last_uploads_only() -> None:
    from pipeline.app.compare import Comparison, ResultStore

    store = ResultStore(3)
    items = [Comparison(f"{i:04x}", None, None, []) for i in range(5)]  # type: ignore[arg-type]
    for c in items:
        store.add(c)
    assert len(store) == 3 and store.get(items[0].id) is None and store.get(items[4].id) is items[4]


def test_the_multipart_reader_keeps_binary_files_intact() -> None:
    from pipeline.app.form import parse_form

    data = np.random.default_rng(0).bytes(100_000) + b"\r\n--\r\n\r\n"
    content_type, body = multipart({"model": "all", "units": "dn"}, "chips/a.tif", data)
    form = parse_form(content_type, body)
    assert bytes(form.data) == data and form.fields == {"model": "all", "units": "dn"} and form.filename == "a.tif"


def test_the_command_line() -> None:
    from pipeline.__main__ import build_parser

    args = build_parser("app").parse_args(["app", "--model", "a.safetensors", "--model", "b.safetensors",
                                           "--port", "8123", "--max-upload-mb", "64"])
    assert args.model == [Path("a.safetensors"), Path("b.safetensors")] and args.port == 8123
    assert args.max_upload_mb == 64 and not args.open


def test_the_command_serves_and_prints_its_address(tmp_path: Path) -> None:
    import os
    import signal
    import sys

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "app", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DISPLAY": ""})
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "127.0.0.1 only" in lines[0], lines
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\n", lines[1]), lines
        assert b"landslide-plainunet-rgb-terrain" in get(lines[1].strip())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


# -- in a real browser ---------------------------------------------------------------------------
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium) for this test")


def browse(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_the_result_page_in_a_browser(app: str, tmp_path: Path) -> None:
    path = l4s_patch(tmp_path, seed=3)
    status, url, page = post(app, path.name, path.read_bytes(), model="all")
    assert status == 200
    dom = browse(url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    ids = model_ids(dom.stdout)
    assert len(ids) == 2
    for mid in ids:
        for kind in ("probability", "mask", "overlay"):
            assert f'src="/result/{url.rsplit("/", 1)[1]}/{mid}-{kind}.png"' in dom.stdout
    assert '<section class="agreement" id="agreement">' in dom.stdout and 'src="' in dom.stdout
    shot = tmp_path / "app.png"
    out = browse(url, tmp_path, f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.is_file(), out.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 1000)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 1000  # images were drawn, not an empty page


def test_models_given_on_the_command_line_are_offered(tmp_path: Path) -> None:
    from pipeline.app import build_catalogue
    from pipeline.app.catalogue import SHIPPED_DIR
    from pipeline.core.errors import PipelineError

    own = tmp_path / "mine.safetensors"
    shutil.copyfile(SHIPPED_DIR / "rgb_terrain.safetensors", own)
    catalogue = build_catalogue([own])
    extra = catalogue.entries[-1]
    assert len(catalogue) == len(shipped()) + 1 and not extra.shipped and extra.artefact.path == own
    assert extra.id == "landslide-plainunet-rgb-terrain-2"  # same name as a shipped one: its own id
    assert [e.id for e in build_catalogue([own], shipped=False).entries] == ["landslide-plainunet-rgb-terrain"]
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="bad.safetensors"):
        build_catalogue([tmp_path / "bad.safetensors"])
