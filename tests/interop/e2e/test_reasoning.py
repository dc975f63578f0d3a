"""A reasoning answer in the web UI: the thinking is shown apart from the answer.

The reference worker answers the riddle with a `<think>` block (scripted in
docs/examples/scripted-replies.toml). The adapter splits it off into DB-GPT's thinking part
(issue 10, `--reasoning`, default auto: an answer that starts with `<think>`), and DB-GPT's app
shows it in a block of its own.
"""

from __future__ import annotations

import importlib.util

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.interop.e2e.app_api import generations, worker_text
from tests.interop.e2e.app_stack import REFERENCE_MODEL, AppStack
from tests.interop.e2e.browser import Browser
from tests.interop.e2e.test_web_ui import ANSWER, INPUT, choose_model, flat, open_chat_normal

THINKING = "Cities without houses, forests without trees, water without fish"
ANSWER_TEXT = "A map."

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("protocol.reasoning") is None,
    reason="needs the adapter's reasoning split (issue 10, protocol/reasoning.py), not on main yet",
)


@pytest.mark.deadline(600)
def test_the_web_ui_shows_the_thinking_apart_from_the_answer(
    app_stack: AppStack, browser: Browser
) -> None:
    proxy = app_stack.reference_proxy
    open_chat_normal(browser, app_stack.url)
    choose_model(browser, REFERENCE_MODEL)
    mark = proxy.mark()
    field = browser.driver.find_element(By.CSS_SELECTOR, INPUT)
    field.send_keys("Tell me a riddle, then its answer.")
    field.send_keys(Keys.ENTER)
    record = browser.wait(
        lambda d: next(iter(generations(proxy, mark)), False), "the request at the worker"
    )
    produced = browser.wait(lambda d: worker_text(proxy, record), "the worker's answer")
    assert produced.startswith("<think>") and THINKING in produced  # the worker's raw text

    answer = browser.wait(
        lambda d: (
            ANSWER_TEXT in d.find_element(By.CSS_SELECTOR, ANSWER).text
            and d.find_element(By.CSS_SELECTOR, ANSWER)
        ),
        "the answer in the page",
    )
    browser.screenshot("thinking")
    shown = answer.text
    assert "<think>" not in shown and "</think>" not in shown
    # The innermost element holding the thinking does not hold the answer: a block of its own.
    holders = answer.find_elements(
        By.XPATH, f".//*[contains(normalize-space(.), '{THINKING}')]"
        f"[not(.//*[contains(normalize-space(.), '{THINKING}')])]",
    )  # fmt: skip
    assert holders, f"the thinking is not shown: {flat(shown)!r}"
    assert all(ANSWER_TEXT not in holder.text for holder in holders)
