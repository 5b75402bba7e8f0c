"""Supervision (OTP semantics) arrives with the supervision issue.

Until then a conversation actor is restarted in place by Ray (``actor_max_restarts``),
re-runs its constructor and rebuilds its history from the store on first use.
"""

__all__: list[str] = []
