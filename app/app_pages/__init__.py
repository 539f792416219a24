"""EMMET Studio pages. ``common`` holds what they share; the page scripts are run by
``st.navigation`` in ``app/streamlit_app.py`` (whose folder Streamlit puts on the path)."""
