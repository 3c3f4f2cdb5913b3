from celery import shared_task
from celery_dedup import DedupTask
from celery_dedup.django import sqlalchemy_connection
from celery_dedup.outbox import Outbox
from django.db import transaction

from .models import Order


@shared_task(base=DedupTask, bind=True, dedup_key=("order_id",))
def fulfil_order(self, order_id):
    """Fulfil an order and announce it: one order.fulfilled event, written in
    the same transaction as the order (the worker's relay publishes it)."""
    outbox = Outbox.from_app(self.app)
    with transaction.atomic(), sqlalchemy_connection() as conn:
        order = Order.objects.select_for_update().get(pk=order_id)
        if order.status == Order.Status.FULFILLED:
            return  # a later submission of a fulfilled order
        order.status = Order.Status.FULFILLED
        order.save(update_fields=["status"])
        outbox.add(
            conn,
            "order.fulfilled",
            aggregate_id=f"order:{order.pk}",
            payload={"order_id": order.pk, "customer": order.customer},
        )


@shared_task(bind=True, dedup_key=("order_id",))
def email_receipt(self, order_id):
    """A task without base=: a DedupTask (deduplicated by its dedup_key) when
    the app runs with CELERY_TASK_CLS=celery_dedup:DedupTask, else a plain
    Celery task, for which dedup_key means nothing."""
