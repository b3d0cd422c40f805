"""Beyond one machine: ``tokensteer serve --ray`` and ``tokensteer eval --ray`` on a Ray cluster.

``cluster`` joins a cluster (or starts a private local one), ``serve`` runs the server's app as a
Ray Serve deployment, ``eval`` spreads an evaluation's work units over Ray actors. Ray is an extra:
``pip install 'tokensteer[ray]'``; nothing here is imported unless ``--ray`` is given.
"""
