"""Render a report page in headless Chromium and read back what the browser saw: whether every
figure decoded (naturalWidth > 0), which figures it showed at under 70% of the size they were
drawn at, which tables are cut (wider than the block that holds them, folded ones unfolded
first), and whether anything sticks out past the window's right edge."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MIN_SHOWN = 0.7  # a figure shown at less than this share of its drawn width is illegible

# Runs after every image has loaded; writes its verdict into an attribute that --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const width = document.documentElement.clientWidth;
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const shrunk = images.filter(i => i.naturalWidth > 0
                               && i.getBoundingClientRect().width < MIN_SHOWN * i.naturalWidth)
    .map(i => `${i.alt}: ${Math.round(i.getBoundingClientRect().width)} of ${i.naturalWidth} px`);
  const cut = [...document.querySelectorAll("table")].filter(t => {
    const r = t.getBoundingClientRect(), holder = t.parentElement.getBoundingClientRect();
    return r.right > holder.right + 1 || t.scrollWidth > t.clientWidth + 1;
  }).map(t => (t.previousElementSibling || t.parentElement).textContent.trim().slice(0, 60));
  const sticking = [...document.body.querySelectorAll("*")].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && r.right > width + 1;
  }).map(e => e.tagName.toLowerCase() + (e.className ? "." + e.className : ""));
  document.body.setAttribute("data-probe", JSON.stringify({
    width, scroll_width: document.documentElement.scrollWidth, images: images.length,
    broken, shrunk, cut, sticking: sticking.slice(0, 10)}));
});
</script>"""


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def probe_page(page: Path, *, width: int, workdir: Path, browser: str) -> dict:
    """Load a copy of ``page`` with the probe at ``width`` CSS pixels; returns the probe's
    verdict: ``width``, ``scroll_width``, ``images``, ``broken`` (alt texts), ``sticking``."""
    copy = workdir / f"probe_{width}.html"
    probe = PROBE.replace("MIN_SHOWN", str(MIN_SHOWN))
    copy.write_text(page.read_text().replace("</body>", probe + "</body>"))
    # --no-sandbox: CI and this machine run as root, where Chromium's sandbox refuses to start.
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--window-size={width},1000", "--virtual-time-budget=20000",
                          "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, f"the probe did not run; chromium printed: {dom[-500:]!r}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, *, width: int, height: int, browser: str) -> Path:
    """A PNG of the first ``height`` CSS pixels of ``page`` at ``width``."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    return out
