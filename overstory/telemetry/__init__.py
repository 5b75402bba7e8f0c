"""OpenTelemetry spans and Ray metrics arrive with the observability issue."""

__all__: list[str] = []
