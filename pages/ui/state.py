"""Session state shared through the URL: the run, the selected test image and the influence settings.

Session state keys: ``run`` (a run reference: a path relative to a run root, see :mod:`.runs`),
``settings`` (:class:`InfluenceSettings`), ``test`` (selected test position), ``reviewer`` (the name review
decisions are saved under; in the URL so that a reload or a bookmark keeps it).
"""

from __future__ import annotations

import streamlit as st

from influence_core.pipeline import (
    DEFAULT_SETTINGS,
    InfluenceSettings,
)

URL_KEYS = ("run", "test", "reviewer")


def settings() -> InfluenceSettings:
    return st.session_state.get("settings", DEFAULT_SETTINGS)


def read_url() -> None:
    """Copy ``run``, ``test`` and ``reviewer`` from the URL into the session once, so a link reopens the same view."""
    if st.session_state.get("_url_read"):
        return
    st.session_state["_url_read"] = True
    params = st.query_params
    if params.get("run"):
        st.session_state["run"] = params["run"]
    if params.get("test", "").isdigit():
        st.session_state["test"] = int(params["test"])
    if params.get("reviewer", "").strip():
        st.session_state["reviewer"] = params["reviewer"].strip()


def write_url() -> None:
    """Mirror the session's ``run``, ``test`` and ``reviewer`` into the URL (page switches clear it)."""
    for key in URL_KEYS:
        value = st.session_state.get(key)
        if value is None or value == "":
            st.query_params.pop(key, None)
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)
