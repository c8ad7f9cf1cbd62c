"""A standalone HTML report of one run: the generated text(s), the prompt, metrics, metadata and every figure
from `viz.figures_for`, in one self-contained file that opens offline (plotly.js is embedded once, inline).

Every text that came from the model or the user (prompt, sequences, params, errors, token labels) is escaped with
html.escape; figure data is embedded as JSON by plotly, which writes '<' as \\u003c.
"""

from __future__ import annotations

import json

import pandas as pd

from viz.common import esc
from viz.figures import figures_for

# metadata shown in the header table, in this order (the rest goes to "Run metadata")
HEADLINE = ("strategy", "model", "status", "seed", "prompt_format", "max_new_tokens", "wall_s", "device", "dtype",
            "quantization", "run_id", "started_at")
LEFT_OUT = ("prompt", "sequences", "metrics", "params", "columns", "prompt_ids", "error")

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: .8em; border-radius: 4px; }
table { border-collapse: collapse; margin: .5em 0 1.5em; } td, th { border-bottom: 1px solid #ddd;
  padding: .25em .8em; text-align: left; vertical-align: top; } th { background: #fafafa; }
.error { color: #b00020; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
"""


def _cell(value) -> str:
    """A metadata value as escaped text (dicts and lists as JSON)."""
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return esc(value)


def _table(items, header: tuple[str, str] | None = None) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in items)
    head = f"<tr><th>{esc(header[0])}</th><th>{esc(header[1])}</th></tr>" if header else ""
    return f"<table>{head}{rows}</table>"


def _sequences(meta: dict) -> str:
    """Each returned sequence, best first: a heading with its score, length and the strategy's scalar extras
    (loglik, penalty, group...), then the text."""
    parts = []
    for i, seq in enumerate(meta.get("sequences") or []):
        facts = [f"{len(seq.get('token_ids') or [])} tokens"]
        for key, value in seq.items():
            if key not in ("text", "token_ids") and isinstance(value, (int, float, str, bool)):
                facts.append(f"{esc(key)} {_cell(round(value, 4) if isinstance(value, float) else value)}")
        parts.append(f"<h3>#{i + 1} · {' · '.join(facts)}</h3><pre>{esc(seq.get('text', ''))}</pre>")
    return "".join(parts) or "<p>(no sequences)</p>"


def html_report(meta: dict, frame: pd.DataFrame) -> str:
    """The whole report as one HTML string (UTF-8). meta: the run metadata (declab.runner Run.events); frame:
    its trace."""
    meta = meta or {}
    figures = figures_for(frame, meta)
    blocks = []
    for i, (label, fig) in enumerate(figures.items()):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        blocks.append(f"<h3>{esc(label)}</h3>{div}")
    title = f"declab run {meta.get('run_id', '')}: {meta.get('strategy', '?')} on {meta.get('model', '?')}"
    error = f"<p class='error'>run {esc(meta.get('status'))}: {esc(meta['error'])}</p>" if meta.get("error") else ""
    params = meta.get("params") or {}
    rest = [(k, v) for k, v in meta.items() if k not in HEADLINE and k not in LEFT_OUT]
    rows = f"{len(frame)} trace rows" if frame is not None else "no trace"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
{error}
{_table([(k, meta[k]) for k in HEADLINE if k in meta])}
<h2>Prompt</h2><pre>{esc(meta.get('prompt', ''))}</pre>
<h2>Generated</h2>{_sequences(meta)}
<h2>Parameters</h2>{_table(params.items()) if params else '<p>(none)</p>'}
<h2>Metrics</h2>{_table((meta.get('metrics') or {}).items())}
<h2>Figures</h2><p>{esc(rows)}; {len(figures)} figures.</p>
{''.join(blocks) or '<p>(no figures for this trace)</p>'}
<h2>Run metadata</h2>{_table(rest)}
</body></html>
"""
