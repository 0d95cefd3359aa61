"""The OpenAI-compatible HTTP server: `create_app(backend)` in app.py (needs fastapi)."""
