"""Framework integrations behind optional extras (``pip install redis-distkit[celery]``).

The core packages never import these modules; each imports its framework when imported.
"""
