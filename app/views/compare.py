"""Compare: two to four strategy configurations on the same model, prompt and seed, side by side."""

import pandas as pd
import streamlit as st

import common
import exports
import forms
import jobs
import render
import viz

st.title("Compare strategies")
st.caption("Same model, prompt and seed for every configuration; texts side by side with their differences marked, "
           "metrics in one table, and per-token entropy, log-probability and latency on shared axes.")

registry = common.get_registry()
spec = forms.model_select(registry, key="cmp:model")
setup = forms.prompt_inputs(spec, prefix="cmp")
n = st.radio("Configurations", [2, 3, 4], horizontal=True, key="cmp:n")

defaults = ["greedy", "sample", "greedy", "sample"]
configs = []
cols = st.columns(n)
for i, col in enumerate(cols):
    with col, st.container(border=True):
        st.markdown(f"**Configuration {i + 1}**")
        strategy = forms.strategy_select(key=f"cmp:{i}:strategy", default=defaults[i])
        params = forms.param_form(strategy, prefix=f"cmp:{i}", columns=1)
        inputs = forms.inputs_form(strategy, params, spec, prefix=f"cmp:{i}")
        configs.append((f"config {i + 1}: {strategy.name}", forms.request(spec, strategy, setup, params, inputs)))

if st.button("Run comparison", type="primary", key="cmp:go", icon=":material/play_arrow:"):
    jobs.start_batch("compare", spec.key, configs)

jobs.run_section("compare")
jobs.show_notices("compare")

records = [r for r in (common.find_run(i) for i in common.last().get("compare", [])) if r is not None]


@st.fragment
def per_token(frames: dict) -> None:
    """Entropy / log-probability / latency per token of every configuration on shared axes (a toggle re-runs only
    this fragment)."""
    column = st.segmented_control("Measure", ["entropy", "logprob", "dt_ms"], default="entropy", key="cmp:column",
                                  format_func={"entropy": "entropy (bits)", "logprob": "log-probability (ln)",
                                               "dt_ms": "latency (ms)"}.get)
    try:
        st.plotly_chart(viz.compare_figure(frames, column or "entropy"), key="cmp:figure", width="stretch")
    except Exception as e:  # a figure bug must not take the page down
        st.error(common.plain(f"Could not draw the comparison: {type(e).__name__}: {e}"))


def results(records: list) -> None:
    st.divider()
    st.subheader("Texts")
    st.caption("Marked: tokens that differ from configuration 1 (for configuration 1: from configuration 2).")
    tokens = [render.token_texts(r) for r in records]
    cols = st.columns(len(records))
    for i, (col, rec) in enumerate(zip(cols, records)):
        with col:
            st.markdown(f"**{i + 1}. {common.plain(rec.info.strategy)}**")
            st.caption(common.plain(render.params_text(rec.info)) or "no parameters")
            if rec.status != "ok":
                st.warning(common.plain(f"status: {rec.status}" + (f" ({rec.error})" if rec.error else "")))
            against = tokens[1] if i == 0 and len(tokens) > 1 else tokens[0]
            render.html_block(render.diff_html(tokens[i], against))

    st.subheader("Metrics")
    rows = []
    for i, rec in enumerate(records):
        info = rec.info
        m = info.metrics
        rows.append({"configuration": f"{i + 1}. {info.strategy}", "status": rec.status,
                     "params": render.params_text(info),
                     "new tokens": m.get("new_tokens"), "tokens/s": m.get("tokens_per_s"),
                     "mean entropy (bits)": m.get("mean_entropy_bits"), "mean logprob": m.get("mean_logprob"),
                     "perplexity": m.get("perplexity"), "median step ms": m.get("median_step_ms"),
                     "wall s": info.wall_s,
                     "same text as 1 (%)": round(100 * render.similarity(tokens[0], tokens[i]), 1)})
    table = pd.DataFrame(rows)
    st.dataframe(table, hide_index=True, width="stretch")
    exports.table_download(table, "declab-compare-metrics.csv", key="cmp:metrics:csv")

    st.subheader("Per token")
    per_token({f"{i + 1}. {r.info.strategy}": r.frame for i, r in enumerate(records)})

    st.subheader("Runs")
    tabs = st.tabs([common.plain(f"{i + 1}. {r.info.strategy}") for i, r in enumerate(records)])
    for tab, rec in zip(tabs, records):
        with tab:
            render.show_run(rec, key=f"cmp:{rec.run_id}")


if records:
    results(records)
else:
    st.info("Set up two to four configurations and press **Run comparison**.")
