"""Deployment of fedpeft experiments across machines (``fedpeft.deploy.flower``: on Flower)."""
