from django.urls import path

from orders import views

urlpatterns = [
    path("orders/<int:order_id>", views.order_page, name="order"),
    path("orders/<int:order_id>/submit", views.submit_order, name="submit-order"),
]
