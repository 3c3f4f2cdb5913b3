"""The example's tests: `python manage.py test` against PostgreSQL and Redis.

TransactionTestCase, not TestCase: these transactions really commit, so
on_commit callbacks run as they do in production.
"""

import celery
import redis
import sqlalchemy as sa
from celery_dedup import DedupTask, LockLostError
from celery_dedup.config import get_config
from celery_dedup.django import sqlalchemy_connection
from celery_dedup.exceptions import OutboxError
from celery_dedup.outbox import Outbox
from django.conf import settings
from django.db import connection, transaction
from django.db.transaction import TransactionManagementError
from django.test import Client, TransactionTestCase
from django.urls import reverse

from proj.celery import app

from .models import Order
from .tasks import email_receipt, fulfil_order

#: Run with CELERY_TASK_CLS=celery_dedup:DedupTask: every task is a DedupTask.
APP_WIDE = issubclass(app.Task, DedupTask)
#: The tasks that deduplicate: base=DedupTask always, the others app-wide only.
DEDUP_TASKS = [fulfil_order, *([email_receipt] if APP_WIDE else [])]
QUEUE = settings.CELERY_TASK_DEFAULT_QUEUE
PREFIX = settings.CELERY_DEDUP_KEY_PREFIX


class Rollback(Exception):
    pass


class BrokerTestCase(TransactionTestCase):
    """Counts what reached the broker (Redis: the queue is a list) and leaves
    no message and no dedup key behind."""

    def setUp(self):
        self.broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        self.dedup = redis.Redis.from_url(settings.CELERY_DEDUP_REDIS_URL)
        self.addCleanup(self.broker.close)
        self.addCleanup(self.dedup.close)
        self.addCleanup(self.clean)
        self.clean()

    def clean(self):
        self.broker.delete(QUEUE)
        for key in self.dedup.scan_iter(f"{PREFIX}:*"):
            self.dedup.delete(key)

    def queued(self):
        return self.broker.llen(QUEUE)

    def claims(self):
        return sorted(self.dedup.scan_iter(f"{PREFIX}:*:claim"))


class DoubleClickTests(BrokerTestCase):
    def test_a_double_click_enqueues_one_task(self):
        order = Order.objects.create(customer="ada")
        browser = Client(enforce_csrf_checks=True)
        page = browser.get(reverse("order", args=[order.pk]))
        self.assertContains(page, "Place order")
        url = reverse("submit-order", args=[order.pk])
        token = {"X-CSRFToken": browser.cookies["csrftoken"].value}
        first = browser.post(url, headers=token)
        second = browser.post(url, headers=token)
        self.assertEqual((first.status_code, second.status_code), (202, 202))
        self.assertEqual(second.json(), {"order": order.pk, "status": "submitted"})
        self.assertEqual(self.queued(), 1)  # the second call was deduplicated
        (claim,) = self.claims()  # named with CELERY_DEDUP_KEY_PREFIX
        self.assertTrue(claim.startswith(f"{PREFIX}:".encode()))
        key = fulfil_order.dedup_key_for((order.pk,))
        self.assertIn(key.encode(), claim)
        self.assertTrue(0 < self.dedup.pttl(claim) <= 600_000)  # CELERY_DEDUP_TTL

    def test_a_failed_request_enqueues_nothing(self):
        response = self.client.post(reverse("submit-order", args=[404]))
        self.assertEqual(response.status_code, 404)
        self.assertEqual(self.queued(), 0)


class SettingsTests(TransactionTestCase):
    def test_the_celery_dedup_settings_are_read(self):
        config = get_config(app)
        self.assertEqual(config.key_prefix, PREFIX)
        self.assertEqual(config.redis_url, settings.CELERY_DEDUP_REDIS_URL)
        self.assertEqual(config.ttl, 600)
        self.assertEqual(config.outbox_table, "orders_outbox")


class OnCommitTests(BrokerTestCase):
    def test_the_task_classes(self):
        self.assertIsInstance(fulfil_order, DedupTask)
        self.assertEqual(isinstance(email_receipt, DedupTask), APP_WIDE)
        if not APP_WIDE and celery.VERSION >= (5, 4):
            # Celery's Django fixup made the plain tasks DjangoTasks.
            from celery.contrib.django.task import DjangoTask  # noqa: PLC0415

            self.assertIsInstance(email_receipt, DjangoTask)

    def test_delay_on_commit_publishes_after_the_commit(self):
        for task in DEDUP_TASKS:
            with self.subTest(task=task.name):
                order = Order.objects.create(customer="ada")
                with transaction.atomic():
                    task.delay_on_commit(order.pk)
                    task.delay_on_commit(order_id=order.pk)  # the same job
                    self.assertEqual(self.queued(), 0)
                    self.assertEqual(self.claims(), [])
                self.assertEqual(self.queued(), 1)
                self.clean()

    def test_delay_on_commit_publishes_nothing_on_rollback(self):
        for task in DEDUP_TASKS:
            with self.subTest(task=task.name):
                order = Order.objects.create(customer="ada")
                with self.assertRaises(Rollback), transaction.atomic():
                    task.delay_on_commit(order.pk)
                    raise Rollback
                self.assertEqual(self.queued(), 0)
                self.assertEqual(self.claims(), [])  # and took no claim

    def test_apply_async_on_commit(self):
        for task in DEDUP_TASKS:
            with self.subTest(task=task.name):
                order = Order.objects.create(customer="ada")
                with transaction.atomic():
                    task.apply_async_on_commit((order.pk,), countdown=60)
                    task.apply_async_on_commit(kwargs={"order_id": order.pk})
                    self.assertEqual(self.queued(), 0)
                self.assertEqual(self.queued(), 1)  # the second one folded in
                with self.assertRaises(Rollback), transaction.atomic():
                    task.apply_async_on_commit((order.pk + 1,))
                    raise Rollback
                self.assertEqual(self.queued(), 1)
                self.assertEqual(len(self.claims()), 1)
                self.clean()

    def test_transaction_on_commit_with_a_lambda(self):
        order = Order.objects.create(customer="ada")
        results = []
        with transaction.atomic():
            for _ in range(2):
                transaction.on_commit(
                    lambda: results.append(fulfil_order.delay(order.pk))
                )
        self.assertEqual([r.deduplicated for r in results], [False, True])
        self.assertEqual(results[0].id, results[1].id)
        self.assertEqual(self.queued(), 1)


class OutboxTests(TransactionTestCase):
    """The outbox written through Django's connection, in its transaction."""

    def setUp(self):
        self.outbox = Outbox.from_app(app)
        self.addCleanup(self.empty_outbox)
        self.empty_outbox()

    def empty_outbox(self):
        # TransactionTestCase empties Django's tables only.
        with connection.cursor() as cursor:
            for table in self.outbox.tables:
                cursor.execute(f"DELETE FROM {table.name}")

    def events(self):
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT event_type, aggregate_id, payload::text "
                f"FROM {self.outbox.table_name} ORDER BY id"
            )
            return cursor.fetchall()

    def add(self, conn, aggregate_id, token):
        return self.outbox.add(
            conn, "order.noted", aggregate_id=aggregate_id, fence=("order:1", token)
        )

    def test_the_task_writes_its_event_with_the_order(self):
        order = Order.objects.create(customer="ada")
        fulfil_order(order.pk)
        fulfil_order(order.pk)  # a second run writes nothing more
        order.refresh_from_db()
        self.assertEqual(order.status, Order.Status.FULFILLED)
        payload = f'{{"order_id": {order.pk}, "customer": "ada"}}'
        self.assertEqual(
            [(t, a, p.replace(" ", "")) for t, a, p in self.events()],
            [("order.fulfilled", f"order:{order.pk}", payload.replace(" ", ""))],
        )
        # What the relay sees, through a connection of its own: committed.
        url = sa.engine.URL.create(
            "postgresql+psycopg2",
            username=connection.settings_dict["USER"],
            password=connection.settings_dict["PASSWORD"] or None,
            host=connection.settings_dict["HOST"],
            port=int(connection.settings_dict["PORT"]),
            database=connection.settings_dict["NAME"],
        )
        relay_side = Outbox(
            url.render_as_string(hide_password=False),
            table_name=self.outbox.table_name,
        )
        self.addCleanup(relay_side.close)
        self.assertEqual(relay_side.count_state("pending"), 1)

    def test_a_rollback_takes_the_event_with_it(self):
        order = Order.objects.create(customer="ada")
        with (
            self.assertRaises(Rollback),
            transaction.atomic(),
            sqlalchemy_connection() as conn,
        ):
            Order.objects.filter(pk=order.pk).update(status="fulfilled")
            self.assertTrue(self.add(conn, "order:1", 1))
            raise Rollback
        order.refresh_from_db()
        self.assertEqual(order.status, Order.Status.NEW)
        self.assertEqual(self.events(), [])

    def zombie_write(self, savepoint):
        """A write fenced with token 3 of a key that token 5 wrote for."""
        with transaction.atomic(savepoint=savepoint), sqlalchemy_connection() as conn:
            self.add(conn, "order:2", 3)

    def test_a_stale_fence_rolls_back_the_whole_django_transaction(self):
        with transaction.atomic(), sqlalchemy_connection() as conn:
            self.assertTrue(self.add(conn, "order:1", 5))
        for savepoint in (False, True):
            with self.subTest(savepoint=savepoint), transaction.atomic():
                Order.objects.create(customer="zombie")
                # A zombie execution, which even catches the error:
                with (
                    self.assertRaises(LockLostError),
                    self.assertLogs("celery_dedup.outbox", "WARNING"),
                ):
                    self.zombie_write(savepoint)
                with self.assertRaises(TransactionManagementError):
                    Order.objects.count()  # the block is marked for rollback
                with self.assertRaises(TransactionManagementError):
                    self.zombie_write(savepoint)
            self.assertEqual(Order.objects.count(), 0)
        self.assertEqual([a for _, a, _ in self.events()], ["order:1"])

    def test_only_inside_atomic_and_never_committed_by_sqlalchemy(self):
        with (
            self.assertRaisesMessage(OutboxError, "inside transaction.atomic"),
            sqlalchemy_connection(),
        ):
            pass
        with (
            self.assertRaisesMessage(OutboxError, "Django commits"),
            transaction.atomic(),
            sqlalchemy_connection() as conn,
        ):
            conn.get_transaction().commit()
        self.assertFalse(connection.in_atomic_block)
        self.assertEqual(self.events(), [])
