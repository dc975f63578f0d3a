"""fastchat-adapter: DB-GPT's worker API and registration, served from FastChat workers."""

__version__ = "0.1.0"
