"""Headless Chromium for the report tests: load a page from disk and let the page itself say
whether every image loaded. `.ci/run` installs Debian's chromium; without it the tests skip."""
import html
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
         "--virtual-time-budget=10000")

# Appended to a copy of the page: after load, one line per <img> and per <svg> into the DOM.
PROBE = """<script>
window.addEventListener("load", function () {
  var out = [];
  document.querySelectorAll("img").forEach(function (img) {
    out.push("IMG " + (img.complete && img.naturalWidth > 0 ? "ok" : "broken") + " "
             + img.naturalWidth + "x" + img.naturalHeight + " " + img.src.slice(0, 30));
  });
  document.querySelectorAll("svg").forEach(function (svg) {
    var box = svg.getBoundingClientRect();
    out.push("SVG " + Math.round(box.width) + "x" + Math.round(box.height));
  });
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = out.join("\\n");
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    """Path of the chromium binary, or skip the test saying how to get it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs "
                    "it): the self-contained report cannot be checked in a real browser")
    return path


def probe_page(page: Path) -> list[str]:
    """Copy `page` ALONE into a fresh folder, add the probe, render it with --dump-dom and
    return the probe's lines ("IMG ok 640x236 data:image/png;base64,iVB", "SVG 360x280")."""
    binary = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        alone = Path(tmp) / "page" / page.name
        alone.parent.mkdir()
        text = page.read_text(encoding="utf-8")
        alone.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        profile = Path(tmp) / "profile"
        proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                               alone.as_uri()], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOME": tmp})
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    marker = '<pre id="probe-result">'  # the element the probe made (not its own source)
    assert marker in dom, (dom[-500:], proc.stderr[-2000:])
    body = dom.split(marker, 1)[1].split("</pre>", 1)[0]
    return [html.unescape(line) for line in body.strip().splitlines() if line]
