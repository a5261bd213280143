"""The HTML report as users see it: opened in headless Chromium and screenshotted.

The browser comes from the OS package manager (`.ci/run` installs `chromium` when it can);
without one these tests are skipped and say so. With ``--overwrite-golden`` the screenshot
of the README (``docs/html-report.png``) is regenerated from the same run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lipcheck.cli import run

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# the chart colours of lipcheck.html_report.COLORS, as RGB
UPPER, ESTIMATE, BOUND = (0xD6, 0x27, 0x28), (0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C)
WIDTH, HEIGHT = 1000, 900


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        # a distribution's placeholder (Ubuntu's snap stub) is on PATH but does not run
        if found and subprocess.run([found, "--version"], capture_output=True, timeout=60).returncode == 0:
            return found
    pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)}): "
                "install chromium (apt-get install chromium) to run the screenshot test")


def screenshot(page: Path, png: Path) -> None:
    """Render ``page`` in headless Chromium at WIDTH x HEIGHT into ``png``."""
    done = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={png}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]


@pytest.mark.e2e
def test_html_report_renders_its_charts_in_a_browser(tmp_path: Path, overwrite_golden: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    page = tmp_path / "report.html"
    monkeypatch.chdir(ROOT)  # the report names the model as the README's command does
    assert run(["inspect", "samples/cnn.onnx", "--format", "html", "-o", str(page), "--no-progress"]) == 0
    png = tmp_path / "report.png"
    screenshot(page, png)
    with image_mod.open(png) as im:
        assert im.size == (WIDTH, HEIGHT)
        pixels = list(im.convert("RGB").getdata())
    colours = set(pixels)

    def near(rgb: tuple[int, int, int]) -> int:
        return sum(1 for p in pixels if all(abs(a - b) <= 12 for a, b in zip(p, rgb)))

    assert len(colours) > 50  # text, axes and marks, not a blank or error page
    # the per-layer chart's estimates and upper bounds, and the bound along the graph, are drawn
    assert near(UPPER) > 20 and near(ESTIMATE) > 20 and near(BOUND) > 20
    if overwrite_golden:
        shutil.copy(png, ROOT / "docs" / "html-report.png")
