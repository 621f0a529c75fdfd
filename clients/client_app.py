"""``flwr run .`` loads the ClientApp from here (``[tool.flwr.app.components]`` in pyproject.toml), as in
Flower's examples. It is fedseg's own, :mod:`fedseg.clients.client_app`: the wheel installs only ``fedseg``,
so an installed fleet names ``fedseg.clients.client_app:app`` instead (``fedseg-sim`` does)."""

from fedseg.clients.client_app import app

__all__ = ["app"]
