"""The app's pages (run by ``app.py`` through ``st.navigation``) and their shared helpers (:mod:`pages.ui`).

Each page script calls :func:`pages.ui.runs.current_run` first, which makes sure it runs inside ``app.py``
(see :mod:`pages.ui.navigation` for why a page may start on its own).
"""
