"""A reasoning answer in the web UI: the thinking is shown apart from the answer.

The reference worker answers the riddle with a `<think>` block (scripted in
docs/examples/scripted-replies.toml). The adapter splits it off into DB-GPT's thinking part
(issue 10, `--reasoning`, default auto: an answer that starts with `<think>`), and DB-GPT's app
shows it in a block of its own.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.interop.e2e.app_api import generations, worker_text
from tests.interop.e2e.app_stack import REFERENCE_MODEL, AppStack
from tests.interop.e2e.browser import Browser
from tests.interop.e2e.test_web_ui import (
    ANSWER,
    INPUT,
    TEE_CHAT_STREAMS,
    choose_model,
    open_chat_normal,
    received_stream,
)

THINKING = "Cities without houses, forests without trees, water without fish"
ANSWER_TEXT = "A map."


# Where the page shows the thinking and the answer, in one look at the DOM (it re-renders while
# streaming): the text of the answer block, and the tag of the innermost element holding both.
LAYOUT = """
const [root, thinking, answer] = arguments;
const holders = [...root.querySelectorAll("*")].filter(
  (e) => e.textContent.includes(thinking) && e.textContent.includes(answer));
const inner = holders.length ? holders[holders.length - 1] : root;
return {text: root.innerText, both: inner.tagName.toLowerCase()};
"""


@pytest.mark.deadline(600)
def test_the_web_ui_shows_the_thinking_apart_from_the_answer(
    app_stack: AppStack, browser: Browser
) -> None:
    proxy = app_stack.reference_proxy
    open_chat_normal(browser, app_stack.url)
    choose_model(browser, REFERENCE_MODEL)
    mark = proxy.mark()
    browser.driver.execute_script(TEE_CHAT_STREAMS)
    field = browser.driver.find_element(By.CSS_SELECTOR, INPUT)
    field.send_keys("Tell me a riddle, then its answer.")
    field.send_keys(Keys.ENTER)
    record = browser.wait(
        lambda d: next(iter(generations(proxy, mark)), False), "the request at the worker"
    )
    produced = browser.wait(lambda d: worker_text(proxy, record), "the worker's answer")
    assert produced.startswith("<think>") and THINKING in produced  # the worker's raw text
    browser.wait(received_stream, "the end of the stream in the page")

    def layout(d: WebDriver) -> dict[str, str] | bool:
        shown = d.execute_script(LAYOUT, d.find_element(By.CSS_SELECTOR, ANSWER), THINKING,
                                 ANSWER_TEXT)  # fmt: skip
        return shown if ANSWER_TEXT in shown["text"] and THINKING in shown["text"] else False

    shown = browser.wait(layout, "the thinking and the answer in the page")
    browser.screenshot("thinking")
    assert "<think>" not in shown["text"] and "</think>" not in shown["text"]
    # Apart: the innermost element holding both is a container of blocks, not one paragraph
    # (unsplit, the renderer makes `<think>` an inline element inside the answer's <p>).
    assert shown["both"] == "div", shown
