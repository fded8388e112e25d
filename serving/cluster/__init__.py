"""The Ray side: deployments, ingress, registry, hot-load coordinator, replica pool, metrics."""
