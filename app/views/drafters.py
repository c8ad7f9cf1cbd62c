"""Drafter observatory: several spec_tree drafters against one verifier, on the same model, prompt and seed.

Each chosen drafter is one spec_tree run with the same shared settings (generated from the strategy's parameters,
`drafter` left out), started as one batch through jobs.py (streamed, stoppable, every run kept in the Library).
Then: the summary side by side (declab.run.observatory.summary_frame, with a spreadsheet-safe CSV download),
acceptance by depth, the texts, and each drafter's run (its tree figures) one click away.
"""

import pandas as pd
import streamlit as st
from viz.heads import head_accuracy_figure

import common
import forms
import jobs
import render
from declab.core import UserError
from declab.models.heads import trained_infos
from declab.run import observatory as obs

K_BATCH = "drafters:batch"        # session_state: [(drafter, run_id)] of the batch last started on this page
HEADLINE = (("acceptance_rate", "Acceptance rate"), ("mean_accepted_length", "Accepted length"),
            ("target_forwards", "Target forwards"), ("speedup", "Speedup"))

st.title("Drafter observatory")
st.caption("One verifier, several drafters: tree speculative decoding (spec_tree) once per drafter with the same "
           "model, prompt, seed and tree settings, so the runs differ only in who proposes the tree. At temperature "
           "0 every drafter's text equals the target's greedy text; what changes is how much of each tree the "
           "target accepts, and how many target forwards that saves.")

registry = common.get_registry()
strategy = forms.all_strategies().get(obs.STRATEGY)
if strategy is None:
    st.error(f"The strategy '{obs.STRATEGY}' is not installed, so there are no drafters to compare.")
    st.stop()
if strategy.advice:
    st.info(strategy.advice, icon=":material/lightbulb:")
spec = forms.model_select(registry, key="drf:model")
setup = forms.prompt_inputs(spec, prefix="drf")
legal = list(obs.legal_drafters())
chosen = st.multiselect("Drafters", legal, default=list(obs.usable_drafters(spec)), key="drf:drafters",
                        help="Each drafter is one run; they run one after another, in this order. The trained "
                             "heads (medusa, hydra, eagle, kangaroo) are preselected where the model has them.")

st.markdown("**Shared spec_tree settings** (every drafter gets the same)")
specs = [p for p in strategy.params() if p["name"] != "drafter"]
params = {}
cols = st.columns(3)
for i, p in enumerate(specs):
    with cols[i % len(cols)]:
        params[p["name"]] = forms.param_widget(p, key=f"drf:{p['name']}")
second_model = None
if "model" in chosen:                  # the model drafter's draft model (the pairs picker), as on the other pages
    second_model = forms.inputs_form(strategy, {**params, "drafter": "model"}, spec, prefix="drf").second_model

if st.button("Run drafters", type="primary", key="drf:go", icon=":material/play_arrow:"):
    try:
        requests = obs.drafter_requests(spec.key, setup.prompt, chosen, max_new_tokens=setup.max_new_tokens,
                                        seed=setup.seed, params=params, prompt_format=setup.prompt_format,
                                        second_model=second_model, registry=registry)
    except UserError as e:
        st.error(str(e))
    else:
        service = jobs.start_batch("drafters", spec.key, requests)
        if service is not None:
            st.session_state[K_BATCH] = [(job.label, job.run.run_id) for job in service.jobs]

jobs.run_section("drafters")
jobs.show_notices("drafters")


def batch_rows() -> list[tuple[str, common.RunRecord | None]]:
    """(drafter, its run in this session's history, or None) for the batch last started here, once it is done."""
    service = jobs.active()
    if service is not None and service.kind == "drafters" and not service.collected:
        return []                      # still decoding (followed above) or not collected yet
    return [(label, common.find_run(run_id)) for label, run_id in st.session_state.get(K_BATCH, [])]


def _value(v) -> str:
    if v is None or pd.isna(v):
        return "–"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def by_depth(rows) -> pd.DataFrame:
    """drafter x depth: rounds whose accepted path reached depth d / rounds that offered a node at depth d."""
    out = {}
    for label, rec in rows:
        depth = (rec.info.metrics.get("acceptance_by_depth") or {}) if rec is not None else {}
        out[label] = {f"depth {d}": v for d, v in sorted(depth.items(), key=lambda kv: int(kv[0]))}
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index.name = "drafter"
    return frame.reset_index()


def results(rows) -> None:
    st.divider()
    frame = obs.summary_frame([(label, rec.meta if rec is not None else None) for label, rec in rows])
    st.subheader("Side by side")
    cols = st.columns(len(rows))
    for col, (_, r) in zip(cols, frame.iterrows()):
        with col, st.container(border=True):
            st.markdown(f"**{render.esc(r['drafter'])}**")
            if r["status"] != "ok":
                st.caption(f"status: {r['status']}")
            for name, title in HEADLINE:
                st.metric(title, _value(r[name]))
    st.dataframe(frame, hide_index=True, width="stretch", key="drf:summary")
    st.download_button("Summary CSV", obs.summary_csv_bytes(frame), "drafters-summary.csv", "text/csv",
                       key="drf:csv", on_click="ignore", icon=":material/download:",
                       help="Spreadsheet-safe (formula-like text gets one leading apostrophe).")

    depth = by_depth(rows)
    if len(depth.columns) > 1:
        st.subheader("Acceptance by depth")
        st.caption("Depth d: the share of rounds reaching depth d - 1 with a drafted node at depth d whose accepted "
                   "path went on to depth d.")
        st.dataframe(depth, hide_index=True, width="stretch", key="drf:depth")

    st.subheader("Texts")
    texts = {label: rec.text for label, rec in rows if rec is not None}
    if len(set(texts.values())) == 1 and len(texts) > 1:
        st.caption("Every drafter produced the same text.")
    for label, text in texts.items():
        st.caption(label)
        st.code(text or " ", language=None, wrap_lines=True)

    st.subheader("Runs")
    done = [(label, rec) for label, rec in rows if rec is not None]
    if not done:
        return
    labels = [label for label, _ in done]
    pick = st.segmented_control("Open a drafter's run (its tree view, trace and exports)", labels,
                                default=labels[0], key="drf:open")
    rec = dict(done).get(pick) if pick else None
    if rec is not None:
        render.show_run(rec, key=f"drf:{rec.run_id}")


def trained_heads(spec) -> None:
    """The model's trained drafters (issue 18): their held-out accuracy by offset, from the files' metadata."""
    infos = trained_infos(spec)
    if not infos:
        return
    with st.expander("Trained drafters of this model: held-out top-1 accuracy by offset", expanded=False):
        st.caption("Measured when the heads were built (tools/heads_build.py) on held-out prompts of topics the "
                   "training never saw: offset d is the d-th drafted token after the root (Medusa: head d; Hydra, "
                   "EAGLE, Kangaroo: step d, given the tokens before it were right). A drafter's accepted length "
                   "per target forward follows from these.")
        fig = head_accuracy_figure(infos)
        if fig is not None:
            st.plotly_chart(fig, key="drf:heads", width="stretch")


trained_heads(spec)
rows = batch_rows()
if rows:
    results(rows)
else:
    st.info("Pick the drafters and press **Run drafters**.")
