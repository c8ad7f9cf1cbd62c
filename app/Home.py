"""declab: the Streamlit entry point (`streamlit run app/Home.py`, or `make run`).

Multipage navigation: Run (the landing page), Compare, Drafter observatory, Trace explorer, Teach, Export,
Library (every stored run, across sessions and restarts) and Sweeps (`declab sweep` results). Each page is a thin
script over the app's modules (common, forms, jobs, render, exports); decoding lives in declab/ and strategies/,
figures in viz/.
"""

import streamlit as st

# an emoji page icon is drawn in the browser (a `:material/...:` one is fetched from a font CDN)
st.set_page_config(page_title="declab", page_icon="🧪", layout="wide")

import common  # noqa: E402  (app/ is on sys.path: Streamlit adds the main script's folder)
import jobs  # noqa: E402

run_page = st.Page("views/run.py", title="Run", icon=":material/play_arrow:", url_path="run")


def landing() -> None:
    """The app's root URL opens the Run page at /run (Streamlit serves a default page only at the root)."""
    st.switch_page(run_page)


pages = [
    st.Page(landing, title="declab", url_path="home", default=True, visibility="hidden"),
    run_page,
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("views/drafters.py", title="Drafter observatory", icon=":material/account_tree:", url_path="drafters"),
    st.Page("views/trace_explorer.py", title="Trace explorer", icon=":material/query_stats:", url_path="explorer"),
    st.Page("views/teach.py", title="Teach", icon=":material/school:", url_path="teach"),
    st.Page("views/export.py", title="Export", icon=":material/download:", url_path="export"),
    st.Page("views/library.py", title="Library", icon=":material/library_books:", url_path="library"),
    st.Page("views/sweeps.py", title="Sweeps", icon=":material/grid_view:", url_path="sweeps"),
]
page = st.navigation(pages)
sidebar = st.sidebar.empty()
common.settings_sidebar()
page.run()
jobs.sidebar_status(sidebar)   # after the page, which may just have collected a run (pages avoid st.stop())
