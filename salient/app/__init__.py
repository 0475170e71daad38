"""The annotation web app: people label a build's (class, feature) pairs in a browser, and their
answers go to ``OUT/annotations/incoming/`` for ``salient ingest`` (see :mod:`salient.app.web`)."""

from salient.app.web import AppSettings, check_access, create_app, serve, settings_from_config, token_from_env

__all__ = ["AppSettings", "check_access", "create_app", "serve", "settings_from_config", "token_from_env"]
