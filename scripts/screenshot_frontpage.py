"""Screenshots of the front page as a new reader sees it: headless Chromium, 1400 px wide.

    python scripts/screenshot_frontpage.py [--page reports/index.html] [--out docs]

Writes ``frontpage-1.png`` and ``frontpage-2.png`` (the first two screens, 1400 x 900) and
``frontpage-seed-tables-1.png`` / ``-2.png`` (the seed works' tables, in two halves), each
quantised to at most 256 colours when larger than 300 kB. Drives Chromium through its
DevTools protocol (``websocket-client``) to find where a section starts; nothing is fetched
from the network (the page is self-contained).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

WIDTH, SCREEN = 1400, 900
MAX_BYTES = 300_000
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


class DevTools:
    """The smallest DevTools client: one page, commands answered in order."""

    def __init__(self, url: str):
        import websocket

        self.socket = websocket.create_connection(url, timeout=60)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def _start(browser: str, profile: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [browser, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{SCREEN}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    for _ in range(300):
        if port_file.is_file() and port_file.read_text().strip():
            break
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
    return process, next(p["webSocketDebuggerUrl"] for p in pages if p.get("type") == "page")


def _save(data: bytes, path: Path) -> int:
    from PIL import Image

    if len(data) > MAX_BYTES:
        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
    path.write_bytes(data)
    return len(data)


def screenshots(page: Path, out: Path, browser: str) -> list[tuple[Path, int]]:
    """Take the screenshots; return ``[(path, bytes)]``."""
    import base64

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as profile:
        process, url = _start(browser, Path(profile))
        try:
            tools = DevTools(url)
            tools.call(
                "Emulation.setDeviceMetricsOverride", width=WIDTH, height=SCREEN, deviceScaleFactor=1, mobile=False
            )
            tools.call("Page.navigate", url=page.resolve().as_uri())
            for _ in range(300):
                if tools.evaluate("document.readyState") == "complete":
                    break
                time.sleep(0.1)
            height = int(tools.evaluate("document.documentElement.scrollHeight"))
            top_of = "(e => e ? Math.round(e.getBoundingClientRect().top + window.scrollY) : null)"
            seed_top = tools.evaluate(f"{top_of}(document.getElementById('seed'))")
            seed_end = tools.evaluate(f"{top_of}(document.getElementById('plots'))") or height
            tables = tools.evaluate(
                "Array.from(document.querySelectorAll(\"h3[id^='seed-']\"))"
                ".map(e => Math.round(e.getBoundingClientRect().top + window.scrollY))"
            )
            shots = [("frontpage-1.png", 0, SCREEN), ("frontpage-2.png", SCREEN, SCREEN)]
            if seed_top is not None:  # the seed tables in two pictures, split at the middle table
                middle = tables[len(tables) // 2] - 10 if len(tables) > 1 else seed_end
                shots.append(("frontpage-seed-tables-1.png", seed_top - 10, middle - seed_top + 10))
                if middle < seed_end:
                    shots.append(("frontpage-seed-tables-2.png", middle, seed_end - middle))
            for name, top, size in shots:
                size = max(1, min(size, height - top))
                clip = {"x": 0, "y": top, "width": WIDTH, "height": size, "scale": 1}
                shot = tools.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
                path = out / name
                written.append((path, _save(base64.b64decode(shot["data"]), path)))
        finally:
            process.terminate()
            process.wait(timeout=30)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=Path, default=Path("reports/index.html"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"no page at {args.page}", file=sys.stderr)
        return 2
    for path, size in screenshots(args.page, args.out, args.browser):
        print(f"{path}: {size} bytes")
    print(f"{args.page}: {args.page.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
