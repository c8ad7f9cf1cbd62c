"""Run: pick a model, a strategy and its parameters, run it live, see the text, metrics and figures."""

import streamlit as st

import common
import forms
import jobs
import render

st.title("declab")
st.caption("An interactive decoding-strategy lab: run a strategy live, watch what it did, compare, teach, export.")

registry = common.get_registry()
c1, c2 = st.columns(2)
with c1:
    spec = forms.model_select(registry, key="run:model")
with c2:
    strategy = forms.strategy_select(key="run:strategy")
    st.caption(strategy.paper)
if strategy.advice:
    st.info(strategy.advice, icon=":material/lightbulb:")

setup = forms.prompt_inputs(spec, prefix="run")
with st.expander(f"Parameters of {strategy.name}", expanded=bool(strategy.params())):
    params = forms.param_form(strategy, prefix="run")
    inputs = forms.inputs_form(strategy, params, spec, prefix="run")

if st.button("Run", type="primary", key="run:go", icon=":material/play_arrow:"):
    jobs.start_batch("run", spec.key, [(strategy.name, forms.request(spec, strategy, setup, params, inputs))])

jobs.run_section("run")
jobs.show_notices("run")

st.divider()
rec = common.run_picker("Run of this session", key="run:view", prefer=common.last().get("run"))
if rec is None:
    st.info("No runs yet in this session: the defaults (embedded model, greedy) work, press **Run**.")
else:
    render.show_run(rec, key=f"run:{rec.run_id}")
