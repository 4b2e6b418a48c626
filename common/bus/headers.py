"""Header names Spool sets on messages; one place so the CLI and the runner agree.

Every one starts with ``PREFIX``. They are believed only on deliveries from Spool's own broker
users (``common.bus.admission``): from anyone else they are ignored, and dropped from copies.
"""

PREFIX = "x-spool-"
ATTEMPT = "x-spool-attempt"  # 1 on first delivery; the runner increments it on each retry
ROUTING_KEY = "x-spool-routing-key"  # original routing key (retries arrive under the queue name)
REASON = "x-spool-reason"  # reason code of the last failure
ERROR = "x-spool-error"  # human text of the last failure
ATTEMPTS = "x-spool-attempts"  # attempts made when dead-lettered
DAEMON = "x-spool-daemon"
HOST = "x-spool-host"
TIME = "x-spool-time"  # ISO time of dead-lettering
QUEUE = "x-spool-queue"  # work queue the message came from (where `dead retry` sends it back)
# On Spool's copies of a delivery (retry tiers, dead letters, revivals): the AMQP user_id of the
# original publisher ("" when it set none). Decides what the copy may do (common.bus.admission).
SENDER = "x-spool-sender"
