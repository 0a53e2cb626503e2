"""The cost report: the same inputs through the pipeline under several configurations, compared.

`configs` names and runs them, `metrics` computes every figure from the runs' Parquet,
`plots` draws them, `render` writes report.md / report.html / report.json.
"""
