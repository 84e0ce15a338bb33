"""Production on one or a few GPU hosts: Docker Compose (``compose.yml``), and what renders its configs."""
