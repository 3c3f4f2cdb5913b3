from django.db import models


class Order(models.Model):
    class Status(models.TextChoices):
        NEW = "new"
        SUBMITTED = "submitted"
        FULFILLED = "fulfilled"

    customer = models.CharField(max_length=100)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.NEW)
    submitted_at = models.DateTimeField(null=True, blank=True)
