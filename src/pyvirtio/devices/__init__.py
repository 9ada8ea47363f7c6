"""Virtio devices served over vhost-user."""
