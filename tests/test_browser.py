"""The Gradio page in a real browser (headless Chromium from Debian's `chromium` package, driven by
playwright without a browser download): generate, its progress bar moving with the server's
streamed steps, Stop, the examples, a bad upload, and the page working after it. The README's
docs/screenshot.png is this test's screenshot of the running page (remade when the controls
change)."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
# headless, and nothing that reaches out: no GPU, sync, updates, background or QUIC traffic
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-quic", "--no-first-run",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def browser_page(ui, tmp_path_factory):
    """(page, [every URL it requested]) on the front end, in a fresh Chromium profile."""
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(ui.url, wait_until="networkidle")
        yield page, requested
        context.close()


def shown_image(page, img) -> np.ndarray:
    """The pixels of an <img> on the page, fetched from its src the way the browser got them."""
    answer = page.request.get(img.get_attribute("src"))
    assert answer.ok, answer.status
    return np.asarray(Image.open(io.BytesIO(answer.body())).convert("RGB"))


def test_the_page_loads_and_asks_only_its_own_server(ui, browser_page):
    page, requested = browser_page
    sync_api.expect(page).to_have_title("pixtok")     # set once the page has rendered
    for tab in ("Generate", "Classify", "Depth"):
        assert page.get_by_role("tab", name=tab).is_visible()
    origin = ui.url.rstrip("/")
    strangers = {u for u in requested if not u.startswith((origin, "data:", "blob:"))}
    assert not strangers     # no analytics, fonts or scripts from elsewhere


def test_generate_shows_a_non_blank_image(ui, browser_page, tmp_path_factory):
    if "generate" not in ui.models:
        pytest.skip("the session server has no generate model yet (tests/conftest.py `server`)")
    page, _ = browser_page
    page.get_by_role("tab", name="Generate").click()
    page.fill("#generate-steps input[type=number]", "2")   # a tiny model: 2 steps suffice
    page.press("#generate-steps input[type=number]", "Tab")
    page.click("#generate-btn")
    img = page.locator("#generate-gallery img").first
    img.wait_for(state="visible")
    pixels = shown_image(page, img)
    shot = tmp_path_factory.mktemp("screenshots") / "generate.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 8
    assert pixels.std() > 1.0, "the generated image is blank"
    keep_readme_screenshot_current(page, shot)


# the controls the page shows (tabs, buttons, labels, choices), as the README's screenshot must
CONTROLS = """() => {
  const seen = new Set();
  for (const e of document.querySelectorAll(
      'button, [role=tab], label, [data-testid=block-info], [data-testid=block-label]')) {
    if (!e.checkVisibility || !e.checkVisibility()) continue;
    if (e.closest('#generate-gallery')) continue;      // captions of what was generated
    const text = (e.innerText || '').replace(/\\s+/g, ' ').trim();
    if (text && text.length <= 60) seen.add(text);
  }
  return [...seen].sort();
}"""
README_SHOT = ROOT / "docs" / "screenshot.png"
CONTROLS_KEY = "pixtok-page-controls"


def keep_readme_screenshot_current(page, shot) -> None:
    """docs/screenshot.png (the README's picture of the page) is this test's screenshot of the
    running page. It carries the list of controls it shows; when the page's controls differ
    (a new sampler, field or button) the test writes the new screenshot there and fails, so a
    stale picture cannot pass unnoticed: commit the new file."""
    from PIL.PngImagePlugin import PngInfo

    controls = json.dumps(page.evaluate(CONTROLS))
    shown = Image.open(README_SHOT).info.get(CONTROLS_KEY) if README_SHOT.exists() else None
    if shown == controls:
        return
    info = PngInfo()
    info.add_text(CONTROLS_KEY, controls)
    Image.open(shot).save(README_SHOT, pnginfo=info, optimize=True)
    pytest.fail(f"docs/screenshot.png showed other controls than the page has now; it was "
                f"remade from the running page ({README_SHOT}): commit it")


# Installed before a generation: a MutationObserver writes down every progress-bar label the
# Generate tab shows ("seed S: step i of n") and whether any of `watched` ever appeared in its
# gallery, so the test reads what the page showed over the whole run, not one moment of it.
RECORDER = """(watched) => {
  const seen = {labels: [], hits: []};
  const record = () => {
    const gallery = document.querySelector('#generate-gallery');
    if (!gallery) return;
    const bar = gallery.querySelector('[role=progressbar]');
    const label = bar ? bar.getAttribute('aria-label') : null;
    if (label && seen.labels[seen.labels.length - 1] !== label) seen.labels.push(label);
    for (const w of watched)
      if (!seen.hits.includes(w) && gallery.innerHTML.includes(w)) seen.hits.push(w);
  };
  if (window.__pixtokObserver) window.__pixtokObserver.disconnect();
  window.__pixtokObserver = new MutationObserver(record);
  window.__pixtokObserver.observe(document.body,
    {subtree: true, childList: true, attributes: true, characterData: true});
  window.__pixtok = seen;
}"""
GENERATION_MS = 300_000       # hundreds of steps of the tiny generator on a busy 2-core machine


def fill_generate_form(page, seed: int, steps: int, sampler: str):
    page.get_by_role("tab", name="Generate").click()
    for field, value in (("#generate-seed", seed), ("#generate-steps", steps)):
        page.fill(f"{field} input[type=number]", str(value))
        page.press(f"{field} input[type=number]", "Tab")
    page.locator("#generate-sampler label", has_text=sampler).click()


def steps_shown(page, seed: int) -> list[tuple[int, int]]:
    """(step, total) of every progress label the recorder saw for this seed, in order."""
    labels = page.evaluate("() => window.__pixtok.labels")
    return [(int(m[1]), int(m[2])) for m in
            (re.search(rf"seed {seed}: step (\d+) of (\d+)", t) for t in labels) if m]


def caption(seed: int) -> str:
    return f"seed {seed} · #0"      # the gallery caption of a finished run's first image


def test_the_progress_bar_moves_with_the_servers_steps(ui, browser_page):
    if "generate" not in ui.models:
        pytest.skip("the session server has no generate model")
    page, _ = browser_page
    fill_generate_form(page, seed=21, steps=400, sampler="ddpm")
    page.evaluate(RECORDER, [caption(21)])
    page.click("#generate-btn")
    page.wait_for_function("c => window.__pixtok.hits.includes(c)", arg=caption(21),
                           timeout=GENERATION_MS)
    shown = steps_shown(page, 21)
    assert {total for _, total in shown} == {400}, shown
    steps = [step for step, _ in shown]
    assert steps == sorted(steps), steps                  # it only moves forward
    assert len(set(steps)) >= 2 and any(0 < s < 400 for s in steps), steps    # it moved


def test_stop_cancels_and_the_page_is_free_again(ui, browser_page):
    if "generate" not in ui.models:
        pytest.skip("the session server has no generate model")
    page, _ = browser_page
    fill_generate_form(page, seed=1234, steps=1000, sampler="ddpm")
    page.evaluate(RECORDER, [caption(1234), caption(77)])
    page.click("#generate-btn")
    page.wait_for_function("() => window.__pixtok.labels.some(t => /step [1-9]/.test(t))",
                           timeout=GENERATION_MS)
    page.click("#generate-stop")
    sync_api.expect(page.locator("#generate-gallery [role=progressbar]")).to_have_count(0)
    # the page takes the next request; its answer comes once the server is free (TorchServe's
    # worker finishes the stopped run first: docs/serving.md)
    fill_generate_form(page, seed=77, steps=2, sampler="ddim")
    page.click("#generate-btn")
    page.wait_for_function("c => window.__pixtok.hits.includes(c)", arg=caption(77),
                           timeout=GENERATION_MS)
    hits = page.evaluate("() => window.__pixtok.hits")
    assert caption(1234) not in hits, "the stopped run's image was shown"
    stopped = [step for step, _ in steps_shown(page, 1234)]
    assert stopped and max(stopped) < 1000, stopped


def test_an_example_fills_in_the_generate_form(ui, browser_page):
    from serving.page_models import generate_examples
    from serving.page_settings import archive_labels, served_archives

    if "generate" not in ui.models:
        pytest.skip("the session server has no generate model")
    page, _ = browser_page
    page.get_by_role("tab", name="Generate").click()
    labels = archive_labels(served_archives(ui.run_dir)[ui.models["generate"]])
    label, seed, sampler, steps, guidance, count = generate_examples(labels)[1]
    page.locator("#generate-examples tbody tr").nth(1).click()
    sync_api.expect(page.locator("#generate-seed input[type=number]")).to_have_value(str(seed))
    sync_api.expect(page.locator("#generate-steps input[type=number]")).to_have_value(str(steps))
    sync_api.expect(page.locator("#generate-count input[type=number]")).to_have_value(str(count))
    sync_api.expect(page.locator("#generate-sampler input[type=radio]:checked")).to_have_value(
        sampler)


def test_the_classify_tab_picks_among_the_served_classifiers(ui, browser_page):
    """The session serves two classifiers (tiny-cls and its ONNX twin): a Model picker names
    both and switches the line that describes the model."""
    from serving.page_settings import served_models

    page, _ = browser_page
    page.get_by_role("tab", name="Classify").click()
    picker = page.locator("#classify-model")
    sync_api.expect(picker).to_be_visible()
    sync_api.expect(picker.locator("input")).to_have_value(ui.models["classify"])
    names = served_models(ui.run_dir)["classify"]
    other = next(n for n in names if n != ui.models["classify"])
    panels = page.locator(".pixtok-model-panel:visible")
    sync_api.expect(panels).to_have_count(1)
    sync_api.expect(panels.first).to_contain_text(f"{ui.models['classify']} · 10 classes")
    picker.locator("input").click()
    page.get_by_role("option", name=other, exact=True).click()
    sync_api.expect(panels.first).to_contain_text(f"{other} · 10 classes")
    picker.locator("input").click()
    page.get_by_role("option", name=ui.models["classify"], exact=True).click()
    sync_api.expect(panels.first).to_contain_text(f"{ui.models['classify']} · 10 classes")


def test_a_generator_shows_its_classes_as_buttons(ui, browser_page):
    if "generate" not in ui.models:
        pytest.skip("the session server has no generate model")
    page, _ = browser_page
    page.get_by_role("tab", name="Generate").click()
    buttons = page.locator("#generate-classes button")
    sync_api.expect(buttons).to_have_count(len(LABELS))
    buttons.nth(4).click()
    page.click("#generate-btn")           # at once: the class is set in the browser itself
    sync_api.expect(page.locator("#generate-class input")).to_have_value(LABELS[4])
    sync_api.expect(page.locator("#generate-gallery")).to_contain_text(
        f"{LABELS[4]} · seed", timeout=GENERATION_MS)


def test_a_bad_upload_shows_the_servers_message_and_the_page_keeps_working(
        server, ui, browser_page, tmp_path):
    page, _ = browser_page
    page.get_by_role("tab", name="Classify").click()
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are notes, not pixels\n" * 4)
    page.locator("#classify-input input[type=file]").set_input_files(str(bad))
    page.click("#classify-btn")
    toast = page.locator(".toast-body").first
    sync_api.expect(toast).to_contain_text("not a PNG, JPEG, WebP, BMP or GIF image")
    assert "Traceback" not in page.content()
    # a second action on the same page succeeds: an example (real Fashion-MNIST test images,
    # shown for a classifier trained on them when the data set is installed), else an upload
    shown = page.locator("#classify-input img")
    if page.locator("button.gallery-item:visible").count():
        page.locator("button.gallery-item:visible").first.click()
        sync_api.expect(shown).to_have_attribute("src", re.compile(r"/fashion-test-[^/]+$"))
        good = ui.run_dir / "ui" / "examples" / shown.get_attribute("src").rsplit("/", 1)[1]
    else:
        good = tmp_path / "noise.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(good)
        page.locator("#classify-input input[type=file]").set_input_files(str(good))
        sync_api.expect(shown).to_have_attribute("src", re.compile(r"/noise\.png$"))
    page.click("#classify-btn")
    want = server.client().classify(good.read_bytes(), model=ui.models["classify"])
    assert want["label"] in LABELS
    output = page.locator("#classify-output")
    sync_api.expect(output.get_by_test_id("label-output-value")).to_have_text(want["label"])
    for top in want["top_k"]:     # one bar per class of the server's top k
        sync_api.expect(output.get_by_test_id(f"{top['label']}-confidence-set")).to_be_visible()
