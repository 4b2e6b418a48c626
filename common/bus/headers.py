"""Header names Spool sets on messages; one place so the CLI and the runner agree."""

ATTEMPT = "x-spool-attempt"  # 1 on first delivery; the runner increments it on each retry
ROUTING_KEY = "x-spool-routing-key"  # original routing key (retries arrive under the queue name)
REASON = "x-spool-reason"  # reason code of the last failure
ERROR = "x-spool-error"  # human text of the last failure
ATTEMPTS = "x-spool-attempts"  # attempts made when dead-lettered
DAEMON = "x-spool-daemon"
HOST = "x-spool-host"
TIME = "x-spool-time"  # ISO time of dead-lettering
QUEUE = "x-spool-queue"  # work queue the message came from (where `dead retry` sends it back)
