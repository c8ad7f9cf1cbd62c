"""Teach: step through a run one decoding step at a time: the candidates the model offered, the token the strategy
picked and why, with a short explanation card per strategy citing its paper."""

import math

import pandas as pd
import streamlit as st

import common
import forms
import jobs
import render
from declab.core.trace import BASE_COLUMNS
from viz.funnel import stage_table

st.title("Teach: one decoding step at a time")
st.caption("At every step the model scores every token in its vocabulary; a decoding strategy turns those scores "
           "into one choice. Step through a run to see the top candidates, their probabilities, and what was picked.")

registry = common.get_registry()
with st.expander("Make a new example run", expanded=not common.runs()):
    c1, c2 = st.columns(2)
    with c1:
        spec = forms.model_select(registry, key="teach:model")
    with c2:
        strategy = forms.strategy_select(key="teach:strategy")
    setup = forms.prompt_inputs(spec, prefix="teach", max_new_tokens=12)
    params = forms.param_form(strategy, prefix="teach")
    inputs = forms.inputs_form(strategy, params, spec, prefix="teach")
    if st.button("Run example", type="primary", key="teach:go", icon=":material/play_arrow:"):
        jobs.start_batch("teach", spec.key, [(strategy.name, forms.request(spec, strategy, setup, params, inputs))])
    jobs.run_section("teach")
    jobs.show_notices("teach")

rec = common.run_picker("Run to step through", key="teach:view",
                        prefer=common.last().get("teach") or (common.runs()[-1].run_id if common.runs() else None))


def card(strategy) -> None:
    """The strategy's explanation card, written for a student, citing the paper."""
    with st.container(border=True):
        if strategy is not None:
            st.markdown(f"#### {strategy.title}")
            st.write(strategy.explanation or "(no explanation written for this strategy yet)")
            st.caption(f"Paper: {strategy.paper or 'n/a'} · "
                       f"{'deterministic' if strategy.deterministic else 'random (reproducible with the seed)'}")
        else:
            st.caption("This trace's strategy is not registered in this version of declab.")


def chips_until(tok: pd.DataFrame, step: int) -> str:
    """Tokens chosen before `step` plain, the one at `step` marked (all escaped)."""
    parts = []
    for s, text in zip(tok["step"], tok["token_text"]):
        if s > step:
            break
        piece = render.esc("" if pd.isna(text) else text)
        parts.append(piece if s < step else
                     f'<mark style="background: #ffd24d; outline: 2px solid #d62728; border-radius: 3px">'
                     f'{piece or "∅"}</mark>')
    return "".join(parts)


def why(row, cands: pd.DataFrame, strategy) -> str:
    p = math.exp(row["logprob"]) if pd.notna(row["logprob"]) else float("nan")
    chosen = cands[cands["accepted"].fillna(False).astype(bool)]
    top = cands.iloc[0] if not cands.empty else None
    if top is not None and not chosen.empty and int(chosen["rank"].iloc[0]) == 0:
        text = f"It picked the most likely candidate (p = {p:.3f})."
    elif top is not None:
        where = f"candidate #{int(chosen['rank'].iloc[0]) + 1}" if not chosen.empty else "a token outside the top list"
        text = (f"It picked {where} (p = {p:.3f}), not the most likely one (p = {math.exp(top['logprob']):.3f}). ")
        if strategy is not None and not strategy.deterministic:
            text += "This strategy draws at random from its (reshaped, truncated) distribution, so a less likely " \
                    "token is sometimes chosen."
        else:
            text += "This strategy's rule (see the card above), not the raw probability alone, decided."
    else:
        text = f"The chosen token had p = {p:.3f}."
    h = row.get("entropy")
    if pd.notna(h):
        text += (f" The model's uncertainty here was {h:.2f} bits: as uncertain as a fair choice among about "
                 f"{2 ** h:.1f} tokens.")
    return text


def chain_steps(frame: pd.DataFrame, step: int) -> None:
    """A sampler_chain step going through the chain stage by stage (viz.funnel.stage_table; token text as text)."""
    table = stage_table(frame, step)
    if table.empty:
        return
    st.markdown("**Through the sampler chain, stage by stage**")
    st.caption("Each stage works on the candidates the previous one left (the first on the whole vocabulary). "
               "'mass kept' is the model's own probability of what is left; 'removed' lists the model's top tokens "
               "this stage removed as token (p under the model, p among this stage's input candidates).")
    st.dataframe(table, hide_index=True, width="stretch")


@st.fragment
def stepper(rec) -> None:
    frame = rec.frame
    strategy = forms.all_strategies().get(rec.info.strategy)
    tok = frame[frame["kind"] == "token"]
    branches = sorted(int(b) for b in tok["branch_id"].dropna().unique())
    branch = None
    if len(branches) > 1:
        branch = st.selectbox("Branch", branches, key=f"teach:{rec.run_id}:branch")
        tok = tok[tok["branch_id"] == branch]
    tok = tok.sort_values("step", kind="stable").drop_duplicates("step")
    steps = [int(s) for s in tok["step"]]
    if not steps:
        st.info("This run has no token steps to show.")
        return
    key = f"teach:{rec.run_id}:step"
    st.session_state.setdefault(key, 0)
    st.session_state[key] = min(st.session_state[key], len(steps) - 1)

    def move(delta: int) -> None:
        st.session_state[key] = max(0, min(len(steps) - 1, st.session_state[key] + delta))

    if len(steps) > 1:
        idx = st.slider("Step", 0, len(steps) - 1, key=key)
    else:
        idx = 0
        st.caption("Step 0 (the only step)")
    c1, c2, _ = st.columns([1, 1, 6])
    c1.button("Previous", on_click=move, args=(-1,), key=f"{key}:prev", icon=":material/chevron_left:",
              disabled=idx == 0, width="stretch")
    c2.button("Next", on_click=move, args=(1,), key=f"{key}:next", icon=":material/chevron_right:",
              disabled=idx == len(steps) - 1, width="stretch")
    step = steps[idx]
    row = tok[tok["step"] == step].iloc[0]

    st.caption(f"Text so far, step {step} marked")
    render.html_block(chips_until(tok, step))

    cands = frame[(frame["kind"] == "candidate") & (frame["step"] == step)]
    if branch is not None:
        cands = cands[cands["branch_id"] == branch]
    if "rank" in cands:
        cands = cands.sort_values("rank")
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Candidates at this step**")
        table = pd.DataFrame({
            "rank": (cands["rank"].astype("Int64") + 1) if "rank" in cands else range(1, len(cands) + 1),
            "token": cands["token_text"].map(render.visible),
            "probability": cands["logprob"].map(math.exp),
            "logprob (ln)": cands["logprob"],
            "chosen": cands["accepted"].fillna(False).astype(bool),
        })
        if not table["chosen"].any():
            table = pd.concat([table, pd.DataFrame([{
                "rank": pd.NA, "token": render.visible(row["token_text"]), "probability": math.exp(row["logprob"]),
                "logprob (ln)": row["logprob"], "chosen": True}])], ignore_index=True)
        st.dataframe(table, hide_index=True, width="stretch", column_config={
            "probability": st.column_config.ProgressColumn("probability", min_value=0.0, max_value=1.0,
                                                           format="%.3f")})
    with right:
        st.markdown("**Chosen token**")
        st.code(render.visible(row["token_text"]), language=None)
        st.markdown("**Why**")
        st.write(why(row, cands, strategy))
        extra = {c: row[c] for c in frame.columns if c not in BASE_COLUMNS and pd.notna(row.get(c))}
        if extra or pd.notna(row.get("score")):
            st.markdown("**What the strategy recorded at this step**")
            shown = {"score": row.get("score"), **extra}
            st.dataframe(pd.DataFrame([{k: v for k, v in shown.items() if pd.notna(v)}]), hide_index=True)
    chain_steps(frame if branch is None else frame[frame["branch_id"] == branch], step)


if rec is None:
    st.info("No runs in this session yet: make an example run above (or on the Run page).")
else:
    card(forms.all_strategies().get(rec.info.strategy))
    stepper(rec)
