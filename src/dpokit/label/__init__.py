"""Human preference labelling in the browser: `dpokit label serve` and `dpokit label export`.

`source` reads the candidate answers (one item per row), `store` keeps items, the queue and every answer in one
SQLite file, `server` is the small Starlette app the page talks to, `export` turns the answers into canonical pairs
and agreement statistics. Depth: docs/labelling.md.
"""
