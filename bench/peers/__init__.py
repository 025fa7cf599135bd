"""The servers the service is compared with, each serving the same checkpoint its own documented way.

``naive`` and ``litserve`` run in the service's bench venv (``.venv-serve``); ``triton``,
``mlserver_runtime``, ``bentoml_service`` and ``ray_app`` each in a venv of their own
(:mod:`bench.venvs`). All are started from the repository root by :mod:`bench.servers`.
"""
