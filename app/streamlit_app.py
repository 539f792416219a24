"""EMMET Studio: edit facts inside a language model and see what the edit did.

Run from the repository root: ``streamlit run app/streamlit_app.py`` (or ``make run``).
This entry point only sets up the page, the model picker and the navigation; each page
is a script in ``app/app_pages/``.
"""

import streamlit as st

from app_pages import classroom, common

st.set_page_config(page_title="EMMET Studio", page_icon=":material/edit_note:", layout="wide")
common.init_state()

pages = [
    st.Page("app_pages/edit.py", title="Edit", icon=":material/edit:", default=True),
    st.Page("app_pages/history.py", title="History", icon=":material/history:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("app_pages/batch.py", title="Batch", icon=":material/table_rows:"),
    st.Page("app_pages/lifelong.py", title="Lifelong", icon=":material/timeline:"),
    st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
]
page = st.navigation(pages)
with st.sidebar:
    st.markdown("### EMMET Studio")
common.model_picker()
common.judgement_settings()
current = common.session()
common.sidebar_status(current)
classroom.lecture_toggle()
classroom.projector_css()
classroom.prepare_panel(current)
page.run()
