"""The report page of a run, opened in a real browser (Debian's chromium through Playwright): no console errors,
no network, every prompt listed, alternatives on hover, the head grid switching layers."""

import json
import shutil

import numpy as np
import pytest
from helpers import run_cli, write_sae

import gemmalens

from gemmalens.errors import ConfigError
from gemmalens.sinks.report import build_report

CAPTURE = ["--capture", "generate.*.sample.token_prob", "--capture", "generate.*.sample.softmax_probs",
           "--capture", "model.layers.1.self_attn.attn_weights", "--capture", "model.layers.3.self_attn.attn_weights",
           "--capture", "model.layers.0.logit_lens.*", "--capture", "model.layers.3.logit_lens.*"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "the report tests need Debian's chromium: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_folder):
    out = tmp_path_factory.mktemp("report") / "run"
    done = run_cli("run", "--model", tiny_folder, "--max-tokens", 4, "--temperature", 0.7, "--seed", 3,
                   "--batch-size", 4, *CAPTURE, "--output-dir", out, "--quiet")
    assert done.returncode == 0, done.stderr
    made = run_cli("report", out)
    assert made.returncode == 0 and (out / "report.html").exists(), made.stderr
    return out


def open_page(browser, path):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    seen = {"errors": [], "requests": []}
    page.on("console", lambda message: seen["errors"].append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on("request", lambda request: seen["requests"].append(request.url))
    page.goto(path.as_uri())
    return page, seen


def test_the_report_opens_from_disk_with_every_prompt_and_no_network(browser, run, tmp_path):
    page, seen = open_page(browser, run / "report.html")
    results = json.loads((run / "results.json").read_text())
    listed = page.locator("nav .prompt").all_text_contents()
    assert listed == [f"{r['id']}: {r['prompt']}" for r in results]
    page.screenshot(path=str(tmp_path / "report.png"))
    assert seen["errors"] == [] and seen["requests"] == [(run / "report.html").as_uri()]


def test_hover_shows_the_alternatives_and_the_head_grid_switches_layers(browser, run):
    page, seen = open_page(browser, run / "report.html")
    page.locator("nav .prompt").nth(5).click()
    results = json.loads((run / "results.json").read_text())
    assert page.locator(".generated").count() == len(results[5]["tokens"])
    page.hover(".generated[data-step='1']")
    tip = page.text_content("#tip")
    assert tip.startswith("step 1:") and "p=" in tip and "alternatives:" in tip and tip.count(",") >= 4
    assert page.locator("#heads canvas").count() == 4 and page.text_content("#big-title") == "layer 1 head 0"
    page.click("button[data-layer='3']")
    page.locator("#heads canvas").nth(2).click()
    assert page.text_content("#big-title") == "layer 3 head 2"
    assert page.locator("table.lens tr").count() == 1 + 2  # a header, then a row per captured layer
    assert seen["errors"] == []


@pytest.fixture(scope="module")
def steered(tmp_path_factory, tiny_folder, run):
    """The same run with layer 1 steered hard and an SAE on layer 2: reported beside ``run``."""
    root = tmp_path_factory.mktemp("steered")
    write_sae(root, "resid_post/layer_2_width_48_l0_small", "model.layers.2.output", 64)
    np.save(root / "v.npy", np.full(64, 40.0, np.float32))
    out = root / "run"
    done = run_cli("run", "--model", tiny_folder, "--max-tokens", 4, "--temperature", 0.7, "--seed", 3,
                   "--batch-size", 4, *CAPTURE, "--steer", f"model.layers.1.resid_out={root / 'v.npy'}",
                   "--sae", root / "resid_post/layer_2_width_48_l0_small", "--capture", "sae.*.features",
                   "--output-dir", out, "--quiet")
    assert done.returncode == 0, done.stderr
    made = run_cli("report", out, "--baseline", run)
    assert made.returncode == 0, made.stderr
    return out


def test_an_edited_run_beside_its_baseline_and_the_features_of_a_chosen_token(browser, steered, run):
    page, seen = open_page(browser, steered / "report.html")
    edited = json.loads((steered / "results.json").read_text())[0]["tokens"]
    base = json.loads((run / "results.json").read_text())[0]["tokens"]
    differing = [k for k, (a, b) in enumerate(zip(edited, base)) if a != b]
    assert differing, "the steer changed nothing: the test would prove nothing"
    assert page.locator(".generated.differs").count() == len(differing)
    assert page.locator(".baseline-token").count() == len(base)
    page.hover(f".generated[data-step='{differing[0]}']")
    assert "baseline:" in page.text_content("#tip") and "change in p:" in page.text_content("#tip")
    page.click(".generated[data-step='2']")
    listed = page.text_content(".feature-list")
    assert listed.startswith("resid_post_layer_2_width_48_l0_small at position ")
    archive = gemmalens.open_activations(steered)
    positions, features = archive.trajectory("sae.resid_post_layer_2_width_48_l0_small.features", 0)
    position = int(page.locator(".generated[data-step='2']").get_attribute("data-position"))
    strongest = int(np.argmax(features[list(positions).index(position)]))
    assert listed.split(": ", 1)[1].startswith(f"{strongest} (")
    assert seen["errors"] == []


def test_a_folder_without_results_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no results.json"):
        build_report(tmp_path)
