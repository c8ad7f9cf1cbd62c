"""Mechanism views of the grammar strategies gcd and asap (strategies/grammar/; docs/strategies.md#gcd, #asap).

One figure per run, four panels (each drawn only when its rows are there):
- KL(empirical || target) against the number of samples (`kl` rows): the cumulative curve and the paper's
  sliding window (last n/4 samples). With an exact target (small finite grammar, `exact` = True) a dashed line
  gives GCD's limit, KL(GCD's exact distribution || Q): where GCD stays however many samples it draws, while ASAp
  goes to 0. Otherwise the title says the target is the explored-support approximation (only strings this run
  sampled, weighted by their likelihood), not the true Q.
- The distributions (`target` rows): target Q, this run's empirical frequencies and, in exact mode, GCD's exact
  distribution, for the most likely sequences.
- asap: EFG~(root) after each sample (`finish` rows), an upper bound that falls towards Z (dashed, exact mode).
  gcd: the sample likelihoods, ln P(w), in the order drawn.
- The trie (`node` rows, else rebuilt from the token rows): x = depth, one node per prefix, size = visits,
  colour = EFG~ (asap) or visits (gcd); dead nodes (nothing grammatical below them within the budget) crossed.
The masked mass per step is drawn by viz.acceptance from the same `masked_mass` column.

`kl_compare_figure({name: frame})` puts the KL curves of several runs (gcd and asap on one prompt) on one axis.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import HIGHLIGHT, MUTED, PALETTE, esc, fmt, has, num, rows_of, show_token, style

MAX_BARS = 12            # sequences in the distribution panel
MAX_TRIE_NODES = 120     # trie nodes drawn (most visited first, with their ancestors)


def gcd_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    """The gcd view; None for asap runs (they have their own, which shows the same and more)."""
    tokens = rows_of(frame, "token")
    if has(tokens, "p_asap") or not has(tokens, "p_gcd"):
        return None
    return grammar_figure(frame, meta, asap=False)


def asap_figure(frame: pd.DataFrame, meta: dict | None = None) -> go.Figure | None:
    if not has(rows_of(frame, "token"), "p_asap", "efg_after"):
        return None
    return grammar_figure(frame, meta, asap=True)


def grammar_figure(frame: pd.DataFrame, meta: dict | None = None, asap: bool = True) -> go.Figure | None:
    kl = rows_of(frame, "kl")
    target = rows_of(frame, "target")
    exact = bool(has(kl, "exact") and kl["exact"].fillna(False).astype(bool).all()) if len(kl) else False
    name = "ASAp" if asap else "GCD"
    kl_title = ("KL(empirical ‖ exact Q)" if exact else
                "KL(empirical ‖ explored-support approximation; not the exact Q)")
    fig = make_subplots(rows=3, cols=2, row_heights=[0.3, 0.25, 0.45], vertical_spacing=0.1, horizontal_spacing=0.1,
                        specs=[[{}, {}], [{}, {}], [{"colspan": 2}, None]],
                        subplot_titles=[kl_title, "Distribution over sentences",
                                        "EFG~(root) after each sample" if asap else "Sample log-likelihood ln P(w)",
                                        "Mean normalised likelihood of the samples", "Prefix trie"])
    _kl_panel(fig, kl, target, exact, name)
    _distribution_panel(fig, target, exact)
    _root_panel(fig, frame, target, exact, asap)
    _expectation_panel(fig, frame, target)
    _trie_panel(fig, frame, asap)
    return style(fig, f"{name}: grammar-conditioned sampling", height=1100, legend_right=True)


def _kl_panel(fig, kl: pd.DataFrame, target: pd.DataFrame, exact: bool, name: str) -> None:
    if not has(kl, "samples", "kl"):
        return
    x = num(kl["samples"])
    fig.add_trace(go.Scatter(x=x, y=num(kl["kl"]), mode="lines", name=f"{name}: all samples so far",
                             line={"color": PALETTE[0]}, legendgroup="kl"), row=1, col=1)
    if has(kl, "kl_window"):
        fig.add_trace(go.Scatter(x=x, y=num(kl["kl_window"]), mode="lines", name=f"{name}: last n/4 samples",
                                 line={"color": PALETTE[0], "dash": "dot"}, legendgroup="kl"), row=1, col=1)
    limit = gcd_limit(target) if exact else None
    if limit is not None and math.isfinite(limit):
        fig.add_trace(go.Scatter(x=[x.min(), x.max()], y=[limit, limit], mode="lines", name="GCD's limit",
                                 line={"color": HIGHLIGHT, "dash": "dash"}, legendgroup="kl"), row=1, col=1)
    fig.update_xaxes(title_text="samples", type="log", row=1, col=1)
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", row=1, col=1)


def gcd_limit(target: pd.DataFrame) -> float | None:
    """KL(GCD's exact distribution renormalised over complete sentences || Q), from the `target` rows."""
    if not has(target, "q", "q_gcd"):
        return None
    q, g = num(target["q"]), np.nan_to_num(num(target["q_gcd"]))
    if g.sum() <= 0:
        return None
    g = g / g.sum()
    keep = g > 0
    if np.any(q[keep] <= 0):
        return float("inf")
    return float(np.sum(g[keep] * np.log(g[keep] / q[keep])))


def _labels(target: pd.DataFrame) -> list[str]:
    return [show_token(t, 24) or "∅" for t in target["token_text"]] if "token_text" in target else \
        [str(i) for i in range(len(target))]


def _distribution_panel(fig, target: pd.DataFrame, exact: bool) -> None:
    if not has(target, "q"):
        return
    q = num(target["q"])
    emp = np.nan_to_num(num(target["count"])) if has(target, "count") else np.zeros(len(target))
    g = np.nan_to_num(num(target["q_gcd"])) if exact and has(target, "q_gcd") else np.zeros(len(target))
    share = np.maximum.reduce([q, emp / max(emp.sum(), 1.0), g / max(g.sum(), 1e-300)])
    order = np.argsort(-share, kind="stable")[:MAX_BARS]                 # what any of the three puts mass on
    top = target.iloc[sorted(order, key=lambda i: -q[i])]
    labels = _labels(top)
    fig.add_trace(go.Bar(x=labels, y=num(top["q"]), name="exact Q" if exact else "Q (explored support)",
                         marker_color=PALETTE[2], legendgroup="dist"), row=1, col=2)
    if has(target, "count"):
        total = float(np.nansum(num(target["count"])))
        if total > 0:
            fig.add_trace(go.Bar(x=labels, y=num(top["count"]) / total, name="empirical", marker_color=PALETTE[0],
                                 legendgroup="dist"), row=1, col=2)
    if exact and has(target, "q_gcd"):
        g = np.nan_to_num(num(target["q_gcd"]))
        if g.sum() > 0:
            fig.add_trace(go.Bar(x=labels, y=np.nan_to_num(num(top["q_gcd"])) / g.sum(), name="GCD (exact)",
                                 marker_color=HIGHLIGHT, legendgroup="dist"), row=1, col=2)
    fig.update_xaxes(type="category", tickangle=-45, row=1, col=2)      # "101" is a sentence, not a number
    fig.update_yaxes(title_text="probability", rangemode="tozero", row=1, col=2)


def _root_panel(fig, frame: pd.DataFrame, target: pd.DataFrame, exact: bool, asap: bool) -> None:
    finish = rows_of(frame, "finish")
    if not len(finish) or "sample" not in finish:
        return
    x = num(finish["sample"])
    if asap and has(finish, "efg_root"):
        fig.add_trace(go.Scatter(x=x, y=num(finish["efg_root"]), mode="lines+markers", name="EFG~(root)",
                                 marker={"size": 4}, line={"color": PALETTE[3]}), row=2, col=1)
        if exact and has(target, "p_w"):
            z = float(np.nansum(num(target["p_w"])))
            fig.add_trace(go.Scatter(x=[x.min(), x.max()], y=[z, z], mode="lines", name="Z (exact)",
                                     line={"color": PALETTE[3], "dash": "dash"}), row=2, col=1)
        fig.update_yaxes(title_text="EFG~(root)", type="log", row=2, col=1)
    elif has(finish, "score"):
        fig.add_trace(go.Scatter(x=x, y=num(finish["score"]), mode="markers", name="ln P(w)",
                                 marker={"size": 5, "color": PALETTE[4]}), row=2, col=1)
        fig.update_yaxes(title_text="ln P(w)", row=2, col=1)
    fig.update_xaxes(title_text="sample", row=2, col=1)


def _expectation_panel(fig, frame: pd.DataFrame, target: pd.DataFrame) -> None:
    """The paper's expectation plot: running mean of each complete sample's normalised likelihood q(w) against
    the ideal sum of q^2 (what exact sampling from q gives in expectation)."""
    finish = rows_of(frame, "finish")
    if not has(target, "q", "seq") or not has(finish, "sample"):
        return
    q_of = {str(s): float(q) for s, q in zip(target["seq"].fillna(""), num(target["q"]))}
    seqs = _sample_seqs(frame)
    values = [q_of.get(seqs.get(int(s)), np.nan) for s in num(finish["sample"])]
    values = pd.Series(values, dtype="float64")
    running = values.expanding().mean().to_numpy()
    x = num(finish["sample"])
    fig.add_trace(go.Scatter(x=x, y=running, mode="lines", name="running mean of q(sample)",
                             line={"color": PALETTE[5]}), row=2, col=2)
    ideal = float(np.sum(num(target["q"]) ** 2))
    fig.add_trace(go.Scatter(x=[x.min(), x.max()], y=[ideal, ideal], mode="lines", name="ideal Σ q²",
                             line={"color": PALETTE[5], "dash": "dash"}), row=2, col=2)
    fig.update_xaxes(title_text="sample", row=2, col=2)
    fig.update_yaxes(title_text="q(w)", rangemode="tozero", row=2, col=2)


def _sample_seqs(frame: pd.DataFrame) -> dict[int, str]:
    """sample index -> its generated token ids as 'id id id' (EOS excluded), from the token rows."""
    tokens = rows_of(frame, "token")
    if not has(tokens, "sample", "token_id"):
        return {}
    finish = rows_of(frame, "finish")
    complete = set()
    if has(finish, "complete"):
        complete = {int(s) for s, c in zip(num(finish["sample"]), finish["complete"].fillna(False)) if c}
    out = {}
    for sample, rows in tokens.sort_values("step", kind="stable").groupby("sample", sort=False):
        ids = [int(t) for t in rows["token_id"]]
        if int(sample) in complete and ids:                  # the last token row of a complete sample is EOS
            ids = ids[:-1]
        out[int(sample)] = " ".join(map(str, ids))
    return out


def trie_nodes(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trie node: node_id, node_parent, depth, token_text, p, efg, visits, dead; from the `node` rows,
    else rebuilt from the token rows (visits only)."""
    nodes = rows_of(frame, "node")
    if has(nodes, "node_id", "node_parent"):
        return nodes
    tokens = rows_of(frame, "token")
    if not has(tokens, "token_id", "step"):
        return nodes.iloc[0:0]
    ids: dict[tuple, int] = {(): 0}
    rows: dict[int, dict] = {}
    branch = tokens["sample"] if "sample" in tokens else tokens.get("branch_id", pd.Series(0, index=tokens.index))
    for _, group in tokens.assign(_b=branch).sort_values("step", kind="stable").groupby("_b", sort=False):
        prefix: tuple = ()
        for t, text, lp in zip(group["token_id"], group["token_text"], num(group["logprob"])):
            child = prefix + (int(t),)
            if child not in ids:
                ids[child] = len(ids)
                rows[ids[child]] = {"node_id": ids[child], "node_parent": ids[prefix], "depth": len(child),
                                    "token_text": text, "p": math.exp(lp) if lp == lp else np.nan, "visits": 0,
                                    "efg": np.nan, "dead": False}
            rows[ids[child]]["visits"] += 1
            prefix = child
    return pd.DataFrame(list(rows.values()))


def _trie_panel(fig, frame: pd.DataFrame, asap: bool) -> None:
    nodes = trie_nodes(frame)
    if not len(nodes):
        return
    nodes = nodes.assign(node_id=num(nodes["node_id"]).astype(int), node_parent=num(nodes["node_parent"]).astype(int),
                         visits=np.nan_to_num(num(nodes["visits"])) if "visits" in nodes else 1.0)
    keep = _most_visited(nodes)
    nodes = nodes[nodes["node_id"].isin(keep)]
    children: dict[int, list[int]] = {}
    for nid, parent in zip(nodes["node_id"], nodes["node_parent"]):
        children.setdefault(int(parent), []).append(int(nid))
    y: dict[int, float] = {}
    counter = [0]

    def place(nid: int) -> float:                 # leaves in DFS order, a parent in the middle of its children
        kids = children.get(nid, [])
        if not kids:
            y[nid] = counter[0]
            counter[0] += 1
        else:
            ys = [place(k) for k in kids]
            y[nid] = (min(ys) + max(ys)) / 2
        return y[nid]
    place(0)
    depth = dict(zip(nodes["node_id"], num(nodes["depth"])))
    depth[0] = 0
    xs, ys = [], []
    for nid, parent in zip(nodes["node_id"], nodes["node_parent"]):
        if parent in y and nid in y:
            xs += [depth[parent], depth[nid], None]
            ys += [y[parent], y[nid], None]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": MUTED, "width": 1}, hoverinfo="skip",
                             showlegend=False), row=3, col=1)
    fig.add_trace(go.Scatter(x=[0], y=[y[0]], mode="markers+text", text=["root"], textposition="middle left",
                             marker={"size": 12, "color": "#333333", "symbol": "square"}, showlegend=False,
                             hovertext=["the prompt (root)"], hoverinfo="text"), row=3, col=1)
    nx = [depth[n] for n in nodes["node_id"]]
    ny = [y[n] for n in nodes["node_id"]]
    visits = nodes["visits"].to_numpy(dtype=float)
    size = 8 + 6 * np.log1p(visits)
    efg = num(nodes["efg"]) if "efg" in nodes else np.full(len(nodes), np.nan)
    color_efg = asap and not np.isnan(efg).all()
    dead = nodes["dead"].fillna(False).astype(bool).to_numpy() if "dead" in nodes else np.zeros(len(nodes), bool)
    p = num(nodes["p"]) if "p" in nodes else np.full(len(nodes), np.nan)
    hover = [f"<b>{show_token(t, 30)}</b><br>depth {fmt(d)} · visits {fmt(int(v))}<br>P(t|parent) = {fmt(pp)}"
             + (f"<br>EFG~ = {fmt(e)}" if color_efg else "") + ("<br>dead (nothing grammatical below)" if dd else "")
             for t, d, v, pp, e, dd in zip(nodes["token_text"], nx, visits, p, efg, dead)]
    marker = {"size": size, "line": {"color": ["#000000" if d else "white" for d in dead], "width": 1},
              "symbol": ["x" if d else "circle" for d in dead]}
    if color_efg:
        marker.update(color=efg, colorscale="Viridis", cmin=0, cmax=1, showscale=True,
                      colorbar={"title": {"text": "EFG~"}, "len": 0.4, "y": 0.2, "thickness": 12})
    else:
        marker.update(color=visits, colorscale=[[0, "#c6dbef"], [1, "#08306b"]], showscale=True,
                      colorbar={"title": {"text": "visits"}, "len": 0.4, "y": 0.2, "thickness": 12})
    fig.add_trace(go.Scatter(x=nx, y=ny, mode="markers+text", text=[show_token(t, 8) for t in nodes["token_text"]],
                             textposition="top center", textfont={"size": 10}, marker=marker, hovertext=hover,
                             hoverinfo="text", name="trie nodes", showlegend=False), row=3, col=1)
    fig.update_xaxes(title_text="depth (tokens)", dtick=1, row=3, col=1)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed", row=3, col=1)


def _most_visited(nodes: pd.DataFrame) -> set[int]:
    """The MAX_TRIE_NODES most visited nodes and all their ancestors (so the drawing stays a tree)."""
    parent = dict(zip(nodes["node_id"], nodes["node_parent"]))
    keep: set[int] = set()
    for nid in nodes.sort_values("visits", ascending=False, kind="stable")["node_id"]:
        if len(keep) >= MAX_TRIE_NODES:
            break
        while nid in parent and nid not in keep:
            keep.add(int(nid))
            nid = parent[nid]
    return keep


def kl_compare_figure(frames: dict[str, pd.DataFrame]) -> go.Figure:
    """KL(empirical || target) against samples for several runs (e.g. gcd and asap on one prompt and grammar),
    on one log axis; the legend names are the dict keys (escaped). GCD's exact limit is drawn once when a run
    carries it."""
    fig = go.Figure()
    limit = None
    exact_all = True
    for i, (name, frame) in enumerate(frames.items()):
        kl = rows_of(frame, "kl")
        if not has(kl, "samples", "kl"):
            continue
        exact_all &= bool(has(kl, "exact") and kl["exact"].fillna(False).astype(bool).all())
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=num(kl["samples"]), y=num(kl["kl"]), mode="lines", name=f"{esc(name)}",
                                 line={"color": color}))
        if has(kl, "kl_window"):
            fig.add_trace(go.Scatter(x=num(kl["samples"]), y=num(kl["kl_window"]), mode="lines",
                                     name=f"{esc(name)} (last n/4)", line={"color": color, "dash": "dot"}))
        limit = limit if limit is not None else gcd_limit(rows_of(frame, "target"))
    if limit is not None and math.isfinite(limit) and fig.data:
        xs = np.concatenate([np.asarray(t.x, dtype=float) for t in fig.data])
        fig.add_trace(go.Scatter(x=[np.nanmin(xs), np.nanmax(xs)], y=[limit, limit], mode="lines",
                                 name="GCD's limit", line={"color": HIGHLIGHT, "dash": "dash"}))
    title = "KL(empirical ‖ exact Q)" if exact_all else "KL(empirical ‖ explored-support approximation)"
    fig.update_xaxes(type="log")
    return style(fig, title + " against the number of samples", "samples", "KL (nats)", height=420)
