"""The page as a person on a phone meets it (issue 23, findings 8-13), in Debian's Chromium at 390x844:
the camera in sight while teaching any class, hold-to-record at a steady rate with a count and a cap,
feedback beside its control in plain words, clearing a class, the paged example browser, the upload's
refresh, the first-run guide, the threshold as stricter/looser, the device's name, smoothed bars.

Every test waits for an event or a count (``wait_for``), never for a time. Screenshots go to
``$EDGEKNN_SHOTS`` (default /tmp/page-shots).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from conftest import needs_data, phone_chromium
from rig import CLASSES, Running, make_config, photo_folders, stable_on, teach, wait_for
from test_web import (
    PASSWORD,
    Client,
    card,
    count_of,
    free_port,
    not_stale,
    page_of,
    web_daemon,
)

from edgeknn.device.build import build

SHOTS = Path(os.environ.get("EDGEKNN_SHOTS", "/tmp/page-shots"))
APP = Path(__file__).resolve().parent.parent / "edgeknn" / "web" / "static" / "app.js"


def constant(name: str) -> float:
    """A constant of the page's script (``const NAME = 5;``): the tests follow the page, not a copy."""
    match = re.search(rf"^const {name} = ([\w.]+);", APP.read_text(), re.M)
    assert match, f"{name} not found in {APP}"
    value = match.group(1)
    return constant(value) if value[0].isalpha() else float(value)


def shot(driver, name: str) -> Path:
    """The viewport as a PNG, taken by Chromium itself (chromedriver's own screenshot moves the page
    under the pointer, which ends a hold: a pointerleave)."""
    import base64

    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    png = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]
    path.write_bytes(base64.b64decode(png))
    return path


@pytest.fixture
def browser():
    """Chromium as a 390x844 phone at one device pixel per CSS pixel: the screenshots are 390x844 (a
    scale of 2 makes Chromium's screenshot send a pointer event at half the pointer's place, which ends
    a held button)."""
    yield from phone_chromium(scale=1)


def logged_in(driver, port: int) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{port}/")
    find = driver.find_element
    assert wait_for(lambda: find(By.ID, "password").is_displayed())
    find(By.ID, "password").send_keys(PASSWORD)
    find(By.CSS_SELECTOR, "#login button").click()
    assert wait_for(lambda: find(By.ID, "main-view").is_displayed())
    assert wait_for(lambda: find(By.ID, "dot").get_attribute("class") == "dot ok")


def center(driver, element) -> None:
    """Scroll ``element`` to the middle of the screen and wait until nothing covers its centre (the
    sticky live-view bar slides in as the page scrolls: a press at once could land on it)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    on_top = """const r = arguments[0].getBoundingClientRect();
        const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
        return hit !== null && arguments[0].contains(hit);"""
    assert wait_for(lambda: driver.execute_script(on_top, element), 30), "the element stays covered"


def in_card(driver, name: str, selector: str):
    from selenium.webdriver.common.by import By

    return card(driver, name).find_element(By.CSS_SELECTOR, selector)


def feedback(driver, name: str) -> str:
    """The feedback line of a class's card ("" while the card is redrawn)."""
    from selenium.common.exceptions import WebDriverException

    try:
        return in_card(driver, name, ".feedback").text
    except WebDriverException:
        return ""


def menu_item(driver, name: str, item: str):
    """Open a class card's ⋯ menu and return its ``item`` button (rename, clear, remove)."""
    summary = in_card(driver, name, ".menu summary")
    center(driver, summary)
    summary.click()
    return in_card(driver, name, f".menu-items .{item}")


def visible_in_viewport(driver, element) -> bool:
    """The element is on screen and nothing covers its centre (what a person sees)."""
    return driver.execute_script(
        """const r = arguments[0].getBoundingClientRect();
        if (r.width === 0 || r.top < 0 || r.bottom > innerHeight) return false;
        const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
        return hit === arguments[0] || arguments[0].contains(hit);""",
        element,
    )


@pytest.fixture
def taught(tmp_path):
    """A device with every class taught (2 examples each), showing class 1 stably."""
    run, scene, port = web_daemon(tmp_path)
    teach(run, scene, per_class=2)
    assert stable_on(run, CLASSES[0])
    yield run, scene, port
    run.stop()


# --- 13: the first run, the device's name ----------------------------------------------------------


def test_a_new_device_greets_with_the_guide_and_its_name(tmp_path, browser):
    from selenium.webdriver.common.by import By

    run, scene, port = web_daemon(tmp_path)
    try:
        driver = browser
        logged_in(driver, port)
        find = driver.find_element
        name = run.daemon.cfg.resolved_device_id()
        assert wait_for(lambda: find(By.ID, "device-name").text == name), "the header names the device"
        assert socket.gethostname() in find(By.ID, "device-host").text, "and its host"
        assert name in driver.title
        guide = find(By.ID, "guide")
        assert wait_for(guide.is_displayed), "no example yet: the guide shows"
        assert "Hold to record" in guide.text
        shot(driver, "1-empty-device")

        # the first example: the guide has done its job
        center(driver, in_card(driver, "1", ".add-one"))
        in_card(driver, "1", ".add-one").click()
        assert wait_for(lambda: not guide.is_displayed())
        assert wait_for(lambda: feedback(driver, "1") == "Added one example.")

        # no class at all (every one removed): the guide says to add one, and adding one works
        client = Client(port)
        csrf = {"X-CSRF-Token": client.login()}
        for name in CLASSES:
            assert client("/api/remove-class", {"class": name}, csrf)[0] == 200
        assert wait_for(lambda: guide.is_displayed() and "Add a class" in guide.text)
        assert not driver.find_elements(By.CSS_SELECTOR, "article.class")
        find(By.ID, "new-class").send_keys("cup")
        find(By.CSS_SELECTOR, "#add-class button").click()
        assert wait_for(lambda: run.daemon.store.classes == ["cup"])
        assert wait_for(lambda: count_of(driver, "cup") == 0)
        assert "cup" in find(By.CSS_SELECTOR, "#add-class .feedback").text
    finally:
        run.stop()


# --- 8: the camera in sight while teaching any class ------------------------------------------------


def test_the_camera_stays_in_sight_while_teaching_the_third_class(taught, browser):
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    find = driver.find_element
    page = page_of(run)
    live = find(By.ID, "live")
    assert wait_for(lambda: driver.execute_script("return arguments[0].naturalWidth", live) > 0)
    assert wait_for(lambda: visible_in_viewport(driver, live))
    assert find(By.ID, "live-bar").get_attribute("hidden") is not None, "the big view at the top"
    assert wait_for(lambda: find(By.ID, "prediction").get_attribute("data-label") == CLASSES[0])
    assert wait_for(
        lambda: not_stale(lambda: float(card(driver, CLASSES[0]).get_attribute("data-shown")) > 0.6)
    )
    shot(driver, "0-taught-device")

    third = CLASSES[2]
    scene.shown = third
    add_one = in_card(driver, third, ".add-one")
    center(driver, add_one)
    assert wait_for(lambda: visible_in_viewport(driver, add_one))
    assert wait_for(lambda: find(By.ID, "live-bar").is_displayed()), "the compact view at the top"
    assert wait_for(lambda: visible_in_viewport(driver, live)), "the camera is in sight beside the card"
    assert driver.execute_script("return arguments[0].closest('#live-bar') !== null", live)
    assert visible_in_viewport(driver, find(By.ID, "prediction")), "and so is the answer"
    first = live.screenshot_as_png
    assert wait_for(lambda: live.screenshot_as_png != first), "the moved view still streams"
    assert page.frames.viewers == 1, "one image, one stream: moving it opened no other"
    before = run.daemon.store.counts()[third]
    add_one.click()
    assert wait_for(lambda: count_of(driver, third) == before + 1)
    assert wait_for(lambda: find(By.ID, "prediction").get_attribute("data-label") == third)
    assert wait_for(
        lambda: not_stale(
            lambda: len(card(driver, third).find_elements(By.CSS_SELECTOR, ".thumb img")) == before + 1
        )
    ), "its picture joins the card's"
    shot(driver, "2-teaching-class-3")

    driver.execute_script("window.scrollTo(0, 0)")
    assert wait_for(lambda: driver.execute_script("return arguments[0].closest('#live-slot') !== null", live))
    assert wait_for(lambda: not find(By.ID, "live-bar").is_displayed()), "back in its card at the top"
    assert page.frames.viewers == 1


def test_the_cards_never_move_while_the_answer_changes(taught, browser):
    """The "settling" line under the prediction came and went several times a second: every card below
    moved 23 px each time, and a press of "Hold to record" landed beside the button (the recording
    test failed one run in three). Empty or full, long names or short, the live card keeps its height."""
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    assert wait_for(lambda: driver.find_element(By.ID, "prediction").get_attribute("data-label"))
    heights = """const home = document.getElementById('live-home'), seen = new Set();
        const put = (id, text) => {
            document.getElementById(id).textContent = text;
            seen.add(home.offsetHeight);
        };
        for (const text of ['', 'settling: 2', 'settling: ' + 'a very long class name '.repeat(6), ''])
            put('candidate', text);
        for (const text of ['1', 'another very long class name '.repeat(6)]) put('prediction', text);
        return [...seen];"""
    assert len(driver.execute_script(heights)) == 1, "the live card's height follows its text"


# --- 10: hold to record -----------------------------------------------------------------------------


def recording(driver, name: str) -> bool:
    return not_stale(lambda: in_card(driver, name, ".record").get_attribute("data-recording") == "1")


def settled(driver, name: str) -> bool:
    """The hold ended and its last request has its answer."""
    return not_stale(lambda: in_card(driver, name, ".record").get_attribute("data-busy") is None)


def waiting_examples(run: Running) -> int:
    """Examples the device was asked for and has not added yet (waiting for frames)."""
    return sum(remaining for _, remaining in list(run.daemon.teacher.pending))


def test_hold_to_record_asks_at_its_pace_not_at_the_answers_and_counts(taught, browser):
    """Finding 10: one request at a time, each waiting for its answer, gave 2-3 examples for a 1.2 s hold
    under load. Now the page asks on while answers are pending: with the camera stalled (no answer can
    come), two requests wait at once (the old page never had more than one); the count runs on the
    button. The pace itself (5 a second) is scripts/measure_hold.py's to measure, not a test's."""
    from selenium.webdriver.common.action_chains import ActionChains

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    name = CLASSES[1]
    scene.shown = name
    record = in_card(driver, name, ".record")
    center(driver, record)
    base = run.daemon.store.counts()[name]
    scene.break_("stall")  # frames stop: every example waits, so no request can be answered
    ActionChains(driver).click_and_hold(record).perform()
    assert wait_for(lambda: recording(driver, name)), record.get_attribute("data-stopped")
    assert wait_for(lambda: waiting_examples(run) >= 2), "more asked for while the first waits"
    scene.repair()
    assert wait_for(lambda: run.daemon.store.counts()[name] >= base + 5), "examples come once frames do"
    assert wait_for(lambda: not_stale(lambda: int(record.text.split()[-1]) >= 5)), "the running count"
    assert record.text.startswith("Recording…")
    shot(driver, "3-recording")
    assert recording(driver, name), record.get_attribute("data-stopped")
    ActionChains(driver).release(record).perform()
    assert wait_for(lambda: settled(driver, name)), "released, and every request answered"
    added = run.daemon.store.counts()[name] - base
    assert wait_for(lambda: feedback(driver, name) == f"Recorded {added} examples."), feedback(driver, name)
    assert not recording(driver, name) and record.text == "Hold to record"
    assert waiting_examples(run) == 0, "nothing left waiting after the release"
    assert run.daemon.store.counts()[name] - base == added


def test_a_hold_whose_release_is_lost_stops_at_the_cap(taught, browser):
    """Finding 10: with the release lost, the old page recorded for over 2 minutes. Now a hold ends
    after RECORD_MAX_S with at most RECORD_PER_S examples a second (plus the batches under way)."""
    from selenium.webdriver.common.action_chains import ActionChains

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    name = CLASSES[0]
    record = in_card(driver, name, ".record")
    center(driver, record)
    base = run.daemon.store.counts()[name]
    ActionChains(driver).click_and_hold(record).perform()  # never released
    assert wait_for(lambda: recording(driver, name))
    limit_s = constant("RECORD_MAX_S")
    assert wait_for(lambda: not recording(driver, name), timeout=limit_s + 60), "it stopped by itself"
    assert wait_for(lambda: settled(driver, name))
    added = run.daemon.store.counts()[name] - base
    most = constant("RECORD_PER_S") * limit_s + constant("RECORD_BATCH") * constant("RECORD_IN_FLIGHT")
    assert 0 < added <= most, (added, most)
    assert wait_for(lambda: f"stops after {limit_s:g} s" in feedback(driver, name)), feedback(driver, name)
    ActionChains(driver).release().perform()


def test_recording_stops_when_the_pointer_leaves_or_the_page_is_hidden(taught, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    name = CLASSES[0]
    # the cards are built from the first state the page hears: wait for it (a press on a card the
    # state then rebuilds never reaches the new button)
    want = str(run.daemon.store.counts()[name])
    assert wait_for(lambda: not_stale(lambda: in_card(driver, name, ".count").text == want), 30)
    record = in_card(driver, name, ".record")
    center(driver, record)

    # the finger slides off the button: the recording ends there
    ActionChains(driver).click_and_hold(record).perform()
    assert wait_for(lambda: recording(driver, name))
    ActionChains(driver).move_to_element(in_card(driver, name, ".name")).perform()
    assert wait_for(lambda: not recording(driver, name)), "stopped when the pointer left"
    ActionChains(driver).release().perform()
    assert wait_for(lambda: settled(driver, name))
    assert wait_for(lambda: feedback(driver, name).startswith("Recorded "))

    # another tab comes to the front while holding: this page is hidden, the recording ends
    page = driver.current_window_handle
    record = in_card(driver, name, ".record")  # its card grew a picture and a note: find it again
    center(driver, record)
    ActionChains(driver).click_and_hold(record).perform()
    assert wait_for(lambda: recording(driver, name))
    driver.switch_to.new_window("tab")
    driver.get("about:blank")
    view = page_of(run)
    assert wait_for(lambda: view.frames.viewers == 0), "hidden: the live view closed"
    held = run.daemon.store.counts()[name]
    driver.switch_to.window(page)
    assert wait_for(lambda: "hidden" in feedback(driver, name)), feedback(driver, name)
    assert not recording(driver, name)
    assert wait_for(lambda: settled(driver, name))
    assert run.daemon.store.counts()[name] - held <= constant("RECORD_BATCH") * constant(
        "RECORD_IN_FLIGHT"
    ), "at most the requests under way when it was hidden"
    ActionChains(driver).release().perform()
    assert wait_for(lambda: driver.find_element(By.ID, "dot").get_attribute("class") == "dot ok")


# --- 9: feedback beside its control, in plain words -------------------------------------------------


def test_errors_show_beside_their_control_in_plain_words(taught, browser, tmp_path):
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    find = driver.find_element
    name = CLASSES[1]

    # a reserved name: the device says "new_name: expected a name that is not reserved (…)"
    menu_item(driver, name, "rename").click()
    field = in_card(driver, name, ".rename-input")
    field.clear()
    field.send_keys("Unknown")
    in_card(driver, name, ".rename-form button[type=submit]").click()
    line = in_card(driver, name, ".rename-form .says")
    assert wait_for(lambda: line.text != "")
    said = line.text
    assert "choose another name" in said and "new_name" not in said and "expected" not in said, said
    assert "new_name: expected a name that is not reserved" in line.get_attribute("title")
    field_box, line_box = field.rect, line.rect
    gap = line_box["y"] - (field_box["y"] + field_box["height"])
    assert 0 <= gap < 40, f"the message is just below the field it answers ({gap} px)"
    assert visible_in_viewport(driver, line), "and on screen with it"
    assert run.daemon.store.classes == CLASSES
    shot(driver, "4-error-beside-its-control")

    # the same name as another class; then a new class with a bad name, under the add-class form
    field.clear()
    field.send_keys(CLASSES[0])
    in_card(driver, name, ".rename-form button[type=submit]").click()
    assert wait_for(lambda: line.text == f"There is already a class called “{CLASSES[0]}”.")
    new = find(By.ID, "new-class")
    center(driver, new)
    new.send_keys("a/b")
    find(By.CSS_SELECTOR, "#add-class button").click()
    added = find(By.CSS_SELECTOR, "#add-class .feedback")
    assert wait_for(lambda: added.text.startswith("Use 1 to 32 letters")), added.text

    # a file that is not an export, under the upload
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    find(By.ID, "upload-file").send_keys(str(bad))
    center(driver, find(By.ID, "upload-send"))
    find(By.ID, "upload-send").click()
    said = find(By.CSS_SELECTOR, "#upload .feedback")
    assert wait_for(lambda: said.text.startswith("That is not a file of examples")), said.text
    assert sum(run.daemon.store.counts().values()) == 2 * len(CLASSES), "nothing changed"


# --- 11: clear a class, browse and delete every example --------------------------------------------


def test_clearing_a_class_forgets_its_examples_and_keeps_its_slot(taught, browser):
    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    name = CLASSES[1]
    menu_item(driver, name, "clear").click()
    alert = driver.switch_to.alert
    assert "2 examples" in alert.text and name in alert.text
    alert.accept()
    assert wait_for(lambda: run.daemon.store.counts()[name] == 0)
    assert run.daemon.store.classes == CLASSES, "the class keeps its name and its slot (button, LED)"
    assert run.daemon.store.counts() == {CLASSES[0]: 2, name: 0, CLASSES[2]: 2}
    assert wait_for(lambda: count_of(driver, name) == 0)
    assert wait_for(lambda: feedback(driver, name) == "Cleared: 2 examples forgotten.")
    assert wait_for(lambda: not_stale(lambda: not card(driver, name).find_elements("css selector", ".thumb")))


def test_examples_are_listed_a_page_at_a_time_newest_first(taught):
    """The API under the browser: ``limit`` and ``offset`` page the newest first, with the total."""
    run, scene, port = taught
    client = Client(port)
    csrf = {"X-CSRF-Token": client.login()}
    name = CLASSES[0]
    status, body = client("/api/add-example", {"class": name, "count": 5}, csrf)
    assert status == 200, body
    every = [e.id for e in run.daemon.store.examples(name)]
    status, first = client(f"/api/examples?class={name}&limit=3")
    assert status == 200 and first["total"] == len(every) == 7, first
    assert [e["id"] for e in first["examples"]] == every[::-1][:3], "the newest first"
    status, last = client(f"/api/examples?class={name}&limit=3&offset=6")
    assert [e["id"] for e in last["examples"]] == every[:1] and last["offset"] == 6
    status, whole = client(f"/api/examples?class={name}")
    assert [e["id"] for e in whole["examples"]] == every and "total" not in whole, "no limit: as before"
    for query in ("limit=0", "limit=x", "limit=3&offset=-1", "limit=100000"):
        status, body = client(f"/api/examples?class={name}&{query}")
        assert status == 400 and body["error"].startswith("offset, limit: expected"), (query, body)
    status, body = client("/api/examples?class=nope&limit=3")
    assert status == 400 and "unknown class" in body["error"]


def test_the_example_browser_reaches_and_deletes_every_example(taught, browser):
    """Finding 11: only the newest 12 could be deleted ("+50 more" unreachable). The browser pages
    through all of them and deletes the oldest."""
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    name = CLASSES[0]
    client = Client(port)
    status, body = client("/api/add-example", {"class": name, "count": 30}, {"X-CSRF-Token": client.login()})
    assert status == 200, body
    total = run.daemon.store.counts()[name]
    page_size = int(constant("PAGE"))
    assert total > page_size
    driver = browser
    logged_in(driver, port)
    find = driver.find_element
    browse = in_card(driver, name, ".browse")
    center(driver, browse)
    assert wait_for(lambda: browse.text == f"See all {total} examples")
    browse.click()
    where = find(By.ID, "browser-where")
    assert wait_for(lambda: where.text == f"1–{page_size} of {total}")

    def shown_ids() -> list[int]:
        return [
            int(t.get_attribute("data-id"))
            for t in find(By.ID, "browser-grid").find_elements(By.CSS_SELECTOR, ".thumb")
        ]

    every = [e.id for e in run.daemon.store.examples(name)][::-1]  # the newest first
    assert wait_for(lambda: not_stale(lambda: shown_ids() == every[:page_size]))
    assert wait_for(
        lambda: not_stale(
            lambda: len(find(By.ID, "browser-grid").find_elements(By.CSS_SELECTOR, "img")) == page_size
        )
    )
    shot(driver, "5-example-browser")
    find(By.ID, "browser-next").click()
    assert wait_for(lambda: where.text == f"{page_size + 1}–{total} of {total}")
    assert wait_for(lambda: not_stale(lambda: shown_ids() == every[page_size:]))
    assert not find(By.ID, "browser-next").is_enabled() and find(By.ID, "browser-prev").is_enabled()

    oldest = every[-1]
    thumb = find(By.CSS_SELECTOR, f'#browser-grid .thumb[data-id="{oldest}"]')
    center(driver, thumb)
    thumb.find_element(By.CSS_SELECTOR, ".delete").click()
    assert wait_for(lambda: oldest not in [e.id for e in run.daemon.store.examples(name)])
    assert wait_for(lambda: where.text == f"{page_size + 1}–{total - 1} of {total - 1}")
    assert wait_for(lambda: not_stale(lambda: oldest not in shown_ids()))
    assert find(By.CSS_SELECTOR, "#browser .feedback").text == "Deleted one example."
    find(By.ID, "browser-close").click()
    assert wait_for(lambda: not find(By.ID, "browser").is_displayed())
    assert wait_for(lambda: count_of(driver, name) == total - 1)


# --- 12: the threshold as stricter / looser -------------------------------------------------------


def test_the_threshold_is_stricter_or_looser_and_automatic_moves_the_slider(taught, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    find = driver.find_element
    scale = find(By.ID, "threshold-range")
    center(driver, scale)
    card_text = find(By.ID, "threshold-card").text
    assert "Stricter" in card_text and "Looser" in card_text and "not recognised" in card_text
    automatic = round(run.daemon.store.effective_threshold, 2)
    assert wait_for(lambda: abs(float(scale.get_attribute("value")) - automatic) < 0.006)
    assert find(By.ID, "threshold-now").text == f"automatic ({automatic:.2f})"

    scale.send_keys(Keys.END)  # the strictest
    assert wait_for(lambda: run.daemon.store.threshold == 1.0)
    says = find(By.CSS_SELECTOR, "#threshold-card .feedback")
    assert wait_for(lambda: says.text == "Stricter: set to 1.00.")
    assert wait_for(lambda: find(By.ID, "threshold-now").text == "1.00, set by hand")

    find(By.ID, "threshold-auto").click()
    assert wait_for(lambda: run.daemon.store.threshold is None)
    assert wait_for(lambda: find(By.ID, "threshold-now").text.startswith("automatic"))
    assert wait_for(lambda: abs(float(scale.get_attribute("value")) - automatic) < 0.006), (
        "finding 12: the slider follows Automatic (the old box kept the number typed)"
    )
    assert says.text == "Automatic: calibrated from the examples."


# --- 13: smoothed bars, Full frame, the upload's buttons and refreshed thumbnails -------------------


def test_the_bars_ease_toward_a_new_answer_instead_of_jumping(taught, browser):
    """Finding 13: the bars jumped with each frame's scores (77 -> 100 %). A bar now moves at most
    SMOOTH_MAX of the way to each reading's score, so a change of class is a glide over readings."""
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    driver = browser
    logged_in(driver, port)
    name = CLASSES[1]
    prediction = driver.find_element(By.ID, "prediction")
    assert wait_for(lambda: prediction.get_attribute("data-label") == CLASSES[0])
    start = driver.execute_script(
        """window.seen = [];
        const card = document.querySelector(`article.class[data-class="${arguments[0]}"]`);
        new MutationObserver(() => seen.push([Number(card.dataset.score), Number(card.dataset.shown),
            card.querySelector(".pct").textContent]))
          .observe(card, {attributes: true, attributeFilter: ["data-shown"]});
        return Number(card.dataset.shown || 0);""",
        name,
    )
    scene.shown = name
    assert wait_for(lambda: prediction.get_attribute("data-label") == name)
    assert wait_for(lambda: driver.execute_script("return seen.length") >= 10)
    most = constant("SMOOTH_MAX")
    before, jumps = start, []
    for score, shown, text in driver.execute_script("return seen"):
        jumps.append(abs(score - before))
        assert abs(shown - before) <= most * abs(score - before) + 0.001, (before, score, shown)
        assert abs(int(text.rstrip("%")) - shown * 100) <= 0.51, ("the number is the bar's", text, shown)
        before = shown
    assert max(jumps) > 0.25, f"the scores did change ({max(jumps):.2f}), and the bar eased after them"
    assert "stable" in card(driver, name).get_attribute("class"), "green: the stable answer"


@needs_data
def test_full_frame_is_offered_only_where_the_camera_gives_more_than_the_model(tmp_path):
    """Finding 13: the 100x100 sign photos (smaller than the model's 224x224) offered "Full frame"."""
    import io

    from conftest import PHOTOS
    from PIL import Image
    from test_web import first_jpeg

    for folder, offered in ((photo_folders(tmp_path)["1"], False), (PHOTOS, True)):
        port = free_port()
        cfg = make_config(
            tmp_path / folder.name,
            web={"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD},
            panel={"kind": "none"},
            camera={"source": f"replay:{folder}?fps=20"},
        )
        run = Running(build(cfg))
        try:
            assert run.classified()
            client = Client(port)
            client.login()
            assert client("/api/session")[1]["full_frame"] is offered, folder
            if offered:
                side = max(Image.open(io.BytesIO(first_jpeg(client, "/api/live.mjpg?full=1"))).size)
                assert side > 224, "the camera's own frame, bigger than the model's"
        finally:
            run.stop()


def test_upload_adds_or_replaces_from_proper_buttons_and_refreshes_the_thumbnails(taught, browser, tmp_path):
    """The download and upload are buttons (not a bare link and the browser's Choose File); the upload
    offers the endpoint's add and replace; the thumbnails follow without a reload."""
    from selenium.webdriver.common.by import By

    run, scene, port = taught
    client = Client(port)
    csrf = {"X-CSRF-Token": client.login()}
    status, archive = client("/api/examples.tar")
    assert status == 200 and isinstance(archive, bytes)
    exported = tmp_path / "examples.tar"
    exported.write_bytes(archive)
    name = CLASSES[2]
    assert client("/api/forget-class", {"class": name}, csrf)[0] == 200
    driver = browser
    logged_in(driver, port)
    find = driver.find_element
    assert wait_for(
        lambda: not_stale(lambda: not card(driver, name).find_elements(By.CSS_SELECTOR, ".thumb"))
    )
    download = find(By.ID, "download")
    assert download.tag_name == "a" and "button" in download.get_attribute("class")
    assert download.get_attribute("href").endswith("/api/examples.tar")
    choose = find(By.CSS_SELECTOR, "label.file-button")
    assert choose.is_displayed() and find(By.ID, "upload-file").size["width"] <= 1, "no bare Choose File"
    assert not find(By.ID, "upload-send").is_enabled(), "nothing to send before a file is chosen"
    says = find(By.CSS_SELECTOR, "#upload .feedback")

    # add (chosen first): the cleared class's examples come back, the others were already here
    assert find(By.CSS_SELECTOR, '#upload-mode input[value="add"]').is_selected()
    find(By.ID, "upload-file").send_keys(str(exported))
    assert wait_for(lambda: find(By.ID, "upload-name").text == "examples.tar")
    center(driver, find(By.ID, "upload-send"))
    find(By.ID, "upload-send").click()
    others = 2 * (len(CLASSES) - 1)
    assert wait_for(lambda: says.text == f"Added 2 examples; {others} were already here."), says.text
    assert run.daemon.store.counts()[name] == 2
    assert wait_for(
        lambda: not_stale(lambda: len(card(driver, name).find_elements(By.CSS_SELECTOR, ".thumb img")) == 2)
    ), "the cleared class's thumbnails are back without a reload"

    # replace (after a confirmation): the device becomes the file, an example taught since goes
    assert client("/api/add-example", {"class": CLASSES[0]}, csrf)[0] == 200
    assert wait_for(lambda: count_of(driver, CLASSES[0]) == 3)
    find(By.CSS_SELECTOR, '#upload-mode input[value="replace"]').click()
    find(By.ID, "upload-file").send_keys(str(exported))
    find(By.ID, "upload-send").click()
    alert = driver.switch_to.alert
    assert "Replace" in alert.text
    alert.accept()
    total = 2 * len(CLASSES)
    assert wait_for(
        lambda: says.text == f"Replaced: {total + 1} examples removed, {total} examples from the file."
    )
    assert run.daemon.store.counts() == dict.fromkeys(CLASSES, 2)
    assert wait_for(lambda: count_of(driver, CLASSES[0]) == 2)
    assert wait_for(
        lambda: not_stale(
            lambda: len(card(driver, CLASSES[0]).find_elements(By.CSS_SELECTOR, ".thumb img")) == 2
        )
    )
