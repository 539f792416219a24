"""What the app runs on top of the library: many users over one model (``workspace``),
the workflows of its pages (``workflows``: one fact with its checks, batches,
comparisons), fact suggestions (``suggest``), uploads (``uploads``), Plotly figures
(``figures``) and the anatomy of an edit for the Learn page (``anatomy``).

The library (``emmet_core``) never imports from here; ``figures`` needs the ``app``
extra (``pip install emmet-studio[app]``).
"""
