"""Publishable results from a tracked study: ``reader`` (MLflow -> trials frame), ``stats`` (seed
intervals, paired bootstrap, importances), ``tables``, ``plots`` and ``report`` (one offline HTML).

Only ``reader`` touches MLflow; everything after it works on pandas frames and numpy arrays.
"""
