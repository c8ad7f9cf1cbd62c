"""Run: pick a model, a strategy and its parameters, run it live, see the text, metrics and figures."""

import streamlit as st

import common
from declab.run import RunRequest

st.title("declab")
st.caption("An interactive decoding-strategy lab: run a strategy live, watch what it did, compare, teach, export.")

registry = common.get_registry()
c1, c2 = st.columns(2)
with c1:
    spec = common.model_select(registry, key="run:model")
with c2:
    strategy = common.strategy_select(key="run:strategy")
    st.caption(strategy.paper)

prompt, fmt, max_new, seed = common.prompt_inputs(spec, prefix="run")
with st.expander(f"Parameters of {strategy.name}", expanded=bool(strategy.params())):
    params = common.param_form(strategy, prefix="run")
    extras = common.extras_form(strategy, spec, registry, prefix="run")

if st.button("Run", type="primary", key="run:go", icon=":material/play_arrow:"):
    request = RunRequest(model=spec.key, strategy=strategy.name, prompt=prompt, params=params, prompt_format=fmt,
                         max_new_tokens=max_new, seed=seed, extras=extras)
    common.start_batch("run", spec.key, [(strategy.name, request)])

common.run_section("run")
common.show_notices("run")

st.divider()
rec = common.run_picker("Run of this session", key="run:view", prefer=common.last().get("run"))
if rec is None:
    st.info("No runs yet in this session: the defaults (embedded model, greedy) work, press **Run**.")
else:
    common.show_run(rec, key=f"run:{rec.run_id}")
