"""The explorer: a local web page over one model and its SAEs (``analyze.py serve``).

``explorer`` answers the page's questions (prompt -> features, cards, side-by-side
generation, export), ``model_worker`` runs everything that touches the model on one thread,
``app`` is the web application (routes, token, limits), ``assets/`` the page itself.
"""
