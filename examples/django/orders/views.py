from django.db import transaction
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from .models import Order
from .tasks import fulfil_order


def order_page(request, order_id):
    """The order, with its "Place order" button."""
    order = get_object_or_404(Order, pk=order_id)
    return render(request, "orders/order.html", {"order": order})


@require_POST
def submit_order(request, order_id):
    """The "Place order" button: a double click POSTs twice, and both requests
    enqueue fulfil_order; celery-dedup publishes the second one not at all."""
    with transaction.atomic():
        order = get_object_or_404(Order, pk=order_id)
        if order.status == Order.Status.NEW:
            order.status = Order.Status.SUBMITTED
            order.submitted_at = timezone.now()
            order.save(update_fields=["status", "submitted_at"])
        # After the commit, so that the worker finds the order submitted (and
        # a rollback enqueues nothing); the same as
        # transaction.on_commit(lambda: fulfil_order.delay(order.pk)).
        fulfil_order.delay_on_commit(order.pk)
    return JsonResponse({"order": order.pk, "status": order.status}, status=202)
