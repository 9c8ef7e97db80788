"""Issue 23, finding 10: how many examples "Hold to record" gives for a short hold, and for a hold whose
release is lost, on the page in headless Chromium at 390x844 against a daemon replaying the sign digits.

    python scripts/measure_hold.py [HOLD_S [LOST_S [CAMERA_FPS]]]     (defaults 1.2, 15, 3)

A camera at 3 frames a second stands for a loaded device: an example waits for the next frame, so each
answer takes a third of a second or more. Prints one line, with the load average. A measurement, not a
test: it holds for wall-clock seconds.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rig import teach, wait_for  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from test_web import CHROMEDRIVER, CHROMIUM, PASSWORD, web_daemon  # noqa: E402


def main(hold: float, lost: float, fps: float) -> str:
    run, scene, port = web_daemon(Path(tempfile.mkdtemp(prefix="measure-hold-")))
    driver = None
    try:
        teach(run, scene, per_class=9)
        scene.fps = fps  # the camera's pace (and so the answers') from here on
        for source in scene.sources:
            source.close()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=390,844"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        phone = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
        driver.get(f"http://127.0.0.1:{port}/")
        assert wait_for(lambda: driver.find_element(By.ID, "password").is_displayed())
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
        assert wait_for(lambda: driver.find_element(By.ID, "main-view").is_displayed())
        said = []
        for name, seconds, released in (("1", hold, True), ("2", lost, False)):
            scene.shown = name
            record = driver.find_element(By.CSS_SELECTOR, f'article[data-class="{name}"] .record')
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", record)
            time.sleep(1.0)
            before = run.daemon.store.counts()[name]
            ActionChains(driver).click_and_hold(record).perform()
            time.sleep(seconds)
            if released:
                ActionChains(driver).release(record).perform()
                time.sleep(3.0)  # the answers under way
                said.append(f"a {seconds:g} s hold: {run.daemon.store.counts()[name] - before} examples")
            else:
                added = run.daemon.store.counts()[name] - before
                said.append(f"a hold whose release is lost, after {seconds:g} s: {added} examples")
                ActionChains(driver).release().perform()
        return "; ".join(said) + f" (camera {fps:g} fps, load average {os.getloadavg()[0]:.1f})"
    finally:
        if driver is not None:
            driver.quit()
        run.stop()


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:]] + [1.2, 15.0, 3.0][len(sys.argv) - 1 :]
    print(main(*args[:3]))
