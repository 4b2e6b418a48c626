"""monitor: consumes every event and heartbeat; serves Prometheus metrics, ``/api/status`` and a
live dashboard; groups failures by reason so the root cause stands out."""
