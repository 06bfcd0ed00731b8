"""Financial sentiment monitoring: watch a stream of news and posts, score each item with a fine-tuned run,
track sentiment per company over time, and warn early when it turns.

``config`` (the YAML) -> ``sources`` (file, followed file, stdin) -> ``items`` (+ ``entities``: alias
matching) -> ``score`` (the inference engine) -> ``store`` (SQLite; offsets, items, rule state and alerts
in one transaction per batch) -> ``evaluate`` (windows as they close; ``aggregate``, ``rules``) ->
``sinks`` (stdout, JSONL, webhook). ``runner.Monitor`` ties them together; ``replay`` is the backtest,
``report`` its table and plots, ``commands`` the CLI.
"""
