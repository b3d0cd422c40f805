"""``tokensteer serve``: an OpenAI-compatible HTTP server with per-request formulas, steering and
constraints (the ``tokensteer`` request object), on the engine's continuous batching, with a web
playground at ``/``. See docs/server.md.

    from tokensteer.server import Settings, create_app
    app = create_app(tokensteer.load(None), Settings(api_key="secret"))
"""

from tokensteer.server.app import ServerContext, Settings, create_app
from tokensteer.server.limits import Limits

__all__ = ["Limits", "ServerContext", "Settings", "create_app"]
