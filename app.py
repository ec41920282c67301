"""Influence Lens in the browser: ``streamlit run app.py`` opens on the bundled demo.

Multipage app (``st.navigation``); each page in ``pages/`` only lays out, shared helpers are in ``pages/ui/``.
The page, the run and the selected test image live in the URL, so a link reopens the same view.
"""

import streamlit as st

from influence_core import InfluenceLensError
from pages.ui import state, widgets

st.set_page_config(page_title="Influence Lens", page_icon=":material/center_focus_strong:", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page("pages/setup_run.py", title="Data & model", icon=":material/tune:"),
    st.Page("pages/explorer.py", title="Test image explorer", icon=":material/image_search:"),
    st.Page("pages/test_set.py", title="Whole test set", icon=":material/bar_chart:"),
    st.Page("pages/review_queue.py", title="Mislabel review", icon=":material/fact_check:"),
    st.Page("pages/corruption_lab.py", title="Corruption lab", icon=":material/science:"),
]

state.read_url()
page = st.navigation(PAGES)
with st.sidebar:
    widgets.run_picker()
    st.caption("Charts: the camera icon above each chart downloads it as PNG. Tables have CSV buttons.")
try:
    page.run()
except InfluenceLensError as e:
    widgets.show_error(e)
finally:
    state.write_url()
