"""Tools beside the product, never on the request path: the reference FastChat worker (a
scripted, deterministic FastChat-protocol emulator for demos, tests and benchmarks) and the
``check`` conformance checkers. The CLI exposes them as ``reference-worker`` and ``check``."""
