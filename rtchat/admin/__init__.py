"""The admin pages: this node, the cluster, its clients and its Redis health at a glance.

``handlers`` (HTTP: auth, page, status JSON, live events, disconnect) ·
``status`` (the snapshot document) · ``pictures`` (topology and sparkline
layout) · ``sampler`` (messages per second) · ``access`` (who may enter).
``make_app`` mounts ``handlers.admin_routes`` only when ``admin.enabled``.
"""
