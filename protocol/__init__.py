"""Both wire protocols as pure code: FastChat workers and the DB-GPT model cluster.

No I/O happens here (no httpx, fastapi, uvicorn or asyncio): every function takes values and
returns values, in the spirit of h11.
"""
