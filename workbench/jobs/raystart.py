"""``ray start`` for a loopback-only local Ray cluster (``python -m workbench.jobs.raystart``).

Ray 2.60's CLI passes ``--node-ip-address 127.0.0.1`` and the ``--address`` host through
``ray._private.services.resolve_ip_for_localhost``, which turns ``127.0.0.1`` into the machine's
routable address; its servers then listen on every interface. And with
``--include-dashboard=false`` the head still starts a dashboard process that queries cloud
metadata addresses and the usage-stats server. This launcher keeps the address as given and does
not start that process. Both touch Ray internals, so it checks they are there (and
:func:`workbench.jobs.cluster.start_local_cluster` checks every listening socket afterwards)
and refuses loudly otherwise. Used by the tests and the benchmark; a real cluster is started
with Ray's own ``ray start``.
"""

from __future__ import annotations

import sys

SUPPORTED = "2.60"


def main() -> None:
    import ray
    import ray._private.node as node
    import ray._private.services as services

    missing = [
        name
        for owner, name in ((services, "resolve_ip_for_localhost"), (node.Node, "start_api_server"))
        if not hasattr(owner, name)
    ]
    if missing or not ray.__version__.startswith(SUPPORTED):
        sys.exit(
            f"workbench.jobs.raystart: Ray {ray.__version__} is not the {SUPPORTED} this launcher "
            f"patches (missing: {', '.join(missing) or 'none'}); install the locked ray"
        )
    services.resolve_ip_for_localhost = lambda host: host

    def no_api_server(self, *, include_dashboard, raise_on_failure):  # type: ignore[no-untyped-def]
        if include_dashboard:
            raise SystemExit("workbench.jobs.raystart: use it with --include-dashboard=false")
        self._webui_url = None

    node.Node.start_api_server = no_api_server  # type: ignore[method-assign]
    from ray.scripts.scripts import main as ray_main

    sys.argv[0] = "ray"
    ray_main()


if __name__ == "__main__":
    main()
