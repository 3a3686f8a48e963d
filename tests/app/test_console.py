"""The web console (/ui) in a real headless Chromium (Debian's `chromium`, driven by Playwright): the key box,
the experts table, the lineage graph, a search job's live loss curve, a streamed playground answer and the
merge form. With MERGEGATE_SCREENSHOTS=docs/img the tests also save the screenshots docs/console.md shows
(docs/img/console-*.png); by default they write nothing into the tree.

Skipped with a message when /usr/bin/chromium or the playwright package is missing (scripts/setup installs
both where it can). The search pauses at a fixed query (MERGEGATE_FAULT_PAUSE), so the curve is checked
while the job is still running, without any timing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ADMIN_KEY, ROOT, Gateway, build_adapter_dir, build_model_dir

CHROMIUM = Path(os.environ.get("MERGEGATE_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("MERGEGATE_SCREENSHOTS")
POOL = ["cs-ad-0", "cs-ad-1", "cs-ad-2"]
PAUSE_AT = "30/40 queries"  # budgets 20 + 20: the live search stops here until cancelled
WAIT_MS = 20_000
EXAMPLES = "\n".join([
    '{"prompt": "def add(a, b):\\n", "completion": "    return a + b"}',
    '{"prompt": "Lists are", "completion": " mutable sequences."}',
    '{"text": "The with statement wraps the execution of a block with methods defined by a context manager."}',
])

if not CHROMIUM.is_file():
    pytest.skip(f"console tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium; scripts/setup "
                "installs it when run as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="console tests need the playwright package "
                               "(pip install -e '.[dev]'); its browsers are not needed")


def post(gw: Gateway, path: str, body: dict, **params) -> dict:
    with gw.admin() as c:
        r = c.post(path, json=body, params=params)
        assert r.status_code in (200, 201), r.text
        return r.json()


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_model_dir, tokenizer):
    """A gateway with a small history: two bases, a merge, a BTM-style forest and its average, three adapters
    and a search winner."""
    root = tmp_path_factory.mktemp("console")
    gw = Gateway(root / "data", extra_env={"MERGEGATE_FAULT_PAUSE": f"search.evo_merging:{PAUSE_AT}"}).start()
    try:
        gw.register("tiny", tiny_model_dir, tags=["base"], lineage={"op": "btm.seed", "parents": []})
        gw.register("tiny-b", build_model_dir(root / "tiny-b", tokenizer=tokenizer, seed=1), tags=["base"])
        for i, eid in enumerate(POOL):
            gw.register(eid, build_adapter_dir(root / eid, tiny_model_dir, seed=60 + i), base="tiny", tags=["pool"])
        post(gw, "/admin/merges", {"id": "tiny-mix", "recipe": {"method": "linear", "experts": [
            {"id": "tiny", "weight": 1.0}, {"id": "tiny-b", "weight": 3.0}]}}, background="false")
        post(gw, "/admin/btm/forests", {"id": "tiny-forest", "members": ["tiny", "tiny-b"]})
        post(gw, "/admin/btm/forests/tiny-forest/average", {"id": "tiny-avg"}, background="false")
        post(gw, "/admin/searches", {"base": "tiny", "pool": POOL, "seed": 3, "budget_stage1": 4, "budget_stage2": 4,
                                     "popsize": 4, "name": "evo-win", "validation": {"examples": [
                                         {"text": "Lists are mutable sequences."}]}}, background="false")
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser, console):
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(console.base + "/ui")
    pg.fill("#admin-key", ADMIN_KEY)
    pg.click("#login button")
    until(pg, "window.mergegate && window.mergegate.ready")
    yield pg
    context.close()
    assert not errors, errors


def until(pg, expr: str, timeout_ms: int = WAIT_MS, step_ms: int = 100) -> None:
    """Wait until the JavaScript expression is truthy in the page. (Playwright's wait_for_function polls
    with eval, which the console's Content-Security-Policy forbids, as it should.)"""
    for _ in range(timeout_ms // step_ms):
        if pg.evaluate(expr):
            return
        pg.wait_for_timeout(step_ms)
    raise AssertionError(f"still false after {timeout_ms} ms: {expr} (notice: {pg.text_content('#notice')!r})")


def shot(pg, name: str) -> None:
    if SHOTS:
        out = ROOT / SHOTS
        out.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(out / f"console-{name}.png"))


def tab(pg, name: str) -> None:
    pg.click(f"#tabs button[data-tab={name}]")


def test_a_wrong_key_is_refused_and_the_page_holds_no_data(browser, console):
    pg = browser.new_page()
    try:
        pg.goto(console.base + "/ui")
        assert pg.is_visible("#login") and not pg.is_visible("#experts-table")
        pg.fill("#admin-key", "not-the-key")
        pg.click("#login button")
        pg.wait_for_selector("#notice.error")
        assert "refused" in pg.inner_text("#notice")
        assert not pg.is_visible("#experts-table")
    finally:
        pg.close()


def test_the_experts_table_lists_the_registry(page):
    tab(page, "experts")
    page.wait_for_selector("#experts-table tr[data-id='evo-win']")
    rows = {r.get_attribute("data-id"): r.inner_text() for r in page.query_selector_all("#experts-table tbody tr")}
    assert {"tiny", "tiny-b", "tiny-mix", "tiny-forest", "tiny-avg", "evo-win", *POOL} <= set(rows)
    assert "lora" in rows["cs-ad-0"] and "pool" in rows["cs-ad-0"] and "ready" in rows["cs-ad-0"]
    assert "ensemble" in rows["tiny-forest"] and "search" in rows["evo-win"]
    assert "KB" in rows["tiny"] or "MB" in rows["tiny"]
    shot(page, "experts")


def test_the_lineage_graph_draws_every_expert_and_its_parents(page):
    tab(page, "lineage")
    until(page, "window.mergegate.cy && window.mergegate.cy.nodes().length >= 9")
    graph = page.evaluate("""() => { const cy = window.mergegate.cy;
        return {nodes: cy.nodes().map(n => n.id()),
                edges: cy.edges().map(e => [e.source().id(), e.target().id(), e.data('relation')])}; }""")
    assert {"tiny", "tiny-b", "tiny-mix", "tiny-forest", "tiny-avg", "evo-win", *POOL} <= set(graph["nodes"])
    edges = {tuple(e) for e in graph["edges"]}
    assert {("tiny", "tiny-mix", "parent"), ("tiny-b", "tiny-mix", "parent"), ("tiny", "tiny-forest", "parent"),
            ("tiny-forest", "tiny-avg", "forest"), ("tiny", "evo-win", "base"), ("cs-ad-1", "evo-win", "parent"),
            ("tiny", "cs-ad-0", "base")} <= edges
    assert page.locator("#lineage-graph canvas").count() >= 1
    page.evaluate("window.mergegate.cy.getElementById('evo-win').emit('tap')")
    until(page, "document.getElementById('lineage-detail').textContent.includes('\"search\"')")
    shot(page, "lineage")


def test_a_search_started_from_the_form_draws_its_curve_live(page):
    tab(page, "search")
    page.wait_for_selector("#search-pool option[value='cs-ad-2']", state="attached")
    page.select_option("#search-base", "tiny")
    page.fill("#search-b1", "20")
    page.fill("#search-b2", "20")
    page.fill("#search-popsize", "4")
    page.fill("#search-examples", EXAMPLES)
    page.click("#search-start")
    # the console follows the job: the curve grows with the events until the search pauses at query 30
    until(page, "window.mergegate.jobEvents.some(e => e.points >= 30)")
    events = page.evaluate("window.mergegate.jobEvents")
    points = [e["points"] for e in events]
    assert all(e["status"] in ("queued", "running") for e in events), events
    assert len(events) >= 2 and points == sorted(points) and points[0] < points[-1] == 30, points
    assert page.evaluate("window.mergegate.chart.data.datasets[0].data.length") == 30
    assert page.evaluate("window.mergegate.chart.data.datasets[1].data.length") == 30
    assert "30/40 queries" in page.inner_text("#job-search-stats")
    assert page.locator("#job-coefficients tbody tr").count() == len(POOL)
    shot(page, "search-job")
    page.click("#job-cancel")
    until(page, "window.mergegate.jobEvents.some(e => e.status === 'cancelled')")
    assert "cancelled" in page.inner_text("#job-title")


def test_the_playground_streams_a_chat_answer_chunk_by_chunk(page):
    tab(page, "playground")
    page.wait_for_selector("#play-model option[value='tiny-mix']", state="attached")
    page.select_option("#play-model", "tiny-mix")
    page.select_option("#play-mode", "chat")
    page.fill("#play-max", "24")
    page.fill("#play-temp", "0")  # greedy: the same answer, as many chunks, on every run
    page.fill("#play-prompt", "What are lists?")
    # every text the answer shows, as the page shows it
    page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const m = document.querySelector('#play-output .msg:last-child span');
        if (m) window.seen.push(m.textContent); }).observe(document.getElementById('play-output'),
        {subtree: true, childList: true, characterData: true}); }""")
    page.click("#play-send")
    until(page, "!document.getElementById('play-send').disabled && window.mergegate.stream.length > 0")
    chunks = page.evaluate("window.mergegate.stream")
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(chunks) >= 3 and page.text_content("#play-output .msg:last-child span") == "".join(chunks)
    # the answer only grows; how many states a DOM observer sees depends on how many SSE events one network
    # read carries (a tiny model's events can all arrive in one read), so the chunk count above is the proof
    assert seen and seen[-1] == "".join(chunks), seen
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:])), seen
    assert page.locator("#play-output .msg").count() == 2  # the question, then the answer
    shot(page, "playground")
    page.select_option("#play-mode", "complete")  # a new mode starts a new transcript
    page.fill("#play-prompt", "Lists are")
    page.click("#play-send")
    until(page, "!document.getElementById('play-send').disabled && window.mergegate.stream.length > 0")
    assert page.locator("#play-output .msg").count() == 2
    assert page.text_content("#play-output .msg:last-child span") == "".join(page.evaluate("window.mergegate.stream"))


def test_the_merge_form_previews_then_merges(page):
    tab(page, "merge")
    page.wait_for_selector("#merge-method option[value='linear']", state="attached")
    page.fill("#merge-id", "ui-merged")
    page.select_option("#merge-method", "linear")
    rows = page.locator("#merge-experts .row")
    rows.nth(0).locator("select").select_option("tiny")
    rows.nth(1).locator("select").select_option("tiny-b")
    page.click("#merge-preview")
    until(page, "document.getElementById('merge-out').textContent.startsWith('Valid')")
    assert "Valid linear merge of tiny, tiny-b" in page.inner_text("#merge-out")
    shot(page, "merge")
    page.click("#merge-start")
    until(page, "window.mergegate.jobEvents.some(e => e.status === 'succeeded')")
    assert page.is_visible("#tab-jobs")
    with_new = page.evaluate("fetch('/admin/experts/ui-merged', {headers: {Authorization: 'Bearer ' + "
                             "sessionStorage.getItem('mergegate.adminKey')}}).then(r => r.json())")
    assert [p["id"] for p in with_new["lineage"]["parents"]] == ["tiny", "tiny-b"]
