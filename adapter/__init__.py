"""fastchat-adapter: DB-GPT's worker API and registration, served from FastChat workers.

A bare section sign in a comment (``§5.3``) points into ``docs/protocol.md``; ``docs/peers.md``
is how the real FastChat and DB-GPT programs are run in the interop tests.
"""

__version__ = "0.1.0"
