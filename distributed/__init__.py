"""The sidecar: launch and control channel, worker loop, USP mechanics, models and sampling."""
