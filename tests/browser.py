"""Headless Chromium for the tests of the pages we write (evaluation report, gallery): run it,
and list which images of a page load."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium"

CHECK = """<script>
window.addEventListener('load', function () {
  var res = Array.prototype.slice.call(document.images).map(function (i) {
    return [i.getAttribute('src'), i.complete, i.naturalWidth]; });
  var pre = document.createElement('pre'); pre.id = 'imgcheck';
  pre.textContent = JSON.stringify(res); document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"headless Chromium not installed; install it with: {INSTALL}")


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def images_in_chromium(page: Path, profile: Path) -> list[list]:
    """[src, complete, naturalWidth] of every <img> of ``page`` as headless Chromium loads it
    (a probe copy of the page beside it, with a script that lists them after load)."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"),
                     encoding="utf-8")
    r = run_chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], profile)
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', r.stdout, re.S)
    assert found, r.stdout[-2000:]
    return json.loads(html.unescape(found.group(1)))


