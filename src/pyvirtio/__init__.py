"""pyvirtio: virtio devices in Python, served over vhost-user."""

__version__ = "0.1.0"
