"""Knowledge base: a space, a small document embedded by the FastChat embedding worker through
the adapter's `@text2vec` model, and a knowledge chat whose prompt to the FastChat worker
carries the retrieved chunk."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.interop.e2e.app_api import chat, generations, ok, poll
from tests.interop.e2e.app_stack import AppStack

DOC = (
    "The lighthouse keeper of Port Zephyr is named Ottoline Brask. "
    "She paints the tower blue every spring."
)
QUESTION = "Who keeps the lighthouse of Port Zephyr?"


def embedded_texts(app_stack: AppStack, mark: int) -> list[str]:
    records = app_stack.embed_proxy.since(mark, "/worker_get_embeddings")
    return [text for record in records for text in record.body["input"]]


@pytest.mark.deadline(900)
def test_knowledge_chat_sends_the_retrieved_chunk_to_the_fastchat_worker(
    app_stack: AppStack, app_http: httpx.Client
) -> None:
    api = app_stack.url + "/api/v1/knowledge"
    space = f"e2e_{uuid.uuid4().hex[:8]}"
    space_body = {"name": space, "vector_type": "Chroma", "owner": "e2e", "desc": "e2e",
                  "domain_type": "Normal"}  # fmt: skip
    ok(app_http.post(f"{api}/space/add", json=space_body))
    document = {"doc_name": "lighthouse.txt", "doc_type": "TEXT", "content": DOC}
    doc_id = ok(app_http.post(f"{api}/{space}/document/add", json=document))
    embed_mark = app_stack.embed_proxy.mark()
    ok(app_http.post(f"{api}/{space}/document/sync", json={"doc_ids": [doc_id]}))

    def synced() -> dict[str, str] | None:
        docs = ok(app_http.post(f"{api}/{space}/document/list", json={}))["data"]
        status = docs[0]["status"]
        assert status != "FAILED", docs[0]
        return docs[0] if status == "FINISHED" else None

    poll(synced, "the document to be embedded and stored")
    assert DOC in embedded_texts(app_stack, embed_mark)  # one chunk: the whole document

    llm_mark, embed_mark = app_stack.llm_proxy.mark(), app_stack.embed_proxy.mark()
    reply = chat(
        app_http, app_stack.url, mode="chat_knowledge", model=app_stack.fastchat.model,
        user_input=QUESTION, select_param=space,
    )  # fmt: skip
    assert QUESTION in embedded_texts(app_stack, embed_mark)  # the retrieval query
    [generation] = generations(app_stack.llm_proxy, llm_mark)
    prompt = generation.body["prompt"]
    assert DOC in prompt and QUESTION in prompt
    assert reply.content
