"""Session state shared through the URL: the run, the selected test image and the influence settings.

Session state keys: ``run`` (a run reference: a name under the runs root or an absolute path),
``settings`` (:class:`InfluenceSettings`), ``test`` (selected test position), ``reviewer``.
"""

from __future__ import annotations

import streamlit as st

from influence_core.pipeline import (
    DEFAULT_SETTINGS,
    InfluenceSettings,
)

URL_KEYS = ("run", "test")


def settings() -> InfluenceSettings:
    return st.session_state.get("settings", DEFAULT_SETTINGS)


def read_url() -> None:
    """Copy ``run`` and ``test`` from the URL into the session once, so a shared link reopens the same view."""
    if st.session_state.get("_url_read"):
        return
    st.session_state["_url_read"] = True
    params = st.query_params
    if params.get("run"):
        st.session_state["run"] = params["run"]
    if params.get("test", "").isdigit():
        st.session_state["test"] = int(params["test"])


def write_url() -> None:
    """Mirror the session's ``run`` and ``test`` into the URL (page switches clear it)."""
    for key in URL_KEYS:
        value = st.session_state.get(key)
        if value is None:
            st.query_params.pop(key, None)
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)
