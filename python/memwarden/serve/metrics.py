"""Prometheus metrics, named in the ``memwarden:`` style inference engines use
(``memwarden:kv_cache_usage_perc``, ``memwarden:num_requests_running``, ...): gauges and
counters fed by the controller's events and the monitor's samples, exposed at ``/metrics``.

May import: prometheus_client, :mod:`memwarden.controller` and the bottom layers. Never
:mod:`memwarden.cli`.
"""
