"""Sweeps: pick a sweep written by `declab sweep FILE --out DIR`, see its summary table and plots (a metric against
a parameter, a 2-D grid heatmap, a Pareto frontier of two metrics); any run (a table row or a point) opens in the
Trace explorer from the run library. No model is loaded.

Sweeps are found under a folder (default $DECLAB_SWEEPS, else `sweeps/out`): every folder below it with a
summary.parquet and a sweep.json. Everything read from those files (model output, prompt ids, parameter values) is
shown as plain text: st.dataframe cells, st.text / st.code, and figures whose labels viz.sweep escapes.
"""

import os
from pathlib import Path

import streamlit as st

import common
from declab.core import UserError
from declab.run.store import open_store
from declab.sweep.driver import list_sweeps, read_summary, sweep_info
from viz import sweep as V

ENV_SWEEPS = "DECLAB_SWEEPS"
K_PICKED = "sweeps:picked"            # session_state: the run id last picked on this page

st.title("Sweeps")
st.caption("Strategies x parameter grids x prompts x seeds, run as one job by `declab sweep FILE --out DIR` (on this "
           "machine or a Ray cluster). Pick one to see its table and plots; open any run in the Trace explorer.")

root = st.text_input("Sweeps folder", value=os.environ.get(ENV_SWEEPS) or "sweeps/out", key="sw:root",
                     help="A sweep's --out folder, or a folder holding several.")
found = list_sweeps(Path(root).expanduser())
if not found:
    st.info(f"No sweep under {root!r} yet: run `declab sweep sweeps/diversity.yaml --out {root}/diversity`.")
    st.stop()


def label(path: Path) -> str:
    info = sweep_info(path)
    return f"{info.get('name', path.name)} · {path} · {info.get('runs', '?')} runs · {info.get('created', '')}"


out = st.selectbox("Sweep", found, format_func=label, key="sw:pick")
try:
    df = read_summary(out)
except Exception as e:  # a torn or foreign file: a message, never a traceback
    st.error(f"Cannot read {out}/summary.parquet: {type(e).__name__}: {e}")
    st.stop()
info = sweep_info(out)
n_ok, n_failed = int((df["status"] == "ok").sum()), int((df["status"] == "failed").sum())
st.text(f"model {info.get('model', '?')} · prompts {info.get('prompt_set', '?')} · {len(df)} of "
        f"{info.get('runs', '?')} runs in the summary · {n_ok} ok · {n_failed} failed")
with st.expander("Sweep file"):
    st.code(str(info.get("file", "")), language="yaml")


def pick(run_id) -> None:
    if run_id:
        st.session_state[K_PICKED] = str(run_id)


def picked_point(event) -> str | None:
    """The run id of a selected plotly point (its customdata), if any."""
    try:
        points = event.selection.points if event is not None else []
    except AttributeError:
        return None
    for p in points or []:
        data = p.get("customdata")
        if isinstance(data, (list, tuple)) and data:
            data = data[0]
        if isinstance(data, str) and data and data != "nan":
            return data
    return None


st.subheader("Runs")
shown = df.drop(columns=["sweep"])
event = st.dataframe(shown, hide_index=True, height=300, on_select="rerun", selection_mode="single-row",
                     key=f"sw:table:{out}")
rows = event.selection.rows if event is not None else []
if rows:
    pick(shown.iloc[rows[0]]["run_id"])

requested = [m for m in info.get("metrics") or [] if m in df.columns]
metrics = requested + [m for m in V.metric_names(df) if m not in requested]     # the sweep's own metrics first
log_y = st.toggle("Log scale for the metric axis", key="sw:logy",
                  help="For metrics that span orders of magnitude, such as perplexity at high temperature.")


def show(fig, key: str):
    if log_y:
        fig.update_yaxes(type="log")
    return st.plotly_chart(fig, on_select="rerun", selection_mode="points", key=key)


params = V.param_names(df)
tab_line, tab_grid, tab_pareto = st.tabs(["Metric against a parameter", "Grid heatmap", "Pareto frontier"])
with tab_line:
    if not params:
        st.info("No parameter takes two or more numeric values in this sweep.")
    else:
        c1, c2 = st.columns(2)
        metric = c1.selectbox("Metric", metrics, key="sw:line:metric")
        param = c2.selectbox("Parameter", params, key="sw:line:param")
        ev = show(V.metric_vs_param(df, metric, param), key=f"sw:line:{out}:{metric}:{param}")
        pick(picked_point(ev))
        st.caption("Lines: the mean over prompts, then over seeds; bands: the range of the per-seed means; faint "
                   "points: single runs (click one to pick it). Dotted: strategies without this parameter.")
with tab_grid:
    grids = {s: [p for p in params if (V.with_params(df[df["strategy"] == s]).get(V.PREFIX + p) is not None)
                 and V.with_params(df[df["strategy"] == s])[V.PREFIX + p].nunique() >= 2]
             for s in dict.fromkeys(df["strategy"])}
    grids = {s: ps for s, ps in grids.items() if len(ps) >= 2}
    if not grids:
        st.info("No strategy in this sweep has a grid over two parameters.")
    else:
        c1, c2, c3, c4 = st.columns(4)
        strategy = c1.selectbox("Strategy", list(grids), key="sw:grid:strategy")
        gx = c2.selectbox("x", grids[strategy], key="sw:grid:x")
        gy = c3.selectbox("y", [p for p in grids[strategy] if p != gx], key="sw:grid:y")
        gmetric = c4.selectbox("Metric", metrics, key="sw:grid:metric")
        ev = st.plotly_chart(V.grid_heatmap(df, gmetric, strategy, gx, gy), on_select="rerun",
                             selection_mode="points", key=f"sw:grid:{out}:{strategy}:{gx}:{gy}:{gmetric}")
        pick(picked_point(ev))
with tab_pareto:
    c1, c2, c3, c4 = st.columns(4)
    mx = c1.selectbox("x metric", metrics, index=metrics.index("distinct_n") if "distinct_n" in metrics else 0,
                      key="sw:par:x")
    my_options = [m for m in metrics if m != mx]
    my = c2.selectbox("y metric", my_options,
                      index=my_options.index("perplexity") if "perplexity" in my_options else 0, key="sw:par:y")
    max_x = c3.radio("x is better when", ["higher", "lower"], horizontal=True, key="sw:par:maxx") == "higher"
    max_y = c4.radio("y is better when", ["higher", "lower"], index=1, horizontal=True, key="sw:par:maxy") == "higher"
    ev = show(V.pareto(df, mx, my, max_x, max_y), key=f"sw:par:{out}:{mx}:{my}:{max_x}:{max_y}")
    pick(picked_point(ev))
    st.caption("One point per setting (strategy and parameters: the mean over its prompts and seeds); clicking one "
               "picks the setting's first run.")

st.subheader("Picked run")
run_id = st.session_state.get(K_PICKED)
if run_id not in set(df["run_id"].astype(str)):
    st.info("Select a row of the table or click a point to pick a run.")
else:
    row = df[df["run_id"].astype(str) == run_id].iloc[0]
    st.text(f"{row['strategy']} {row['params']} · prompt {row['prompt_id']} · seed {row['seed']} · {row['status']}"
            + (f" · {row['error']}" if isinstance(row["error"], str) and row["error"] else ""))
    st.code(str(row["text"]) if isinstance(row["text"], str) and row["text"] else " ", language=None,
            wrap_lines=True)
    if st.button("Open in Trace explorer", key="sw:open", icon=":material/query_stats:",
                 help="From the run library (the sweep stored every run's trace there). No model is loaded."):
        try:
            store = open_store()
            rec = common.find_run(run_id)
            if rec is None:
                meta, frame = store.get(run_id)
                rec = common.add_run(meta, frame, origin=" (sweep)")
        except UserError as e:
            st.error(f"{e} (was the sweep run with --no-store, or with another --store / $DECLAB_STORE?)")
        else:
            common.last()["explorer"] = rec.run_id
            st.session_state.pop("tx:pick:prefer", None)
            st.session_state["tx:source"] = "A run of this session"
            st.switch_page("views/trace_explorer.py")
