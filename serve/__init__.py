"""The Ray Serve application (``serve.app``: deployments, ``AppArgs``, ``build_app``), its search
page and deploy config; the library side it deploys, without Ray, is ``oclear_ray.serve``."""
