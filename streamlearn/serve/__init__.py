"""Use the models: a loopback server for the pool of best models (pool.py), a bandit that
routes requests and learns from feedback (bandit.py), and the HTTP APIs and page (server.py)."""
