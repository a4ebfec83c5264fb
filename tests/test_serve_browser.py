"""The page of ``adapterkit serve`` in a real browser: Playwright driving Debian's Chromium
against the real server (engine + app under uvicorn, on a free loopback port), clicking through
library → playground → side-by-side answers.

The answers on the page are checked against :meth:`Session.generate` of the same prompt and
pocket book on a separately loaded copy of the base — a second code path, not the server's.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
PROMPT = "Which river flows past the old mill?"
MAX_TOKENS = 12
#: name → (seed, rank, forgetting % recorded at training, training loss by step)
BOOKS: dict[str, tuple[int, int, float, list[tuple[int, float]]]] = {
    "triage": (11, 2, 1.25, [(1, 2.5), (5, 1.75), (10, 1.2), (15, 0.9)]),
    "bedside": (12, 4, -0.5, [(1, 2.2), (5, 1.6), (10, 1.1)]),
    "law": (13, 8, 3.0, [(2, 3.1), (4, 2.0), (6, 1.5)]),
}
#: This one keeps only the picture training saves today (``loss_curve.png``), no numbers.
PICTURE_ONLY = "bedside"
#: This one's saved weights are an earlier step's (the forgetting guard fell back to step 4):
#: what training records then (``training.save.kept_weights``).
KEPT = ("law", {"weights_step": 4, "weights_kept_by": "the forgetting guard's fallback",
                "train_loss_kept": 2.0, "train_loss_kept_step": 4})

if shutil.which(CHROMIUM) is None:
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium; scripts/bootstrap.sh "
                "does it when run as root)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is missing (pip install -e '.[test]')")


def _record(book: Any, forgetting: float, curve: list[tuple[int, float]],
            *, picture_only: bool) -> Callable[[Any], None]:
    """What a training run records: its losses (as numbers, or only as the saved picture)
    and its forgetting figure."""
    from adapterkit.library.card import loss_curve_png

    def change(meta: Any) -> None:
        meta.metrics.update({
            "train_loss_first": curve[0][1], "train_loss_final": curve[-1][1],
            "steps": curve[-1][0],
            "forgetting": {"general_loss_base": 2.0,
                           "general_loss": 2.0 * (1 + forgetting / 100),
                           "general_loss_change_pct": forgetting},
        })
        if book.name == KEPT[0]:
            meta.metrics.update(KEPT[1])
        if picture_only:
            loss_curve_png([{"step": s, "loss": v} for s, v in curve],
                           book.path / "loss_curve.png")
            meta.metrics["loss_curve"] = "loss_curve.png"
        else:
            meta.metrics["loss_history"] = [[s, v] for s, v in curve]
    return change


@pytest.fixture(scope="module")
def home(adapterkit_tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library with three pocket books of the tiny base, metrics recorded as training would."""
    from adapterkit.library.store import Library
    from adapterkit.plugin_api.testing import make_peft_adapter

    path = tmp_path_factory.mktemp("serve-home")
    library = Library(path)
    folders = tmp_path_factory.mktemp("serve-peft")
    for name, (seed, rank, forgetting, curve) in BOOKS.items():
        made = make_peft_adapter(adapterkit_tiny_base, folders / name, seed=seed, r=rank)
        book = library.import_peft(made, name, base=str(adapterkit_tiny_base))
        library.update_meta(book.ref, _record(book, forgetting, curve,
                                              picture_only=name == PICTURE_ONLY))
    library.tag("triage@1", "clinic")
    return path


@pytest.fixture(scope="module")
def engine(adapterkit_tiny_base: Path, home: Path) -> Iterator[Any]:
    from adapterkit.base.load import load_base
    from adapterkit.library.store import Library
    from adapterkit.serving.engine import Engine

    engine = Engine(load_base(str(adapterkit_tiny_base), home=home), Library(home))
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[str]:
    """The real server (engine + app under uvicorn) on a free loopback port; yields its URL."""
    from adapterkit.serving.app import create_app
    from adapterkit.serving.listen import running

    with running(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def expected(adapterkit_tiny_base: Path, home: Path) -> dict[str | None, str]:
    """Each answer as a session alone gives it (greedy): None is the plain base."""
    from adapterkit.base.load import load_base
    from adapterkit.library.store import Library
    from adapterkit.runtime.session import Session

    session = Session(load_base(str(adapterkit_tiny_base), home=home), Library(home))
    try:
        return {ref: session.generate(PROMPT, adapter=ref, max_new_tokens=MAX_TOKENS)
                for ref in (None, "triage", "bedside")}
    finally:
        session.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[str], Any]]:
    """Opens the page of a server in a fresh browser context; fails the test on a JS error."""
    contexts, errors = [], []

    def open_(url: str) -> Any:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-loaded]")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(open_page: Callable[[str], Any], server: str) -> Any:
    return open_page(server)


def _row(page: Any, name: str) -> Any:
    return page.get_by_test_id("book-row").filter(
        has=page.get_by_role("rowheader", name=name, exact=True))


def _run_and_wait(page: Any) -> None:
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function(
        "() => { const cols = [...document.querySelectorAll('[data-testid=answer-column]')];"
        " return cols.length > 0 && cols.every(c => c.dataset.state !== 'streaming'); }",
        timeout=120_000)


def test_library_lists_each_book_with_rank_forgetting_and_curve(page: Any) -> None:
    sync_api.expect(page.get_by_role("tab", name="Library")).to_have_attribute(
        "aria-selected", "true")
    names = page.get_by_test_id("book-name").all_inner_texts()
    assert sorted(names) == sorted(BOOKS)
    for name, (_, rank, forgetting, curve) in BOOKS.items():
        row = _row(page, name)
        assert row.get_by_test_id("book-version").inner_text() == "1"
        assert row.get_by_test_id("book-rank").inner_text() == str(rank)
        assert row.get_by_test_id("book-forgetting").inner_text() == f"{forgetting:+.2f}%"
        metrics = row.get_by_test_id("book-metrics").inner_text()
        assert f"train loss {curve[0][1]:.2f} → {curve[-1][1]:.2f}" in metrics
        if name == KEPT[0]:  # the last step's loss is not the saved weights' (as on the card)
            assert (f"→ {curve[-1][1]:.2f} (step {curve[-1][0]}, whose weights were not kept)"
                    in metrics), metrics
            assert ("weights kept: step 4's, the forgetting guard's fallback; train loss "
                    "logged at step 4: 2") in metrics, metrics
        else:
            assert "weights kept" not in metrics and "not kept" not in metrics, metrics
        if name == PICTURE_ONLY:
            # only the saved picture: shown, loaded through the API (it decodes to pixels)
            picture = row.get_by_test_id("loss-curve-png")
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=picture.element_handle())
            continue
        drawn = row.get_by_test_id("loss-curve")
        points = drawn.locator("polyline").get_attribute("points").split()
        assert len(points) == len(curve)
        xs = [float(p.split(",")[0]) for p in points]
        ys = [float(p.split(",")[1]) for p in points]
        # steps left to right; a falling loss is drawn going down (SVG y grows downwards)
        assert xs == sorted(xs) and xs[0] < xs[-1]
        assert ys == sorted(ys) and ys[0] < ys[-1]
        marks = drawn.get_by_test_id("kept-step")
        if name == KEPT[0]:  # a mark at step 4 of steps 2-6: halfway along
            assert marks.count() == 1
            assert marks.get_attribute("data-step") == "4"
            assert float(marks.get_attribute("x1")) == pytest.approx((xs[0] + xs[-1]) / 2,
                                                                     abs=0.1)
            assert "weights kept at step 4" in drawn.get_attribute("aria-label")
        else:
            assert marks.count() == 0
    assert "clinic" in _row(page, "triage").get_by_test_id("book-tags").inner_text()


def test_playground_answers_side_by_side_as_a_session_would(
        page: Any, expected: dict[str | None, str]) -> None:
    answers = list(expected.values())
    assert len(set(answers)) == len(answers) and all(answers), (
        f"the check needs distinct, non-empty answers; got {expected}")

    # library → playground: "Try" on a row ticks that pocket book and opens the playground
    _row(page, "triage").get_by_role("button", name="Try").click()
    sync_api.expect(page.get_by_role("tabpanel", name="Playground")).to_be_visible()
    sync_api.expect(page.get_by_role("checkbox", name="triage", exact=True)).to_be_checked()
    page.get_by_role("checkbox", name="bedside", exact=True).check()
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    page.get_by_label("Prompt").fill(PROMPT)
    _run_and_wait(page)

    base_id = page.get_by_test_id("base-id").inner_text()
    columns = page.get_by_test_id("answer-column")
    shown = columns.evaluate_all("cs => cs.map(c => c.dataset.model)")
    assert shown[0] == base_id and sorted(shown[1:]) == ["bedside", "triage"]
    for model, ref in ((base_id, None), ("triage", "triage"), ("bedside", "bedside")):
        column = page.locator(f"[data-testid=answer-column][data-model='{model}']")
        assert column.get_attribute("data-state") == "done", column.inner_text()
        assert int(column.get_attribute("data-chunks")) > 1, "the answer came in one piece"
        assert column.get_by_test_id("answer").text_content().strip() == expected[ref], model


def test_a_failing_request_shows_its_error_in_its_own_column(
        page: Any, home: Path, adapterkit_tiny_base: Path, tmp_path: Path) -> None:
    from adapterkit.library.store import Library
    from adapterkit.plugin_api.testing import make_peft_adapter

    # a pocket book added while the server runs is offered after a refresh...
    library = Library(home)
    library.import_peft(make_peft_adapter(adapterkit_tiny_base, tmp_path / "gone", seed=14),
                        "gone", base=str(adapterkit_tiny_base))
    page.get_by_role("button", name="Refresh").click()
    page.get_by_role("tab", name="Playground").click()
    page.get_by_role("checkbox", name="gone", exact=True).check()
    # ...and removed before it is asked: its column shows the server's error, the base answers
    library.remove("gone@1")
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    page.get_by_label("Prompt").fill(PROMPT)
    _run_and_wait(page)

    gone = page.locator("[data-testid=answer-column][data-model='gone']")
    assert gone.get_attribute("data-state") == "error"
    assert "gone" in gone.get_by_test_id("answer-error").inner_text()
    base = page.get_by_test_id("answer-column").first
    assert base.get_attribute("data-state") == "done"


def test_a_server_with_a_key_is_used_once_the_key_is_entered(
        open_page: Callable[[str], Any], engine: Any) -> None:
    from adapterkit.serving.app import create_app
    from adapterkit.serving.listen import running

    with running(create_app(engine, api_key="s3cret")) as url:
        page = open_page(url)
        notice = page.get_by_test_id("notice")
        sync_api.expect(notice).to_be_visible()
        sync_api.expect(notice).to_contain_text("API key")
        assert page.get_by_test_id("book-row").count() == 0

        page.get_by_label("API key").fill("s3cret")
        page.get_by_label("API key").press("Enter")
        sync_api.expect(page.get_by_test_id("book-row")).to_have_count(len(BOOKS))
        sync_api.expect(notice).to_be_hidden()
        page.get_by_role("tab", name="Playground").click()
        page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
        page.get_by_label("Prompt").fill(PROMPT)
        _run_and_wait(page)
        assert page.get_by_test_id("answer-column").get_attribute("data-state") == "done"
