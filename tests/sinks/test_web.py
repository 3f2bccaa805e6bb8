"""The live page, in a real browser: tokens appear as a (controller-paced) run generates them; beyond loopback
the page needs its token."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from gemmalens.control import Controller
from gemmalens.sinks.web import LiveWeb


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.read()
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def test_the_live_page_shows_tokens_as_they_are_generated(tmp_path, tiny_folder):
    from playwright.sync_api import sync_playwright

    port, control = free_port(), f"ipc://{tmp_path}/control"
    proc = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "run", "--model", str(tiny_folder),
                             "--max-tokens", "5", "--temperature", "0", "--batch-size", "4", "--web", "--web-port",
                             str(port), "--control", control, "--control-sync", "--output-dir", str(tmp_path / "out"),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_page(f"http://127.0.0.1:{port}/")
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        assert executable, "the page tests need Debian's chromium: apt-get install chromium (.ci/run does)"
        with sync_playwright() as playwright, Controller(control, timeout=60) as controller:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{port}/")
            lengths = []
            for _ in range(3):  # each go releases one step: the rows grow while the run goes
                controller.go()
                page.wait_for_function("n => [...document.querySelectorAll('td.tokens')].map(t => t.textContent)"
                                       ".join('').length > n", arg=sum(lengths[-1:]) if lengths else 0, timeout=30000)
                lengths.append(sum(len(t) for t in page.locator("td.tokens").all_text_contents()))
            assert lengths == sorted(lengths) and lengths[0] > 0 and page.locator("tr.row").count() >= 4
            page.screenshot(path=str(tmp_path / "live.png"))
            assert errors == []
            while controller.go().get("ended") is not True:
                pass
            browser.close()
        assert proc.wait(120) == 0, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_beyond_loopback_the_page_needs_its_token():
    live = LiveWeb("tcp://127.0.0.1:9", host="0.0.0.0", port=0, name="web")
    try:
        port = live.server.server_address[1]
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert live.token and live.url.endswith(f"?token={live.token}")
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={live.token}", timeout=5).read()
        assert b"gemmalens: live" in page
    finally:
        live.close()
