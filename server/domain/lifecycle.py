"""The words of a payment's lifecycle, as the API and the database both spell them.

A payment is created PENDING and leaves it exactly once: to SUCCESS (confirmed by an admin) or
to FAILED, with the reason CANCELLED (by its payer or an admin) or EXPIRED (by the expiry job,
at expires_at). Kept apart from the rules so that storage's queries can name them too.
"""

PENDING, SUCCESS, FAILED = "pending", "success", "failed"
STATUSES = (PENDING, SUCCESS, FAILED)
CANCELLED, EXPIRED = "cancelled", "expired"
