"""Publishable results from a tracked study: ``runs`` (the MLflow store, read only), ``tracked`` (the
study model: trials frame, metrics, objective), ``axes`` (what to group by, bins of sampled axes),
``selection`` (``compare``'s ``r=8,targets=qv``), ``stats`` (seed intervals, paired bootstrap,
importances), ``tables``, ``plots`` and ``html_report`` (one offline HTML).

Only ``runs`` touches MLflow; everything after it works on pandas frames and numpy arrays.
"""
