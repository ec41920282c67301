"""Before and after: what correcting labels bought, for a run made from review decisions."""

import streamlit as st

from influence_core.fixes import lineage
from pages.ui import fixes, runs

run = runs.current_run()
st.title("Before and after")
if lineage(run) is not None:
    fixes.compare_view(run)
else:
    children = fixes.children_of(run)
    if children:
        st.markdown("This run has corrected versions. Open one to see what the corrections changed:")
        for path in children:
            if st.button(f"Open {path.name}", key=f"open-{path.name}"):
                runs.select_run(path)
                st.rerun()
    else:
        st.info(
            "This run was trained on the labels as given. Review suspected mislabels, then press "
            "*Retrain with N decisions* on the Mislabel review page: the corrected model appears here, "
            "side by side with this one."
        )
        st.page_link("pages/review_queue.py", label="Review suspected mislabels", icon=":material/fact_check:")
    fixes.exports(run)
