"""Order tasks: shipping labels from a rate-limited, breaker-protected shipping API."""

import time

from celery import shared_task

from celery_tuning import circuit_breaker, rate_limit


@shared_task
@rate_limit("shipping-api")
@circuit_breaker("shipping-api")
def create_label(order_id: int) -> str:
    time.sleep(0.01)  # the shipping API call
    return f"LABEL-{order_id:05d}"
