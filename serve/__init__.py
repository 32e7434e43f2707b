"""The Ray Serve application (``serve.app``) and its HTTP API and page (``serve.api``)."""
