"""DB-GPT's web UI in a real browser, answering with a real FastChat worker through the adapter.

The user's path: the app list, "Chat Normal", the FastChat model in the model picker, a question,
Enter. What the page receives must be exactly the text the tiny-vicuna worker produced for that
request (seen by the recording proxy in front of it; the page's `fetch` is teed to read the
stream the UI reads), and the page must show it, growing while it streams. The UI renders the
answer as Markdown with KaTeX, and tiny-vicuna's random text holds their syntax now and then
(`&not`, `----`, `a*b*`, `$`), which joins, drops or re-renders characters; so what is shown is
compared by its letters and digits: in order, they are the received ones, hardly any missing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from tests.interop.e2e.app_api import generations, last_message, worker_text
from tests.interop.e2e.app_stack import AppStack
from tests.interop.e2e.browser import Browser

QUESTION = "Name three colours of the sea at dawn."
CHAT_NORMAL_CARD = (
    "//span[normalize-space()='Chat Normal']/ancestor::div[contains(@class,'cursor-pointer')][1]"
)
START_CHAT = ".//img[@alt='/pictures/card_chat.png']/.."  # the card's "start chat" link
MODEL_PICKER = "#input-panel .ant-select"
INPUT = "#input-panel textarea"
ANSWER = "[data-slot=assistant-response] .prose"
QUESTION_SHOWN = "[data-slot=user-message]"
# Keeps a copy of every chat stream the page reads (the UI reads it with window.fetch).
TEE_CHAT_STREAMS = """
window.__chatStreams = [];
const originalFetch = window.fetch;
window.fetch = async function (input, init) {
  const response = await originalFetch.apply(this, arguments);
  const url = typeof input === "string" ? input : input.url;
  if (!url.includes("/api/v1/chat/completions") || !response.body) return response;
  const [mine, theirs] = response.body.tee();
  const copy = {text: "", done: false};
  window.__chatStreams.push(copy);
  (async () => {
    const reader = mine.getReader(), decoder = new TextDecoder();
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      copy.text += decoder.decode(value, {stream: true});
    }
    copy.done = true;
  })();
  return new Response(theirs, {status: response.status, headers: response.headers});
};
"""
# The answer's text as rendered, without KaTeX's hidden MathML copy of any formula.
SHOWN_TEXT = """
const node = document.querySelector(arguments[0]).cloneNode(true);
node.querySelectorAll(".katex-mathml, annotation").forEach((e) => e.remove());
return node.textContent;
"""
# Records every text the answer shows, from the first token on (the page re-renders per event).
WATCH_ANSWER = """
window.__answers = [];
new MutationObserver(() => {
  const node = document.querySelector(arguments[0]);
  const text = node ? node.innerText : "";
  const seen = window.__answers;
  if (text && seen[seen.length - 1] !== text) seen.push(text);
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def flat(text: str) -> str:
    return " ".join(text.split())


def letters(text: str) -> str:
    return "".join(re.findall(r"[^\W_]", text))


def unmatched(part: str, whole: str) -> str | None:
    """None when `part` is a subsequence of `whole`, else `part` from its first unmatched
    character (with a little context), for the failure message."""
    rest = iter(whole)
    for index, char in enumerate(part):
        if char not in rest:
            return part[max(0, index - 30) : index + 30]
    return None


def hardly_any_missing(part: str, whole: str) -> bool:
    return len(part) >= 0.9 * len(whole)


def received_stream(driver: WebDriver) -> str | bool:
    """The one chat stream the page read, once it has ended."""
    streams = driver.execute_script("return window.__chatStreams")
    assert len(streams) <= 1, "the page sent more than one chat request"
    return streams[0]["text"] if streams and streams[0]["done"] else False


def visible_option(label: str) -> Callable[[WebDriver], WebElement | bool]:
    xpath = (
        f"//div[contains(@class,'ant-select-item-option')][.//span[normalize-space()='{label}']]"
    )

    def find(driver: WebDriver) -> WebElement | bool:
        shown = [e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
        return shown[0] if shown else False

    return find


def choose_model(browser: Browser, model: str) -> None:
    picker = browser.wait(
        lambda d: d.find_element(By.CSS_SELECTOR, MODEL_PICKER), "the model picker"
    )
    picker.click()
    browser.wait(visible_option(model), f"{model} in the model picker").click()
    browser.wait(lambda d: picker.text == model, f"{model} chosen")


def open_chat_normal(browser: Browser, app_url: str) -> None:
    browser.driver.get(app_url + "/construct/app")
    card = browser.wait(lambda d: d.find_element(By.XPATH, CHAT_NORMAL_CARD), "the Chat Normal app")
    card.find_element(By.XPATH, START_CHAT).click()
    browser.wait(lambda d: "/chat" in d.current_url, "the chat page")


@pytest.mark.deadline(900)
def test_the_web_ui_streams_the_fastchat_workers_answer(
    app_stack: AppStack, browser: Browser
) -> None:
    proxy, model = app_stack.llm_proxy, app_stack.fastchat.model
    open_chat_normal(browser, app_stack.url)
    choose_model(browser, model)
    mark = proxy.mark()
    browser.driver.execute_script(TEE_CHAT_STREAMS)
    browser.driver.execute_script(WATCH_ANSWER, ANSWER)
    field = browser.driver.find_element(By.CSS_SELECTOR, INPUT)
    field.send_keys(QUESTION)
    field.send_keys(Keys.ENTER)

    record = browser.wait(
        lambda d: next(iter(generations(proxy, mark)), False), "the request at the worker"
    )
    produced = browser.wait(
        lambda d: worker_text(proxy, record), "the worker's whole answer", timeout=600
    )
    assert QUESTION in record.body["prompt"]
    # DB-GPT drops U+FFFD (a token ending mid UTF-8 sequence) from what it streams, as its
    # apiserver does (docs/protocol.md §8.4); the adapter relays the text untouched.
    assert produced.replace("\ufffd", "").strip(), "tiny-vicuna produced an empty answer"

    received = browser.wait(received_stream, "the end of the stream in the page", timeout=300)
    content = last_message(received.splitlines()).content
    assert content.strip() == produced.replace("\ufffd", "").strip()

    sent = letters(content)

    def shown(d: WebDriver) -> str:
        return letters(d.execute_script(SHOWN_TEXT, ANSWER))

    def all_shown(d: WebDriver) -> bool:
        page = shown(d)
        return unmatched(page, sent) is None and hardly_any_missing(page, sent)

    with contextlib.suppress(TimeoutException):  # the asserts below say what differs
        browser.wait(all_shown, "the whole answer in the page", timeout=120)
    for question in browser.driver.find_elements(By.CSS_SELECTOR, QUESTION_SHOWN)[:1]:
        browser.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", question)
    browser.screenshot("answer")  # the README's picture: docs/images/dbgpt-app-chat.png
    (browser.artefacts / f"{browser.name}-received.txt").write_text(content)
    page = shown(browser.driver)
    assert unmatched(page, sent) is None, f"shown, from where it differs: {unmatched(page, sent)}"
    assert hardly_any_missing(page, sent), f"{len(page)} of {len(sent)} letters and digits shown"
    assert len(generations(proxy, mark)) == 1
    snapshots = browser.driver.execute_script("return window.__answers")
    assert len(snapshots) >= 2, f"the answer appeared at once, not streamed: {snapshots}"
