"""`walsync ui`: a local web dashboard over a store (runs, steps, cost, replication, health).

Read-only by default and bound to 127.0.0.1; it opens the store as a reader
beside a live writer. Standard library only; the page's HTML, CSS and script
ship in this package (``static/``), so nothing is fetched from elsewhere.
"""

from .dashboard import Dashboard, Response
from .server import DashboardServer, serve

__all__ = ["Dashboard", "DashboardServer", "Response", "serve"]
