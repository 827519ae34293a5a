"""The domain floor: the vocabulary every layer shares, importing nothing of the gateway above it.

- ``catalog``: the model catalog (capabilities, prices, lifecycle), read from YAML;
- ``provider_spec``: how a native provider's catalog entry maps the OpenAI fields;
- ``jobs``: a validated request (``ImageJob``) and what an upstream answers (events, usage);
- ``money``: integer micro-units, their exact parsing, formatting and the per-key multiplier;
- ``states``: states more than one layer reports, such as a circuit breaker's.

``make lint`` (import-linter, ``[tool.importlinter]`` in pyproject.toml) keeps it a floor.
"""
