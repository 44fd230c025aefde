"""Where connectors come from (a directory of YAML, or a Kubernetes cluster) and what clients get rendered."""
