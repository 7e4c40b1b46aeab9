"""docs/web_chat.png: the chat page with an answered question, as headless Chromium shows it.

    python -m phivision.web --model BASE --adapter RUN_DIR &          # serves http://127.0.0.1:7860/
    python docs/web_chat_screenshot.py http://127.0.0.1:7860/ IMAGE "QUESTION" docs/web_chat.png

Needs selenium, chromium and chromedriver (see README "Development").
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import chromium  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def main(url: str, image: str, question: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(Path(profile))
        try:
            driver.set_window_size(1400, 1250)  # the run's examples below the chat too
            driver.get(url)
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
            driver.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys(str(Path(image).resolve()))
            wait.until(lambda d: Path(image).name in "".join(
                d.find_element(By.CSS_SELECTOR, "#uploads").get_attribute("textContent").split()))
            driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
            driver.find_element(By.CSS_SELECTOR, "#send").click()
            # answered: every chat shows an answer and the page says nothing more
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=bot]") and
                       d.find_element(By.CSS_SELECTOR, "#status").text == "")
            driver.save_screenshot(out)
        finally:
            driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:])
