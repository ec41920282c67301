"""The app's pages (run by ``app.py`` through ``st.navigation``) and their shared helpers (:mod:`pages.ui`).

Streamlit treats a ``pages/`` folder beside the main script as an old-style (v1) multipage app until the
first ``st.navigation`` call; a deep link such as ``/review?run=…`` into a freshly started server would
then run the page script on its own, without ``app.py``. The first import switches Streamlit to
``st.navigation`` mode and reruns, so every link goes through ``app.py``.
"""

from streamlit.runtime.pages_manager import PagesManager

if PagesManager.uses_pages_directory:
    import streamlit as st
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    PagesManager.uses_pages_directory = False
    if get_script_run_ctx() is not None:
        st.rerun()
