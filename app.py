"""Influence Lens in the browser: ``streamlit run app.py`` opens on the bundled demo.

Multipage app (``st.navigation``); each page in ``pages/`` only lays out, shared helpers are in ``pages/ui/``.
The page, the run, the selected test image and the reviewer live in the URL, so a link reopens the same view.
Every problem a page meets (bad input, a refused link, an unreadable or read-only run folder, a broken review
store) is shown as one clear message; the full exception goes to the server log only.
"""

from pathlib import Path

import streamlit as st

from pages.ui import navigation, state, widgets

st.set_page_config(page_title="Influence Lens", page_icon=":material/center_focus_strong:", layout="wide")
st.logo(str(Path(__file__).parent / "assets" / "logo.svg"), size="large")

state.read_url()
page = st.navigation(navigation.app_pages())
with st.sidebar, widgets.errors_shown():
    widgets.run_picker()
    widgets.running_jobs()
    st.caption("Charts: the camera icon above each chart downloads it as PNG. Tables have CSV buttons.")
state.write_url()  # now too: a page may stop early (e.g. while a job runs) and the link must name its run
try:
    with navigation.framed(), widgets.errors_shown():
        page.run()
finally:
    state.write_url()
