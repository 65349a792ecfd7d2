"""``openelm-mlx serve``: an OpenAI-compatible HTTP server on the engine.

Layout: ``protocol`` turns request bodies into engine requests (and names the field at fault),
``worker`` owns the engines in one thread and steps them, ``app`` holds the Starlette routes,
``metrics`` the Prometheus counters, ``cli`` the command line.
"""
