"""desktop-gateway: a full Linux desktop in the browser for every student and teacher."""

__version__ = "0.1.0"
